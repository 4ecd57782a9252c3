"""`med3dvlm merge-lora`: fold a stage-3 LoRA adapter into the LLM for a standalone VLM."""

from __future__ import annotations

from pathlib import Path

import typer

from .root import fail, root


@root.command("merge-lora")
def merge_lora(
    model: Path = typer.Argument(..., help="A VLM folder with LoRA weights (stage 3's model/)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the standalone merged model."),
) -> None:
    """Fold the LoRA adapter into the LLM and write a standalone VLM that needs no peft to run."""
    from ..loading import from_pretrained
    from ..models.vlm import Med3DVLM, has_lora

    try:
        vlm_model = from_pretrained(model)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    if not isinstance(vlm_model, Med3DVLM):
        fail(f"{model} holds a {type(vlm_model).__name__}, not a VLM")
    if not has_lora(vlm_model.llm):
        fail(f"{model} has no LoRA weights (no lora/ folder) to merge")
    vlm_model.merge_lora().save_pretrained(out)
    typer.echo(f"wrote {out}")
