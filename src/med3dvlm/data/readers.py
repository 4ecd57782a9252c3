"""Reading volumes from disk: NIfTI, DICOM series folders, NRRD/MHA (any ITK format) and .npy.

`load_volume(path)` picks the reader from the path. DICOM headers are scanned with pydicom so that
slices are grouped by series and sorted by their position along the slice normal (never by file name
or instance number), and rescale slope/intercept are applied per slice, giving Hounsfield units for CT.
Every failure raises `VolumeError` naming the file and the reason; nothing is silently replaced.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from .volume import Volume, VolumeError

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd", ".nii", ".nii.gz", ".img", ".hdr", ".vtk")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
# The volume files that `discover_volumes` lists (single DICOM slices are found as their series folder).
VOLUME_SUFFIXES = (".npy", ".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")


@dataclass
class DicomSeries:
    """One series found in a folder, as listed by `list_series`."""

    uid: str
    description: str
    modality: str
    num_files: int
    rows: int
    columns: int
    files: list[Path]

    def to_dict(self) -> dict[str, object]:
        """Everything but the file list (it can be thousands of paths)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "files"}


def file_suffix(name: str | os.PathLike) -> str:
    """The file type of a name or path (".nii.gz" counts as one suffix), lower case; "" when none."""
    lower = str(name).lower()
    return ".nii.gz" if lower.endswith(".nii.gz") else PurePosixPath(lower).suffix


def _is_dicom_dir(path: Path) -> bool:
    return path.is_dir() and any(p.suffix.lower() in DICOM_SUFFIXES for p in path.iterdir())


def discover_volumes(folder: str | os.PathLike) -> list[Path]:
    """Volume files (npy, NIfTI, NRRD, MHA) and DICOM series folders under `folder`, sorted."""
    folder = Path(folder)
    found: list[Path] = []
    for path in sorted(folder.rglob("*")):
        name = path.name.lower()
        if path.is_file() and name.endswith(VOLUME_SUFFIXES) and not name.endswith(".dcm"):
            found.append(path)
        elif _is_dicom_dir(path):
            found.append(path)
    if _is_dicom_dir(folder):
        found.insert(0, folder)
    return found


def load_volume(path: str | os.PathLike, series_uid: str | None = None) -> Volume:
    """Read a 3D volume from a file or a DICOM series folder.

    Args:
        path: a .nii/.nii.gz, .nrrd, .mha/.mhd, .npy or single DICOM file, or a folder of DICOM slices.
        series_uid: which series to read when a folder holds several (see `list_series`).

    Raises:
        VolumeError: the path is missing, empty, unreadable, not 3D, or holds NaN/Inf.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(path, "no such file or directory")
    if path.is_dir():
        volume = read_dicom_series(path, series_uid)
    else:
        if path.stat().st_size == 0:
            raise VolumeError(path, "the file is empty (0 bytes)")
        suffix = file_suffix(path.name)
        if suffix == ".npy":
            volume = read_npy(path)
        elif suffix in DICOM_SUFFIXES or (suffix not in ITK_SUFFIXES and _is_dicom(path)):
            volume = read_dicom_file(path)
        elif suffix in NIFTI_SUFFIXES:
            volume = read_nifti(path)
        elif suffix in ITK_SUFFIXES:
            volume = read_itk(path)
        else:
            raise VolumeError(path, f"unsupported file type {suffix or '(no suffix)'!r}; expected NIfTI, DICOM, NRRD, MHA or .npy")
    check_finite(volume)
    return volume


def check_finite(volume: Volume) -> None:
    if np.issubdtype(volume.array.dtype, np.floating):
        bad = int(np.size(volume.array) - np.count_nonzero(np.isfinite(volume.array)))
        if bad:
            raise VolumeError(volume.source, f"{bad} voxels are NaN or Inf")


def _squeeze_to_3d(array: np.ndarray, source: Path) -> np.ndarray:
    if array.ndim == 4 and array.shape[0] == 1:  # (1, D, H, W) as the M3D .npy files store it
        array = array[0]
    return _require_3d(array, source)


def _require_3d(array: np.ndarray, source: Path) -> np.ndarray:
    """`array` if it is a 3D volume, else a `VolumeError` saying what it is instead."""
    if array.ndim == 2:
        raise VolumeError(source, f"a 2D image of shape {array.shape}, not a 3D volume")
    if array.ndim != 3:
        raise VolumeError(source, f"a {array.ndim}D image of shape {array.shape}; only 3D volumes are supported")
    if min(array.shape) < 2:
        raise VolumeError(source, f"shape {array.shape} has a singleton axis; this is a 2D image, not a 3D volume")
    return array


def read_npy(path: Path) -> Volume:
    """A (D, H, W) or (1, D, H, W) array; memory-mapped so reading a crop stays cheap."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise VolumeError(path, f"not a readable .npy array ({err})") from None
    if array.dtype.kind not in "biuf":
        raise VolumeError(path, f"unsupported dtype {array.dtype}")
    array = _squeeze_to_3d(np.asarray(array), path)
    return Volume(array=array, source=str(path), meta={"format": "npy"})


