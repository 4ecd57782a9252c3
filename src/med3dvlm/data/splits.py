"""Case-level splits for M3D-Cap, and the paper's split with its paths brought up to date.

A case is the folder holding a study's series (`M3D_Cap_npy/<collection>/<case>/`). The published
split puts different series of one case into train and test (BAAI-DCAI/M3D#38); `case_level_split`
assigns whole cases, so no case appears in two splits, and `find_leakage` reports any that do.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from pathlib import PurePosixPath

from .m3d import CAP_SPLITS

logger = logging.getLogger(__name__)


def case_of(image_path: str) -> str:
    """The case an item belongs to: the folder of its image."""
    return str(PurePosixPath(image_path.replace("\\", "/")).parent)


def case_level_split(
    items: list[dict[str, str]], fractions: tuple[float, float, float] = (0.9, 0.05, 0.05), seed: int = 0
) -> dict[str, list[dict[str, str]]]:
    """Split items into train/validation/test by case, deterministically for a seed.

    Each non-zero fraction gets at least one case when there are enough cases. Items keep their
    input order within a split.
    """
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
        raise ValueError(f"fractions must be three non-negative numbers, got {fractions}")
    by_case: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        by_case[case_of(item["image"])].append(i)
    cases = sorted(by_case)
    random.Random(seed).shuffle(cases)
    total = sum(fractions)
    n = len(cases)
    n_val = int(round(n * fractions[1] / total))
    n_test = int(round(n * fractions[2] / total))
    if n >= 3:
        n_val = max(n_val, 1 if fractions[1] > 0 else 0)
        n_test = max(n_test, 1 if fractions[2] > 0 else 0)
    n_test = min(n_test, n)
    n_val = min(n_val, n - n_test)
    assignment = {c: "test" for c in cases[:n_test]}
    assignment.update({c: "validation" for c in cases[n_test : n_test + n_val]})
    assignment.update({c: "train" for c in cases[n_test + n_val :]})
    out: dict[str, list[dict[str, str]]] = {s: [] for s in CAP_SPLITS}
    for i, item in enumerate(items):
        out[assignment[case_of(item["image"])]].append(item)
    return out


def find_leakage(splits: dict[str, list[dict[str, str]]]) -> dict[str, list[str]]:
    """Cases found in more than one of train/validation/test, with the splits they are in."""
    seen: dict[str, set[str]] = defaultdict(set)
    for split in CAP_SPLITS:
        for item in splits.get(split, []):
            seen[case_of(item["image"])].add(split)
    return {case: sorted(s) for case, s in sorted(seen.items()) if len(s) > 1}


def _normalise(image: str) -> str:
    # The paper's JSON says .npy; Med3DVLM's rename script made the CSVs say .nii.gz. Either maps to ours.
    path = image.replace("\\", "/")
    if path.endswith(".nii.gz"):
        path = path[: -len(".nii.gz")] + ".npy"
    return path


def rewrite_split(paper: dict[str, list[dict[str, str]]], available: set[str]) -> dict[str, list[dict[str, str]]]:
    """The published split with paths pointing at the files we wrote; items we do not have are dropped."""
    out: dict[str, list[dict[str, str]]] = {}
    for split in CAP_SPLITS:
        kept, dropped = [], 0
        for item in paper.get(split, []):
            image = _normalise(item["image"])
            if image in available:
                kept.append({"image": image, "text": str(PurePosixPath(image).parent / "text.txt")})
            else:
                dropped += 1
        if dropped:
            logger.warning("paper split %s: %d items have no prepared volume and were dropped", split, dropped)
        out[split] = kept
    leaks = find_leakage(out)
    if leaks:
        logger.warning("the paper's split puts %d case(s) in several splits (e.g. %s)", len(leaks), next(iter(leaks)))
    return out
