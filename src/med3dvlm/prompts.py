"""Prompts and tokenization for the VLM, in the format of the original Med3DVLM (§4.3 of the reference).

No chat template is used. A prompt is the image placeholder tokens followed by the text:

- report generation: `<im_patch>` x N, then a caption instruction (no space in between);
- VQA: `<im_patch>` x N, a space, the question; closed-ended questions append
  " Choices: A. ... B. ... C. ... D. ..." and are answered "X. answer".

For training the answer follows the prompt after a space and ends with the EOS token; the labels are
-100 on the prompt (and on padding) so only the answer is learned.

Text is always tokenized as text (`VLMProcessor.text_ids`): a question or report that contains the
placeholder's spelling, or any other special token's, gets the ids of those characters, so only the
processor places image tokens and user text can never add or move image positions.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100
IMAGE_TOKEN = "<im_patch>"

# Instructions for report generation. The original draws from 42 such phrasings; these are our own.
CAPTION_TEMPLATES = (
    "Describe the findings of the medical image you see.",
    "Write a radiology report for this CT scan.",
    "What are the findings in this image?",
    "Please summarize the findings of this scan.",
    "Generate the findings section of a report for this volume.",
    "Give a description of what this CT shows.",
    "Report the imaging findings.",
    "Can you describe this scan in detail?",
    "Provide a concise report of the abnormalities in this image.",
    "Describe this image as a radiologist would.",
)
DEFAULT_CAPTION_PROMPT = CAPTION_TEMPLATES[0]


def closed_question(question: str, choices: dict[str, str]) -> str:
    """`question` with its choices appended as the original does: "Q Choices: A. a B. b C. c D. d"."""
    listed = " ".join(f"{letter}. {text}" for letter, text in choices.items())
    return f"{question} Choices: {listed}"


def closed_answer(letter: str, answer: str) -> str:
    return f"{letter}. {answer}"


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


class VLMProcessor:
    """Builds token ids for prompts and answers around a fixed number of image placeholder tokens."""

    def __init__(self, tokenizer: Any, num_image_tokens: int, max_length: int = 512, image_token: str = IMAGE_TOKEN) -> None:
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.image_token = image_token
        self.image_token_id = add_image_token(tokenizer, image_token)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token  # the original pads with the LM's own end-of-text
        if num_image_tokens >= max_length:
            raise ValueError(f"max_length {max_length} leaves no room for text after {num_image_tokens} image tokens")

    # -- prompts -------------------------------------------------------------------------------
    def text_ids(self, text: str) -> list[int]:
        """Token ids of `text` read as plain text: special tokens spelled in it are not those tokens.

        A question containing "<im_patch>" would otherwise add image positions the model has no features
        for (generation failed), and one containing the end-of-text token would end the prompt early.

        Raises:
            ValueError: the tokenizer still produced the image token (it cannot spell it as text).
        """
        ids = self._ids(text)
        if self.image_token_id in ids:
            # A tokenizer holding the placeholder as a plain (not special) added token: spell each occurrence
            # in two pieces, which no added token matches.
            token = self.image_token
            ids = []
            for i, piece in enumerate(text.split(token)):
                if i:
                    ids += self._ids(token[:1]) + self._ids(token[1:])
                ids += self._ids(piece) if piece else []
        if self.image_token_id in ids:
            raise ValueError(f"the text cannot be tokenized without the image token {self.image_token!r}; "
                             "remove it from the text")
        return ids

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids

    def prompt_ids(self, text: str, *, caption: bool = False) -> list[int]:
        """Image tokens, then the instruction (caption) or " " + question (VQA), the text as plain text."""
        text = text if caption else " " + text
        return [self.image_token_id] * self.num_image_tokens + self.text_ids(text)

    def caption_prompt(self, rng: random.Random | None = None) -> str:
        return rng.choice(CAPTION_TEMPLATES) if rng else DEFAULT_CAPTION_PROMPT

    # -- training ------------------------------------------------------------------------------
    def encode_example(self, prompt: str, answer: str, *, caption: bool = False) -> Encoded:
        """Ids of prompt + " " + answer + EOS, labels masked on the prompt; truncated to max_length."""
        prompt_ids = self.prompt_ids(prompt, caption=caption)
        answer_ids = self.text_ids(" " + answer.strip()) + [self.tokenizer.eos_token_id]
        ids = (prompt_ids + answer_ids)[: self.max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[: self.max_length]
        return Encoded(ids, labels)

    def collate(self, examples: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        """Right-padded training batch: input_ids, attention_mask, labels."""
        width = max(len(e.input_ids) for e in examples)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(examples), width), pad, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e.input_ids)
            ids[i, :n] = torch.tensor(e.input_ids)
            labels[i, :n] = torch.tensor(e.labels)
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    # -- generation ----------------------------------------------------------------------------
    def generation_batch(self, prompts: Sequence[str], *, caption: bool | Sequence[bool] = False) -> dict[str, torch.Tensor]:
        """Left-padded prompts, so every sequence ends where generation starts."""
        flags = [caption] * len(prompts) if isinstance(caption, bool) else list(caption)
        seqs = [self.prompt_ids(p, caption=c) for p, c in zip(prompts, flags)]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def add_image_token(tokenizer: Any, image_token: str = IMAGE_TOKEN) -> int:
    """Add the image placeholder as a special token if the tokenizer lacks it; return its id."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([image_token], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(image_token)