def read_itk(path: Path) -> Volume:
    """NRRD, MetaImage and the other formats SimpleITK reads."""
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as err:
        reason = _itk_reason(err)
        if "no such file" in reason.lower():  # ITK reports a stale errno when the data are short
            reason = f"truncated or corrupt image data ({reason})"
        raise VolumeError(path, f"cannot be read: {reason}") from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(path, f"has {img.GetNumberOfComponentsPerPixel()} components per voxel (colour/vector); need a scalar image")
    dim = img.GetDimension()
    if dim == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
        dim = 3
    if dim != 3:
        raise VolumeError(path, f"a {dim}D image of size {img.GetSize()}; only 3D volumes are supported")
    if min(img.GetSize()) < 2:
        raise VolumeError(path, f"size {img.GetSize()} has a singleton axis; this is a 2D image, not a 3D volume")
    modality = _itk_modality(img)
    return Volume.from_sitk(img, modality=modality, source=str(path), format=file_suffix(path.name).lstrip("."))


def _itk_reason(err: RuntimeError) -> str:
    # ITK messages span several lines with source locations; keep the informative tail.
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("sitk::ERROR", "/", "itk::"))] or lines
    return " ".join(useful[-2:])[:300]


def _itk_modality(img: sitk.Image) -> str:
    for key in ("0008|0060", "modality", "Modality"):
        if img.HasMetaDataKey(key):
            return img.GetMetaData(key).strip() or "unknown"
    return "unknown"


