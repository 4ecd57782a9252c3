"""Reading volumes from disk: NIfTI, DICOM series folders, NRRD/MHA (any ITK format) and .npy.

`load_volume(path)` picks the reader from the path. DICOM headers are scanned with pydicom so that
slices are grouped by series and sorted by their position along the slice normal (never by file name
or instance number), and rescale slope/intercept are applied per slice, giving Hounsfield units for CT.
Every failure raises `VolumeError` naming the file and the reason; nothing is silently replaced.

Every reader checks what the header claims against `ReadLimits` before it allocates (see
`med3dvlm.data.limits`), and nothing here logs a path or a DICOM value: what a reader notices but
accepts goes into `Volume.warnings`, which the caller reports to the user.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import warnings
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from .limits import ReadLimits, check_claim, check_gzip_file, unpacked_size_at_most
from .volume import Volume, VolumeError, VolumeTooLarge

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


def check_path(path: str | os.PathLike) -> os.stat_result:
    """`os.stat(path)`, or a `VolumeError` that says why the path cannot be used.

    `Path.exists()` answers False for a symbolic link loop, a dangling link and a permission problem
    alike, which made all three read as "no such file"; the errno tells them apart.
    """
    try:
        return os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            reason = "a symbolic link loop (the link resolves back to itself)"
        elif err.errno == errno.ENOENT and os.path.lexists(path):
            reason = "a broken symbolic link (its target does not exist)"
        elif err.errno == errno.ENOENT:
            reason = "no such file or directory"
        elif err.errno in (errno.EACCES, errno.EPERM):
            reason = "permission denied"
        else:
            reason = os.strerror(err.errno) if err.errno else "cannot be accessed"
        raise VolumeError(path, reason) from None


def load_volume(
    path: str | os.PathLike,
    series_uid: str | None = None,
    limits: ReadLimits | None = None,
    strict: bool = False,
) -> Volume:
    """Read a 3D volume from a file or a DICOM series folder.

    Args:
        path: a .nii/.nii.gz, .nrrd, .mha/.mhd, .npy or single DICOM file, or a folder of DICOM slices.
        series_uid: which series to read when a folder holds several (see `list_series`).
        limits: the largest volume the header may claim and compressed data may unpack to, checked
            before anything is allocated; default `ReadLimits()`.
        strict: refuse what is otherwise accepted with a warning (uneven slice gaps, an assumed spacing).

    Raises:
        VolumeError: the path is missing, empty, unreadable, not 3D, holds NaN/Inf, or has a zero,
            negative or non-finite spacing or orientation. `VolumeTooLarge` when over `limits`.
    """
    path = Path(path)
    limits = limits or ReadLimits()
    info = check_path(path)
    if stat.S_ISDIR(info.st_mode):
        volume = read_dicom_series(path, series_uid, limits=limits)
    elif not stat.S_ISREG(info.st_mode):
        raise VolumeError(path, "not a regular file (a device, pipe or socket)")
    else:
        if info.st_size == 0:
            raise VolumeError(path, "the file is empty (0 bytes)")
        suffix = file_suffix(path.name)
        if suffix == ".npy":
            volume = read_npy(path, limits)
        elif suffix in DICOM_SUFFIXES or (suffix not in ITK_SUFFIXES and _is_dicom(path)):
            volume = read_dicom_file(path, limits)
        elif suffix in NIFTI_SUFFIXES:
            volume = read_nifti(path, limits)
        elif suffix in ITK_SUFFIXES:
            volume = read_itk(path, limits)
        else:
            raise VolumeError(path, f"unsupported file type {suffix or '(no suffix)'!r}; expected NIfTI, DICOM, NRRD, MHA or .npy")
    check_geometry(volume)
    check_finite(volume)
    if strict and volume.warnings:
        raise VolumeError(path, "; ".join(volume.warnings) + " (refused under --strict)")
    return volume


def check_finite(volume: Volume) -> None:
    """A `VolumeError` when a float volume holds NaN or Inf voxels."""
    if np.issubdtype(volume.array.dtype, np.floating):
        bad = int(np.size(volume.array) - np.count_nonzero(np.isfinite(volume.array)))
        if bad:
            raise VolumeError(volume.source, f"{bad} voxels are NaN or Inf")


def check_geometry(volume: Volume) -> None:
    """A `VolumeError` for a spacing, origin or orientation no scanner writes: zero, negative, NaN, Inf, degenerate.

    Resampling divides by the spacing and the viewer scales by it, so such a value would surface much
    later as a division by zero or an SVD that does not converge.
    """
    spacing = np.asarray(volume.spacing, dtype=np.float64)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise VolumeError(volume.source, f"invalid voxel spacing {tuple(float(s) for s in spacing)} mm; every spacing must be a positive finite number")
    if not np.all(np.isfinite(volume.origin)):
        raise VolumeError(volume.source, f"invalid origin {volume.origin}; it must be finite")
    direction = np.asarray(volume.direction, dtype=np.float64).reshape(3, 3)
    if not np.all(np.isfinite(direction)) or abs(np.linalg.det(direction)) < 1e-6:
        raise VolumeError(volume.source, "invalid orientation: the direction cosines are not finite or the axes are degenerate")


def _squeeze_to_3d(array: np.ndarray, source: Path) -> np.ndarray:
    if array.ndim == 4 and array.shape[0] == 1:  # (1, D, H, W) as the M3D .npy files store it
        array = array[0]
    return _require_3d(array, source)


def _require_3d(array: np.ndarray, source: Path) -> np.ndarray:
    """`array` if it is a 3D volume, else a `VolumeError` saying what it is instead."""
    _require_3d_shape(tuple(array.shape), source)
    return array


def _require_3d_shape(shape: tuple[int, ...], source: object) -> None:
    # Checked on the header's shape, so a 2D or 4D file is refused before its data are read.
    if len(shape) == 2:
        raise VolumeError(source, f"a 2D image of shape {shape}, not a 3D volume")
    if len(shape) != 3:
        raise VolumeError(source, f"a {len(shape)}D image of shape {shape}; only 3D volumes are supported")
    if min(shape) < 2:
        raise VolumeError(source, f"shape {shape} has a singleton axis; this is a 2D image, not a 3D volume")


def _clean_reason(err: BaseException, path: Path, default: str) -> str:
    """An exception's message on one line, without the file's path (the error names it already) or other paths."""
    reason = " ".join(str(err).split())
    reason = reason.replace(str(path), "the file").replace(str(path.parent), "")
    reason = _ABSOLUTE_PATH.sub("<path>", reason)
    return reason or f"{default} ({type(err).__name__})"


# An absolute path inside a library's message (ITK's source files, a temporary folder).
_ABSOLUTE_PATH = re.compile(r"(?<![\w.])(?:/[^\s/'\"():,]+){2,}/?")


def read_npy(path: Path, limits: ReadLimits | None = None) -> Volume:
    """A (D, H, W) or (1, D, H, W) array; memory-mapped so reading a crop stays cheap."""
    limits = limits or ReadLimits()
    try:
        # A memory map allocates nothing, and refuses a header that claims more data than the file holds.
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise VolumeError(path, f"not a readable .npy array ({_clean_reason(err, path, 'bad header')})") from None
    if array.dtype.kind not in "biuf":
        raise VolumeError(path, f"unsupported dtype {array.dtype}")
    check_claim(path, tuple(array.shape), array.dtype.itemsize, limits)
    array = _squeeze_to_3d(np.asarray(array), path)
    return Volume(array=array, source=str(path), meta={"format": "npy"})


def read_itk(path: Path, limits: ReadLimits | None = None) -> Volume:
    """NRRD, MetaImage and the other formats SimpleITK reads.

    The header is read first (`ReadImageInformation`) and its claimed size checked against `limits`,
    and for NRRD/MHA the voxel data present in the file against the claim, before ITK allocates.
    """
    limits = limits or ReadLimits()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise VolumeError(path, f"cannot be read: {_itk_reason(err, path)}") from None
    size = tuple(int(s) for s in reader.GetSize())
    components = int(reader.GetNumberOfComponents())
    if components != 1:
        raise VolumeError(path, f"has {components} components per voxel (colour/vector); need a scalar image")
    shape = size[:3] if len(size) == 4 and size[3] == 1 else size
    _require_3d_shape(shape, path)
    nbytes = check_claim(path, size, _itk_pixel_bytes(reader.GetPixelID()), limits)
    check_itk_data(path, nbytes, limits)
    try:
        img = reader.Execute()
    except RuntimeError as err:
        reason = _itk_reason(err, path)
        if "no such file" in reason.lower():  # ITK reports a stale errno when the data are short
            reason = f"truncated or corrupt image data ({reason})"
        raise VolumeError(path, f"cannot be read: {reason}") from None
    if img.GetDimension() == 4:
        img = img[:, :, :, 0]
    modality = _itk_modality(img)
    return Volume.from_sitk(img, modality=modality, source=str(path), format=file_suffix(path.name).lstrip("."))


def _itk_pixel_bytes(pixel_id: int) -> int:
    """Bytes per voxel component of an ITK pixel type ("16-bit signed integer" -> 2; complex counts twice)."""
    name = sitk.GetPixelIDValueAsString(pixel_id)
    found = re.search(r"(\d+)-bit", name)
    bits = int(found.group(1)) if found else 64
    return max(1, bits // 8) * (2 if name.startswith("complex") else 1)


def _itk_reason(err: RuntimeError, path: Path | None = None) -> str:
    # ITK messages span several lines with source locations; keep the informative tail, without paths
    # (ITK's build tree and the file's own path, which the error names already).
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("sitk::ERROR", "/", "itk::"))] or lines
    reason = " ".join(useful[-2:])
    if path is not None:
        reason = reason.replace(str(path), "the file")
    reason = _ABSOLUTE_PATH.sub("<path>", reason)
    reason = re.sub(r"<path>:\d+:?", "", reason).strip()
    return reason[:300] or "ITK gave no reason"


def _itk_modality(img: sitk.Image) -> str:
    for key in ("0008|0060", "modality", "Modality"):
        if img.HasMetaDataKey(key):
            return normalize_modality(img.GetMetaData(key))
    return "unknown"


def normalize_modality(value: object) -> str:
    """A modality code as DICOM writes it ("CT", "MR"), from DICOM or MetaImage ("MET_MOD_CT"); "unknown" if none."""
    text = str(value or "").strip().upper()
    text = text.removeprefix("MET_MOD_")
    return text if text and text not in ("UNKNOWN", "OTHER") else "unknown"


def _text_header(path: Path, end: bytes, max_header: int = 1 << 16) -> tuple[bytes, int] | None:
    """The text header of an NRRD/MHA file up to and including `end`, and its length; None if not found."""
    with open(path, "rb") as fh:
        head = fh.read(max_header)
    at = head.find(end)
    return (head[: at + len(end)], at + len(end)) if at >= 0 else None


def _header_fields(header: bytes, sep: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in header.decode("latin-1").splitlines():
        if sep in line and not line.startswith("#"):
            key, _, value = line.partition(sep)
            fields[key.strip().lower()] = value.strip()
    return fields


def check_itk_data(path: Path, nbytes: int, limits: ReadLimits) -> None:
    """For NRRD and MetaImage, that the file holds the `nbytes` of voxel data its header claims.

    ITK allocates the claimed image and only then finds the data short; a gzip or zlib stream is
    counted while decompressing (nothing kept) and refused past `limits.max_bytes`. Formats or
    layouts this does not understand (ASCII, bzip2, byte skips, data lists) are left to ITK.
    """
    suffix = file_suffix(path.name)
    if suffix in (".nrrd", ".nhdr"):
        found = _text_header(path, b"\n\n")
        if found is None:
            return
        header, offset = found
        fields = _header_fields(header, ":")
        encoding = fields.get("encoding", "raw").lower()
        data_file = fields.get("data file") or fields.get("datafile")
        if "byte skip" in fields or "line skip" in fields or encoding not in ("raw", "gzip", "gz"):
            return
        kind = "gzip" if encoding in ("gzip", "gz") else None
    elif suffix in (".mha", ".mhd"):
        found = _text_header(path, b"ElementDataFile")
        if found is None:
            return
        header, _ = found
        with open(path, "rb") as fh:  # the data start after the ElementDataFile line
            fh.seek(len(header))
            rest = fh.readline()
        offset = len(header) + len(rest)
        fields = _header_fields(header + rest, "=")
        data_file = fields.get("elementdatafile", "LOCAL")
        data_file = None if data_file.upper() == "LOCAL" else data_file
        if fields.get("headersize", "0") not in ("0", "") or (data_file or "").upper().startswith("LIST") or "%" in (data_file or ""):
            return
        kind = "zlib" if fields.get("compresseddata", "false").lower() == "true" else None
    else:
        return
    source = path
    if data_file is not None:
        source = path.parent / data_file
        offset = 0
        if not source.is_file():
            raise VolumeError(path, f"its data file {data_file!r} is missing")
        if kind is None and file_suffix(data_file).endswith(".gz"):
            kind = "gzip"
    if kind is None:
        available = source.stat().st_size - offset
    else:
        with open(source, "rb") as fh:
            fh.seek(offset)
            try:
                available = unpacked_size_at_most(fh, kind, max(nbytes, limits.max_bytes))
            except VolumeError as err:
                raise VolumeError(path, f"truncated or corrupt compressed data ({err.reason})") from None
        if available > limits.max_bytes:
            raise VolumeTooLarge(path, f"its data unpack to more than {limits.max_bytes / 1024**2:,.0f} MB; refusing to read them")
    if available < nbytes:
        raise VolumeError(path, f"truncated: the header claims {nbytes:,} bytes of voxel data, the file holds {max(available, 0):,}")


def read_nifti(path: Path, limits: ReadLimits | None = None) -> Volume:
    """NIfTI through nibabel.

    Not SimpleITK: its NIfTI reader silently zero-fills a truncated file and turns NaN into 0, which
    would hide exactly the bad input we must report. The affine (RAS) is converted to ITK's LPS.
    The header's shape is checked against `limits`, and the data present against the shape, before
    nibabel allocates the array (it would allocate the claimed size first and find the data short after).
    """
    import nibabel as nib

    limits = limits or ReadLimits()
    try:
        nii = nib.load(str(path))  # header only: the voxel data stay on disk until `dataobj` is read
        shape = tuple(int(s) for s in nii.shape)
        dtype = nii.header.get_data_dtype()
        offset = int(nii.header.get_data_offset())
        affine = np.array(nii.affine, dtype=np.float64)
    except EOFError as err:
        raise VolumeError(path, f"truncated or corrupt gzip stream ({_clean_reason(err, path, 'ends early')})") from None
    except Exception as err:  # nibabel raises many types for corrupt headers
        raise VolumeError(path, f"not a readable NIfTI file ({_clean_reason(err, path, 'the header cannot be parsed')})") from None
    if dtype.kind not in "biuf":
        raise VolumeError(path, f"unsupported voxel type {dtype} (colour or complex); need a scalar image")
    _require_3d_shape(shape[:3] if len(shape) == 4 and shape[3] == 1 else shape, path)
    nbytes = check_claim(path, shape, dtype.itemsize, limits)
    available = (check_gzip_file(path, limits) if file_suffix(path.name) == ".nii.gz" else path.stat().st_size) - offset
    if available < nbytes:
        raise VolumeError(path, f"not a readable NIfTI file (truncated: the header claims {nbytes:,} bytes of voxel data, "
                                f"the file holds {max(available, 0):,})")
    spacing_xyz, direction = _nifti_geometry(affine, path)
    try:
        data = np.asanyarray(nii.dataobj)  # applies scl_slope/scl_inter
    except EOFError as err:
        raise VolumeError(path, f"truncated or corrupt gzip stream ({_clean_reason(err, path, 'ends early')})") from None
    except Exception as err:  # noqa: BLE001 - nibabel raises many types for corrupt data
        reason = _clean_reason(err, path, "the voxel data cannot be read")
        if "Expected" in reason and "bytes" in reason:
            reason = f"truncated: {reason}"
        raise VolumeError(path, f"not a readable NIfTI file ({reason})") from None
    if data.ndim == 4:
        data = data[..., 0]
    warns = []
    if not np.allclose(direction, affine[:3, :3] / spacing_xyz, atol=1e-4):
        warns.append(f"{path}: the affine has a shear; using the nearest rotation for orientation")
    return Volume(
        array=np.ascontiguousarray(np.asarray(data).transpose(2, 1, 0)),  # nibabel (x, y, z) -> (D, H, W)
        spacing=tuple(float(s) for s in spacing_xyz[::-1]),  # type: ignore[arg-type]
        origin=tuple(float(o) for o in affine[:3, 3]),  # type: ignore[arg-type]
        direction=tuple(float(d) for d in direction.ravel()),
        source=str(path),
        meta={"format": file_suffix(path.name).lstrip(".")},
        warnings=warns,
    )


def _nifti_geometry(affine: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Spacing (x, y, z) and the nearest rotation of a NIfTI affine (RAS, modified in place to LPS).

    A zero, NaN or Inf affine made the SVD fail with "SVD did not converge" and no file named; such
    an affine is refused here with what is wrong with it.
    """
    if not np.all(np.isfinite(affine)):
        raise VolumeError(path, "the affine (voxel-to-world matrix) holds NaN or Inf; the file's geometry is corrupt")
    affine[:2] *= -1  # RAS (NIfTI) -> LPS (ITK)
    columns = affine[:3, :3]
    spacing_xyz = np.linalg.norm(columns, axis=0)
    if np.any(spacing_xyz <= 1e-9):
        raise VolumeError(path, f"the affine gives a zero voxel spacing ({', '.join(f'{s:g}' for s in spacing_xyz)} mm along x, y, z)")
    cosines = columns / spacing_xyz
    if abs(np.linalg.det(cosines)) < 1e-6:
        raise VolumeError(path, "the affine is degenerate (two voxel axes point the same way)")
    try:
        u, _, vt = np.linalg.svd(cosines)
    except np.linalg.LinAlgError:
        raise VolumeError(path, "the affine's orientation cannot be decomposed") from None
    return spacing_xyz, u @ vt  # nearest rotation; equals `cosines` unless the affine has a shear


