"""A procedurally generated CT-like dataset in exactly the M3D-Cap / M3D-VQA formats.

Each case is drawn from a seeded generator: a body region (abdomen, chest, head) with a body outline,
organs at plausible Hounsfield units, 0-2 lesions of one kind (cyst, mass, calcification, nodule,
hemorrhage) with a size and location, a contrast phase that changes how blood and organs enhance, and
one or two series in an acquisition plane (axial, coronal, sagittal). Volumes are rendered in HU, then
windowed to 8 bits as the Radiopaedia sources of M3D-Cap were, then stored by the very code that
`prepare-m3d-cap` uses. Reports and all five VQA question types are derived from the ground truth, so a
model can learn them. This is the default data of the quickstart, the tests and the benchmarks.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .m3d import CAP_JSON, VQA_DIR, VQA_FILES, write_cap_json, write_vqa_csv
from .phantom_text import report_text, vqa_rows, yes_no_rows
from .prepare import NPY_DIR, m3d_chain, process_pool, save_npy_atomic, to_storage
from .preprocess import apply_window, window_bounds
from .splits import case_level_split

PLANES = ("axial", "coronal", "sagittal")
# SimpleITK orientation codes: where the (W, H, D) index axes point for each acquisition plane.
PLANE_ORIENTATION = {"axial": "LPS", "coronal": "LIP", "sagittal": "PIL"}
PHASES = ("non-contrast", "arterial", "portal venous", "delayed")
# HU per tissue in (non-contrast, arterial, portal venous, delayed).
TISSUE_HU: dict[str, tuple[float, float, float, float]] = {
    "blood": (40, 300, 160, 100),
    "liver": (55, 70, 110, 90),
    "spleen": (45, 110, 120, 95),
    "kidney": (30, 170, 150, 120),
    "heart": (40, 280, 150, 100),
    "brain": (35, 37, 39, 39),
    "lung": (-850, -850, -850, -850),
    "soft": (40, 50, 60, 55),
}
# Which lesion kinds each organ tissue can hold, and the range of their largest diameter in mm.
KINDS_BY_TISSUE = {
    "liver": ("cyst", "mass", "calcification"),
    "spleen": ("cyst", "mass"),
    "kidney": ("cyst", "mass", "calcification"),
    "lung": ("nodule", "mass"),
    "brain": ("hemorrhage", "mass", "calcification"),
}
# At 32 x 64 x 64 a voxel is 4-8 mm. Lesions span at least three voxels (calcifications, at 700 HU, three or
# four) and may bulge past a small organ's edge, as exophytic renal cysts do: a short CPU run learns to see them
# only at these sizes (smaller ones left a supervised DCFormer at 50-60 % on the lesion questions). A lung
# nodule is at most 3 cm and a lung mass larger, as radiologists define them, with a gap between the two: of
# the same density, they differ only in size, and overlapping ranges (nodules up to 40 mm) made the kind of
# a 35-40 mm lung lesion a coin toss even for a supervised encoder.
DIAMETER_MM = {"cyst": (30, 60), "mass": (36, 70), "calcification": (18, 26), "nodule": (16, 28), "hemorrhage": (30, 55)}
MAX_DIAMETER_TO_RADIUS = 1.2  # a lesion's largest diameter against its organ's smallest radius


@dataclass
class Organ:
    name: str  # as written in reports: "liver", "left kidney", ...
    tissue: str
    center: tuple[float, float, float]  # (x, y, z) mm, LPS: x to patient left, y posterior, z superior
    radii: tuple[float, float, float]
    side: str  # "right", "left" or "midline"
    part_axis: int  # which relative coordinate splits the organ into two named parts
    parts: tuple[str, str]  # names for the negative and positive half along part_axis


# Region -> (field of view (x, y, z) mm, organs that can hold lesions, phases allowed, 8-bit window).
REGIONS: dict[str, dict[str, Any]] = {
    "abdomen": {"fov": (360, 360, 240), "phases": PHASES, "window": "soft_tissue"},
    "chest": {"fov": (380, 380, 260), "phases": PHASES, "window": "soft_tissue"},
    "head": {"fov": (230, 230, 190), "phases": ("non-contrast", "non-contrast", "arterial"), "window": "brain"},
}


def _organs(region: str, rng: np.random.Generator) -> list[Organ]:
    def j(values: tuple[float, ...], scale: float) -> tuple[float, float, float]:
        return tuple(float(v + rng.uniform(-scale, scale)) for v in values)  # type: ignore[return-value]

    def r(values: tuple[float, ...]) -> tuple[float, float, float]:
        return tuple(float(v * rng.uniform(0.88, 1.12)) for v in values)  # type: ignore[return-value]

    if region == "abdomen":
        return [
            Organ("liver", "liver", j((-70, -5, 25), 8), r((62, 72, 70)), "right", 0, ("right lobe", "left lobe")),
            Organ("spleen", "spleen", j((88, 35, 40), 6), r((28, 42, 48)), "left", 2, ("lower pole", "upper pole")),
            Organ("right kidney", "kidney", j((-62, 55, -35), 5), r((26, 28, 50)), "right", 2, ("lower pole", "upper pole")),
            Organ("left kidney", "kidney", j((62, 55, -25), 5), r((26, 28, 50)), "left", 2, ("lower pole", "upper pole")),
        ]
    if region == "chest":
        return [
            Organ("right lung", "lung", j((-78, 15, 10), 5), r((62, 85, 105)), "right", 2, ("lower lobe", "upper lobe")),
            Organ("left lung", "lung", j((78, 15, 10), 5), r((56, 85, 105)), "left", 2, ("lower lobe", "upper lobe")),
        ]
    return [Organ("brain", "brain", j((0, 0, 0), 3), r((64, 82, 66)), "midline", 1, ("frontal lobe", "occipital lobe"))]


def _blob(vol: np.ndarray, axes: tuple[np.ndarray, ...], center: tuple[float, ...], radii: tuple[float, ...], value: float) -> None:
    """Blend an ellipsoid of `value` into `vol` (D, H, W) with a one-voxel soft edge, inside its bounding box only."""
    zyx_center, zyx_radii = center[::-1], radii[::-1]
    slices, rel = [], []
    for ax, c, rad in zip(axes, zyx_center, zyx_radii):
        step = float(ax[1] - ax[0])
        lo, hi = np.searchsorted(ax, c - rad - 2 * step), np.searchsorted(ax, c + rad + 2 * step)
        if hi <= lo:
            return
        slices.append(slice(int(lo), int(hi)))
        rel.append((ax[lo:hi] - c) / rad)
    rho = np.sqrt(rel[0][:, None, None] ** 2 + rel[1][None, :, None] ** 2 + rel[2][None, None, :] ** 2)
    step = float(axes[2][1] - axes[2][0])
    # Signed distance to the surface ~ (rho - 1) * radius; a one-voxel ramp keeps small lesions visible.
    weight = np.clip(0.5 - (rho - 1.0) * min(radii) / step, 0.0, 1.0).astype(np.float32)
    region = vol[tuple(slices)]
    region += weight * (np.float32(value) - region)


def sample_case(index: int, seed: int) -> dict[str, Any]:
    """The ground truth of case `index`: region, organs, lesions, series. Deterministic in (seed, index)."""
    rng = np.random.default_rng([seed, index])
    region = str(rng.choice(list(REGIONS)))
    spec = REGIONS[region]
    organs = _organs(region, rng)
    n_lesions = int(rng.choice([0, 1, 2], p=[0.3, 0.5, 0.2]))
    first = organs[int(rng.integers(len(organs)))]
    kind = str(rng.choice(KINDS_BY_TISSUE[first.tissue]))
    lesions = []
    for k in range(n_lesions):
        candidates = [o for o in organs if kind in KINDS_BY_TISSUE[o.tissue]]
        organ = first if k == 0 else candidates[int(rng.integers(len(candidates)))]
        lo, hi = DIAMETER_MM[kind]
        diameter = float(min(rng.uniform(lo, hi), MAX_DIAMETER_TO_RADIUS * min(organ.radii)))
        aspect = rng.uniform(0.8, 1.0, size=3)
        radii = tuple(float(diameter / 2 * a) for a in aspect)
        radii = tuple(r if i else diameter / 2 for i, r in enumerate(radii))  # the largest diameter is the reported one
        half = int(rng.integers(2))
        # A point in the chosen half of the organ, far enough inside that the lesion stays in it.
        limit = max(0.15, 0.6 - diameter / 2 / min(organ.radii))
        u = rng.uniform(-limit, limit, size=3)
        u[organ.part_axis] = (1 if half else -1) * rng.uniform(0.15, limit)
        if organ.side == "midline":  # clearly to one side, so that the side a question asks for is visible
            u[0] = (1 if rng.random() < 0.5 else -1) * rng.uniform(0.3, max(0.35, limit))
        center = tuple(float(c + ui * r) for c, ui, r in zip(organ.center, u, organ.radii))
        side = organ.side if organ.side != "midline" else ("left" if center[0] > organ.center[0] else "right")
        part = organ.parts[half]
        location = f"{side} {part}" if organ.name == "brain" else f"{part} of the {organ.name}"
        lesions.append(
            {
                "kind": kind,
                "organ": organ.name,
                "tissue": organ.tissue,
                "side": side,
                "part": part,
                "upper": bool(center[2] > organ.center[2]),
                "location": location,
                "diameter_mm": round(diameter, 1),
                "center_mm": [round(c, 2) for c in center],
                "radii_mm": [round(r, 2) for r in radii],
            }
        )
    lesions.sort(key=lambda les: -les["diameter_mm"])
    phase = str(rng.choice(spec["phases"]))
    planes = [str(rng.choice(PLANES, p=[0.6, 0.25, 0.15]))]
    # A second series in another plane for some cases: they test case-level splits. Few, because the case's one
    # report names both planes, which the image of either series cannot tell.
    if rng.random() < 0.1:
        planes.append(str(rng.choice([p for p in PLANES if p != planes[0]])))
    return {
        "case_id": f"{index:06d}",
        "index": index,
        "seed": seed,
        "region": region,
        "phase": phase,
        "organs": [o.__dict__ for o in organs],
        "lesions": lesions,
        "series": [{"name": f"{p.capitalize()}_{phase.replace(' ', '_').replace('-', '_')}", "plane": p} for p in planes],
    }


def render_hu(case: dict[str, Any], grid: int = 64) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The axial (LPS) HU volume of a case, (D, H, W) with `grid` voxels in-plane, and its spacing (D, H, W)."""
    rng = np.random.default_rng([case["seed"], case["index"], 1])
    region, phase = case["region"], PHASES.index(case["phase"])
    fx, fy, fz = REGIONS[region]["fov"]
    shape = (max(8, int(round(grid * fz / fx))), grid, grid)
    spacing = (fz / shape[0], fy / grid, fx / grid)
    axes = tuple((np.arange(n, dtype=np.float32) + 0.5) * s - f / 2 for n, s, f in zip(shape, spacing, (fz, fy, fx)))
    vol = np.full(shape, -1000.0, np.float32)
    hu = {k: v[phase] for k, v in TISSUE_HU.items()}
    big = 10 * fz  # cylinders: an ellipsoid much longer than the field of view
    if region == "head":
        _blob(vol, axes, (0, 0, -5), (76, 95, 80), 40)  # scalp
        _blob(vol, axes, (0, 0, -5), (72, 91, 76), 1000)  # skull
    else:
        ax, ay = (150, 110) if region == "abdomen" else (165, 118)
        ax, ay = ax * rng.uniform(0.9, 1.05), ay * rng.uniform(0.9, 1.05)
        _blob(vol, axes, (0, 5, 0), (ax, ay, big), -100)  # subcutaneous fat
        _blob(vol, axes, (0, 5, 0), (ax - 14, ay - 14, big), hu["soft"])
        _blob(vol, axes, (0, 78, 0), (18, 16, big), 500)  # vertebral column
    for organ in case["organs"]:
        _blob(vol, axes, organ["center"], organ["radii"], hu[organ["tissue"]])
    if region == "chest":
        _blob(vol, axes, (18, -15, -45), (55, 48, 50), hu["heart"])
        _blob(vol, axes, (22, 48, 0), (12, 12, big), hu["blood"])  # descending aorta
    elif region == "abdomen":
        _blob(vol, axes, (12, 45, 0), (11, 11, big), hu["blood"])  # aorta
    else:
        _blob(vol, axes, (-7, 2, 0), (5, 18, 12), 8)  # lateral ventricles (CSF)
        _blob(vol, axes, (7, 2, 0), (5, 18, 12), 8)
        _blob(vol, axes, (0, 78, 20), (4, 4, 60), hu["blood"])  # superior sagittal sinus
        # Basilar and middle cerebral arteries, a few voxels wide: the sinus alone (one voxel) left the
        # arterial phase of a head scan all but invisible.
        _blob(vol, axes, (0, 10, -35), (5, 5, 22), hu["blood"])
        _blob(vol, axes, (-30, -5, -15), (24, 5, 5), hu["blood"])
        _blob(vol, axes, (30, -5, -15), (24, 5, 5), hu["blood"])
    for lesion in case["lesions"]:
        _blob(vol, axes, lesion["center_mm"], lesion["radii_mm"], _lesion_hu(lesion, phase))
    # Quantum noise; smaller for the head so the narrow brain window is not drowned in it.
    vol += rng.standard_normal(shape, dtype=np.float32) * np.float32(3.0 if region == "head" else 8.0)
    return vol, spacing  # type: ignore[return-value]


