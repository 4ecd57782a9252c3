"""`prepare-m3d-cap`: raw M3D-Cap slice folders -> compact, memory-mappable volumes and a fresh JSON.

The conversion is the paper's (reference-facts §5.2): text from study_findings (else discussion),
slices sorted by integer file name, P-mode -> RGBA -> L, /255, only the most common slice shape kept,
min-max, crop foreground, trilinear resize to 128x256x256. Unlike the original it runs in worker
processes with a progress bar, resumes, checks every output (all-zero/constant volumes are flagged),
stores uint8 (or float16) `.npy` instead of float32 `.nii.gz`, and writes a JSON whose paths point at
what it wrote (the original's stay stale).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..fileio import write_atomic
from .m3d import CAP_JSON, CAP_SPLITS, extract_report_text, read_cap_json, write_cap_json
from .preprocess import DEFAULT_SIZE, foreground_box, minmax, resize
from .volume import VolumeError

logger = logging.getLogger(__name__)

NPY_DIR = "M3D_Cap_npy"
STORAGE_DTYPES = ("uint8", "float16")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")
LOG_NAME = "prepare_log.jsonl"


# ------------------------------------------------------------------------------- volume operations


def m3d_chain(array: np.ndarray, size: tuple[int, int, int] = DEFAULT_SIZE) -> np.ndarray:
    """The paper's volume chain on a (D, H, W) array: min-max -> crop foreground (> 0) -> trilinear resize."""
    scaled = minmax(array)
    box = foreground_box(scaled)
    if box is not None:
        scaled = scaled[box]
    tensor = resize(torch.from_numpy(np.ascontiguousarray(scaled)).unsqueeze(0), size)
    return tensor.squeeze(0).clamp_(0.0, 1.0).numpy()


def to_storage(array01: np.ndarray, dtype: str = "uint8") -> np.ndarray:
    """[0, 1] floats -> the compact on-disk dtype (uint8 rounds to 1/255: the sources are 8-bit anyway)."""
    if dtype == "uint8":
        return np.round(np.clip(array01, 0.0, 1.0) * 255.0).astype(np.uint8)
    if dtype == "float16":
        return np.asarray(array01, dtype=np.float16)
    raise ValueError(f"storage dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")


def from_storage(array: np.ndarray) -> np.ndarray:
    """Stored array -> float32 in [0, 1]; uint8 is scaled by 1/255, floats are taken as they are."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) * np.float32(1.0 / 255.0)
    return np.asarray(array, dtype=np.float32)


def check_volume(array: np.ndarray) -> str | None:
    """Why a prepared volume is unusable (all zero, constant, NaN), or None when it is fine."""
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        return "contains NaN or Inf"
    lo, hi = float(array.min()), float(array.max())
    if hi == 0 and lo == 0:
        return "all zero"
    if hi == lo:
        return f"constant ({lo:g})"
    return None


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a handle, so np.save does not append ".npy" to the temporary name
            np.save(fh, array)

    write_atomic(path, write)


# --------------------------------------------------------------------------------- slice folders


def read_slice_folder(folder: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Stack a folder of 2D slice images as the paper does; returns ((D, H, W) in [0, 1], slices dropped).

    Slices are sorted by the integer value of their file name; slices whose shape is not the most
    common one are dropped (counted, not silently).
    """
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise VolumeError(folder, "no slice images (an empty series)")
    try:
        files.sort(key=lambda p: int(p.stem))
    except ValueError:
        bad = next(p for p in files if not p.stem.lstrip("-").isdigit())
        raise VolumeError(bad, "slice file name is not an integer; M3D orders slices by int(name)") from None
    slices = []
    for path in files:
        try:
            with Image.open(path) as img:
                if img.mode == "P":
                    img = img.convert("RGBA")  # palette images need RGBA first or transparency is lost
                slices.append(np.asarray(img.convert("L"), dtype=np.float32) / 255.0)
        except (UnidentifiedImageError, OSError) as err:
            raise VolumeError(path, f"cannot read slice image ({err})") from None
    common = Counter(s.shape for s in slices).most_common(1)[0][0]
    kept = [s for s in slices if s.shape == common]
    if len(kept) < 2:
        raise VolumeError(folder, f"only {len(kept)} slice(s) of the common shape {common}; not a volume")
    return np.stack(kept), len(slices) - len(kept)


