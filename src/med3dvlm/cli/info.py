"""`med3dvlm info`: parameters, compute and output shapes of registered models."""

from __future__ import annotations

import json
from typing import Optional

import typer

from .root import error_message, fail, root


@root.command()
def info(
    name: Optional[str] = typer.Argument(None, help="Registered model name (see `med3dvlm info` for all)."),
    input: Optional[tuple[int, int, int]] = typer.Option(None, "--input", help="Input size D H W; default: the model's own."),
    llm_dim: Optional[int] = typer.Option(None, "--llm-dim", help="LLM hidden size, for projectors."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Print parameters, multiply-accumulates and the token shape of each output of a model.

    Without NAME, summarise every registered model at its own input size.
    """
    from ..profiling import format_shape, profile_model
    from ..registry import list_models

    overrides = {"llm_dim": llm_dim} if llm_dim is not None else {}
    try:
        names = [name] if name else list_models()
        summaries = [profile_model(n, input, **overrides) for n in names]
    except (KeyError, TypeError, ValueError) as err:
        fail(error_message(err), 2)
    if as_json:
        payload = [s.to_dict() for s in summaries]
        typer.echo(json.dumps(payload[0] if name else payload, indent=2))
        return
    typer.echo(f"{'model':<18} {'params':>14} {'GMAC':>10}  {'input':<18} outputs (tokens x dim)")
    for s in summaries:
        outs = ", ".join(format_shape(o) for o in s.outputs)
        typer.echo(f"{s.name:<18} {s.params:>14,} {s.gmac:>10.2f}  {format_shape(s.input_shape):<18} {outs}")