# --------------------------------------------------------------------------------------------- DICOM


class _WithholdValues(logging.Filter):
    """pydicom logs invalid element values verbatim ("Invalid value for VR PN: ..."), and those can be a
    patient's name or free text; its records keep their level but lose their text."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = "pydicom reported a problem with a DICOM element (value withheld)", None
        return True


logging.getLogger("pydicom").addFilter(_WithholdValues())


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _dcmread(path: Path, header_only: bool) -> pydicom.Dataset:
    """`pydicom.dcmread` as both the header scan and the pixel read need it: forced, quiet.

    Forced, because files without the 128-byte preamble and file meta are common (older exports), and
    the header scan already accepted them; reading the pixels unforced raised InvalidDicomError for
    exactly those files. Such a dataset gets the transfer syntax its encoding implies, which pydicom
    needs to decode the pixels. Large values are deferred so a non-DICOM file costs little.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings quote element values
        ds = pydicom.dcmread(path, stop_before_pixels=header_only, force=True, defer_size="1 MB" if header_only else None)
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = getattr(ds, "original_encoding", (True, True))
        ds.file_meta.TransferSyntaxUID = (
            pydicom.uid.ImplicitVRLittleEndian if implicit in (True, None)
            else pydicom.uid.ExplicitVRLittleEndian if little in (True, None) else pydicom.uid.ExplicitVRBigEndian
        )
    return ds


