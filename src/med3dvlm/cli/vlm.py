"""`med3dvlm train vlm` (stages 2 and 3) and `med3dvlm merge-lora`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from . import app
from .train import _fail, train_app


@train_app.command()
def vlm(
    config: Path = typer.Option(..., "--config", "-c", help="Recipe YAML, e.g. configs/vlm_stage2_cpu.yaml."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in train.output_dir."),
    resume_from: Optional[Path] = typer.Option(None, "--resume-from", help="Continue from this checkpoint folder."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", "-s", help="Override a recipe value (repeatable)."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Shortcut for --set train.output_dir=..."),
) -> None:
    """Stage 2 (projector pre-training) or 3 (LoRA fine-tuning) of the VLM, as `stage.stage` says."""
    from ..train.config import RecipeError, load_recipe
    from ..train.vlm import main

    sets = list(overrides or [])
    if output_dir is not None:
        sets.append(f"train.output_dir={output_dir}")
    try:
        summary = main(load_recipe(config, sets), resume=resume_from if resume_from is not None else resume)
    except (RecipeError, FileNotFoundError, KeyError, ImportError, TypeError, ValueError) as err:
        _fail(str(err.args[0] if err.args else err))
    typer.echo(json.dumps(summary, indent=2, default=str))
    if not summary["completed"]:
        raise typer.Exit(130)


@app.command("merge-lora")
def merge_lora(
    model: Path = typer.Argument(..., help="A VLM folder with LoRA weights (stage 3's model/)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the standalone merged model."),
) -> None:
    """Fold the LoRA adapter into the LLM and write a standalone VLM that needs no peft to run."""
    from ..hub import from_pretrained
    from ..models.vlm import Med3DVLM, has_lora

    try:
        vlm_model = from_pretrained(model)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    if not isinstance(vlm_model, Med3DVLM):
        _fail(f"{model} holds a {type(vlm_model).__name__}, not a VLM")
    if not has_lora(vlm_model.llm):
        _fail(f"{model} has no LoRA weights (no lora/ folder) to merge")
    vlm_model.merge_lora().save_pretrained(out)
    typer.echo(f"wrote {out}")
