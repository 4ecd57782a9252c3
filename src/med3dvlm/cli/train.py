"""`med3dvlm train ...`: the training stages, each driven by a YAML recipe from configs/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from . import app

train_app = typer.Typer(help="Train the Med3DVLM stages from YAML recipes (configs/*.yaml).", no_args_is_help=True)
app.add_typer(train_app, name="train")


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


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
        summary = main(recipe, resume=resume_from if resume_from is not None else resume)
    except (RecipeError, FileNotFoundError, KeyError, ImportError, TypeError, ValueError) as err:
        _fail(str(err.args[0] if err.args else err))
    typer.echo(json.dumps(summary, indent=2, default=str))
    if not summary["completed"]:
        raise typer.Exit(130)  # stopped by a signal; a checkpoint was written
