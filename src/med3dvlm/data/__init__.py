"""The data layer: reading CT volumes, preprocessing them for a model, and the M3D-style datasets.

Quick use::

    from med3dvlm.data import load_volume, preprocess, PreprocessSpec
    volume = load_volume("scan.nii.gz")                   # or a DICOM folder, .nrrd, .mha, .npy
    image = preprocess(volume, PreprocessSpec.ct("soft_tissue"))   # (1, 128, 256, 256) in [0, 1]
"""

from .datasets import CaptionDataset, ImageReportDataset, VQADataset, load_image, train_transforms
from .m3d import DatasetFormatError, check_dataset, read_cap_json, read_vqa_csv, write_cap_json, write_vqa_csv
from .phantom import write_phantom_dataset
from .prepare import prepare_m3d_cap
from .preprocess import (
    WINDOW_PRESETS,
    IntensityWarning,
    PreprocessReport,
    PreprocessSpec,
    load_for_model,
    preprocess,
    preprocess_with_report,
)
from .readers import DicomSeries, list_series, load_volume
from .splits import case_level_split, find_leakage
from .text import truncate_report
from .volume import Volume, VolumeError, reorient

__all__ = [
    "WINDOW_PRESETS",
    "CaptionDataset",
    "DatasetFormatError",
    "ImageReportDataset",
    "VQADataset",
    "case_level_split",
    "check_dataset",
    "find_leakage",
    "load_image",
    "prepare_m3d_cap",
    "read_cap_json",
    "read_vqa_csv",
    "train_transforms",
    "truncate_report",
    "write_cap_json",
    "write_phantom_dataset",
    "write_vqa_csv",
    "DicomSeries",
    "IntensityWarning",
    "PreprocessReport",
    "PreprocessSpec",
    "Volume",
    "VolumeError",
    "list_series",
    "load_for_model",
    "load_volume",
    "preprocess",
    "preprocess_with_report",
    "reorient",
]
