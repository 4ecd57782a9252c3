"""Preprocessing as a serializable spec, stored in every model config and applied by whoever loads it.

Pipeline (each step optional as the spec says): orientation to one canonical frame -> resampling to a
spacing -> intensity to [0, 1] (an HU window, or M3D's min-max for already windowed 8-bit data) ->
crop to the foreground -> resize to the model size with trilinear interpolation, align_corners=False
(what MONAI `Resize(mode="trilinear")` does) -> float32 clipped to [0, 1], shaped (1, D, H, W).

The default spec reproduces M3D/Med3DVLM data preparation (min-max, crop foreground, resize to
128x256x256). A spec for raw CT in Hounsfield units uses `intensity="window"` with a preset.

A model trained on already windowed 8-bit images (every M3D-trained model: M3D-Cap's Radiopaedia
slices were windowed for display) has a min-max spec; its optional `hu_window` says which display
window its training images had, and a raw HU scan given to it is windowed with it before the min-max
(`input_hu_window`), instead of being min-maxed over its whole range (-1024..3000 HU), which squeezes
all soft tissue into a few grey levels.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .limits import ReadLimits
from .volume import Volume, VolumeError, reorient

logger = logging.getLogger(__name__)

# (level, width) in HU; the usual radiology presets.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
INTENSITY_MODES = ("minmax", "window", "none")
# Modalities whose values may be Hounsfield units (a file without a modality is taken at its values' word).
HU_MODALITIES = ("CT", "unknown")
DEFAULT_SIZE = (128, 256, 256)


class IntensityWarning(UserWarning):
    """The input's value range does not match what the spec expects (HU vs already normalized)."""


