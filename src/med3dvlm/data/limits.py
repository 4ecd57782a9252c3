"""Read limits: how large a volume a reader may allocate, checked before anything is allocated.

nibabel, SimpleITK and pydicom allocate what a header claims before they read a byte of voxel data,
so a 55-byte file that claims 1024^3 voxels costs gigabytes before it fails. Every reader therefore
asks `check_claim` first (the claimed shape against `ReadLimits.max_voxels`), and compressed data are
counted while decompressing, without keeping them (`compressed_size_at_most`), so a stream that is
shorter than its header claims, or one that unpacks to more than `ReadLimits.max_bytes`, fails fast.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from typing import BinaryIO

from .volume import VolumeError, VolumeTooLarge

_CHUNK = 1 << 20


@dataclass(frozen=True)
class ReadLimits:
    """Upper bounds for one read.

    Attributes:
        max_voxels: voxels (all axes, all components) a file may claim. The default (2^29, e.g.
            512 x 512 x 2048) holds any real CT series; a header claiming more is refused before
            allocation.
        max_bytes: bytes a compressed file (.nii.gz, gzip/zlib NRRD or MHA) or a zip may unpack to.
    """

    max_voxels: int = 512 * 512 * 2048
    max_bytes: int = 2 * 1024**3

    def __post_init__(self) -> None:
        if self.max_voxels < 8 or self.max_bytes < 1024:
            raise ValueError(f"read limits are too small to read any volume: {self}")

    @classmethod
    def from_options(cls, max_voxels: int | None = None, max_unpacked_mb: float | None = None, base: ReadLimits | None = None) -> ReadLimits:
        """`base` (default: the library defaults) with the limits a user passed (None keeps them)."""
        base = base or cls()
        return cls(
            max_voxels=int(max_voxels) if max_voxels is not None else base.max_voxels,
            max_bytes=int(max_unpacked_mb * 1024**2) if max_unpacked_mb is not None else base.max_bytes,
        )

    def to_dict(self) -> dict[str, int]:
        return {"max_voxels": self.max_voxels, "max_bytes": self.max_bytes}


# What the servers use unless told otherwise: several requests may read at once, so each gets less.
SERVER_LIMITS = ReadLimits(max_voxels=512 * 512 * 1024, max_bytes=1024**3)


def check_claim(source: object, shape: tuple[int, ...], itemsize: int, limits: ReadLimits) -> int:
    """The byte size `shape` x `itemsize` claims; a `VolumeError` when it exceeds `limits`.

    Zero or negative sizes are refused here too, since a reader would otherwise allocate nothing and
    fail later with a less helpful message.
    """
    dims = [int(s) for s in shape]
    if not dims or min(dims) < 1:
        raise VolumeError(source, f"the header claims an image of size {tuple(dims)}, which holds no voxels")
    voxels = 1
    for d in dims:
        voxels *= d
    if voxels > limits.max_voxels:
        raise VolumeTooLarge(
            source,
            f"the header claims {' x '.join(map(str, dims))} = {voxels:,} voxels, more than the limit of "
            f"{limits.max_voxels:,}; refusing to allocate it (raise the limit with --max-voxels if the file is real)",
        )
    return voxels * max(1, int(itemsize))


def unpacked_size_at_most(stream: BinaryIO, kind: str, cap: int) -> int:
    """Bytes the compressed `stream` (read from its current position) unpacks to, counting at most `cap + 1`.

    Decompresses chunk by chunk and keeps nothing, so memory stays at one chunk whatever the stream
    holds. `kind` is "gzip" (possibly several members, as `gzip` writes) or "zlib".

    Raises:
        VolumeError: the stream is corrupt (the caller names the file: `source` is "<stream>").
    """
    total = 0
    decoder = zlib.decompressobj(16 + zlib.MAX_WBITS if kind == "gzip" else zlib.MAX_WBITS)
    try:
        while total <= cap:
            chunk = stream.read(_CHUNK)
            if not chunk:
                break
            while chunk and total <= cap:
                total += len(decoder.decompress(chunk, _CHUNK))
                chunk = decoder.unconsumed_tail
                if decoder.eof:  # a gzip file may hold several members; each restarts the decoder
                    rest = decoder.unused_data + chunk
                    if kind != "gzip" or not rest.strip(b"\0"):
                        return total
                    decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    chunk = rest
        total += len(decoder.flush())
    except zlib.error as err:
        raise VolumeError("<stream>", f"corrupt compressed data ({err})") from None
    return total


def check_gzip_file(path: str | os.PathLike, limits: ReadLimits) -> int:
    """The unpacked size of a gzip file; a `VolumeError` naming it when over `limits.max_bytes` or corrupt."""
    try:
        with open(path, "rb") as fh:
            size = unpacked_size_at_most(fh, "gzip", limits.max_bytes)
    except VolumeError as err:
        raise VolumeError(path, f"truncated or corrupt gzip stream ({err.reason})") from None
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise VolumeError(path, f"cannot be read ({os.strerror(err.errno) if getattr(err, 'errno', None) else err})") from None
    if size > limits.max_bytes:
        raise VolumeTooLarge(path, f"unpacks to more than {limits.max_bytes / 1024**2:,.0f} MB; refusing to read it "
                                "(raise the limit with --max-unpacked-mb if the file is real)")
    return size
