"""Controls that show whether a VLM's answers come from the image.

A falling loss, or a good score, can come from text priors alone ("most scans here are axial"). Three
controls separate that from reading the scan:

- `ImageAblation(dataset, "zero")`: every volume replaced by zeros. A grounded model falls to what the text
  alone allows;
- `ImageAblation(dataset, "swapped", donors)`: each volume replaced by another case's. A grounded model's
  answers follow the volume it was given (`follows_swapped`), not the question's own case;
- `text_prior_baseline`: the best image-free answer, the training set's most frequent answer to the same
  question text among the offered choices (by question type when the text is new). Ablated accuracy near
  it, and real accuracy far above it, is the evidence.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

ABLATIONS = ("real", "zero", "swapped")


def case_of(image_path: str) -> str:
    """The case an M3D image belongs to: its folder (`<source>/<case>/<series>.npy`)."""
    return Path(image_path).parent.as_posix()


def swap_partners(image_paths: Sequence[str], seed: int = 0) -> dict[str, str]:
    """A donor image from another case for every image: a seeded shuffle, each image paired with the next
    one in it that belongs to a different case."""
    unique = sorted(set(image_paths))
    if len({case_of(p) for p in unique}) < 2:
        raise ValueError("swapping volumes needs images of at least two cases")
    order = [unique[i] for i in np.random.default_rng(seed).permutation(len(unique))]
    donors = {}
    for k, path in enumerate(order):
        step = 1
        while case_of(order[(k + step) % len(order)]) == case_of(path):
            step += 1
        donors[path] = order[(k + step) % len(order)]
    return donors


class ImageAblation(Dataset):
    """A VQA or caption dataset with its volumes zeroed ("zero") or taken from another case ("swapped").

    Items keep their question and answer; "swapped" items also carry "donor_path", the image really shown.
    """

    def __init__(self, dataset: Any, mode: str, donors: Mapping[str, str] | None = None) -> None:
        if mode not in ABLATIONS:
            raise ValueError(f"mode must be one of {ABLATIONS}, got {mode!r}")
        if mode == "swapped" and donors is None:
            raise ValueError("the swapped ablation needs a donor for every image (swap_partners)")
        self.dataset, self.mode, self.donors = dataset, mode, donors or {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])
        if self.mode == "zero":
            item["image"] = torch.zeros_like(item["image"])
        elif self.mode == "swapped":
            from ..data.datasets import load_image
            from ..data.m3d import resolve_in_root

            base = getattr(self.dataset, "dataset", self.dataset)  # through a Subset
            donor = self.donors[item["image_path"]]
            item["image"] = load_image(resolve_in_root(base.root, donor), base.size, base.spec)
            item["donor_path"] = donor
        return item


def text_prior_baseline(train_rows: Sequence[Mapping[str, Any]], test_rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracy (%) of answering each test question from the training answers alone (see the module doc).

    Rows carry "question" (without the choices), "question_type", "answer", "answer_choice", "choices".
    """
    by_question: dict[str, Counter] = {}
    by_type: dict[int, Counter] = {}
    for r in train_rows:
        by_question.setdefault(str(r["question"]), Counter())[str(r["answer"])] += 1
        by_type.setdefault(int(r["question_type"]), Counter())[str(r["answer"])] += 1
    right = []
    for r in test_rows:
        counts = by_question.get(str(r["question"])) or by_type.get(int(r["question_type"]), Counter())
        offered = [(letter, text) for letter, text in sorted(r["choices"].items()) if text and text != "NA"]
        letter = max(offered, key=lambda lt: counts.get(lt[1], 0))[0] if offered else None
        right.append(letter == r["answer_choice"])
    return {"accuracy": round(100 * float(np.mean(right)), 2) if right else None, "n": len(right)}


def follows_swapped(swapped_rows: Sequence[Mapping[str, Any]], truth: Mapping[tuple[str, str], str]) -> dict[str, Any]:
    """How often an answer under the swap names the donor volume's true answer (%).

    Counted on questions the donor case was asked too (`truth[(image, question)]` = answer text), where the
    donor's answer is among the offered choices and differs from the question's own answer.
    """
    follows, counted = 0, 0
    for r in swapped_rows:
        donor_answer = truth.get((str(r["donor_path"]), str(r["question"])))
        if donor_answer is None or donor_answer == r["answer"] or donor_answer not in r["choices"].values():
            continue
        counted += 1
        chosen = r.get("chosen_letter")
        follows += chosen is not None and r["choices"].get(chosen) == donor_answer
    return {"follows_swapped": round(100 * follows / counted, 2) if counted else None, "n": counted}


def yes_no_metrics(predictions: Sequence[str], answers: Sequence[str]) -> dict[str, Any]:
    """Balanced accuracy, predicted and true yes-rates (%) of yes/no answers; an answer is read from its first word."""
    said = [_yes_no(p) for p in predictions]
    truth = [_yes_no(a) for a in answers]
    pos = [s == "yes" for s, t in zip(said, truth) if t == "yes"]
    neg = [s == "no" for s, t in zip(said, truth) if t == "no"]
    rates = [float(np.mean(x)) for x in (pos, neg) if x]
    return {
        "n": len(said),
        "balanced_accuracy": round(100 * float(np.mean(rates)), 2) if rates else None,
        "yes_rate": round(100 * sum(s == "yes" for s in said) / len(said), 2) if said else None,
        "true_yes_rate": round(100 * sum(t == "yes" for t in truth) / len(truth), 2) if truth else None,
        "unreadable": sum(s is None for s in said),
    }


def _yes_no(text: str) -> str | None:
    words = str(text).strip().lower().replace(".", " ").replace(",", " ").split()
    return words[0] if words and words[0] in ("yes", "no") else None
