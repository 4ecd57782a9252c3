"""`med3dvlm predict`: a report or an answer for your own CT (NIfTI, DICOM folder or zip, NRRD, MHA, .npy)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from .data import MAX_UNPACKED_HELP, MAX_VOXELS_HELP, read_limits
from .root import fail, root


def batch_items(source: Path, question: Optional[str]) -> list[tuple[Path, Optional[str]]]:
    """(scan, question) pairs from a folder of scans or a CSV with an `image` and optional `question` column.

    CSV paths are relative to the CSV's folder; an empty question cell asks for the report.
    """
    from ..data.readers import discover_volumes

    if source.is_dir():
        items = [(p, question) for p in discover_volumes(source) if not p.name.lower().endswith(".zip")]
        items += [(p, question) for p in sorted(source.rglob("*.zip"))]
        if not items:
            raise ValueError(f"{source}: no scans found (NIfTI, NRRD, MHA, .npy, zip or DICOM folders)")
        return items
    if source.suffix.lower() != ".csv":
        raise ValueError(f"{source}: --batch takes a folder of scans or a .csv file")
    try:
        with open(source, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{source}: cannot read the CSV ({err})") from None
    if not rows or "image" not in rows[0]:
        raise ValueError(f"{source}: needs a header with an 'image' column (and optionally 'question')")
    out = []
    for row in rows:
        image = Path(row["image"] or "")
        asked = (row.get("question") or "").strip() or question
        out.append((image if image.is_absolute() else source.parent / image, asked))
    return out


@root.command()
def predict(
    model: str = typer.Option(..., "--model", "-m", help="A saved VLM folder (stage 3 output_dir/model) or a Hugging Face hub id (owner/name)."),
    image: Optional[Path] = typer.Option(None, "--image", "-i", help="A NIfTI/NRRD/MHA/.npy/DICOM file, a DICOM folder or a zip of one."),
    question: Optional[str] = typer.Option(None, "--question", "-q", help="Ask this; without it the model writes the report."),
    batch: Optional[Path] = typer.Option(None, "--batch", help="A folder of scans, or a CSV with 'image' and 'question' columns."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON with the preprocessing, timings and settings."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="With --batch: write JSON Lines here instead of stdout."),
    series: Optional[str] = typer.Option(None, "--series", help="Series UID when a DICOM folder holds several."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Longest answer in tokens."),
    sample: bool = typer.Option(False, "--sample", help="Sample (top-p) instead of greedy decoding."),
    temperature: float = typer.Option(1.0, "--temperature", min=0.01),
    top_p: Optional[float] = typer.Option(None, "--top-p", min=0.0, max=1.0),
    seed: Optional[int] = typer.Option(None, "--seed", help="Makes sampling reproducible."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Scans per generate call with --batch."),
    index: Optional[Path] = typer.Option(None, "--index", help="Also list similar cases from this case index."),
    k: int = typer.Option(3, "--k", min=1, help="Similar cases to list with --index."),
    device: Optional[str] = typer.Option(None, "--device"),
    strict: bool = typer.Option(False, "--strict", help="Refuse what is otherwise a warning: uneven slice gaps, an assumed spacing."),
    max_voxels: Optional[int] = typer.Option(None, "--max-voxels", min=8, help=MAX_VOXELS_HELP),
    max_unpacked_mb: Optional[float] = typer.Option(None, "--max-unpacked-mb", min=1, help=MAX_UNPACKED_HELP),
    dicom_text: bool = typer.Option(False, "--dicom-text", help="Put the DICOM series UID and description in the JSON (they can identify a patient)."),
) -> None:
    """Generate a report (default) or answer --question for a scan, or for every scan of --batch."""
    from ..data.readers import check_path
    from ..data.volume import VolumeError
    from ..inference import Predictor, prediction_settings
    from ..search import SearchIndexError

    if (image is None) == (batch is None):
        fail("give exactly one of --image PATH or --batch FOLDER_OR_CSV", 2)
    if out is not None and batch is None:
        fail("--out is for --batch; a single result goes to stdout", 2)
    if image is not None:
        try:
            check_path(image)  # before the model loads: a missing file, a broken link or a loop, said plainly
        except VolumeError as err:
            fail(str(err), 2)
    limits = read_limits(max_voxels, max_unpacked_mb)
    settings = prediction_settings(max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature, top_p=top_p, seed=seed)
    try:
        predictor = Predictor.from_dir(model, index_dir=index, settings=settings, device=device,
                                       limits=limits, strict=strict, include_private=dicom_text)
    except (FileNotFoundError, SearchIndexError, TypeError, ValueError, OSError) as err:
        fail(str(err))
    if image is not None:
        try:
            result = predictor.predict(image, question, series_uid=series).to_dict()
            if index is not None:
                result["similar_cases"] = predictor.search(image, k=k)
        except VolumeError as err:
            fail(str(err))
        if as_json:
            typer.echo(json.dumps(result, indent=2))
        else:
            for step in result["preprocessing"]["steps"]:
                if step.startswith("HU window "):  # raw HU windowed as the model's training images were
                    typer.echo(f"note: {step}", err=True)
            for warning in result["preprocessing"]["warnings"]:
                typer.echo(f"warning: {warning}", err=True)
            typer.echo(result["text"])
            for hit in result.get("similar_cases", []):
                typer.echo(f"similar: {hit['rank']}  {hit['score']:+.4f}  {hit['image']}")
        return
    _run_batch(predictor, batch, question, out, series, batch_size)  # type: ignore[arg-type]


def _run_batch(predictor: Any, source: Path, question: Optional[str], out: Optional[Path], series: Optional[str], batch_size: int) -> None:
    from tqdm.auto import tqdm

    from ..data.volume import VolumeError

    if not source.exists():
        fail(f"{source}: no such file or directory", 2)
    try:
        items = batch_items(source, question)
    except ValueError as err:
        fail(str(err), 2)
    sink = open(out, "w", encoding="utf-8") if out is not None else sys.stdout
    failed = 0
    try:
        with tqdm(total=len(items), desc="predict", unit="scan", file=sys.stderr) as bar:
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                prepared, asked = [], []
                for path, q in chunk:
                    try:
                        prepared.append(predictor.prepare(path, series))
                        asked.append(q)
                    except VolumeError as err:  # one bad scan must not stop a night's batch
                        failed += 1
                        sink.write(json.dumps({"source": str(path), "error": err.reason}) + "\n")
                if prepared:
                    for result in predictor.predict_many(prepared, asked, batch_size=len(prepared)):
                        sink.write(json.dumps(result.to_dict()) + "\n")
                sink.flush()
                bar.update(len(chunk))
    finally:
        if out is not None:
            sink.close()
    if failed:
        typer.echo(f"error: {failed} of {len(items)} scans could not be read (see their 'error' lines)", err=True)
        raise typer.Exit(1)
