"""`med3dvlm convert`: turn released original checkpoints into med3dvlm checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from .root import fail, root

log = logging.getLogger(__name__)


@root.command()
def convert(
    source: Path = typer.Argument(..., help="Original weights: .bin/.pt/.pth (read with weights_only=True) or .safetensors."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for the med3dvlm checkpoint."),
    prefix: Optional[str] = typer.Option(
        None, help="Key prefix in front of `encoder.s0...`; found automatically when the file holds one encoder."
    ),
) -> None:
    """Convert an original DCFormer encoder (bare, or the vision tower inside a DCFormer_SigLIP or
    Med3DVLM checkpoint) into a med3dvlm DCFormer checkpoint (config.json + model.safetensors)."""
    from ..convert import convert_dcformer_checkpoint, load_state_dict

    try:
        state_dict = load_state_dict(source)
        model = convert_dcformer_checkpoint(state_dict, prefix=prefix)
    except (OSError, ValueError) as err:
        fail(str(err))
    model.save_pretrained(out)
    typer.echo(f"wrote {out} ({model.num_parameters():,} parameters, stages {list(model.config.dims)})")
