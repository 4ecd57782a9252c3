"""YAML recipes -> typed dataclasses, with dotted command-line overrides.

A recipe is a YAML mapping of sections (`model`, `data`, `train`, ...). Each stage defines its own
dataclasses for its sections; `load_recipe` reads the file, applies overrides such as
``train.lr=3e-4`` or ``data.image_size=[32,64,64]`` (values parsed as YAML), and
`section_from_dict` fills one dataclass, rejecting unknown keys with the file and key named, so a typo
in a recipe fails loudly instead of silently training with a default.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class RecipeError(ValueError):
    """A recipe file or override is malformed; the message names the file (or override) and the reason."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 0.0003); the value is parsed as YAML (so lists, null, bools work)."""
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=3e-4")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise RecipeError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise RecipeError(f"override {text!r}: value is not valid YAML ({err})") from None
    # YAML 1.1 reads "3e-4" (no dot) as a string; learning rates are written that way all the time.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in "eE.") and not value.isalpha() else value
        except ValueError:
            pass
    return parts, value


def apply_overrides(recipe: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of `recipe` with dotted overrides applied (intermediate mappings are created when missing)."""
    out = _deepcopy(recipe)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override {text!r}: {p!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def load_recipe(path: str | os.PathLike, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Read a YAML recipe (a mapping of sections) and apply dotted overrides."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML ({err})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    data = apply_overrides(data, overrides)
    data.setdefault("_source", str(path))
    return data


def section_from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str = "recipe") -> T:
    """Fill dataclass `cls` from `data`; unknown keys raise a `RecipeError` naming `where` and the valid keys.

    Lists become tuples for tuple-typed fields and nested dataclass fields are filled recursively.
    """
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        hint = hints.get(name)
        kwargs[name] = _coerce(value, hint, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{where}: {err}") from None


def to_plain(obj: Any) -> Any:
    """Dataclasses/tuples -> JSON/YAML-ready dicts and lists (for logging the resolved recipe)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _coerce(value: Any, hint: Any, where: str) -> Any:
    if hint is None or value is None:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _coerce(value, args[0], where) if len(args) == 1 else value
    if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
        return section_from_dict(hint, value, where)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if hint is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise RecipeError(f"{where}: expected a number, got {value!r}") from None
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


class Recipe:
    """Base of the stage recipes (dataclasses of sections): `from_dict` fills one from a loaded recipe dict.

    Keys starting with "_" are bookkeeping of `load_recipe` (e.g. "_source", the file it came from), not sections.
    """

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        source = data.get("_source", "recipe")
        return section_from_dict(cls, {k: v for k, v in data.items() if not k.startswith("_")}, where=str(source))