def read_nifti(path: Path) -> Volume:
    """NIfTI through nibabel.

    Not SimpleITK: its NIfTI reader silently zero-fills a truncated file and turns NaN into 0, which
    would hide exactly the bad input we must report. The affine (RAS) is converted to ITK's LPS.
    """
    import nibabel as nib

    try:
        nii = nib.load(str(path))
        data = np.asanyarray(nii.dataobj)  # applies scl_slope/scl_inter
    except EOFError as err:
        raise VolumeError(path, f"truncated or corrupt gzip stream ({err})") from None
    except Exception as err:  # nibabel raises many types for corrupt files
        reason = " ".join(str(err).split())
        if "Expected" in reason and "bytes" in reason:
            reason = f"truncated: {reason}"
        raise VolumeError(path, f"not a readable NIfTI file ({reason})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    data = _require_3d(data, path)
    affine = nii.affine.copy()
    affine[:2] *= -1  # RAS (NIfTI) -> LPS (ITK)
    columns = affine[:3, :3]
    spacing_xyz = np.linalg.norm(columns, axis=0)
    cosines = columns / spacing_xyz
    u, _, vt = np.linalg.svd(cosines)
    direction = u @ vt  # nearest rotation; equals `cosines` unless the affine has a shear
    if not np.allclose(direction, cosines, atol=1e-4):
        logger.warning("%s: the affine has a shear; using the nearest rotation for orientation", path)
    return Volume(
        array=np.ascontiguousarray(np.asarray(data).transpose(2, 1, 0)),  # nibabel (x, y, z) -> (D, H, W)
        spacing=tuple(float(s) for s in spacing_xyz[::-1]),  # type: ignore[arg-type]
        origin=tuple(float(o) for o in affine[:3, 3]),  # type: ignore[arg-type]
        direction=tuple(float(d) for d in direction.ravel()),
        source=str(path),
        meta={"format": file_suffix(path.name).lstrip(".")},
    )


# --------------------------------------------------------------------------------------------- DICOM


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _read_header(path: Path) -> pydicom.Dataset | None:
    """The header of a DICOM image file, or None when `path` is not one (quietly: folders hold other files)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=not path.name.lower().endswith(".txt"))
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError, KeyError):
        return None
    if "SeriesInstanceUID" not in ds and "SOPClassUID" not in ds:
        return None  # force=True "reads" any file; a real DICOM has at least one of these
    return ds


def _scan_folder(folder: Path) -> dict[str, list[tuple[Path, pydicom.Dataset]]]:
    series: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    skipped = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name.upper() == "DICOMDIR":
            continue
        ds = _read_header(path)
        if ds is None:
            skipped += 1
            continue
        uid = str(ds.get("SeriesInstanceUID", "unknown"))
        series.setdefault(uid, []).append((path, ds))
    if skipped:
        logger.debug("%s: %d files are not DICOM and were ignored", folder, skipped)
    return series


def list_series(folder: str | os.PathLike) -> list[DicomSeries]:
    """The DICOM series in `folder` (searched recursively), largest first."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VolumeError(folder, "not a directory")
    out = []
    for uid, items in _scan_folder(folder).items():
        images = [(p, ds) for p, ds in items if "Rows" in ds]
        first = images[0][1] if images else items[0][1]
        out.append(
            DicomSeries(
                uid=uid,
                description=str(first.get("SeriesDescription", "")),
                modality=str(first.get("Modality", "unknown")),
                num_files=len(images),
                rows=int(first.get("Rows", 0)),
                columns=int(first.get("Columns", 0)),
                files=[p for p, _ in images],
            )
        )
    return sorted(out, key=lambda s: -s.num_files)


def read_dicom_series(folder: Path, series_uid: str | None = None) -> Volume:
    """Read one series from a folder of slices: grouped by UID, sorted by geometry, in HU."""
    groups = _scan_folder(folder)
    if not groups:
        raise VolumeError(folder, "no DICOM files found in the folder (an empty series)")
    if series_uid is None:
        if len(groups) > 1:
            listing = "; ".join(
                f"{s.uid} ({s.description or 'no description'}, {s.num_files} files)" for s in list_series(folder)
            )
            raise VolumeError(folder, f"holds {len(groups)} DICOM series; pass a series UID, one of: {listing}")
        series_uid = next(iter(groups))
    if series_uid not in groups:
        raise VolumeError(folder, f"has no series with UID {series_uid}; found: {', '.join(groups)}")
    items = [(p, ds) for p, ds in groups[series_uid] if "Rows" in ds]
    if not items:
        raise VolumeError(folder, f"series {series_uid} has no image slices (an empty series)")
    if len(items) == 1:
        return read_dicom_file(items[0][0])
    return _assemble_series(folder, series_uid, items)


def _slice_geometry(path: Path, ds: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        iop = np.array([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
    except (AttributeError, TypeError, ValueError):
        raise VolumeError(path, "slice has no ImagePositionPatient/ImageOrientationPatient; cannot order it by geometry") from None
    return iop[:3], iop[3:], ipp


def _assemble_series(folder: Path, uid: str, items: list[tuple[Path, pydicom.Dataset]]) -> Volume:
    row_dir, col_dir, _ = _slice_geometry(*items[0])
    normal = np.cross(row_dir, col_dir)
    keyed = []
    for path, ds in items:
        r, c, ipp = _slice_geometry(path, ds)
        if not (np.allclose(r, row_dir, atol=1e-3) and np.allclose(c, col_dir, atol=1e-3)):
            raise VolumeError(path, "slice orientation differs from the rest of the series (mixed orientations)")
        keyed.append((float(np.dot(ipp, normal)), path, ds, ipp))
    keyed.sort(key=lambda t: t[0])
    positions = np.array([k[0] for k in keyed])
    gaps = np.diff(positions)
    if np.any(gaps < 1e-4):
        i = int(np.argmin(gaps))
        raise VolumeError(keyed[i + 1][1], f"has the same slice position as {keyed[i][1].name}; several acquisitions in one series?")
    step = float(np.median(gaps))
    if np.any(np.abs(gaps - step) > 0.1 * step):
        logger.warning("%s: uneven slice gaps (%.3g..%.3g mm, median %.3g); slices may be missing", folder, gaps.min(), gaps.max(), step)

    shapes = Counter((int(ds.Rows), int(ds.Columns)) for _, _, ds, _ in keyed)
    if len(shapes) > 1:
        odd = next(p for _, p, ds, _ in keyed if (int(ds.Rows), int(ds.Columns)) != shapes.most_common(1)[0][0])
        raise VolumeError(odd, f"slice size differs from the rest of the series ({dict(shapes)})")

    slices = [_slice_hu(path) for _, path, _, _ in keyed]
    first = keyed[0][2]
    try:
        row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    except (AttributeError, TypeError, ValueError):
        logger.warning("%s: no PixelSpacing; assuming 1 mm", folder)
        row_spacing = col_spacing = 1.0
    direction = np.stack([row_dir, col_dir, normal], axis=1)  # columns: x (W), y (H), z (D) axes
    return Volume(
        array=np.stack(slices),
        spacing=(step, row_spacing, col_spacing),
        origin=tuple(float(v) for v in keyed[0][3]),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in direction.ravel()),
        modality=str(first.get("Modality", "unknown")),
        source=str(folder),
        meta={"series_uid": uid, "description": str(first.get("SeriesDescription", "")), "num_slices": len(keyed)},
    )


def _slice_hu(path: Path) -> np.ndarray:
    """One slice's pixels with its own rescale slope/intercept applied (they may differ per slice)."""
    ds = pydicom.dcmread(path)
    try:
        pixels = ds.pixel_array
    except Exception as err:  # noqa: BLE001 - pydicom raises many types for bad pixel data
        if not ds.file_meta.get("TransferSyntaxUID", pydicom.uid.ExplicitVRLittleEndian).is_compressed:
            raise VolumeError(path, f"pixel data cannot be decoded ({err})") from None
        # A compressed transfer syntax pydicom cannot decode without plugins: GDCM (in SimpleITK) can.
        try:
            return sitk.GetArrayFromImage(sitk.ReadImage(str(path), sitk.sitkFloat32))[0]
        except RuntimeError:
            raise VolumeError(path, f"pixel data cannot be decoded ({err})") from None
    if pixels.ndim != 2:
        raise VolumeError(path, f"expected one 2D grey slice, got pixel data of shape {pixels.shape}")
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def read_dicom_file(path: Path) -> Volume:
    """A single DICOM file: a multi-frame (enhanced) image is a volume, a single slice is an error."""
    ds = _read_header(path)
    if ds is None:
        raise VolumeError(path, "not a DICOM file (no DICOM header could be parsed)")
    if "Rows" not in ds:
        raise VolumeError(path, "DICOM file holds no image (an empty series)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames < 2:
        raise VolumeError(path, "a single 2D DICOM slice; pass the folder holding the whole series")
    try:
        img = sitk.ReadImage(str(path), sitk.sitkFloat32)
    except RuntimeError as err:
        raise VolumeError(path, f"cannot be read: {_itk_reason(err)}") from None
    return Volume.from_sitk(img, modality=str(ds.get("Modality", "unknown")), source=str(path), frames=frames)
