"""`med3dvlm train clip` (stage 1) and `med3dvlm train vlm` (stages 2 and 3), each driven by a YAML recipe from configs/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .root import error_message, fail, root, stdout_to_stderr

train_app = typer.Typer(help="Train the Med3DVLM stages from YAML recipes (configs/*.yaml).", no_args_is_help=True)
root.add_typer(train_app, name="train")


@train_app.command()
def clip(
    config: Path = typer.Option(..., "--config", "-c", help="Recipe YAML, e.g. configs/clip_cpu.yaml."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in train.output_dir."),
    resume_from: Optional[Path] = typer.Option(None, "--resume-from", help="Continue from this checkpoint folder."),
    overrides: Optional[list[str]] = typer.Option(
        None, "--set", "-s", help="Override a recipe value: --set train.lr=3e-4 --set data.limit=64 (repeatable)."
    ),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Shortcut for --set train.output_dir=..."),
) -> None:
    """Stage 1: contrastive (SigLIP) pre-training of DCFormer and the text tower on image-report pairs.

    Runs on one CPU as is; `accelerate launch $(which med3dvlm) train clip ...` for several GPUs, and
    train.deepspeed=configs/zero2.json for ZeRO-2 (needs the deepspeed package).
    """
    from ..train.clip import main
    from ..train.config import RecipeError, load_recipe

    sets = list(overrides or [])
    if output_dir is not None:
        sets.append(f"train.output_dir={output_dir}")
    try:
        recipe = load_recipe(config, sets)
        with stdout_to_stderr():
            summary = main(recipe, resume=resume_from if resume_from is not None else resume)
    except (RecipeError, FileNotFoundError, KeyError, ImportError, TypeError, ValueError) as err:
        fail(error_message(err))
    typer.echo(json.dumps(summary, indent=2, default=str))
    if not summary["completed"]:
        raise typer.Exit(130)  # stopped by a signal; a checkpoint was written


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
        recipe = load_recipe(config, sets)
        with stdout_to_stderr():
            summary = main(recipe, resume=resume_from if resume_from is not None else resume)
    except (RecipeError, FileNotFoundError, KeyError, ImportError, TypeError, ValueError) as err:
        fail(error_message(err))
    typer.echo(json.dumps(summary, indent=2, default=str))
    if not summary["completed"]:
        raise typer.Exit(130)
