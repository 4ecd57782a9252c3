"""Upload safety: which file types the services take, and extracting a zipped DICOM series without risk.

A zip from the network is hostile until shown otherwise: it is extracted with limits on its total
unpacked size, its number of files and its member names, so it can neither write outside its temporary
folder nor fill the disk. The predictor, the REST API and the web app all read uploads through here.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from .data.limits import ReadLimits
from .data.readers import file_suffix
from .data.volume import VolumeError, VolumeTooLarge

# Upload types the services accept (one file each); a DICOM series travels as a zip of its slices.
UPLOAD_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".npy", ".dcm", ".zip")
MAX_ZIP_MEMBERS = 5000  # a CT series has a few hundred to ~2000 slices
MAX_UNZIPPED_BYTES = ReadLimits().max_bytes
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
            raise VolumeTooLarge(archive, f"holds {len(members)} files; at most {max_members} are accepted")
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
                            raise VolumeTooLarge(archive, f"unzips to more than {max_bytes / 1024**2:.0f} MB; refusing to extract")
                        out.write(chunk)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, OSError) as err:
                raise VolumeError(archive, f"cannot extract {member.filename!r} ({err})") from None
    return dest


def _volume_in(folder: Path, archive: Path) -> Path:
    """What to read in an extracted archive: its single volume file, else the folder as a DICOM series.

    A zip holding two volumes is refused here, naming them;
    read as a series folder it was reported as "no DICOM files found", which sent people looking
    for a DICOM problem.
    """
    files = [p for p in folder.rglob("*") if p.is_file()]
    volumes = [p for p in files if upload_suffix(p.name) in SINGLE_VOLUME_SUFFIXES]
    if len(volumes) == 1:
        return volumes[0]
    if len(volumes) > 1:
        names = ", ".join(sorted(p.relative_to(folder).as_posix() for p in volumes)[:5])
        raise VolumeError(archive, f"holds {len(volumes)} volume files ({names}); a zip must hold one volume or one DICOM series")
    return folder  # slices often have no suffix or a UID for a name: the DICOM reader decides


@contextlib.contextmanager
def readable_path(path: str | os.PathLike, max_bytes: int | None = None, limits: ReadLimits | None = None) -> Iterator[Path]:
    """`path` itself, or for a .zip the extracted series (in a temporary folder removed on exit).

    The zip may unpack to `max_bytes`, default `limits.max_bytes` (the library's `ReadLimits()`).
    """
    path = Path(path)
    if path.is_file() and upload_suffix(path.name) == ".zip":
        cap = max_bytes if max_bytes is not None else (limits or ReadLimits()).max_bytes
        with tempfile.TemporaryDirectory(prefix="med3dvlm-zip-") as tmp:
            yield _volume_in(extract_zip(path, tmp, max_bytes=cap), path)
    else:
        yield path


# An absolute path in a message: a temporary folder, ITK's build tree. Not preceded by a word
# character or a dot, so "HU/mm" and relative names inside an archive are left alone.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.])(?:/[^\s/'\"():,]+){2,}/?")


def scrub_paths(text: str, replacements: dict[str, str] | None = None) -> str:
    """`text` with the given paths replaced (longest first, e.g. an upload's temporary path by its
    original name) and any other absolute path replaced by "<path>": error details sent over the
    network must not show the server's folders. A replacement is kept as given even when it is an
    absolute path itself (the CLI shows the user's own path)."""
    kept: list[str] = []
    for old, new in sorted((replacements or {}).items(), key=lambda kv: -len(kv[0])):
        if old and old in text:
            text = text.replace(old, f"\0{len(kept)}\0")
            kept.append(new)
    text = _ABSOLUTE_PATH.sub("<path>", text)
    for i, new in enumerate(kept):
        text = text.replace(f"\0{i}\0", new)
    return text
