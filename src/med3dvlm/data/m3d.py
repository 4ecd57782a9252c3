"""The M3D-Cap and M3D-VQA file formats, exactly as published (reference-facts §5).

M3D-Cap is one JSON, `M3D_Cap.json`, with keys train/validation/test and the test100/test500/test1k
subsets; each item is `{"image": "<rel>/<series>.npy", "text": "<rel>/text.txt"}`, relative to the
dataset root. M3D-VQA is a set of CSVs with the columns in `VQA_COLUMNS`; question types 1..5 are
Plane, Phase, Organ, Abnormality, Location, missing choices are 'NA', and the yes/no CSV has the same
columns. Paths read from these files are resolved inside the dataset root and never allowed out of it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd

from ..fileio import write_text_atomic
from .volume import VolumeError

logger = logging.getLogger(__name__)

CAP_JSON = "M3D_Cap.json"
CAP_SPLITS = ("train", "validation", "test")
TEST_SUBSETS = {"test100": 100, "test500": 500, "test1k": 1000}
VQA_DIR = "M3D-VQA"
VQA_FILES = {
    "train": "M3D_VQA_train.csv",
    "validation": "M3D_VQA_val.csv",
    "test": "M3D_VQA_test.csv",
    "test5k": "M3D_VQA_test5k.csv",
    "yn_train": "M3D_VQA_yn_train.csv",
}
VQA_COLUMNS = [
    "Image Path",
    "Text",
    "Question Type",
    "Question",
    "Choice A",
    "Choice B",
    "Choice C",
    "Choice D",
    "Answer",
    "Answer Choice",
]
QUESTION_TYPES = {1: "Plane", 2: "Phase", 3: "Organ", 4: "Abnormality", 5: "Location"}
CHOICE_LETTERS = ("A", "B", "C", "D")
NA = "NA"


class DatasetFormatError(ValueError):
    """A dataset file does not follow the M3D format; the message names the file and what is wrong."""


def resolve_in_root(root: str | os.PathLike, relative: str | os.PathLike) -> Path:
    """`root / relative`, refusing anything that lands outside `root` (``..``, absolute paths, symlinks)."""
    root_path = Path(root).resolve()
    target = (root_path / relative).resolve()
    if target != root_path and root_path not in target.parents:
        raise VolumeError(relative, f"escapes the dataset root {root_path}")
    return target


def extract_report_text(raw: str) -> str:
    """The report text the paper trains on: after "study_findings:", else after "discussion:", else all.

    A part counts as present when it has at least 5 non-space characters; newlines become spaces.
    Each part ends where the other marker starts, so findings never drag the discussion along.
    """
    markers = ("study_findings:", "discussion:")

    def part(marker: str) -> str | None:
        at = raw.find(marker)
        if at < 0:
            return None
        text = raw[at + len(marker) :]
        other = markers[1 - markers.index(marker)]
        if other in text:
            text = text[: text.index(other)]
        return text if len("".join(text.split())) >= 5 else None

    text = part("study_findings:") or part("discussion:") or raw
    return " ".join(text.replace("\n", " ").split())


def add_test_subsets(splits: dict[str, list[dict[str, str]]]) -> dict[str, list[dict[str, str]]]:
    """Add test100/test500/test1k: the first N items of `test` (as the M3D evaluation uses them)."""
    out = {k: v for k, v in splits.items() if k not in TEST_SUBSETS}
    for name, n in TEST_SUBSETS.items():
        out[name] = list(out.get("test", []))[:n]
    return out


def write_cap_json(path: str | os.PathLike, splits: dict[str, list[dict[str, str]]]) -> Path:
    """Write `M3D_Cap.json` with the three splits and the test subsets, atomically."""
    path = Path(path)
    missing = [s for s in CAP_SPLITS if s not in splits]
    if missing:
        raise ValueError(f"splits lack {', '.join(missing)}")
    payload = add_test_subsets(splits)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, json.dumps(payload, indent=1))


def read_cap_json(path: str | os.PathLike) -> dict[str, list[dict[str, str]]]:
    """Read and validate `M3D_Cap.json`: the three splits exist and every item has image and text."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetFormatError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetFormatError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise DatasetFormatError(f"{path}: expected an object with keys {', '.join(CAP_SPLITS)}")
    missing = [s for s in CAP_SPLITS if s not in data]
    if missing:
        raise DatasetFormatError(f"{path}: missing split(s) {', '.join(missing)}")
    for split, items in data.items():
        if not isinstance(items, list):
            raise DatasetFormatError(f"{path}: split {split!r} is not a list")
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not {"image", "text"} <= set(item):
                raise DatasetFormatError(f"{path}: {split}[{i}] needs 'image' and 'text' keys, got {item!r}")
    return data