@dataclass
class PreprocessSpec:
    """How a volume becomes model input. All fields are JSON values (tuples round-trip via lists).

    Attributes:
        size: output (D, H, W).
        orientation: canonical frame the axes are permuted/flipped to (SimpleITK code); None keeps the
            input's. "LPS" puts patient left along W, posterior along H and superior along D.
        spacing: resample to this voxel size in mm (D, H, W) before everything else; None skips it.
        intensity: "window" (HU window -> [0, 1]), "minmax" (M3D: rescale the volume's own min/max
            to [0, 1]; meant for already windowed 8-bit data) or "none" (input is already in [0, 1]).
        window: preset name (see `WINDOW_PRESETS`) when intensity is "window".
        window_range: explicit (low, high) HU, overriding `window`.
        crop_foreground: crop to the bounding box of voxels above `foreground_threshold` after the
            intensity step (M3D's `CropForeground`, which keeps values > 0).
        foreground_threshold: see `crop_foreground`.
        hu_window: for a model trained on already windowed images (intensity "minmax" or "none"): the
            display window those images had, a preset name or {"level": L, "width": W} in HU. An input
            in Hounsfield units is windowed with it to [0, 1] before the intensity step, as the training
            images were; None keeps the old behaviour (a warning, then the intensity step alone).
    """

    size: tuple[int, int, int] = DEFAULT_SIZE
    orientation: str | None = "LPS"
    spacing: tuple[float, float, float] | None = None
    intensity: str = "minmax"
    window: str | None = None
    window_range: tuple[float, float] | None = None
    crop_foreground: bool = True
    foreground_threshold: float = 0.0
    hu_window: str | dict[str, float] | None = None

    def __post_init__(self) -> None:
        self.size = tuple(int(s) for s in self.size)  # type: ignore[assignment]
        if len(self.size) != 3 or min(self.size) < 1:
            raise ValueError(f"size must be three positive ints (D, H, W), got {self.size}")
        if self.spacing is not None:
            self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
            if len(self.spacing) != 3 or min(self.spacing) <= 0:
                raise ValueError(f"spacing must be three positive mm values, got {self.spacing}")
        if self.intensity not in INTENSITY_MODES:
            raise ValueError(f"intensity must be one of {INTENSITY_MODES}, got {self.intensity!r}")
        if self.window is not None and self.window not in WINDOW_PRESETS:
            raise ValueError(f"unknown window preset {self.window!r}; presets: {', '.join(WINDOW_PRESETS)}")
        if self.window_range is not None:
            self.window_range = tuple(float(v) for v in self.window_range)  # type: ignore[assignment]
            if len(self.window_range) != 2 or self.window_range[0] >= self.window_range[1]:
                raise ValueError(f"window_range must be (low, high) with low < high, got {self.window_range}")
        if self.intensity == "window" and self.window is None and self.window_range is None:
            raise ValueError('intensity="window" needs a window preset or a window_range')
        if self.hu_window is not None:
            if self.intensity == "window":
                raise ValueError('hu_window is for models trained on already windowed images (intensity "minmax" or '
                                 '"none"); a spec with intensity="window" windows every input with its window')
            level, width = hu_window_level_width(self.hu_window)  # validates
            if not isinstance(self.hu_window, str):
                self.hu_window = {"level": level, "width": width}

    @property
    def hu_range(self) -> tuple[float, float] | None:
        """The (low, high) HU mapped to (0, 1), or None when the spec does not window."""
        if self.intensity != "window":
            return None
        if self.window_range is not None:
            return self.window_range
        return window_bounds(self.window)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown PreprocessSpec fields: {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    @classmethod
    def ct(cls, window: str = "soft_tissue", size: tuple[int, int, int] = DEFAULT_SIZE, **kw: Any) -> PreprocessSpec:
        """A spec for raw CT in HU: canonical orientation, an HU window, crop, resize."""
        return cls(size=size, intensity="window", window=window, **kw)

    @classmethod
    def m3d(
        cls, size: tuple[int, int, int] = DEFAULT_SIZE, hu_window: str | dict[str, float] | None = None
    ) -> PreprocessSpec:
        """M3D/Med3DVLM's preparation of already windowed 8-bit slices: min-max, crop, resize.

        `hu_window`: the display window of those slices, applied first to inputs in HU.
        """
        return cls(size=size, intensity="minmax", hu_window=hu_window)

    @classmethod
    def for_model(cls, config: Any) -> PreprocessSpec:
        """The spec stored in a model config, or the M3D default at the config's `input_size`."""
        stored = getattr(config, "preprocess", None)
        if stored:
            return cls.from_dict(stored)
        size = getattr(config, "input_size", None)
        return cls.m3d(tuple(size) if size is not None else DEFAULT_SIZE)  # type: ignore[arg-type]


@dataclass
class PreprocessReport:
    """What `preprocess` read and did, for `med3dvlm data inspect` and logging."""

    input: dict[str, Any]
    steps: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    output: dict[str, Any] = field(default_factory=dict)
    # The spec's hu_window when it was applied to this input ({"level", "width", "low", "high", "name"}), else None.
    hu_window: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------- array operations


def window_bounds(preset: str) -> tuple[float, float]:
    """The (low, high) HU of a window preset: level -/+ width / 2."""
    level, width = WINDOW_PRESETS[preset]
    return level - width / 2, level + width / 2


def hu_window_level_width(hu_window: str | Mapping[str, float]) -> tuple[float, float]:
    """(level, width) in HU of a `PreprocessSpec.hu_window`: a preset name or {"level": L, "width": W}.

    Raises:
        ValueError: an unknown preset, other keys, or a width that is not a positive number.
    """
    if isinstance(hu_window, str):
        if hu_window not in WINDOW_PRESETS:
            raise ValueError(f"unknown hu_window preset {hu_window!r}; presets: {', '.join(WINDOW_PRESETS)}")
        return WINDOW_PRESETS[hu_window]
    if not isinstance(hu_window, Mapping) or set(hu_window) != {"level", "width"}:
        raise ValueError(f'hu_window must be a preset name or {{"level": L, "width": W}} in HU, got {hu_window!r}')
    level, width = float(hu_window["level"]), float(hu_window["width"])
    if not (np.isfinite(level) and np.isfinite(width) and width > 0):
        raise ValueError(f"hu_window needs a finite level and a positive width, got {hu_window!r}")
    return level, width


def describe_hu_window(hu_window: str | Mapping[str, float]) -> str:
    """A radiologist's name for a window: "W400/L40 (soft_tissue)", "W350/L50"."""
    level, width = hu_window_level_width(hu_window)
    return f"W{width:g}/L{level:g}" + (f" ({hu_window})" if isinstance(hu_window, str) else "")


def input_hu_window(spec: PreprocessSpec, modality: str, kind: str) -> tuple[float, float] | None:
    """The (low, high) HU to window an input with before a windowed-data spec's intensity step, or None.

    It is the spec's `hu_window`, when it has one and the input is in Hounsfield units: its values look
    like HU (`describe_range` kind "hu") and its modality may hold them (CT, or unknown). Specs with
    intensity "window" window every input themselves, so this is None for them. Every path from a file
    to a model (predict, the web app, the REST and OpenAI-compatible APIs) applies it through
    `preprocess_with_report`.
    """
    if spec.hu_window is None or spec.intensity == "window" or kind != "hu" or modality not in HU_MODALITIES:
        return None
    level, width = hu_window_level_width(spec.hu_window)
    return level - width / 2, level + width / 2


def apply_window(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly to [0, 1] and clip outside (MONAI `ScaleIntensityRange(clip=True)`)."""
    out = (np.asarray(array, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(out, 0.0, 1.0, out=out)


def minmax(array: np.ndarray) -> np.ndarray:
    """Rescale to [0, 1] by the array's own min and max; a constant array becomes zeros."""
    array = np.asarray(array, dtype=np.float32)
    lo, hi = float(array.min()), float(array.max())
    if hi - lo <= 0:
        return np.zeros_like(array)
    return (array - np.float32(lo)) / np.float32(hi - lo)


def foreground_box(array: np.ndarray, threshold: float = 0.0) -> tuple[slice, slice, slice] | None:
    """Bounding box of voxels > threshold (as MONAI `CropForeground`, margin 0), or None if there are none."""
    mask = array > threshold
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


def resize(tensor: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Trilinear resize of a (C, D, H, W) tensor, align_corners=False: equal to MONAI `Resize(mode="trilinear")`."""
    if tuple(tensor.shape[-3:]) == tuple(size):
        return tensor
    return F.interpolate(tensor.unsqueeze(0), size=tuple(size), mode="trilinear", align_corners=False).squeeze(0)


def resample_to_spacing(volume: Volume, spacing: tuple[float, float, float]) -> Volume:
    """Trilinear resampling to a new voxel size; the physical extent is kept."""
    shape = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(volume.shape, volume.spacing, spacing))
    if shape == volume.shape:
        return volume.replace(spacing=spacing)
    data = torch.from_numpy(np.asarray(volume.array, dtype=np.float32)).unsqueeze(0)
    out = resize(data, shape).squeeze(0).numpy()  # type: ignore[arg-type]
    real = tuple(n * s / m for n, s, m in zip(volume.shape, volume.spacing, shape))
    return volume.replace(array=out, spacing=real)


def describe_range(array: np.ndarray) -> str:
    """Classify a value range: "hu" (raw CT), "unit" ([0, 1]), "8bit" ([0, 255] integers) or "other"."""
    lo, hi = float(np.min(array)), float(np.max(array))
    if lo < -200.0 or hi > 1500.0:
        return "hu"
    if lo >= 0.0 and hi <= 1.0:
        return "unit"
    if lo >= 0.0 and hi <= 255.0 and (array.dtype == np.uint8 or np.all(np.mod(array.ravel()[:100_000], 1) == 0)):
        return "8bit"
    return "other"


def _check_input(volume: Volume, spec: PreprocessSpec, kind: str) -> list[str]:
    msgs = []
    if volume.modality not in HU_MODALITIES:
        if spec.intensity == "window":
            # A Hounsfield window means nothing for MR or PET values: refuse rather than feed noise.
            raise VolumeError(
                volume.source,
                f"modality {volume.modality}: the preprocessing applies a CT Hounsfield window {spec.hu_range}, which "
                "is meaningless for this modality; use a CT scan, or a spec with intensity='minmax'",
            )
        msgs.append(f"{volume.source}: modality {volume.modality}, not CT; the models here are trained on CT, so results may be meaningless")
    if spec.intensity == "window" and kind in ("unit", "8bit"):
        what = "already normalized to [0, 1]" if kind == "unit" else "an already windowed 8-bit image"
        msgs.append(
            f"{volume.source}: the spec windows Hounsfield units {spec.hu_range} but the input looks {what} "
            f"(range {volume.value_range()}); use intensity='minmax' or 'none' for such data"
        )
    elif spec.intensity in ("minmax", "none") and kind == "hu" and input_hu_window(spec, volume.modality, kind) is None:
        fate = "min-maxed over its whole range" if spec.intensity == "minmax" else "clipped to [0, 1]"
        fix = ("set the spec's hu_window to the display window of the model's training images" if spec.hu_window is None
               else "its hu_window applies to CT only")
        msgs.append(
            f"{volume.source}: the input looks like raw Hounsfield units (range {volume.value_range()}) but the spec "
            f"expects already windowed/normalized data (intensity={spec.intensity!r}), so it is {fate}; {fix}"
        )
    elif spec.intensity == "none" and kind != "unit":
        msgs.append(f"{volume.source}: intensity='none' expects values in [0, 1]; values outside are clipped")
    return msgs


def preprocess_with_report(
    volume: Volume, spec: PreprocessSpec, include_private: bool = False
) -> tuple[torch.Tensor, PreprocessReport]:
    """Apply `spec` to `volume`: a (1, D, H, W) float32 tensor in [0, 1], plus what was done.

    An input in Hounsfield units given to a spec of windowed data with a `hu_window` is windowed with
    it first (`input_hu_window`); the report says so in its steps and its `hu_window`. Range mismatches
    (HU expected but the input looks normalized, or the reverse) and a non-CT
    modality are warned with `IntensityWarning` and recorded in the report, after what the reader
    itself noticed (`volume.warnings`: uneven slice gaps, an assumed spacing). The report's input
    holds geometry and values; the DICOM series UID and description only with `include_private`.

    Raises:
        VolumeError: a HU window is asked for on a volume whose modality is not CT.
    """
    report = PreprocessReport(input=volume.summary(include_private=include_private))
    report.warnings.extend(volume.warnings)
    kind = describe_range(volume.array)
    report.input["looks_like"] = kind
    for msg in _check_input(volume, spec, kind):
        warnings.warn(msg, IntensityWarning, stacklevel=3)
        report.warnings.append(msg)

    if spec.orientation and volume.orientation != spec.orientation:
        before = volume.orientation
        volume = reorient(volume, spec.orientation)
        report.steps.append(f"reorient {before} -> {volume.orientation}")
    if spec.spacing is not None:
        before_shape = volume.shape
        volume = resample_to_spacing(volume, spec.spacing)
        report.steps.append(f"resample to spacing {list(spec.spacing)} mm: {list(before_shape)} -> {list(volume.shape)}")

    array = np.asarray(volume.array)
    display = input_hu_window(spec, volume.modality, kind)
    if display is not None:
        # The model saw images windowed for display, then min-maxed: window the HU the same way first.
        low, high = display
        hu_window = spec.hu_window
        assert hu_window is not None  # input_hu_window returns bounds only for a spec with one
        level, width = hu_window_level_width(hu_window)
        array = apply_window(array, low, high)
        name = hu_window if isinstance(hu_window, str) else None
        report.hu_window = {"level": level, "width": width, "low": low, "high": high, "name": name}
        report.steps.append(
            f"HU window {describe_hu_window(hu_window)} applied: [{low:g}, {high:g}] HU -> [0, 1] "
            "(the model was trained on windowed images)"
        )
    if spec.intensity == "window":
        low, high = spec.hu_range  # type: ignore[misc]
        array = apply_window(array, low, high)
        report.steps.append(f"window [{low:g}, {high:g}] HU -> [0, 1]" + (f" ({spec.window})" if spec.window_range is None else ""))
    elif spec.intensity == "minmax":
        lo, hi = float(np.min(array)), float(np.max(array))
        array = minmax(array)
        report.steps.append(f"min-max [{lo:g}, {hi:g}] -> [0, 1]")
        if hi <= lo:
            what = "constant after the HU window" if display is not None else f"constant volume (all {lo:g})"
            report.warnings.append(f"{volume.source}: {what}; the output is all zeros")
    else:
        array = np.clip(np.asarray(array, dtype=np.float32), 0.0, 1.0)
        report.steps.append("clip to [0, 1]")

    if spec.crop_foreground:
        box = foreground_box(array, spec.foreground_threshold)
        if box is None:
            msg = f"{volume.source}: no voxel above {spec.foreground_threshold:g} after the intensity step; nothing cropped"
            report.warnings.append(msg)  # not logged: the message names the file
        elif tuple(b.stop - b.start for b in box) != array.shape:
            report.steps.append(f"crop foreground {list(array.shape)} -> {[b.stop - b.start for b in box]}")
            array = array[box]

    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).unsqueeze(0)  # (1, D, H, W)
    if tuple(tensor.shape[1:]) != spec.size:
        report.steps.append(f"resize {list(tensor.shape[1:])} -> {list(spec.size)} (trilinear, align_corners=False)")
        tensor = resize(tensor, spec.size)
    tensor = tensor.clamp_(0.0, 1.0)
    report.output = {
        "shape": list(tensor.shape),
        "dtype": "float32",
        "min": float(tensor.min()),
        "max": float(tensor.max()),
        "mean": float(tensor.mean()),
    }
    return tensor, report


def preprocess(volume: Volume, spec: PreprocessSpec | None = None) -> torch.Tensor:
    """`preprocess_with_report` without the report: a (1, D, H, W) float32 tensor in [0, 1]."""
    return preprocess_with_report(volume, spec or PreprocessSpec())[0]


def load_for_model(
    path: Any,
    config_or_spec: Any,
    series_uid: str | None = None,
    limits: ReadLimits | None = None,
    strict: bool = False,
    include_private: bool = False,
) -> tuple[torch.Tensor, PreprocessReport]:
    """Read a file or DICOM folder and preprocess it as a model expects: (1, D, H, W) and the report.

    `config_or_spec` is a `PreprocessSpec` or a model config (its stored spec, else the M3D default).
    This is the one path from a file to model input, whatever its type (a prepared .npy too), so the
    same checks and the same intensity mapping apply to reports, answers, embeddings and search.
    `limits` and `strict` are passed to `load_volume`.
    """
    from .readers import load_volume

    spec = spec_for(config_or_spec)
    volume = load_volume(path, series_uid=series_uid, limits=limits, strict=strict)
    return preprocess_with_report(volume, spec, include_private=include_private)


def with_hu_window(config: Any, hu_window: str | dict[str, float] | None) -> Any:
    """A copy of model `config` whose stored spec (else the M3D default) has `hu_window`.

    Training recipes call it with the display window of their images, so the saved model windows raw HU
    input the same way (see `PreprocessSpec.hu_window`).
    """
    spec = dataclasses.replace(PreprocessSpec.for_model(config), hu_window=hu_window)
    return config.replace(preprocess=spec.to_dict())


def spec_for(config_or_spec: Any) -> PreprocessSpec:
    """`config_or_spec` if it is a `PreprocessSpec`, else the spec stored in that model config."""
    return config_or_spec if isinstance(config_or_spec, PreprocessSpec) else PreprocessSpec.for_model(config_or_spec)
