"""Batching image-report pairs for the contrastive model: stacked volumes and tokenized reports.

Training (`med3dvlm.train.clip`) and retrieval evaluation (`med3dvlm.eval.retrieval`) batch the same
way, so both take these from here.
"""

from __future__ import annotations

from typing import Any

import torch


class ImageTextCollate:
    """Stack images and tokenize reports (padding to the longest, truncation to `max_length`).

    A class rather than a closure so DataLoader workers can pickle it.
    """

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(
            [it["text"] for it in items], max_length=self.max_length, truncation=True, padding=True, return_tensors="pt"
        )
        return {
            "images": torch.stack([it["image"] for it in items]),
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
        }


class TokenCounter:
    """Token count of a string with the model's tokenizer (for the paper's report truncation)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=True)["input_ids"])