def find_root(cap_json: str | os.PathLike, sample: str | None = None) -> Path:
    """The folder item paths are relative to: the JSON's folder, or its parent (the original layout,
    where M3D_Cap.json sits inside M3D_Cap_npy/ and items start with "M3D_Cap_npy/")."""
    folder = Path(cap_json).resolve().parent
    if sample is None or (folder / sample).exists() or not (folder.parent / sample).exists():
        return folder
    logger.info("%s: item paths are relative to %s (original M3D layout)", cap_json, folder.parent)
    return folder.parent


def read_vqa_csv(path: str | os.PathLike, nrows: int | None = None) -> pd.DataFrame:
    """Read an M3D-VQA CSV, checking the columns; missing choices become 'NA', types become ints."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, nrows=nrows, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise DatasetFormatError(f"{path}: no such file") from None
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise DatasetFormatError(f"{path}: not a readable CSV ({err})") from None
    missing = [c for c in VQA_COLUMNS if c not in frame.columns]
    if missing:
        raise DatasetFormatError(f"{path}: missing column(s) {', '.join(missing)}; M3D-VQA has {', '.join(VQA_COLUMNS)}")
    for col in ("Choice A", "Choice B", "Choice C", "Choice D"):
        frame[col] = frame[col].replace("", NA)
    try:
        frame["Question Type"] = frame["Question Type"].astype(int)
    except ValueError:
        raise DatasetFormatError(f"{path}: 'Question Type' must be an integer 1..5") from None
    bad = sorted(set(frame["Question Type"]) - set(QUESTION_TYPES))
    if bad:
        raise DatasetFormatError(f"{path}: unknown question type(s) {bad}; expected 1..5")
    return frame


def write_vqa_csv(path: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    """Write rows (dicts keyed by `VQA_COLUMNS`) as an M3D-VQA CSV, filling missing choices with 'NA'."""
    path = Path(path)
    frame = pd.DataFrame([{c: row.get(c, NA if c.startswith("Choice") else "") for c in VQA_COLUMNS} for row in rows], columns=VQA_COLUMNS)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def choice_columns(row: Any) -> dict[str, str]:
    """The non-NA choices of a VQA row as {"A": text, ...}."""
    return {letter: str(row[f"Choice {letter}"]) for letter in CHOICE_LETTERS if str(row[f"Choice {letter}"]) != NA}


def check_dataset(root: str | os.PathLike, load_images: bool = True) -> dict[str, Any]:
    """Check an M3D-format dataset folder; returns counts and raises `DatasetFormatError` on the first problem.

    Checks: the JSON validates; every image and text exists inside the root; images load as non-constant
    3D arrays; the VQA CSVs have the M3D columns; closed answers match their choice letter.
    """
    import numpy as np

    root = Path(root)
    splits = read_cap_json(root / CAP_JSON)
    counts: dict[str, Any] = {s: len(v) for s, v in splits.items()}
    cases: dict[str, set[str]] = {}
    for split in CAP_SPLITS:
        for item in splits[split]:
            image = resolve_in_root(root, item["image"])
            text = resolve_in_root(root, item["text"])
            if not image.exists() or not text.exists():
                raise DatasetFormatError(f"{root / CAP_JSON}: {split} item {item} points at a missing file")
            if not text.read_text().strip():
                raise DatasetFormatError(f"{text}: empty report")
            if load_images:
                arr = np.load(image, mmap_mode="r")
                if arr.ndim != 3 or float(arr.max()) == float(arr.min()):
                    raise DatasetFormatError(f"{image}: not a non-constant 3D volume (shape {arr.shape})")
            cases.setdefault(split, set()).add(str(Path(item["image"]).parent))
    for name in VQA_FILES.values():
        path = root / VQA_DIR / name
        if not path.exists():
            continue
        frame = read_vqa_csv(path)
        for row in frame.itertuples(index=False):
            values = dict(zip(VQA_COLUMNS, row))
            letter = values["Answer Choice"]
            if letter not in CHOICE_LETTERS or values[f"Choice {letter}"] != values["Answer"]:
                raise DatasetFormatError(f"{path}: answer {values['Answer']!r} is not choice {letter!r} in {values}")
            resolve_in_root(root, values["Image Path"])
        counts[name] = len(frame)
    counts["cases"] = {s: len(c) for s, c in cases.items()}
    return counts
