"""Datasets for each training stage: image-report pairs (CLIP), captions and VQA (the VLM).

They are tokenizer-agnostic: items are dicts holding the image, a (1, D, H, W) float32 tensor, and raw
strings; the CLIP and VLM code tokenize. Evaluation is deterministic (seeded per index); training draws
its randomness from torch's generator, so `torch.manual_seed` and DataLoader worker seeding control it.

Bad items never get a silent random substitute (the original's behaviour): `on_error="raise"` stops
with the file and the reason, `on_error="skip"` logs the skip, counts it in `skipped`, and returns the
next item in order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..prompts import closed_answer, closed_question
from .m3d import CHOICE_LETTERS, QUESTION_TYPES, choice_columns, find_root, read_cap_json, read_vqa_csv, resolve_in_root
from .prepare import from_storage
from .preprocess import PreprocessSpec, preprocess, resize
from .readers import load_volume
from .text import CAPTION_PROMPTS, truncate_report, whitespace_tokens
from .volume import VolumeError

logger = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")


def train_transforms() -> Callable[[torch.Tensor], torch.Tensor]:
    """The paper's training augmentations through MONAI (reference-facts §2), in order."""
    from monai.transforms import Compose, RandFlip, RandRotate90, RandScaleIntensity, RandShiftIntensity, ToTensor

    return Compose(
        [
            RandRotate90(prob=0.5, spatial_axes=(1, 2)),  # rotations in the H-W (axial) plane only
            RandFlip(prob=0.10, spatial_axis=0),
            RandFlip(prob=0.10, spatial_axis=1),
            RandFlip(prob=0.10, spatial_axis=2),
            RandScaleIntensity(factors=0.1, prob=0.5),
            RandShiftIntensity(offsets=0.1, prob=0.5),
            ToTensor(dtype=torch.float32, track_meta=False),
        ]
    )


def load_image(path: str | os.PathLike, size: tuple[int, int, int] | None = None, spec: PreprocessSpec | None = None) -> torch.Tensor:
    """A model-ready (1, D, H, W) float32 image from a prepared file.

    Prepared `.npy` (uint8 -> /255, float16/float32 as stored) and the original's float32 `.nii.gz`
    are taken as already in [0, 1]; `spec`, when given, runs the full preprocessing instead (raw CT).
    """
    path = Path(path)
    if spec is not None:
        return preprocess(load_volume(path), spec)
    if path.suffix == ".npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise VolumeError(path, f"not a readable .npy array ({err})") from None
        if array.ndim == 4 and array.shape[0] == 1:
            array = array[0]
        if array.ndim != 3:
            raise VolumeError(path, f"expected a (D, H, W) volume, got shape {array.shape}")
        data = from_storage(np.asarray(array))
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            raise VolumeError(path, "contains NaN or Inf")
    else:
        data = np.asarray(load_volume(path).array, dtype=np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(data)).unsqueeze(0)
    return resize(tensor, size) if size is not None else tensor


