"""Closed- and open-ended VQA scoring for M3D-VQA, as Med3DVLM reported it and stricter.

Xin et al., IEEE JBHI 2025 (https://ieeexplore.ieee.org/document/11145341), `src/eval/eval_vqa.py` of the
original code (reference-facts §6.3): a closed-ended answer counts as correct when the string
``f"{answer_choice}."`` occurs *anywhere* in the generated text ("loose"). That credits "A. B. C. D." and
"... see B. above" alike, so `strict_correct` also scores the letter the model actually chose: a leading
letter ("B", "B.", "(B)", "B) ..."), else the only choice text the answer matches. Accuracy is given per
question type (1..5: Plane, Phase, Organ, Abnormality, Location), as their mean over types (the original
prints no overall number), and over all questions, each with a bootstrap interval. Open-ended answers use the
text metrics of `med3dvlm.metrics.nlg`, grouped per question type by `by_type`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..data.m3d import QUESTION_TYPES
from .nlg import bootstrap_ci

# The M3D-VQA question types, by the number the CSV uses (one table, in data.m3d).
QUESTION_TYPE_NAMES = QUESTION_TYPES

# A choice letter at the very start, alone or followed by punctuation: "B", "B.", "(B)", "B)", "B:", "B. liver".
# Not "A lesion ...": a capital A followed by a space is the article.
_LEADING_LETTER = re.compile(r"^\s*[\(\[]?([A-D])(?:[\.\):\]]|$)")
# "The answer is B" / "Answer: (C)" when the letter is not first; the letter itself must be a capital.
_ANSWER_IS = re.compile(r"\b(?i:answer)(?:\s+(?i:is))?\s*[:\-]?\s*[\(\[]?([A-D])(?![\w])")


def loose_correct(prediction: str, answer_choice: str) -> bool:
    """The original rule: `f"{answer_choice}."` is a substring of the prediction."""
    return f"{answer_choice}." in prediction


def chosen_letter(prediction: str, choices: Mapping[str, str] | None = None) -> str | None:
    """The choice the prediction commits to, or None when it names none (or several by text only).

    Order: a leading letter; "answer (is) X"; otherwise the choice whose text the whole prediction equals
    (case- and punctuation-insensitive), and then the single choice text contained in the prediction.
    """
    text = prediction.strip()
    match = _LEADING_LETTER.match(text)
    if match:
        return match.group(1)
    match = _ANSWER_IS.search(text)
    if match:
        return match.group(1)
    if not choices:
        return None
    norm = _normalize(text)
    options = {k: _normalize(v) for k, v in choices.items() if v and v != "NA" and _normalize(v)}
    exact = [k for k, v in options.items() if v == norm]
    if len(exact) == 1:
        return exact[0]
    contained = [k for k, v in options.items() if re.search(rf"(?<!\w){re.escape(v)}(?!\w)", norm)]
    # Several contained choices (e.g. "liver" inside "liver and spleen") are ambiguous: no answer.
    return contained[0] if len(contained) == 1 else None


def _normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", str(text).lower()).split())


def strict_correct(prediction: str, answer_choice: str, choices: Mapping[str, str] | None = None) -> bool:
    """True iff the letter the prediction chose (`chosen_letter`) is the right one."""
    return chosen_letter(prediction, choices) == answer_choice


def by_type(values: Sequence[float], question_types: Sequence[int]) -> dict[int, list[float]]:
    """Values grouped by question type, types in ascending order."""
    if len(values) != len(question_types):
        raise ValueError(f"{len(values)} values but {len(question_types)} question types")
    groups: dict[int, list[float]] = {}
    for v, t in zip(values, question_types):
        groups.setdefault(int(t), []).append(float(v))
    return dict(sorted(groups.items()))


def closed_vqa_metrics(
    predictions: Sequence[str],
    answer_choices: Sequence[str],
    question_types: Sequence[int],
    choices: Sequence[Mapping[str, str]] | None = None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Loose and strict closed-ended accuracy per type, mean over types and overall.

    Returns {"per_sample": {"loose": [0/1..], "strict": [..], "chosen": [letter|None..]},
             "loose"/"strict": {"by_type": {type: {"mean", "ci_low", "ci_high", "n"}}, "mean_over_types": float,
                                "overall": {"mean", "ci_low", "ci_high", "n"}}}.
    """
    n = len(predictions)
    if len(answer_choices) != n or len(question_types) != n or (choices is not None and len(choices) != n):
        raise ValueError("predictions, answer_choices, question_types (and choices) must have the same length")
    options = list(choices) if choices is not None else [None] * n
    chosen = [chosen_letter(p, c) for p, c in zip(predictions, options)]
    loose = [float(loose_correct(p, a)) for p, a in zip(predictions, answer_choices)]
    strict = [float(c == a) for c, a in zip(chosen, answer_choices)]
    out: dict[str, Any] = {"per_sample": {"loose": loose, "strict": strict, "chosen": chosen}}
    for name, values in (("loose", loose), ("strict", strict)):
        groups = {t: bootstrap_ci(v, n_resamples, confidence, seed) for t, v in by_type(values, question_types).items()}
        out[name] = {
            "by_type": groups,
            "mean_over_types": float(np.mean([g["mean"] for g in groups.values()])) if groups else float("nan"),
            "overall": bootstrap_ci(values, n_resamples, confidence, seed),
        }
    return out


def open_vqa_by_type(
    scores: Mapping[str, Sequence[float]],
    question_types: Sequence[int],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-type (the paper's layout) and overall means with CIs of per-sample text metrics.

    Returns {"by_type": {type: {metric: {"mean", "ci_low", "ci_high", "n"}}}, "overall": {metric: {...}}}.
    """
    types = sorted({int(t) for t in question_types})
    by: dict[int, dict[str, dict[str, float]]] = {t: {} for t in types}
    for metric, values in scores.items():
        for t, group in by_type(values, question_types).items():
            by[t][metric] = bootstrap_ci(group, n_resamples, confidence, seed)
    overall = {metric: bootstrap_ci(values, n_resamples, confidence, seed) for metric, values in scores.items()}
    return {"by_type": by, "overall": overall}