def write_slice_folder(folder: str | os.PathLike, array01: np.ndarray) -> Path:
    """Write a (D, H, W) volume in [0, 1] as 8-bit PNG slices named 0.png, 1.png, ... (the raw M3D-Cap form)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for k, plane in enumerate(to_storage(array01, "uint8")):
        Image.fromarray(plane, mode="L").save(folder / f"{k}.png", optimize=False, compress_level=1)
    return folder


# ------------------------------------------------------------------------------------ the command


def _single_thread() -> None:
    # Each worker is one of many processes; intra-op threads would only oversubscribe the CPUs.
    torch.set_num_threads(1)


def process_pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes started with "spawn": a forked child of a process that already ran torch ops
    can hang forever in torch's thread pool (seen here with the trilinear resize)."""
    import multiprocessing

    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_single_thread)


@dataclass
class SeriesJob:
    source: str  # slice folder
    image: str  # output .npy, relative to the output root
    text_source: str
    text: str  # output text.txt, relative to the output root


@dataclass
class SeriesResult:
    image: str
    text: str
    status: str  # "ok", "resumed", "flagged" or "failed"
    reason: str = ""
    dropped_slices: int = 0


def _safe_name(name: str) -> str:
    from unidecode import unidecode

    # The paper renames with unidecode so that paths are ASCII on every file system.
    return unidecode(name).replace("/", "_")


def discover_series(src_root: str | os.PathLike) -> Iterator[SeriesJob]:
    """Series folders under `src_root/<collection>/<case>/<series>/`, with the case's text.txt."""
    src_root = Path(src_root)
    for collection in sorted(p for p in src_root.iterdir() if p.is_dir()):
        for case in sorted(p for p in collection.iterdir() if p.is_dir()):
            text_source = case / "text.txt"
            rel_case = Path(NPY_DIR) / _safe_name(collection.name) / _safe_name(case.name)
            for series in sorted(p for p in case.iterdir() if p.is_dir()):
                yield SeriesJob(
                    source=str(series),
                    image=str(rel_case / f"{_safe_name(series.name)}.npy"),
                    text_source=str(text_source),
                    text=str(rel_case / "text.txt"),
                )


def _is_done(path: Path, size: tuple[int, int, int]) -> bool:
    try:
        return tuple(np.load(path, mmap_mode="r").shape) == tuple(size)
    except (OSError, ValueError, EOFError):
        return False


def process_series(job: SeriesJob, out_root: str, size: tuple[int, int, int], dtype: str, resume: bool) -> SeriesResult:
    """Convert one series folder; never raises, so one bad series cannot stop a long run."""
    out = Path(out_root)
    result = SeriesResult(image=job.image, text=job.text, status="ok")
    try:
        text_path = out / job.text
        if not text_path.exists():
            try:
                raw = Path(job.text_source).read_text(encoding="utf-8", errors="replace")
            except OSError as err:
                raise VolumeError(job.text_source, f"cannot read the report ({err.strerror})") from None
            report = extract_report_text(raw)
            if not report:
                raise VolumeError(job.text_source, "empty report")
            text_path.parent.mkdir(parents=True, exist_ok=True)
            text_path.write_text(report, encoding="utf-8")
        image_path = out / job.image
        if resume and _is_done(image_path, size):
            # Re-check: a flagged volume from an earlier run is on disk too and must stay out of the JSON.
            problem = check_volume(np.load(image_path, mmap_mode="r"))
            result.status, result.reason = ("flagged", problem) if problem else ("resumed", "")
            return result
        stack, result.dropped_slices = read_slice_folder(job.source)
        volume = to_storage(m3d_chain(stack, size), dtype)
        problem = check_volume(volume)
        save_npy_atomic(image_path, volume)
        if problem:
            result.status, result.reason = "flagged", problem
    except VolumeError as err:
        result.status, result.reason = "failed", str(err)
    return result


