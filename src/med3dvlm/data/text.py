"""Report text helpers: sentence splitting and the training-time report truncation of the paper.

Truncation (reference-facts §2): the first sentence is always kept, then other sentences are added while
the token budget allows. At training they are tried in random order (as the original does); at
evaluation in document order, so the result is deterministic. Kept sentences are output in document
order. The token counter is any callable, so this works with every tokenizer.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

from ..prompts import CAPTION_TEMPLATES

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9])")

# Report-generation instructions: one list for training and inference, our own wording (prompts.py).
CAPTION_PROMPTS = CAPTION_TEMPLATES


def split_sentences(text: str) -> list[str]:
    """Sentences of a report; splits after . ! ? followed by space and an upper-case letter or digit,
    so decimals such as "2.5 cm" stay whole."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def whitespace_tokens(text: str) -> int:
    """A tokenizer-free token count (words); good enough for budgets when no tokenizer is at hand."""
    return len(text.split())


def truncate_report(
    text: str,
    max_tokens: int,
    count_tokens: Callable[[str], int] = whitespace_tokens,
    rng: np.random.Generator | None = None,
) -> str:
    """Keep the first sentence, then add other sentences while the total stays within `max_tokens`.

    Args:
        count_tokens: number of tokens of a string, e.g. `lambda s: len(tokenizer(s).input_ids)`.
        rng: random order of the other sentences (training); None tries them in order (evaluation).
    """
    sentences = split_sentences(text)
    if not sentences:
        return ""
    if count_tokens(" ".join(sentences)) <= max_tokens:
        return " ".join(sentences)
    keep = {0}
    used = count_tokens(sentences[0])
    order = list(range(1, len(sentences)))
    if rng is not None:
        order = [order[i] for i in rng.permutation(len(order))]
    for i in order:
        cost = count_tokens(sentences[i])
        if used + cost <= max_tokens:
            keep.add(i)
            used += cost
    return " ".join(sentences[i] for i in sorted(keep))
