"""`med3dvlm index build` and `med3dvlm search`: similar prior cases by image or by text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .root import error_message, fail, root

index_app = typer.Typer(help="Build case-search indexes from a trained contrastive model.", no_args_is_help=True)
root.add_typer(index_app, name="index")


@index_app.command("build")
def build(
    model: str = typer.Option(..., "--model", "-m", help="A saved contrastive model folder (train output_dir/model) or a Hugging Face hub id (owner/name)."),
    source: Path = typer.Option(..., "--data", "-d", help="An M3D_Cap.json (scans + reports) or a folder of volumes."),
    out: Path = typer.Option(..., "--out", "-o", help="Index folder to write."),
    splits: Optional[list[str]] = typer.Option(None, "--split", help="Dataset splits to index (repeatable); default all."),
    batch_size: int = typer.Option(8, "--batch-size"),
    device: Optional[str] = typer.Option(None, "--device"),
) -> None:
    """Embed every scan (and report) of a dataset or folder with MODEL and save the index."""
    from ..data.m3d import DatasetFormatError
    from ..data.volume import VolumeError
    from ..search import build_index

    try:
        summary = build_index(model, source, out, splits=splits, batch_size=batch_size, device=device)
    except (DatasetFormatError, VolumeError, FileNotFoundError, KeyError, TypeError, ValueError) as err:
        fail(error_message(err))
    typer.echo(json.dumps(summary, indent=2))


@root.command()
def search(
    index: Path = typer.Option(..., "--index", "-i", help="Index folder from `med3dvlm index build`."),
    image: Optional[Path] = typer.Option(None, "--image", help="Query scan: a volume file or DICOM folder."),
    text: Optional[str] = typer.Option(None, "--text", help="Query text, e.g. 'hypodense cyst in the liver'."),
    k: int = typer.Option(5, "--k", "-k", help="Number of results."),
    against: str = typer.Option("image", "--against", help="Match the indexed 'image' or 'text' (report) embeddings."),
    per_series: bool = typer.Option(False, "--per-series", help="Rank series, not cases (a case's series may repeat)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    device: Optional[str] = typer.Option(None, "--device"),
) -> None:
    """The nearest indexed cases to a scan or a text, with cosine-similarity scores."""
    from ..data.volume import VolumeError
    from ..search import CaseIndex, SearchIndexError

    if (image is None) == (text is None):
        fail("give exactly one of --image PATH or --text '...'", 2)
    if k < 1:
        fail("--k must be at least 1", 2)
    try:
        idx = CaseIndex(index, device=device)
        hits = (
            idx.search_image(image, k, against, per_case=not per_series)
            if image is not None
            else idx.search_text(text or "", k, against, per_case=not per_series)
        )
    except (SearchIndexError, VolumeError, FileNotFoundError, TypeError, ValueError) as err:
        fail(error_message(err))
    if as_json:
        typer.echo(json.dumps([h.to_dict() for h in hits], indent=2))
        return
    for h in hits:
        report = (h.report or "")[:100] + ("..." if h.report and len(h.report) > 100 else "")
        typer.echo(f"{h.rank:>3}  {h.score:+.4f}  {h.image}" + (f"\n       {report}" if report else ""))