def prepare_m3d_cap(
    src_root: str | os.PathLike,
    out_root: str | os.PathLike,
    size: tuple[int, int, int] = DEFAULT_SIZE,
    dtype: str = "uint8",
    workers: int = 0,
    resume: bool = True,
    split: str = "case",
    paper_json: str | os.PathLike | None = None,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.9, 0.05, 0.05),
    progress: bool = True,
) -> dict[str, Any]:
    """Convert raw M3D-Cap slice folders; returns a summary (counts by status, the JSON written).

    Args:
        src_root: folder holding `<collection>/<case>/<series>/<n>.png` and `<collection>/<case>/text.txt`.
        out_root: where `M3D_Cap_npy/...`, `M3D_Cap.json` and `prepare_log.jsonl` are written.
        workers: processes; 0 picks one per CPU when there are enough series to pay for starting them.
        split: "case" (a case-level split, no case in two splits) or "paper" (the published
            `paper_json` split, with its paths rewritten to the files written here).
    """
    from .splits import case_level_split, rewrite_split

    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
    if split not in ("case", "paper"):
        raise ValueError(f"split must be 'case' or 'paper', got {split!r}")
    if split == "paper" and paper_json is None:
        raise ValueError("split='paper' needs paper_json, the published M3D_Cap.json")
    src_root, out_root = Path(src_root), Path(out_root)
    if not src_root.is_dir():
        raise VolumeError(src_root, "not a directory")
    jobs = list(discover_series(src_root))
    if not jobs:
        raise VolumeError(src_root, "no <collection>/<case>/<series>/ slice folders found")
    out_root.mkdir(parents=True, exist_ok=True)
    if not workers:
        # Spawned workers pay seconds of imports each; only worth it for enough series.
        workers = max(1, min(os.cpu_count() or 1, len(jobs) // 32))
    size = tuple(int(s) for s in size)  # type: ignore[assignment]
    results: list[SeriesResult] = []
    bar = tqdm(total=len(jobs), desc="prepare M3D-Cap", unit="series", disable=not progress)
    with open(out_root / LOG_NAME, "a", encoding="utf-8") as log:
        if workers == 1:
            stream: Iterator[SeriesResult] = (process_series(j, str(out_root), size, dtype, resume) for j in jobs)
            _collect(stream, results, log, bar)
        else:
            with process_pool(workers) as pool:
                stream = pool.map(process_series, jobs, *zip(*[(str(out_root), size, dtype, resume)] * len(jobs)), chunksize=4)
                _collect(stream, results, log, bar)
    bar.close()
    good = [{"image": r.image, "text": r.text} for r in results if r.status in ("ok", "resumed")]
    if split == "paper":
        splits = rewrite_split(read_cap_json(paper_json), {g["image"] for g in good})  # type: ignore[arg-type]
    else:
        splits = case_level_split(good, fractions=fractions, seed=seed)
    json_path = write_cap_json(out_root / CAP_JSON, splits)
    counts = Counter(r.status for r in results)
    for r in results:
        if r.status in ("flagged", "failed"):
            logger.warning("%s %s: %s", r.status, r.image, r.reason)
    return {
        "json": str(json_path),
        "log": str(out_root / LOG_NAME),
        "series": len(jobs),
        **{k: counts.get(k, 0) for k in ("ok", "resumed", "flagged", "failed")},
        "dropped_slices": sum(r.dropped_slices for r in results),
        "splits": {s: len(splits[s]) for s in CAP_SPLITS},
    }


def _collect(stream: Iterator[SeriesResult], results: list[SeriesResult], log: Any, bar: Any) -> None:
    for result in stream:
        results.append(result)
        log.write(json.dumps(asdict(result)) + "\n")
        bar.update(1)
        if result.status in ("flagged", "failed"):
            bar.set_postfix_str(f"{sum(r.status in ('flagged', 'failed') for r in results)} bad")
