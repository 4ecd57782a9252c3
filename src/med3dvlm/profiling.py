"""Size and cost of a model: parameters, multiply-accumulates and output token shapes.

Counting runs on the meta device, so even dcformer_large at 128x256x256 is measured instantly and without
memory. MACs come from `torch.utils.flop_counter` (matmuls and convolutions only; FLOPs / 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from .registry import build_from_config, get_config


@dataclass
class ModelSummary:
    name: str
    params: int
    gmac: float
    input_shape: list  # (D, H, W) of a volume, or [tokens, dim] per input for projectors
    outputs: list[list[int]] = field(default_factory=list)  # [tokens, dim] per output

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "params": self.params,
            "gmac": self.gmac,
            "input": self.input_shape,
            "outputs": self.outputs,
        }


def profile_model(name: str, input_size: tuple[int, ...] | None = None, batch_size: int = 1, **overrides: Any) -> ModelSummary:
    """Parameters, GMAC and output shapes of registered model `name` on one input of `input_size`.

    `input_size` defaults to the config's own `input_size`; overrides change config fields.
    """
    config = get_config(name, **overrides)
    if config.model_type == "vlm":
        return _profile_vlm(name, config)
    with torch.device("meta"):
        model = build_from_config(config).eval()
    params = sum(p.numel() for p in model.parameters())
    if hasattr(model, "example_input"):  # models whose input is not one volume (projectors, contrastive)
        example = model.example_input(batch_size)
        input_size = tuple(tuple(t.shape[1:]) for t in example)
    else:
        input_size = tuple(input_size or getattr(config, "input_size"))
        example = torch.empty(batch_size, getattr(config, "in_channels", 1), *input_size, device="meta")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        # a tuple holds several arguments (images, token ids); a list is one argument (encoder features)
        outputs = model(*example) if isinstance(example, tuple) else model(example)
    if isinstance(outputs, dict):  # contrastive models return named features and scalars
        outputs = [v for v in outputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    if isinstance(outputs, torch.Tensor):
        outputs = [outputs]
    shapes = [list(o.shape[1:]) for o in outputs]
    gmac = counter.get_total_flops() / 2 / 1e9 / batch_size
    return ModelSummary(name, params, round(gmac, 4), [list(i) if isinstance(i, tuple) else i for i in input_size], shapes)


def format_shape(shape: list) -> str:
    """[128, 256, 256] -> '128x256x256'; [[256, 384], [32, 768]] -> '256x384 + 32x768'."""
    if shape and isinstance(shape[0], list):
        return " + ".join(format_shape(s) for s in shape)
    return "x".join(map(str, shape))



def _profile_vlm(name: str, config: Any) -> ModelSummary:
    """A VLM's size without loading its LLM: parameters of all parts, compute of encoder + projector."""
    from .models.llm import KNOWN_LLM_CONFIGS

    llm_config = config.llm_config or KNOWN_LLM_CONFIGS.get(config.llm)
    if llm_config is None:
        from transformers import AutoConfig

        from .models.llm import resolve_llm_path

        hf = AutoConfig.from_pretrained(resolve_llm_path(config.llm))
        llm_config = {**hf.to_dict(), "model_type": hf.model_type}
    with torch.device("meta"):
        model = build_from_config(config.replace(llm_config=dict(llm_config))).eval()
    params = sum(p.numel() for p in model.parameters())
    vision_config = model.vision.config
    example = torch.empty(1, getattr(vision_config, "in_channels", 1), *vision_config.input_size, device="meta")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        tokens = model.projector(model.vision(example))
    gmac = counter.get_total_flops() / 2 / 1e9
    return ModelSummary(name, params, round(gmac, 4), list(vision_config.input_size), [list(tokens.shape[1:])])