def _lesion_hu(lesion: dict[str, Any], phase: int) -> float:
    kind, organ_hu = lesion["kind"], TISSUE_HU[lesion["tissue"]][phase]
    if kind == "cyst":
        return 8.0
    if kind == "calcification":
        return 700.0
    if kind == "hemorrhage":  # acute blood; at 72 HU it was all but saturated in the brain window, like calcium
        return 62.0
    if kind == "nodule":
        return 35.0 + 15.0 * (phase > 0)
    if lesion["tissue"] == "lung":
        return 40.0 + 25.0 * (phase > 0)
    if lesion["tissue"] == "brain":  # darker than brain (tumour with oedema), unlike the bright hemorrhage
        return organ_hu - 40.0 if phase == 0 else organ_hu - 60.0
    # Abdominal masses are denser than their organ in every phase, so they never look like a (water) cyst.
    return organ_hu + 90.0


def render_series(case: dict[str, Any], plane: str, grid: int = 64) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """(8-bit windowed slice stack as it would come from Radiopaedia, HU volume, spacing), both in `plane`."""
    from .volume import Volume, reorient

    hu, spacing = render_hu(case, grid)
    vol = reorient(Volume(hu, spacing=spacing, modality="CT"), PLANE_ORIENTATION[plane])
    windowed = np.round(apply_window(vol.array, *window_bounds(REGIONS[case["region"]]["window"])) * 255) / 255
    return windowed.astype(np.float32), vol.array, vol.spacing


