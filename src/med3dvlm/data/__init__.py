"""The data layer: reading CT volumes, preprocessing them for a model, and the M3D-style datasets.

Quick use::

    from med3dvlm.data import load_volume, preprocess, PreprocessSpec
    volume = load_volume("scan.nii.gz")                   # or a DICOM folder, .nrrd, .mha, .npy
    image = preprocess(volume, PreprocessSpec.ct("soft_tissue"))   # (1, 128, 256, 256) in [0, 1]
"""

from .preprocess import (
    WINDOW_PRESETS,
    IntensityWarning,
    PreprocessReport,
    PreprocessSpec,
    preprocess,
    preprocess_with_report,
)
from .readers import DicomSeries, list_series, load_volume
from .volume import Volume, VolumeError, reorient

__all__ = [
    "WINDOW_PRESETS",
    "DicomSeries",
    "IntensityWarning",
    "PreprocessReport",
    "PreprocessSpec",
    "Volume",
    "VolumeError",
    "list_series",
    "load_volume",
    "preprocess",
    "preprocess_with_report",
    "reorient",
]
