"""Model registry: names map to config factories, config classes map to model classes.

Usage mirrors timm: `@register_model` on a tiny function that returns a filled config,
`create_model("dcformer_small", **overrides)` to build one, `list_models("dcformer_*")` to browse.

The registry is the layer just above `config`: it imports no model. The package `__init__` imports
`med3dvlm.models`, whose decorators fill it, so any `import med3dvlm...` sees every built-in name.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from .config import ModelConfig

_CONFIG_FACTORIES: dict[str, Callable[[], ModelConfig]] = {}
_MODEL_CLASSES: dict[str, type[nn.Module]] = {}
_CONFIG_CLASSES: dict[str, type[ModelConfig]] = {}

F = TypeVar("F", bound=Callable[[], ModelConfig])
M = TypeVar("M", bound=type[nn.Module])


def register_model(fn: F) -> F:
    """Register a named config; the function's name is the model name."""
    name = fn.__name__
    if name in _CONFIG_FACTORIES:
        raise ValueError(f"model {name!r} is registered twice")
    _CONFIG_FACTORIES[name] = fn
    return fn


def register_family(config_class: type[ModelConfig]) -> Callable[[M], M]:
    """Class decorator tying a model class to its config class (and so to `config.model_type`).

    It also sets the class's `config_class`, which `PretrainedModel` checks configs against.
    """

    def wrap(model_class: M) -> M:
        key = config_class.model_type
        if not key:
            raise ValueError(f"{config_class.__name__} has no model_type")
        model_class.config_class = config_class  # type: ignore[attr-defined]
        _MODEL_CLASSES[key] = model_class
        _CONFIG_CLASSES[key] = config_class
        return model_class

    return wrap


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    return sorted(n for n in _CONFIG_FACTORIES if fnmatch.fnmatchcase(n, pattern))


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """The config registered under `name`, with `overrides` applied."""
    if name not in _CONFIG_FACTORIES:
        close = difflib.get_close_matches(name, list(_CONFIG_FACTORIES), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown model {name!r}.{hint} See `med3dvlm.list_models()` for all names.")
    config = _CONFIG_FACTORIES[name]()
    return config.replace(**overrides) if overrides else config


def config_class_for(model_type: str) -> type[ModelConfig]:
    """The config class registered for `model_type` (the key in `config.json`)."""
    if model_type not in _CONFIG_CLASSES:
        raise KeyError(f"unknown model_type {model_type!r}; known: {', '.join(sorted(_CONFIG_CLASSES))}")
    return _CONFIG_CLASSES[model_type]


def model_class_for(model_type: str) -> type[nn.Module]:
    """The model class registered for `model_type`."""
    if model_type not in _MODEL_CLASSES:
        raise KeyError(f"no model class registered for model_type {model_type!r}")
    return _MODEL_CLASSES[model_type]


def build_from_config(config: ModelConfig) -> nn.Module:
    """Instantiate the model class registered for `config.model_type`."""
    try:
        model_class = _MODEL_CLASSES[config.model_type]
    except KeyError:
        raise KeyError(f"no model class registered for model_type {config.model_type!r}") from None
    return model_class(config)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build the registered model `name`; keyword arguments override config fields."""
    return build_from_config(get_config(name, **overrides))