def _build_case(args: tuple[int, int, tuple[int, int, int], str, str, bool]) -> dict[str, Any]:
    index, seed, size, dtype, out, write_hu = args
    case = sample_case(index, seed)
    case["report"] = report_text(case)
    out_path = Path(out)
    rel_case = Path(NPY_DIR) / "phantom" / case["case_id"]
    grid = max(size[1], size[2])
    for series in case["series"]:
        windowed, hu, spacing = render_series(case, series["plane"], grid)
        series["image"] = str(rel_case / f"{series['name']}.npy")
        save_npy_atomic(out_path / series["image"], to_storage(m3d_chain(windowed, size), dtype))
        if write_hu:
            import SimpleITK as sitk

            from .volume import Volume

            series["hu_image"] = str(Path("hu") / case["case_id"] / f"{series['name']}.nii.gz")
            (out_path / series["hu_image"]).parent.mkdir(parents=True, exist_ok=True)
            img = Volume(hu, spacing=spacing, direction=_direction(series["plane"])).to_sitk()
            sitk.WriteImage(img, str(out_path / series["hu_image"]), useCompression=True)
    case["text"] = str(rel_case / "text.txt")
    (out_path / case["text"]).parent.mkdir(parents=True, exist_ok=True)
    (out_path / case["text"]).write_text(case["report"], encoding="utf-8")
    return case


