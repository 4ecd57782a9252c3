"""`med3dvlm quickstart`: the whole pipeline on the embedded default, offline, on a CPU."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from . import app


@app.command()
def quickstart(
    out: Path = typer.Option(Path("runs/quickstart"), "--out", "-o", help="Folder for everything it writes."),
    cases: int = typer.Option(240, help="Phantom cases to generate."),
    seed: int = typer.Option(0, help="Seed of the phantom dataset."),
) -> None:
    """Generate phantom CT data, run the three training stages with small models on the embedded LLM and text
    tower, evaluate retrieval, report generation and VQA, and write results.md. Re-running resumes."""
    from ..quickstart import run_quickstart

    t0 = time.perf_counter()
    page = run_quickstart(out, cases=cases, seed=seed)
    typer.echo(f"results: {page}  ({time.perf_counter() - t0:.0f} s)")
