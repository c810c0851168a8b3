"""File names and digests: the checks every place that stores or writes a run or model file shares."""

from __future__ import annotations

import hashlib
import io
import posixpath
from pathlib import Path

from shared import schemas
from shared.errors import ValidationError

CHUNK = 1 << 20


def digest(path: Path, name: str, with_md5: bool = True) -> schemas.FileEntry:
    """Size, SHA-256 and (unless ``with_md5`` is off) MD5 of a file, in one streaming pass with bounded memory.

    MD5 only serves to check a single-PUT upload against its ETag; a multipart upload's ETag is not an MD5, so
    large files skip it.
    """
    md5 = hashlib.md5(usedforsecurity=False) if with_md5 else None
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            if md5 is not None:
                md5.update(chunk)
            sha.update(chunk)
            size += len(chunk)
    return schemas.FileEntry(name=name, size=size, md5=md5.hexdigest() if md5 else "", sha256=sha.hexdigest())


def check_relative(name: str, what: str = "file name") -> str:
    """A clean relative posix path: no '..', no absolute path, no NUL, nothing that escapes its prefix."""
    if (
        not name
        or "\0" in name
        or name.startswith("/")
        or "\\" in name
        or posixpath.normpath(name) != name
        or name.split("/")[0] == ".."
    ):
        raise ValidationError(f"{what} {name!r} must be a clean relative path (no '..', no leading '/')")
    return name


def safe_destination(root: Path, name: str) -> Path:
    """Where a download of ``name`` goes under ``root``, refusing anything that would land outside it."""
    check_relative(name)
    dest = (root / name).resolve()
    if not dest.is_relative_to(root.resolve()):
        raise ValidationError(f"{name!r} would be written outside {root}")
    return dest


class Prefix(io.RawIOBase):
    """The first ``size`` bytes of a file, streamed: what an upload of a file that may still grow must send."""

    def __init__(self, path: Path, size: int) -> None:
        self._fh = open(path, "rb")
        self._left = size

    def readable(self) -> bool:
        return True

    def skip(self, offset: int) -> None:
        """Start ``offset`` bytes in (a part of a multipart upload)."""
        self._fh.seek(offset)
        self._left -= offset

    def read(self, n: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        n = self._left if n is None or n < 0 else min(n, self._left)
        data = self._fh.read(n)
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._fh.close()
        super().close()