def _direction(plane: str) -> tuple[float, ...]:
    import SimpleITK as sitk

    img = sitk.DICOMOrient(sitk.Image(2, 2, 2, sitk.sitkUInt8), PLANE_ORIENTATION[plane])
    return img.GetDirection()


def write_phantom_dataset(
    out: str | os.PathLike,
    n: int = 32,
    seed: int = 0,
    size: tuple[int, int, int] = (32, 64, 64),
    dtype: str = "uint8",
    write_hu: bool = False,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    workers: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Write `n` phantom cases as an M3D-format dataset under `out`; returns counts and paths.

    Layout: `M3D_Cap.json`, `M3D_Cap_npy/phantom/<case>/<Plane_phase>.npy` + `text.txt`,
    `M3D-VQA/M3D_VQA_{train,val,test,test5k,yn_train}.csv` (+ yn_val/yn_test), `phantom_truth.json`
    and, with `write_hu`, the HU volumes as `hu/<case>/<series>.nii.gz`. The same (n, seed, size)
    always gives the same bytes.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    size = tuple(int(s) for s in size)  # type: ignore[assignment]
    jobs = [(i, seed, size, dtype, str(out), write_hu) for i in range(n)]
    bar = tqdm(total=n, desc="phantom cases", unit="case", disable=not progress)
    cases: list[dict[str, Any]] = []
    if workers > 1:
        with process_pool(workers) as pool:
            for case in pool.map(_build_case, jobs, chunksize=max(1, n // (4 * workers))):
                cases.append(case)
                bar.update(1)
    else:
        for job in jobs:
            cases.append(_build_case(job))
            bar.update(1)
    bar.close()
    items = [{"image": s["image"], "text": c["text"]} for c in cases for s in c["series"]]
    splits = case_level_split(items, fractions=fractions, seed=seed)
    write_cap_json(out / CAP_JSON, splits)
    split_of = {it["image"]: name for name, its in splits.items() for it in its}
    vqa: dict[str, list[dict[str, Any]]] = {"train": [], "validation": [], "test": []}
    yn: dict[str, list[dict[str, Any]]] = {"train": [], "validation": [], "test": []}
    for case in cases:
        for series in case["series"]:
            rng = np.random.default_rng([seed, case["index"], 2, case["series"].index(series)])
            split = split_of[series["image"]]
            vqa[split].extend(vqa_rows(case, series, rng))
            yn[split].extend(yes_no_rows(case, series, rng))
    vqa_dir = out / VQA_DIR
    write_vqa_csv(vqa_dir / VQA_FILES["train"], vqa["train"])
    write_vqa_csv(vqa_dir / VQA_FILES["validation"], vqa["validation"])
    write_vqa_csv(vqa_dir / VQA_FILES["test"], vqa["test"])
    write_vqa_csv(vqa_dir / VQA_FILES["test5k"], vqa["test"][:5000])
    write_vqa_csv(vqa_dir / VQA_FILES["yn_train"], yn["train"])
    write_vqa_csv(vqa_dir / "M3D_VQA_yn_val.csv", yn["validation"])
    write_vqa_csv(vqa_dir / "M3D_VQA_yn_test.csv", yn["test"])
    truth = {"n": n, "seed": seed, "size": list(size), "dtype": dtype, "cases": cases}
    (out / "phantom_truth.json").write_text(json.dumps(truth, indent=1))
    return {
        "root": str(out),
        "cases": n,
        "images": len(items),
        "splits": {k: len(v) for k, v in splits.items()},
        "vqa_rows": {k: len(v) for k, v in vqa.items()},
        "yes_no_rows": {k: len(v) for k, v in yn.items()},
    }