class _VolumeDataset(Dataset):
    """Shared loading, path checking and the skip policy."""

    def __init__(
        self,
        root: Path,
        size: tuple[int, int, int] | None,
        train: bool,
        seed: int,
        on_error: str,
        spec: PreprocessSpec | None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None,
    ) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.root = Path(root)
        self.size = tuple(size) if size is not None else None
        self.train = train
        self.seed = seed
        self.on_error = on_error
        self.spec = spec
        self.transform = transform if transform is not None else (train_transforms() if train else None)
        self.skipped: list[tuple[int, str]] = []

    def _rng(self, index: int) -> np.random.Generator:
        if self.train:
            return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        return np.random.default_rng([self.seed, index])

    def _image(self, relative: str, rng: np.random.Generator) -> torch.Tensor:
        image = load_image(resolve_in_root(self.root, relative), self.size, self.spec)
        if self.transform is not None:
            if hasattr(self.transform, "set_random_state"):
                self.transform.set_random_state(seed=int(rng.integers(2**31)))
            image = torch.as_tensor(self.transform(image), dtype=torch.float32)
        return image

    def _item(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        for attempt in range(n):
            i = (index + attempt) % n
            try:
                return self._item(i)
            except (VolumeError, OSError, ValueError) as err:
                if self.on_error == "raise":
                    raise
                self.skipped.append((i, str(err)))
                logger.warning("skipped item %d (%d skipped so far): %s", i, len(self.skipped), err)
        raise RuntimeError(f"every one of the {n} items failed to load; last skips: {self.skipped[-3:]}")


def _resolve_cap(cap_json: str | os.PathLike, split: str, root: str | os.PathLike | None) -> tuple[list[dict[str, str]], Path]:
    data = read_cap_json(cap_json)
    if split not in data:
        raise KeyError(f"{cap_json}: no split {split!r}; available: {', '.join(data)}")
    items = data[split]
    base = Path(root) if root is not None else find_root(cap_json, items[0]["image"] if items else None)
    return items, base


class ImageReportDataset(_VolumeDataset):
    """Image-report pairs from M3D_Cap.json, for contrastive pre-training (stage 1).

    Items: {"image": (1, D, H, W), "text": report (truncated to `max_tokens` if given), "image_path", "index"}.
    """

    def __init__(
        self,
        cap_json: str | os.PathLike,
        split: str = "train",
        root: str | os.PathLike | None = None,
        size: tuple[int, int, int] | None = None,
        train: bool | None = None,
        max_tokens: int | None = None,
        count_tokens: Callable[[str], int] = whitespace_tokens,
        seed: int = 0,
        on_error: str = "raise",
        spec: PreprocessSpec | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.items, base = _resolve_cap(cap_json, split, root)
        super().__init__(base, size, split == "train" if train is None else train, seed, on_error, spec, transform)
        self.max_tokens = max_tokens
        self.count_tokens = count_tokens

    def __len__(self) -> int:
        return len(self.items)

    def _text(self, index: int, rng: np.random.Generator) -> str:
        item = self.items[index]
        path = resolve_in_root(self.root, item["text"])
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise VolumeError(path, f"cannot read the report ({err})") from None
        if not text:
            raise VolumeError(path, "empty report")
        if self.max_tokens is not None:
            text = truncate_report(text, self.max_tokens, self.count_tokens, rng if self.train else None)
        return text

    def _item(self, index: int) -> dict[str, Any]:
        rng = self._rng(index)
        item = self.items[index]
        return {"image": self._image(item["image"], rng), "text": self._text(index, rng), "image_path": item["image"], "index": index}

    def text_length(self, index: int) -> int:
        """Characters of the report, without loading the image (for length-grouped batches)."""
        try:
            return len(resolve_in_root(self.root, self.items[index]["text"]).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            return 0  # the item fails with its reason when it is loaded


class CaptionDataset(ImageReportDataset):
    """Report generation samples (stage 2/3): a caption prompt as the question, the report as the answer."""

    def __init__(self, *args: Any, prompts: tuple[str, ...] = CAPTION_PROMPTS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prompts = prompts

    def _item(self, index: int) -> dict[str, Any]:
        rng = self._rng(index)
        item = self.items[index]
        return {
            "image": self._image(item["image"], rng),
            "question": self.prompts[int(rng.integers(len(self.prompts)))],
            "answer": self._text(index, rng),
            "task": "caption",
            "image_path": item["image"],
            "index": index,
        }


class VQADataset(_VolumeDataset):
    """M3D-VQA samples (also the yes/no CSV). `mode="closed"` lists the choices in the question and
    answers "<letter>. <choice>" (the M3D format), or with the choice text alone when
    `closed_answer="text"`; `mode="open"` answers with the choice text.

    Why "text": a letter-first answer asks a small model to find the content in the image, find it among the
    choices and emit the letter before it, all in its first token. In short runs it then learns the letter from
    the question alone (teacher-forced loss with real and zeroed volumes: 0.288 vs 0.292), while the same model
    answers open questions from the image (0.46 vs 0.88). The strict scorer maps a choice text to its letter.
    """

    CLOSED_ANSWERS = ("letter", "text")

    def __init__(
        self,
        csv_path: str | os.PathLike,
        root: str | os.PathLike | None = None,
        mode: str = "closed",
        size: tuple[int, int, int] | None = None,
        train: bool = False,
        question_types: tuple[int, ...] | None = None,
        nrows: int | None = None,
        seed: int = 0,
        on_error: str = "raise",
        spec: PreprocessSpec | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        closed_answer: str = "letter",
    ) -> None:
        if mode not in ("open", "closed"):
            raise ValueError(f"mode must be 'open' or 'closed', got {mode!r}")
        if closed_answer not in self.CLOSED_ANSWERS:
            raise ValueError(f"closed_answer must be one of {self.CLOSED_ANSWERS}, got {closed_answer!r}")
        self.closed_answer = closed_answer
        frame = read_vqa_csv(csv_path, nrows=nrows)
        if question_types is not None:
            frame = frame[frame["Question Type"].isin(question_types)]
        self.rows = frame.reset_index(drop=True)
        # The CSVs sit in M3D-VQA/ beside M3D_Cap.json by default; paths are relative to that root.
        base = Path(root) if root is not None else Path(csv_path).resolve().parent.parent
        super().__init__(base, size, train, seed, on_error, spec, transform)
        self.mode = mode

    def __len__(self) -> int:
        return len(self.rows)

    def text_length(self, index: int) -> int:
        """Characters of question, choices (closed mode) and answer, without loading the image."""
        row = self.rows.iloc[index]
        choices = " ".join(str(v) for v in choice_columns(row).values()) if self.mode == "closed" else ""
        return len(str(row["Question"])) + len(choices) + len(str(row["Answer"]))

    def _item(self, index: int) -> dict[str, Any]:
        row = self.rows.iloc[index]
        choices = choice_columns(row)
        letter = str(row["Answer Choice"])
        question = str(row["Question"])
        if self.mode == "closed":
            question = closed_question(question, choices)
            answer = closed_answer(letter, str(row["Answer"])) if self.closed_answer == "letter" else str(row["Answer"])
        else:
            answer = str(row["Answer"])
        qtype = int(row["Question Type"])
        return {
            "image": self._image(str(row["Image Path"]), self._rng(index)),
            "question": question,
            "answer": answer,
            "question_type": qtype,
            "question_type_name": QUESTION_TYPES[qtype],
            "choices": {k: choices.get(k, "NA") for k in CHOICE_LETTERS},
            "answer_choice": letter,
            "task": f"vqa_{self.mode}",
            "image_path": str(row["Image Path"]),
            "index": index,
        }