def _read_header(path: Path) -> pydicom.Dataset | None:
    """The header of a DICOM image file, or None when `path` is not one (quietly: folders hold other files)."""
    if path.name.lower().endswith(".txt"):
        return None
    try:
        ds = _dcmread(path, header_only=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError, KeyError, OverflowError, MemoryError):
        return None
    if "SeriesInstanceUID" not in ds and "SOPClassUID" not in ds:
        return None  # force=True "reads" any file; a real DICOM has at least one of these
    return ds


def _dicom_int(path: Path, ds: pydicom.Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, None)
    if value in (None, ""):
        if default is None:
            raise VolumeError(path, f"DICOM header has no {keyword}")
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise VolumeError(path, f"{keyword} {str(value)[:20]!r} is not a whole number") from None


def _dicom_float(path: Path, ds: pydicom.Dataset, keyword: str, default: float) -> float:
    """A numeric DICOM field (DS), or `default` when absent; a `VolumeError` when it is not a finite number."""
    value = ds.get(keyword, None)
    if value in (None, ""):
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise VolumeError(path, f"{keyword} {str(value)[:20]!r} is not a number") from None
    if not np.isfinite(number):
        raise VolumeError(path, f"{keyword} is {number}; it must be a finite number")
    return number


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
        logger.debug("%d files of a folder are not DICOM and were ignored", skipped)
    return series


