"""`med3dvlm data ...`: reading, inspecting and preparing volumes and datasets."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import typer

from .root import error_message, fail, root

data_app = typer.Typer(help="Read, inspect and prepare CT volumes and the M3D datasets.", no_args_is_help=True)
root.add_typer(data_app, name="data")


def _spec_from_options(
    model: Optional[str],
    window: Optional[str],
    hu_range: Optional[tuple[float, float]],
    intensity: Optional[str],
    size: Optional[tuple[int, int, int]],
    spacing: Optional[tuple[float, float, float]],
    no_crop: bool,
):
    from ..data.preprocess import PreprocessSpec

    base = PreprocessSpec()
    if model:
        from ..registry import get_config

        base = PreprocessSpec.for_model(get_config(model))
    fields = base.to_dict()
    if window or hu_range:
        # An explicit window replaces the spec's intensity step, and with it a windowed-data spec's hu_window.
        fields.update(intensity="window", window=window, window_range=list(hu_range) if hu_range else None,
                      hu_window=None)
    if intensity:
        fields["intensity"] = intensity
    if size:
        fields["size"] = list(size)
    if spacing:
        fields["spacing"] = list(spacing)
    if no_crop:
        fields["crop_foreground"] = False
    return PreprocessSpec.from_dict(fields)


MAX_VOXELS_HELP = "Refuse volumes whose header claims more voxels (checked before reading; default 512*512*2048)."
MAX_UNPACKED_HELP = "Refuse compressed files and zips that unpack to more MB (default 2048)."


def read_limits(max_voxels: Optional[int], max_unpacked_mb: Optional[float], base=None):
    """The `ReadLimits` of the --max-voxels/--max-unpacked-mb options (None keeps `base`, else the library default)."""
    from ..data.limits import ReadLimits

    try:
        return ReadLimits.from_options(max_voxels, max_unpacked_mb, base=base)
    except ValueError as err:
        fail(str(err), 2)


@data_app.command()
def inspect(
    path: Path = typer.Argument(..., help="A NIfTI/NRRD/MHA/.npy/DICOM file, a DICOM series folder, or a .zip of either."),
    series: Optional[str] = typer.Option(None, "--series", help="Series UID when the folder holds several."),
    model: Optional[str] = typer.Option(None, "--model", help="Use this registered model's preprocessing spec."),
    window: Optional[str] = typer.Option(None, "--window", help="HU window preset: soft_tissue, lung, bone, brain."),
    hu_range: Optional[tuple[float, float]] = typer.Option(None, "--hu-range", help="Explicit HU window LOW HIGH."),
    intensity: Optional[str] = typer.Option(None, "--intensity", help="minmax | window | none."),
    size: Optional[tuple[int, int, int]] = typer.Option(None, "--size", help="Output size D H W."),
    spacing: Optional[tuple[float, float, float]] = typer.Option(None, "--spacing", help="Resample to D H W mm first."),
    no_crop: bool = typer.Option(False, "--no-crop", help="Do not crop to the foreground."),
    strict: bool = typer.Option(False, "--strict", help="Refuse what is otherwise a warning: uneven slice gaps, an assumed spacing."),
    max_voxels: Optional[int] = typer.Option(None, "--max-voxels", min=8, help=MAX_VOXELS_HELP),
    max_unpacked_mb: Optional[float] = typer.Option(None, "--max-unpacked-mb", min=1, help=MAX_UNPACKED_HELP),
    dicom_text: bool = typer.Option(False, "--dicom-text", help="Also show the DICOM series UID and description (they can identify a patient)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Print what was read (shape, spacing, orientation, modality, values) and what preprocessing made of it."""
    from ..data.preprocess import preprocess_with_report
    from ..data.readers import list_series, load_volume
    from ..data.volume import VolumeError
    from ..uploads import readable_path, scrub_paths

    try:
        spec = _spec_from_options(model, window, hu_range, intensity, size, spacing, no_crop)
    except (KeyError, ValueError) as err:
        fail(error_message(err), 2)
    limits = read_limits(max_voxels, max_unpacked_mb)
    real = path

    def shown(text: str) -> str:  # inside a zip: the archive's name, not the temporary folder
        return text if real == path else scrub_paths(text, {str(real): str(path), str(real.parent): str(path)})

    try:
        with readable_path(path, limits=limits) as real:
            if real.is_dir() and series is None:
                found = list_series(real)
                if len(found) > 1:
                    _print_series(path, found, as_json, dicom_text)
                    fail("several series; choose one with --series UID", 2)
            volume = load_volume(real, series_uid=series, limits=limits, strict=strict)
            with warnings.catch_warnings():
                # The report carries the warnings; printing them twice would only add noise.
                warnings.simplefilter("ignore")
                _, report = preprocess_with_report(volume, spec, include_private=dicom_text)
    except VolumeError as err:
        fail(shown(str(err)))
    report.input["source"] = str(path)
    report.warnings = [shown(w) for w in report.warnings]
    payload = {"read": report.input, "spec": spec.to_dict(), "steps": report.steps, "output": report.output, "warnings": report.warnings}
    if as_json:
        typer.echo(json.dumps(payload, indent=2, default=str))
        return
    r, o = report.input, report.output
    typer.echo(f"read        {r['source']}")
    typer.echo(f"  shape     {' x '.join(map(str, r['shape']))} (D x H x W), {r['dtype']}")
    typer.echo(f"  spacing   {' x '.join(f'{s:g}' for s in r['spacing'])} mm")
    typer.echo(f"  orient.   {r['orientation']}    modality {r['modality']}")
    typer.echo(f"  values    [{r['min']:g}, {r['max']:g}], mean {r['mean']:.4g} (looks like: {r['looks_like']})")
    gaps = r.get("meta", {}).get("slice_gaps")
    if gaps:
        typer.echo(f"  gaps      {gaps['min_mm']:g} to {gaps['max_mm']:g} mm (median {gaps['median_mm']:g}), about {gaps['missing_estimate']} slice(s) missing")
    for key, value in r.get("dicom", {}).items():
        typer.echo(f"  {key:<9} {value}")
    typer.echo("preprocess  " + (", ".join(report.steps) or "nothing to do"))
    typer.echo(f"  output    {' x '.join(map(str, o['shape']))} float32, [{o['min']:.4g}, {o['max']:.4g}], mean {o['mean']:.4g}")
    for w in report.warnings:
        typer.echo(f"warning: {w}", err=True)


