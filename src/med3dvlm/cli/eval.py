"""`med3dvlm eval retrieval`; `eval report` and `eval vqa` are in `eval_generation` and share this group."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .root import error_message, fail, root

eval_app = typer.Typer(help="Evaluate trained models.", no_args_is_help=True)
root.add_typer(eval_app, name="eval")


def _named(entries: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep:
            name, path = Path(entry).stem if len(entries) > 1 else "test", entry
        if name in out:
            fail(f"--data name {name!r} given twice; use NAME=PATH", 2)
        out[name] = Path(path)
    return out


@eval_app.command()
def retrieval(
    model: str = typer.Option(..., "--model", "-m", help="A saved contrastive model folder (train output_dir/model) or a Hugging Face hub id (owner/name)."),
    data: list[str] = typer.Option(
        ..., "--data", "-d",
        help="[NAME=]M3D_Cap.json to evaluate on; repeat for the published split and a case-level one, "
        "e.g. --data paper=M3D_Cap.json --data case=M3D_Cap_case.json.",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for retrieval.json, retrieval.md and recall_at_k.png."),
    split: str = typer.Option("test", "--split", help="Split of each JSON; the first N pairs are used."),
    sizes: Optional[list[int]] = typer.Option(None, "--size", "-n", help="Prefix sizes N (repeatable); default 100 500 1000 2000."),
    batch_size: int = typer.Option(8, "--batch-size"),
    workers: int = typer.Option(0, "--workers", help="DataLoader workers."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ...; default: cuda if available."),
) -> None:
    """Image-to-text and text-to-image recall@1/5/10 on the first N test pairs (the paper's protocol)."""
    from ..data.m3d import DatasetFormatError
    from ..eval.retrieval import PAPER_SIZES, evaluate_checkpoint, markdown_table, write_retrieval_report

    try:
        results = evaluate_checkpoint(
            model, _named(data), split=split, sizes=tuple(sizes) if sizes else PAPER_SIZES,
            batch_size=batch_size, num_workers=workers, device=device,
        )
    except (DatasetFormatError, FileNotFoundError, KeyError, TypeError, ValueError) as err:
        fail(error_message(err))
    paths = write_retrieval_report(results, out)
    typer.echo(markdown_table(results))
    typer.echo(json.dumps(paths, indent=2))