def list_series(folder: str | os.PathLike) -> list[DicomSeries]:
    """The DICOM series in `folder` (searched recursively), largest first."""
    folder = Path(folder)
    if not stat.S_ISDIR(check_path(folder).st_mode):
        raise VolumeError(folder, "not a directory")
    out = []
    for uid, items in _scan_folder(folder).items():
        images = [(p, ds) for p, ds in items if "Rows" in ds]
        first = images[0][1] if images else items[0][1]
        out.append(
            DicomSeries(
                uid=uid,
                description=str(first.get("SeriesDescription", "")),
                modality=normalize_modality(first.get("Modality", "")),
                num_files=len(images),
                rows=int(first.get("Rows", 0) or 0),
                columns=int(first.get("Columns", 0) or 0),
                files=[p for p, _ in images],
            )
        )
    return sorted(out, key=lambda s: -s.num_files)


def read_dicom_series(folder: Path, series_uid: str | None = None, limits: ReadLimits | None = None) -> Volume:
    """Read one series from a folder of slices: grouped by UID, sorted by geometry, in HU."""
    limits = limits or ReadLimits()
    groups = _scan_folder(folder)
    if not groups:
        others = [p for p in folder.rglob("*") if p.is_file() and file_suffix(p.name) in VOLUME_SUFFIXES]
        if others:
            raise VolumeError(folder, f"holds no DICOM files but {len(others)} other volume file(s); read one file at a time")
        raise VolumeError(folder, "no DICOM files found in the folder (an empty series)")
    if series_uid is None:
        if len(groups) > 1:
            # UIDs, modality and counts only: descriptions are free text and go into error messages.
            listing = "; ".join(f"{s.uid} ({s.modality}, {s.num_files} files)" for s in list_series(folder))
            raise VolumeError(folder, f"holds {len(groups)} DICOM series; pass a series UID, one of: {listing}")
        series_uid = next(iter(groups))
    if series_uid not in groups:
        raise VolumeError(folder, f"has no series with UID {series_uid[:128]}; found: {', '.join(groups)}")
    items = [(p, ds) for p, ds in groups[series_uid] if "Rows" in ds]
    if not items:
        raise VolumeError(folder, "the series has no image slices (an empty series)")
    if len(items) == 1:
        return read_dicom_file(items[0][0], limits)
    return _assemble_series(folder, series_uid, items, limits)


