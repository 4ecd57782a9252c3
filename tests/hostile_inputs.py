"""Broken and hostile inputs written on the fly: lying headers, bad geometry, odd DICOM, for the reader and server tests."""

from __future__ import annotations

import gzip
import io
import zlib
import zipfile
from pathlib import Path

import numpy as np


def lying_nifti(path: Path, shape: tuple[int, ...] = (1024, 1024, 1024), dtype: type = np.int16) -> Path:
    """A .nii.gz (52 bytes for the default) whose header claims `shape` and which holds no voxel data."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    raw = header.binaryblock + b"\0" * 4
    path.write_bytes(gzip.compress(raw, 9, mtime=0) if path.name.endswith(".gz") else raw)
    return path


def nifti_with_affine(path: Path, affine: np.ndarray, shape: tuple[int, ...] = (8, 9, 10)) -> Path:
    """A NIfTI whose sform is `affine` as given (nibabel refuses to save an affine it cannot decompose)."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header["sform_code"], header["qform_code"] = 1, 0
    header["srow_x"], header["srow_y"], header["srow_z"] = affine[0], affine[1], affine[2]
    raw = header.binaryblock + b"\0" * 4 + np.zeros(shape, np.int16).tobytes()
    path.write_bytes(gzip.compress(raw, mtime=0) if path.name.endswith(".gz") else raw)
    return path


def lps_nifti(path: Path, array: np.ndarray, spacing: tuple[float, float, float] = (2.5, 0.8, 0.8)) -> Path:
    """`array` (D, H, W) as a NIfTI whose voxel axes are LPS, so it reads back without reorientation (like a .npy)."""
    import nibabel as nib

    affine = np.diag([-spacing[2], -spacing[1], spacing[0], 1.0])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine), str(path))
    return path


def lying_nrrd(path: Path, sizes: tuple[int, int, int] = (2048, 2048, 512), payload: bytes = b"") -> Path:
    """A gzip NRRD whose header claims `sizes` (x y z) int16, followed by a tiny gzip stream (`payload` packed)."""
    header = (
        "NRRD0004\ntype: short\ndimension: 3\n"
        f"sizes: {sizes[0]} {sizes[1]} {sizes[2]}\nspacings: 1 1 1\nencoding: gzip\nendian: little\n\n"
    )
    path.write_bytes(header.encode() + gzip.compress(payload, 9, mtime=0))
    return path


def raw_nrrd(path: Path, array: np.ndarray, spacings: str = "1 1 1") -> Path:
    """`array` (D, H, W) int16 as an uncompressed NRRD with the given spacings line."""
    d, h, w = array.shape
    header = f"NRRD0004\ntype: short\ndimension: 3\nsizes: {w} {h} {d}\nspacings: {spacings}\nencoding: raw\nendian: little\n\n"
    path.write_bytes(header.encode() + array.astype("<i2").tobytes())
    return path


def short_mha(path: Path, sizes: tuple[int, int, int] = (256, 256, 128), compressed: bool = True) -> Path:
    """A MetaImage whose header claims `sizes` of shorts but holds a few bytes of data."""
    data = b"\0" * 64
    lines = [
        "ObjectType = Image", "NDims = 3", f"DimSize = {sizes[0]} {sizes[1]} {sizes[2]}", "ElementType = MET_SHORT",
        "ElementSpacing = 1 1 1", f"CompressedData = {'True' if compressed else 'False'}", "ElementDataFile = LOCAL",
    ]
    payload = zlib.compress(data) if compressed else data
    path.write_bytes(("\n".join(lines) + "\n").encode() + payload)
    return path


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def zip_of(files: dict[str, bytes], archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in files.items():
            zf.writestr(name, content)
    return archive


def edit_dicom_series(folder: Path, edit) -> Path:
    """Apply `edit(index, dataset)` to every slice of a series written by `serving_helpers.write_dicom_series`."""
    import pydicom

    for k, path in enumerate(sorted(folder.glob("*.dcm"))):
        ds = pydicom.dcmread(path)
        if edit(k, ds) is False:
            path.unlink()
            continue
        ds.save_as(path, enforce_file_format=True)
    return folder


def strip_preamble(path: Path) -> Path:
    """Rewrite a DICOM file as a bare dataset: no 128-byte preamble, no "DICM", no file meta (old exports)."""
    import pydicom
    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_dataset

    ds = pydicom.dcmread(path)
    with open(path, "wb") as fh:
        out = DicomFileLike(fh)
        out.is_little_endian, out.is_implicit_VR = True, True
        write_dataset(out, ds)
    return path


def patch_bytes(path: Path, old: bytes, new: bytes) -> Path:
    """Replace `old` by `new` (same length) in a file: how a value pydicom refuses to write gets into one."""
    data = path.read_bytes()
    assert data.count(old) == 1 and len(old) == len(new)
    path.write_bytes(data.replace(old, new))
    return path
