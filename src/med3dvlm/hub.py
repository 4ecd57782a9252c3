"""Checkpoints as `config.json` + `model.safetensors`, the layout of the Hugging Face hub.

`PretrainedModel` gives any registered model `save_pretrained(dir)` and `from_pretrained(dir)`.
The module-level `from_pretrained` reads `config.json` first and dispatches on its `model_type`,
so a directory is enough to rebuild whatever model it holds (like `AutoModel`).

This module knows our format only. Released checkpoints in other layouts are read by `med3dvlm.convert`
and `med3dvlm.loading.from_pretrained` (what `med3dvlm.from_pretrained` is) chooses between the two, so
the models, which import this module, never reach the converters.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from safetensors.torch import load_model, save_model
from torch import nn

from .config import ModelConfig
from .fileio import write_atomic, write_json_atomic  # noqa: F401  (write_json_atomic: used by the models)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# `model_type`s of released layouts that `med3dvlm.convert` reads (the original Med3DVLM with Qwen2.5).
RELEASED_MODEL_TYPES = ("vlm_qwen",)

P = TypeVar("P", bound="PretrainedModel")


class PretrainedModel(nn.Module):
    """Base class of every model built from a `ModelConfig`."""

    config_class: ClassVar[type[ModelConfig]] = ModelConfig

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write `config.json` and `model.safetensors` into `directory` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(directory / CONFIG_NAME, self.config.to_dict())
        # Write beside the target then rename, so an interrupted save never leaves a torn file.
        write_atomic(directory / WEIGHTS_NAME, lambda tmp: save_model(self, str(tmp)))
        return directory

    @classmethod
    def from_pretrained(cls: type[P], directory: str | os.PathLike, **overrides: Any) -> P:
        """Rebuild a model from a directory written by `save_pretrained`.

        Keyword overrides change config fields that do not affect the weights' shapes.
        """
        model = from_pretrained(directory, **overrides)
        if not isinstance(model, cls):
            raise TypeError(f"{directory} holds a {type(model).__name__}, not a {cls.__name__}")
        return model


def read_config(directory: str | os.PathLike) -> ModelConfig:
    from .registry import config_class_for

    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME}; is {directory} a med3dvlm checkpoint directory?")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if "model_type" not in data:
        raise ValueError(f"{path}: has no 'model_type' key")
    return config_class_for(data["model_type"]).from_dict(data)


def from_pretrained(directory: str | os.PathLike, **overrides: Any) -> nn.Module:
    """Load whatever model in our format `directory` holds, dispatching on `model_type` in its config."""
    from .registry import build_from_config, model_class_for

    if peek_model_type(directory) in RELEASED_MODEL_TYPES:
        raise ValueError(
            f"{directory}: a released checkpoint (model_type {peek_model_type(directory)!r}), not med3dvlm's format; "
            "load it with med3dvlm.from_pretrained"
        )
    config = read_config(directory)
    if overrides:
        config = config.replace(**overrides)
    model_class = model_class_for(config.model_type)
    if hasattr(model_class, "load_directory"):  # composite models (the VLM) keep their parts in sub-folders
        return model_class.load_directory(directory, config)
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing weights file")
    model = build_from_config(config)
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"{weights}: weights do not match the config in {CONFIG_NAME}: {str(err)[:500]}") from None
    if missing or unexpected:
        raise ValueError(
            f"{weights}: weights do not match the config: missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
        )
    model.eval()
    return model


def peek_model_type(directory: str | os.PathLike) -> str | None:
    """`model_type` in `directory/config.json`, or None when it cannot be read (`read_config` says why)."""
    path = Path(directory) / CONFIG_NAME
    try:
        return json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None  # read_config reports the problem properly
