"""Upload safety: which file types the services take, and extracting a zipped DICOM series without risk.

A zip from the network is hostile until shown otherwise: it is extracted with limits on its total
unpacked size, its number of files and its member names, so it can neither write outside its temporary
folder nor fill the disk. The predictor, the REST API and the web app all read uploads through here.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from .data.readers import file_suffix
from .data.volume import VolumeError

# Upload types the services accept (one file each); a DICOM series travels as a zip of its slices.
UPLOAD_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".npy", ".dcm", ".zip")
MAX_ZIP_MEMBERS = 5000  # a CT series has a few hundred to ~2000 slices
MAX_UNZIPPED_BYTES = 2 * 1024**3
_CHUNK = 1 << 20


# The uploads that are one volume file each (a zip holds a series; a lone .dcm is one multi-frame file).
SINGLE_VOLUME_SUFFIXES = tuple(s for s in UPLOAD_SUFFIXES if s not in (".dcm", ".zip"))


def upload_suffix(name: str) -> str:
    """The file type of an upload name (".nii.gz" counts as one suffix), lower case; "" when none."""
    return file_suffix(name)


def extract_zip(
    archive: str | os.PathLike,
    dest: str | os.PathLike,
    max_bytes: int = MAX_UNZIPPED_BYTES,
    max_members: int = MAX_ZIP_MEMBERS,
) -> Path:
    """Extract a zip (e.g. a DICOM series) into `dest` safely; returns `dest`.

    Refuses absolute paths, ".." components, symbolic links, more than `max_members` entries and more
    than `max_bytes` in total; the size is counted while decompressing, since the sizes written in the
    archive can lie (zip bombs).

    Raises:
        VolumeError: naming the archive and the reason.
    """
    archive, dest = Path(archive), Path(dest)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as err:
        raise VolumeError(archive, f"not a readable zip archive ({err})") from None
    total = 0
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if len(members) > max_members:
            raise VolumeError(archive, f"holds {len(members)} files; at most {max_members} are accepted")
        if not members:
            raise VolumeError(archive, "the zip archive is empty")
        for member in members:
            parts = PurePosixPath(member.filename.replace("\\", "/")).parts
            if member.filename.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                raise VolumeError(archive, f"unsafe path in the archive ({member.filename!r}); refusing to extract")
            if stat.S_ISLNK(member.external_attr >> 16):
                raise VolumeError(archive, f"the archive holds a symbolic link ({member.filename!r}); refusing to extract")
            target = dest.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(member) as src, open(target, "wb") as out:
                    while chunk := src.read(_CHUNK):
                        total += len(chunk)
                        if total > max_bytes:
                            raise VolumeError(archive, f"unzips to more than {max_bytes / 1024**2:.0f} MB; refusing to extract")
                        out.write(chunk)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, OSError) as err:
                raise VolumeError(archive, f"cannot extract {member.filename!r} ({err})") from None
    return dest


def _volume_in(folder: Path) -> Path:
    """What to read in an extracted archive: its single volume file, else the folder as a DICOM series."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    volumes = [p for p in files if upload_suffix(p.name) in SINGLE_VOLUME_SUFFIXES]
    if len(volumes) == 1:
        return volumes[0]
    return folder


@contextlib.contextmanager
def readable_path(path: str | os.PathLike, max_bytes: int = MAX_UNZIPPED_BYTES) -> Iterator[Path]:
    """`path` itself, or for a .zip the extracted series (in a temporary folder removed on exit)."""
    path = Path(path)
    if path.is_file() and upload_suffix(path.name) == ".zip":
        with tempfile.TemporaryDirectory(prefix="med3dvlm-zip-") as tmp:
            yield _volume_in(extract_zip(path, tmp, max_bytes=max_bytes))
    else:
        yield path
