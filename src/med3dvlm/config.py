"""Serializable configuration dataclasses shared by every model family.

A config is the single source of truth for a model: `create_model` builds from it, `save_pretrained`
writes it to `config.json`, and `from_pretrained` rebuilds the same model from that file alone.
Every field is a JSON value (ints, floats, strings, lists, dicts); tuples round-trip through lists.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

C = TypeVar("C", bound="ModelConfig")


@dataclass
class ModelConfig:
    """Base class of every model config.

    Subclasses set `model_type`, the key that `from_pretrained` uses to pick the model class.
    `preprocess` holds the serialized preprocessing spec (see `med3dvlm.data.preprocess`) so that the
    way volumes must be prepared travels with the weights.
    """

    model_type: ClassVar[str] = ""
    preprocess: dict[str, Any] | None = field(default=None, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model_type": self.model_type}
        for f in dataclasses.fields(self):
            out[f.name] = _to_json(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        data = dict(data)
        model_type = data.pop("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(f"config is for model_type {model_type!r}, not {cls.model_type!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        kwargs = {k: _from_json(v, hints.get(k)) for k, v in data.items()}
        return cls(**kwargs)

    def replace(self: C, **overrides: Any) -> C:
        """A copy with some fields changed; unknown field names are an error, not silently ignored."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(
                f"{type(self).__name__} has no field(s) {', '.join(unknown)}; fields are: {', '.join(sorted(names))}"
            )
        # Values often come from YAML or JSON (lists); coerce them like from_dict so equal configs compare equal.
        hints = typing.get_type_hints(type(self))
        return dataclasses.replace(self, **{k: _from_json(v, hints.get(k)) for k, v in overrides.items()})


def _to_json(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value):
        return _to_json(dataclasses.asdict(value))
    return value


def _from_json(value: Any, hint: Any) -> Any:
    """Turn JSON lists back into tuples where the field is annotated as a tuple."""
    if hint is None or value is None:
        return value
    origin = typing.get_origin(hint)
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(hint)
        inner = args[0] if args else None
        return tuple(_from_json(v, inner) for v in value)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in typing.get_args(hint):
            if arg is type(None):
                continue
            return _from_json(value, arg)
    return value
