"""File names and digests: the checks every place that stores or writes a run or model file shares."""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import http.client
import io
import posixpath
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared import schemas
from shared.errors import StorageError, ValidationError

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


def digest_bytes(name: str, data: bytes) -> schemas.FileEntry:
    """``digest`` of content already in memory."""
    return schemas.FileEntry(
        name=name,
        size=len(data),
        md5=hashlib.md5(data, usedforsecurity=False).hexdigest(),
        sha256=hashlib.sha256(data).hexdigest(),
    )


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


def put_range(url: str, path: Path, offset: int, size: int, timeout: float = 300.0) -> str:
    """PUT ``size`` bytes of ``path`` from ``offset`` to a (presigned) URL; returns the ETag.

    The body goes from the page cache to the socket with sendfile(2): no copy through Python, so an upload leaves
    the CPU to the hashing and to the store (which often shares the machine). Exactly ``size`` bytes are sent, even
    if the file is still growing; a file that shrank is an error, not a short body.
    """
    parts = urllib.parse.urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = kind(parts.hostname or "", parts.port, timeout=timeout)
    try:
        conn.putrequest("PUT", f"{parts.path}?{parts.query}" if parts.query else parts.path, skip_accept_encoding=True)
        conn.putheader("Content-Length", str(size))
        conn.endheaders()
        with open(path, "rb") as fh:
            if parts.scheme == "https":  # TLS encrypts in user space: stream it in large blocks instead
                fh.seek(offset)
                left = size
                while left and (block := fh.read(min(CHUNK, left))):
                    conn.sock.sendall(block)
                    left -= len(block)
                sent = size - left
            else:
                sent = conn.sock.sendfile(fh, offset, size) if size else 0
        if sent != size:
            raise OSError(f"{path} is shorter than the {offset + size} bytes being uploaded")
        resp = conn.getresponse()
        body = resp.read()
        if resp.status >= 300:
            raise OSError(f"PUT failed with HTTP {resp.status}: {body[:300].decode('utf-8', 'replace')}")
        return (resp.headers.get("ETag") or "").strip('"')
    except http.client.HTTPException as exc:  # a garbled or cut-off response: as retryable as a reset connection
        raise OSError(f"PUT failed: {exc!r}") from exc
    finally:
        conn.close()


def unreachable_store(url: str, exc: BaseException, where: str) -> StorageError:
    """The error for a presigned URL that cannot be reached: it names the setting that decides its host."""
    host = urllib.parse.urlsplit(url).netloc
    reason = getattr(exc, "reason", exc)
    return StorageError(
        f"the object store at {host} is not reachable from {where} ({reason}); presigned URLs name the S3 endpoint "
        "the services advertise (CADRE_S3_PUBLIC_ENDPOINT, else CADRE_S3_ENDPOINT), which every agent and client "
        "host must reach"
    )


PART = 8 << 20  # bytes per ranged GET of a parallel download
FETCH_WORKERS = 4


def fetch(url: str, dest: Path, size: int, hasher: Any, progress: Callable[[int], None] | None = None) -> None:
    """Download ``url`` (``size`` bytes) to ``dest``, feeding ``hasher`` in order as the bytes arrive.

    A large object comes as ranged GETs in parallel while this thread writes and hashes the parts in order, so
    the network and the hash overlap; at most ``2 * FETCH_WORKERS`` parts are held in memory.
    """
    if size <= 2 * PART:
        with urllib.request.urlopen(url, timeout=300) as resp, open(dest, "wb") as out:
            done = 0
            while chunk := resp.read(CHUNK):
                hasher.update(chunk)
                out.write(chunk)
                done += len(chunk)
                if progress:
                    progress(done)
        return

    def get(index: int) -> bytes:
        start = index * PART
        end = min(size, start + PART) - 1
        req = urllib.request.Request(url, headers={"Range": f"bytes={start}-{end}"})
        with urllib.request.urlopen(req, timeout=300) as resp:
            if resp.status != 206:
                raise StorageError(f"the object store ignored a ranged GET (HTTP {resp.status})")
            data = resp.read()
        if len(data) != end - start + 1:
            raise StorageError(f"a ranged GET returned {len(data)} bytes, not {end - start + 1}")
        return data

    parts = (size + PART - 1) // PART
    with concurrent.futures.ThreadPoolExecutor(FETCH_WORKERS) as pool, open(dest, "wb") as out:
        pending: collections.deque[concurrent.futures.Future[bytes]] = collections.deque()
        submitted = 0
        done = 0
        try:
            while done < size:
                while submitted < parts and len(pending) < 2 * FETCH_WORKERS:
                    pending.append(pool.submit(get, submitted))
                    submitted += 1
                data = pending.popleft().result()
                hasher.update(data)  # hashlib lets go of the GIL: the GETs go on meanwhile
                out.write(data)
                done += len(data)
                if progress:
                    progress(done)
        finally:
            for fut in pending:
                fut.cancel()


def human_size(n: float) -> str:
    """1536 -> '1.5 KiB': sizes as people read them, in pages and log lines."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