def _slice_geometry(path: Path, ds: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        iop = np.array([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
    except (AttributeError, TypeError, ValueError):
        raise VolumeError(path, "slice has no usable ImagePositionPatient/ImageOrientationPatient; cannot order it by geometry") from None
    if iop.size != 6 or ipp.size != 3 or not (np.all(np.isfinite(iop)) and np.all(np.isfinite(ipp))):
        raise VolumeError(path, "ImagePositionPatient/ImageOrientationPatient must hold 3 and 6 finite numbers")
    row, col = iop[:3], iop[3:]
    if min(np.linalg.norm(row), np.linalg.norm(col)) < 1e-3 or np.linalg.norm(np.cross(row, col)) < 1e-3:
        raise VolumeError(path, "ImageOrientationPatient is degenerate (a zero or repeated direction)")
    return row / np.linalg.norm(row), col / np.linalg.norm(col), ipp


def _pixel_spacing(path: Path, ds: pydicom.Dataset) -> tuple[float, float] | None:
    """(row, column) spacing in mm, None when absent; a `VolumeError` when present but not two positive numbers."""
    value = ds.get("PixelSpacing", None)
    if value in (None, ""):
        return None
    try:
        spacing = [float(v) for v in (value if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value])]
    except (TypeError, ValueError):
        raise VolumeError(path, f"PixelSpacing {str(value)[:40]!r} is not two numbers") from None
    if len(spacing) != 2 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise VolumeError(path, f"PixelSpacing {spacing} is invalid; it must be two positive numbers in mm")
    return spacing[0], spacing[1]


def _assemble_series(folder: Path, uid: str, items: list[tuple[Path, pydicom.Dataset]], limits: ReadLimits) -> Volume:
    def where(path: Path) -> str:  # the slice, relative to the folder the user gave
        return path.relative_to(folder).as_posix() if path.is_relative_to(folder) else path.name

    def refuse(path: Path, reason: str) -> VolumeError:
        return VolumeError(folder, f"slice {where(path)}: {reason}")

    try:
        row_dir, col_dir, _ = _slice_geometry(*items[0])
        normal = np.cross(row_dir, col_dir)
        keyed = []
        for path, ds in items:
            r, c, ipp = _slice_geometry(path, ds)
            if not (np.allclose(r, row_dir, atol=1e-3) and np.allclose(c, col_dir, atol=1e-3)):
                raise VolumeError(path, "slice orientation differs from the rest of the series (mixed orientations)")
            keyed.append((float(np.dot(ipp, normal)), path, ds, ipp))
        shapes = Counter((_dicom_int(p, ds, "Rows"), _dicom_int(p, ds, "Columns")) for _, p, ds, _ in keyed)
    except VolumeError as err:
        raise refuse(Path(err.source), err.reason) from None
    if len(shapes) > 1:
        common = shapes.most_common(1)[0][0]
        odd = next(p for _, p, ds, _ in keyed if (int(ds.Rows), int(ds.Columns)) != common)
        counts = ", ".join(f"{n} of {r}x{c}" for (r, c), n in shapes.items())
        raise refuse(odd, f"slice size differs from the rest of the series ({counts})")
    rows, columns = next(iter(shapes))
    # Before any pixel is decoded: the slices' claimed size against the limit.
    check_claim(folder, (len(keyed), rows, columns), 4, limits)
    keyed.sort(key=lambda t: t[0])
    positions = np.array([k[0] for k in keyed])
    gaps = np.diff(positions)
    if np.any(gaps < 1e-4):
        i = int(np.argmin(gaps))
        raise refuse(keyed[i + 1][1], f"has the same slice position as {where(keyed[i][1])}; several acquisitions in one series?")
    step = float(np.median(gaps))
    warns: list[str] = []
    meta: dict[str, object] = {"num_slices": len(keyed)}
    uneven = np.abs(gaps - step) > 0.1 * step
    if np.any(uneven):
        missing = int(round(float(np.sum(np.maximum(gaps / step - 1.0, 0.0)[uneven]))))
        meta["slice_gaps"] = {"min_mm": round(float(gaps.min()), 4), "max_mm": round(float(gaps.max()), 4),
                              "median_mm": round(step, 4), "uneven": int(np.sum(uneven)), "missing_estimate": missing}
        warns.append(
            f"{folder}: uneven slice gaps ({gaps.min():.3g} to {gaps.max():.3g} mm, median {step:.3g}): about {missing} "
            f"slice(s) missing; the volume is stacked at the median gap, so distances along the slice axis are wrong there"
        )
    first_path, first = keyed[0][1], keyed[0][2]
    try:
        pixel_spacing = _pixel_spacing(first_path, first)
        slices = [_slice_hu(path, limits) for _, path, _, _ in keyed]
    except VolumeError as err:
        raise refuse(Path(err.source), err.reason) from None
    if pixel_spacing is None:
        warns.append(f"{folder}: no PixelSpacing in the DICOM header; assuming 1 x 1 mm")
        pixel_spacing = (1.0, 1.0)
    direction = np.stack([row_dir, col_dir, normal], axis=1)  # columns: x (W), y (H), z (D) axes
    return Volume(
        array=np.stack(slices),
        spacing=(step, *pixel_spacing),
        origin=tuple(float(v) for v in keyed[0][3]),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in direction.ravel()),
        modality=normalize_modality(first.get("Modality", "")),
        source=str(folder),
        meta=meta,
        warnings=warns,
        private={"series_uid": uid, "series_description": str(first.get("SeriesDescription", ""))},
    )


def _slice_hu(path: Path, limits: ReadLimits) -> np.ndarray:
    """One slice's pixels with its own rescale slope/intercept applied (they may differ per slice)."""
    try:
        ds = _dcmread(path, header_only=False)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError, KeyError) as err:
        raise VolumeError(path, f"cannot be read as DICOM ({_clean_reason(err, path, 'unreadable')})") from None
    frames = _dicom_int(path, ds, "NumberOfFrames", 1)
    check_claim(path, (max(frames, 1), _dicom_int(path, ds, "Rows"), _dicom_int(path, ds, "Columns"),
                       _dicom_int(path, ds, "SamplesPerPixel", 1)), 4, limits)
    slope = _dicom_float(path, ds, "RescaleSlope", 1.0)
    intercept = _dicom_float(path, ds, "RescaleIntercept", 0.0)
    if slope == 0:
        raise VolumeError(path, "RescaleSlope is 0, which would make every voxel the same value")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = ds.pixel_array
    except Exception as err:  # noqa: BLE001 - pydicom raises many types for bad pixel data
        if not ds.file_meta.get("TransferSyntaxUID", pydicom.uid.ExplicitVRLittleEndian).is_compressed:
            raise VolumeError(path, f"pixel data cannot be decoded ({_clean_reason(err, path, 'no reason given')})") from None
        # A compressed transfer syntax pydicom cannot decode without plugins: GDCM (in SimpleITK) can.
        try:
            return sitk.GetArrayFromImage(sitk.ReadImage(str(path), sitk.sitkFloat32))[0]  # GDCM applies the rescale
        except RuntimeError:
            raise VolumeError(path, f"pixel data cannot be decoded ({_clean_reason(err, path, 'no reason given')})") from None
    if pixels.ndim != 2:
        raise VolumeError(path, f"expected one 2D grey slice, got pixel data of shape {pixels.shape}")
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def read_dicom_file(path: Path, limits: ReadLimits | None = None) -> Volume:
    """A single DICOM file: a multi-frame (enhanced) image is a volume, a single slice is an error."""
    limits = limits or ReadLimits()
    ds = _read_header(path)
    if ds is None:
        raise VolumeError(path, "not a DICOM file (no DICOM header could be parsed)")
    if "Rows" not in ds:
        raise VolumeError(path, "DICOM file holds no image (an empty series)")
    frames = _dicom_int(path, ds, "NumberOfFrames", 1)
    if frames < 2:
        raise VolumeError(path, "a single 2D DICOM slice; pass the folder holding the whole series")
    check_claim(path, (frames, _dicom_int(path, ds, "Rows"), _dicom_int(path, ds, "Columns"),
                       _dicom_int(path, ds, "SamplesPerPixel", 1)), 4, limits)
    try:
        img = sitk.ReadImage(str(path), sitk.sitkFloat32)
    except RuntimeError as err:
        raise VolumeError(path, f"cannot be read: {_itk_reason(err, path)}") from None
    return Volume.from_sitk(img, modality=normalize_modality(ds.get("Modality", "")), source=str(path), frames=frames)
