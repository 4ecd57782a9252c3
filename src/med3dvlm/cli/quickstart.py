"""`med3dvlm quickstart`: the whole pipeline on the embedded default, offline, on a CPU."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import typer

from .root import root


@root.command()
def quickstart(
    out: Path = typer.Option(Path("runs/quickstart"), "--out", "-o", help="Folder for everything it writes."),
    seed: int = typer.Option(0, help="Seed of the phantom data and of every training stage."),
    cases: int | None = typer.Option(None, help="Phantom cases to generate (default: QuickstartBudget.cases)."),
) -> None:
    """Generate phantom CT data, run the three training stages with small models on the embedded LLM and text
    tower, evaluate on held-out cases with image-ablation controls, and write results.md and results.json.
    Re-running resumes."""
    from ..quickstart import QuickstartBudget, run_quickstart

    if not logging.getLogger().isEnabledFor(logging.DEBUG):  # without -v: one progress bar per stage, then the summary
        for name in ("med3dvlm.train", "med3dvlm.eval", "transformers", "httpx"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # Accelerate warns at every checkpoint that the tied lm_head is saved once; that is expected.
        logging.getLogger("accelerate").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="sklearn")
    t0 = time.perf_counter()
    page = run_quickstart(out, seed=seed, budget=QuickstartBudget() if cases is None else QuickstartBudget(cases=cases))
    results = __import__("json").loads((page.parent / "results.json").read_text())
    closed, ablation = results["closed_vqa"], results["ablation"]
    typer.echo(
        f"\nheld-out closed VQA {closed['strict']['overall']:.1f} % (text-prior baseline {closed['majority_baseline']:.1f} %, "
        f"zeroed volumes {ablation['zero']['closed_vqa_strict']:.1f} %, swapped {ablation['swapped']['closed_vqa_strict']:.1f} %); "
        f"yes/no balanced {results['yes_no']['balanced_accuracy']} %; report findings {results['report']['finding_accuracy']} %; "
        f"retrieval IR@1 {results['retrieval']['ir_at_1']} % (chance {results['retrieval']['chance']} %)"
    )
    typer.echo(f"results: {page}  and results.json  ({time.perf_counter() - t0:.0f} s, peak RSS {results['peak_rss_mb']:.0f} MB)")
