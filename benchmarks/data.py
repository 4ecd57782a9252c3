"""Data-layer benchmark: how fast training samples load and how fast raw slice folders are prepared.

Prints, in one run:
- training-sample load rate (samples/s, `ImageReportDataset` in eval mode) from the compact format
  (uint8 and float16 `.npy`, memory-mapped) and from float32 `.nii.gz` (the original Med3DVLM format);
- disk bytes per volume of each format;
- prepare throughput (volumes/s) of `prepare_m3d_cap` on generated PNG slice folders.

Volumes come from the phantom generator, so the run needs no data. Reads hit a warm page cache (the
files were just written), which is what repeated epochs see; cold-disk reads would be slower for all.

    python benchmarks/data.py --n 8 --size 128 256 256
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from med3dvlm.data import ImageReportDataset, write_phantom_dataset
from med3dvlm.data.m3d import CAP_JSON, write_cap_json
from med3dvlm.data.phantom import render_series, sample_case
from med3dvlm.data.prepare import from_storage, prepare_m3d_cap, write_slice_folder


def _load_rate(cap_json: Path, repeats: int) -> float:
    ds = ImageReportDataset(cap_json, split="train", train=False)
    ds[0]  # warm imports
    start = time.perf_counter()
    for _ in range(repeats):
        for i in range(len(ds)):
            ds[i]["image"].sum()
    return repeats * len(ds) / (time.perf_counter() - start)


def _variant(root: Path, name: str, items: list[dict[str, str]], convert) -> tuple[Path, float]:
    """Write every volume in another format under `root/name`; return its JSON and mean bytes per volume."""
    out_items, sizes = [], []
    for item in items:
        array = from_storage(np.load(root / item["image"]))
        rel = str(Path(name) / item["image"]).replace(".npy", convert.suffix)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        convert(array, root / rel)
        sizes.append((root / rel).stat().st_size)
        out_items.append({"image": rel, "text": item["text"]})
    path = root / f"{name}.json"
    write_cap_json(path, {"train": out_items, "validation": [], "test": []})
    return path, float(np.mean(sizes))


def _to_float16(array: np.ndarray, path: Path) -> None:
    np.save(path, array.astype(np.float16))


def _to_nii_gz(array: np.ndarray, path: Path) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.float32)), str(path), useCompression=True)


_to_float16.suffix = ".npy"  # type: ignore[attr-defined]
_to_nii_gz.suffix = ".nii.gz"  # type: ignore[attr-defined]


def _raw_folders(root: Path, n: int, size: tuple[int, int, int]) -> Path:
    """n phantom series as 8-bit PNG slice folders in the raw M3D-Cap layout."""
    src = root / "raw"
    for i in range(n):
        case = sample_case(i, 0)
        windowed, _, _ = render_series(case, case["series"][0]["plane"], grid=max(size[1:]))
        case_dir = src / "ct_case" / f"{i:06d}"
        write_slice_folder(case_dir / case["series"][0]["name"], windowed)
        (case_dir / "text.txt").write_text("study_findings: Phantom report for the benchmark.")
    return src


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8, help="volumes")
    parser.add_argument("--size", type=int, nargs=3, default=(128, 256, 256), help="D H W")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the volumes when timing loads")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args()
    size = tuple(args.size)
    workdir = Path(tempfile.mkdtemp(prefix="med3dvlm-bench-data-"))
    try:
        write_phantom_dataset(workdir, n=args.n, seed=0, size=size, fractions=(1.0, 0.0, 0.0), progress=False)
        items = json.loads((workdir / CAP_JSON).read_text())["train"]
        uint8_bytes = float(np.mean([(workdir / it["image"]).stat().st_size for it in items]))
        rows = [("uint8 .npy (ours, default)", workdir / CAP_JSON, uint8_bytes)]
        for name, fn, label in (("f16", _to_float16, "float16 .npy (ours)"), ("nii", _to_nii_gz, "float32 .nii.gz (original)")):
            path, nbytes = _variant(workdir, name, items, fn)
            rows.append((label, path, nbytes))
        results = [{"format": label, "samples_per_s": _load_rate(path, args.repeats), "bytes_per_volume": nbytes} for label, path, nbytes in rows]

        src = _raw_folders(workdir, args.n, size)
        prep = []
        for workers in sorted({1, os.cpu_count() or 1}):
            out = workdir / f"prepared_{workers}"
            start = time.perf_counter()
            summary = prepare_m3d_cap(src, out, size=size, workers=workers, resume=False, progress=False)
            seconds = time.perf_counter() - start
            assert summary["ok"] == args.n, summary
            prep.append({"workers": workers, "volumes_per_s": args.n / seconds, "seconds": seconds})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    d, h, w = size
    print(f"data benchmark: {args.n} phantom volumes of {d}x{h}x{w}, {os.cpu_count()} CPU(s), warm page cache\n")
    print(f"| {'format':<28} | {'load samples/s':>14} | {'MB per volume':>13} |")
    print(f"|{'-' * 30}|{'-' * 16}|{'-' * 15}|")
    for r in results:
        print(f"| {r['format']:<28} | {r['samples_per_s']:>14.1f} | {r['bytes_per_volume'] / 1e6:>13.2f} |")
    print(f"\n| {'prepare-m3d-cap (PNG folders)':<30} | {'volumes/s':>9} |")
    print(f"|{'-' * 32}|{'-' * 11}|")
    for p in prep:
        print(f"| {str(p['workers']) + ' worker(s)':<30} | {p['volumes_per_s']:>9.2f} |")
    if args.json:
        print(json.dumps({"size": list(size), "n": args.n, "load": results, "prepare": prep}, indent=2))


if __name__ == "__main__":
    main()