def _print_series(path: Path, found: list, as_json: bool, dicom_text: bool) -> None:
    """The series of a folder, to choose one with --series; descriptions (free text) only with --dicom-text."""
    rows = [s.to_dict() for s in found]
    if not dicom_text:
        for row in rows:
            row.pop("description", None)
    if as_json:
        typer.echo(json.dumps({"path": str(path), "series": rows}, indent=2))
        return
    typer.echo(f"{path} holds {len(found)} DICOM series:")
    for s in found:
        text = f"  {s.description}" if dicom_text else ""
        typer.echo(f"  {s.uid}  {s.modality:<4} {s.num_files:>4} files  {s.rows}x{s.columns}{text}")


@data_app.command()
def phantom(
    out: Path = typer.Option(..., "--out", help="Folder to write the dataset into."),
    n: int = typer.Option(32, "--n", help="Number of cases (each has one or two series)."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives the same dataset."),
    size: tuple[int, int, int] = typer.Option((32, 64, 64), "--size", help="Stored volume size D H W."),
    dtype: str = typer.Option("uint8", "--dtype", help="Storage dtype: uint8 or float16."),
    hu: bool = typer.Option(False, "--hu", help="Also write the HU volumes as hu/<case>/<series>.nii.gz."),
    workers: int = typer.Option(1, "--workers", help="Worker processes."),
) -> None:
    """Write a procedurally generated CT dataset in the M3D-Cap / M3D-VQA formats."""
    from ..data.phantom import write_phantom_dataset

    if n < 1:
        fail("--n must be at least 1", 2)
    summary = write_phantom_dataset(out, n=n, seed=seed, size=size, dtype=dtype, write_hu=hu, workers=workers)
    typer.echo(json.dumps(summary, indent=2))


@data_app.command("prepare-m3d-cap")
def prepare_m3d_cap(
    src: Path = typer.Argument(..., help="Raw M3D-Cap folder holding <collection>/<case>/<series>/<n>.png and text.txt."),
    out: Path = typer.Option(..., "--out", help="Output folder (M3D_Cap_npy/, M3D_Cap.json, prepare_log.jsonl)."),
    size: tuple[int, int, int] = typer.Option((128, 256, 256), "--size", help="Volume size D H W."),
    dtype: str = typer.Option("uint8", "--dtype", help="Storage dtype: uint8 or float16."),
    workers: int = typer.Option(0, "--workers", help="Worker processes; 0 = automatic (one per CPU for large jobs)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Skip series whose output is already complete."),
    split: str = typer.Option("case", "--split", help="'case' (no case in two splits) or 'paper' (needs --paper-json)."),
    paper_json: Optional[Path] = typer.Option(None, "--paper-json", help="The published M3D_Cap.json, for --split paper."),
    seed: int = typer.Option(0, "--seed", help="Seed of the case-level split."),
) -> None:
    """Convert raw M3D-Cap slice folders into compact .npy volumes and a fresh M3D_Cap.json."""
    from ..data.m3d import DatasetFormatError
    from ..data.prepare import prepare_m3d_cap as run
    from ..data.volume import VolumeError

    try:
        summary = run(src, out, size=size, dtype=dtype, workers=workers, resume=resume, split=split, paper_json=paper_json, seed=seed)
    except (VolumeError, DatasetFormatError, ValueError) as err:
        fail(str(err))
    typer.echo(json.dumps(summary, indent=2))
    if summary["failed"] or summary["flagged"]:
        typer.echo(f"warning: {summary['failed']} failed and {summary['flagged']} flagged series; see {summary['log']}", err=True)


@data_app.command()
def split(
    cap_json: Path = typer.Argument(..., help="An M3D_Cap.json to re-split (all its items are pooled)."),
    out: Path = typer.Option(..., "--out", help="Where to write the case-level M3D_Cap.json."),
    seed: int = typer.Option(0, "--seed"),
    fractions: tuple[float, float, float] = typer.Option((0.9, 0.05, 0.05), "--fractions", help="train validation test."),
) -> None:
    """Build a case-level split (no case in two splits) and report the input's leakage."""
    from ..data.m3d import CAP_SPLITS, DatasetFormatError, read_cap_json, write_cap_json
    from ..data.splits import case_level_split, find_leakage

    try:
        original = read_cap_json(cap_json)
    except DatasetFormatError as err:
        fail(str(err))
    leaks = find_leakage(original)
    items = list({it["image"]: it for s in CAP_SPLITS for it in original[s]}.values())
    splits = case_level_split(items, fractions=fractions, seed=seed)
    write_cap_json(out, splits)
    typer.echo(json.dumps({"input_leaking_cases": len(leaks), "splits": {s: len(splits[s]) for s in CAP_SPLITS}, "out": str(out)}, indent=2))
