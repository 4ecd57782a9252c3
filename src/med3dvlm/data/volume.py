"""The one in-memory volume type: a (D, H, W) array plus its geometry and modality.

Every reader returns a `Volume`; preprocessing consumes one. The geometry follows SimpleITK/DICOM
conventions (physical coordinates in LPS millimetres) so a `Volume` converts losslessly to and from a
`SimpleITK.Image`, whose array order is also (D, H, W) = (z, y, x).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

IDENTITY_DIRECTION: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


class VolumeError(ValueError):
    """A volume (file, folder or array) cannot be used; the message names the source and the reason."""

    def __init__(self, source: Any, reason: str) -> None:
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")


class VolumeTooLarge(VolumeError):
    """A volume is (or claims to be) larger than the read limits allow; servers answer 413."""


@dataclass
class Volume:
    """A 3D scalar image.

    Attributes:
        array: voxel values, shape (D, H, W); Hounsfield units for CT read from DICOM or HU NIfTI.
        spacing: voxel size in mm along (D, H, W).
        origin: physical (x, y, z) position in LPS mm of voxel (0, 0, 0).
        direction: 3x3 direction cosines, row-major as in SimpleITK; column j is the physical
            direction of index axis j in ITK order (x=W, y=H, z=D).
        modality: "CT", "MR", ... or "unknown" when the file does not say.
        source: where it was read from (a path), for error messages and reports.
        meta: reader-specific extras (slice count, slice gaps, ...), JSON values only; shown in reports.
        warnings: what the reader noticed but accepted (uneven slice gaps, an assumed pixel spacing);
            reports and responses carry them, and `load_volume(strict=True)` refuses them.
        private: DICOM fields that can identify a patient or a study (series UID, free-text
            description). Kept out of `summary()`, logs and responses unless asked for.
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = IDENTITY_DIRECTION
    modality: str = "unknown"
    source: str = "<array>"
    meta: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    private: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise VolumeError(self.source, f"expected a 3D (D, H, W) array, got shape {tuple(self.array.shape)}")
        if len(self.spacing) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise VolumeError(self.source, "spacing and origin need 3 values and direction 9")
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(o) for o in self.origin)  # type: ignore[assignment]
        self.direction = tuple(float(d) for d in self.direction)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def orientation(self) -> str:
        """Three-letter code of where each index axis (W, H, D order) points, e.g. "LPS" for identity."""
        try:
            return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(self.direction)
        except RuntimeError:
            return "oblique"

    def value_range(self) -> tuple[float, float]:
        return float(np.min(self.array)), float(np.max(self.array))

    def replace(self, **changes: Any) -> Volume:
        return dataclasses.replace(self, **changes)

    def summary(self, include_private: bool = False) -> dict[str, Any]:
        """JSON-ready description used by `med3dvlm data inspect`: geometry and values, no DICOM free text.

        `include_private` adds the `private` fields (series UID, description) under "dicom".
        """
        lo, hi = self.value_range()
        return {
            "source": self.source,
            "shape": list(self.shape),
            "dtype": str(self.array.dtype),
            "spacing": [round(s, 6) for s in self.spacing],
            "orientation": self.orientation,
            "modality": self.modality,
            "min": lo,
            "max": hi,
            "mean": float(np.mean(self.array, dtype=np.float64)),
            **({"meta": self.meta} if self.meta else {}),
            **({"dicom": self.private} if include_private and self.private else {}),
        }

    def to_sitk(self) -> sitk.Image:
        img = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        # SimpleITK orders spacing (x, y, z) = (W, H, D).
        img.SetSpacing(tuple(reversed(self.spacing)))
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction)
        return img

    @classmethod
    def from_sitk(cls, img: sitk.Image, modality: str = "unknown", source: str = "<sitk>", **meta: Any) -> Volume:
        return cls(
            array=sitk.GetArrayFromImage(img),
            spacing=tuple(reversed(img.GetSpacing())),  # type: ignore[arg-type]
            origin=img.GetOrigin(),  # type: ignore[arg-type]
            direction=img.GetDirection(),
            modality=modality,
            source=source,
            meta=dict(meta),
        )


def reorient(volume: Volume, orientation: str = "LPS") -> Volume:
    """The same volume with its axes permuted/flipped so the index axes point as `orientation` says.

    Only axis permutations and flips happen (no interpolation), so values are unchanged.
    """
    if volume.orientation == orientation:
        return volume
    img = sitk.DICOMOrient(volume.to_sitk(), orientation)
    # `replace` keeps modality, meta, warnings and private fields; only the grid changes.
    return volume.replace(
        array=sitk.GetArrayFromImage(img),
        spacing=tuple(reversed(img.GetSpacing())),
        origin=img.GetOrigin(),
        direction=img.GetDirection(),
    )
