"""Which reader a tomogram file needs, from its first bytes; what a file holds when no
reader fits.

A TIFF is known by its signature (whatever its suffix); an MRC file by the ``MAP ``
stamp at byte 208 (MRC2000 and later) or, in older files, by a header whose mode is an
MRC mode and whose dimensions are positive. Everything else is named from its
signature (HDF5, PNG, NumPy .npy, ZIP, gzip, ...), as plain text, or by its first bytes,
so that the one-line error says what the file is instead of blaming the MRC header.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from cryowae.io.mrc import SUPPORTED_MODES, UNSUPPORTED_MODES
from cryowae.io.tiff import TIFF_MAGIC

#: bytes read to decide
HEAD_BYTES = 1024
#: MRC2000/2014 stamp and its offset
MRC_STAMP, MRC_STAMP_AT = b"MAP ", 208
#: signatures of formats that are not tomograms cryowae reads, and their names
SIGNATURES = (
    (b"\x89HDF\r\n\x1a\n", "HDF5 data"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"PK\x03\x04", "a ZIP archive (or .npz)"),
    (b"PK\x05\x06", "an empty ZIP archive"),
    (b"\x1f\x8b", "gzip-compressed data"),
    (b"BZh", "bzip2-compressed data"),
    (b"\xfd7zXZ\x00", "xz-compressed data"),
    (b"\x28\xb5\x2f\xfd", "Zstandard-compressed data"),
    (b"%PDF", "a PDF document"),
    (b"\x7fELF", "an ELF executable"),
    (b"CDF\x01", "netCDF data"),
    (b"CDF\x02", "netCDF data"),
)


def _looks_like_mrc(head: bytes) -> bool:
    if head[MRC_STAMP_AT:MRC_STAMP_AT + 4] == MRC_STAMP:
        return True
    if len(head) < HEAD_BYTES:
        return False
    modes = set(SUPPORTED_MODES) | set(UNSUPPORTED_MODES)
    for order in "<>":
        nx, ny, nz, mode = struct.unpack(order + "4i", head[:16])
        if mode in modes and 0 < nx < 2**20 and 0 < ny < 2**20 and 0 < nz < 2**20:
            return True
    return False


def describe_bytes(head: bytes) -> str:
    """What a file starting with `head` holds, in words: a known signature, plain
    text, an empty file, or ``unknown bytes 0x..``."""
    if not head:
        return "an empty file"
    for magic, name in SIGNATURES:
        if head.startswith(magic):
            return name
    sample = head[:512]
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError:
        text = None
        if len(head) >= HEAD_BYTES:  # a multi-byte character cut at the end
            try:
                text = sample[:-3].decode("utf-8")
            except UnicodeDecodeError:
                text = None
    if text is not None and all(c.isprintable() or c in "\t\r\n\f" for c in text):
        return "plain text"
    return "unknown bytes " + " ".join(f"0x{b:02x}" for b in head[:8])


def file_format(path: str | os.PathLike) -> str:
    """``"tiff"``, ``"mrc"``, or, for any other file, what it holds in words
    (`describe_bytes`). The caller checks that `path` is an existing file."""
    with open(Path(path), "rb") as f:
        head = f.read(HEAD_BYTES)
    if head[:4] in TIFF_MAGIC:
        return "tiff"
    if _looks_like_mrc(head):
        return "mrc"
    return describe_bytes(head)


__all__ = ["HEAD_BYTES", "SIGNATURES", "describe_bytes", "file_format"]
