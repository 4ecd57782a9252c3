"""Frozen weights held once in the autocast dtype, so mixed-precision training stops casting them every step.

Under bf16 autocast a linear layer casts its fp32 weight to bf16 each time it runs. For a frozen LLM with LoRA
that was a quarter of a CPU training step (the tied 49k x 576 output head alone ~80 ms). A frozen weight never
changes, so its cast can be made once: the copies are exactly what autocast would have made, and the losses,
gradients and updates are bit-identical (tests/test_train_speed.py). The model keeps its fp32 parameters, so
checkpoints, saved models and LoRA merges are untouched; the copies are only swapped in for the forward pass
(`torch.func.functional_call`).
"""

from __future__ import annotations

import torch
from torch import nn


def frozen_linear_copies(module: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """{parameter name: `dtype` copy} for the fp32 weights and biases of every frozen `nn.Linear` in `module`.

    A weight tied to a non-linear module (an LLM's output head sharing the embedding table) gets its own copy
    under the linear layer's name only: the embedding lookup keeps reading the fp32 table, as autocast does.
    """
    names = {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}
    copies: dict[str, torch.Tensor] = {}
    for prefix, m in module.named_modules(remove_duplicate=False):
        if not isinstance(m, nn.Linear):
            continue
        for attr in ("weight", "bias"):
            p = getattr(m, attr)
            if p is None or p.requires_grad or p.dtype != torch.float32 or id(p) not in names:
                continue
            copies[f"{prefix}.{attr}" if prefix else attr] = p.detach().to(dtype)
    return copies


def autocast_dtype(mixed_precision: str) -> torch.dtype | None:
    """The lower-precision dtype of a trainer's `mixed_precision` setting, or None for "no"."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
