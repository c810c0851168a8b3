"""Packing source_directory into a snapshot: ignore files honoured, limits checked first, content-hashed.

The archive is deterministic (sorted entries, zeroed times and owners), so the same tree always gets the
same hash and is stored once.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import io
import os
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from shared import schemas
from shared.errors import ValidationError
from shared.settings import Limits

IGNORE_FILES = (".gitignore", ".cadreignore")
ALWAYS_SKIPPED = (".git",)
MAX_DIFF = 100_000  # characters of uncommitted diff kept with the run (it rides in the run's spec)


@dataclass(frozen=True)
class _Rule:
    pattern: str
    negate: bool
    dir_only: bool
    anchored: bool

    def matches(self, rel: str, is_dir: bool) -> bool:
        if self.dir_only and not is_dir:
            return False
        if self.anchored:
            return fnmatch.fnmatchcase(rel, self.pattern)
        return fnmatch.fnmatchcase(rel.rsplit("/", 1)[-1], self.pattern) or fnmatch.fnmatchcase(rel, self.pattern)


def _rules(root: Path) -> list[_Rule]:
    rules = []
    for name in IGNORE_FILES:
        path = root / name
        if not path.is_file():
            continue
        for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            line = line[1:] if negate else line
            dir_only = line.endswith("/")
            line = line.rstrip("/")
            anchored = "/" in line
            rules.append(_Rule(line.lstrip("/"), negate, dir_only, anchored))
    return rules


def _ignored(rules: list[_Rule], rel: str, is_dir: bool) -> bool:
    ignored = False
    for rule in rules:  # the last matching rule wins, as in git
        if rule.matches(rel, is_dir):
            ignored = not rule.negate
    return ignored


def collect(root: Path) -> list[tuple[str, Path]]:
    """Files to ship, as (relative posix path, absolute path), sorted."""
    rules = _rules(root)
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        rel_base = base.relative_to(root).as_posix()
        rel_base = "" if rel_base == "." else rel_base + "/"
        dirnames[:] = sorted(d for d in dirnames if d not in ALWAYS_SKIPPED and not _ignored(rules, rel_base + d, True))
        for f in sorted(filenames):
            rel = rel_base + f
            path = base / f
            if not path.is_file():  # a dangling link, a socket or a FIFO: nothing a job could read as a file
                continue
            if not _ignored(rules, rel, False):
                out.append((rel, path))
    return sorted(out)


@dataclass(frozen=True)
class Snapshot:
    ref: schemas.SnapshotRef
    data: bytes


def pack(root: Path, limits: Limits | None = None) -> Snapshot:
    limits = limits or Limits()
    files = collect(root)
    total = sum(p.stat().st_size for _, p in files)
    if len(files) > limits.snapshot_max_files:
        raise ValidationError(
            f"source_directory {root} has {len(files)} files to ship, over the limit of "
            f"{limits.snapshot_max_files}: list data or generated files in .cadreignore"
        )
    if total > limits.snapshot_max_bytes:
        largest = sorted(files, key=lambda f: f[1].stat().st_size, reverse=True)[:3]
        hint = ", ".join(f"{rel} ({p.stat().st_size / 1e6:.1f} MB)" for rel, p in largest)
        raise ValidationError(
            f"source_directory {root} holds {total / 1e6:.1f} MB to ship, over the limit of "
            f"{limits.snapshot_max_bytes / 1e6:.0f} MB (largest: {hint}): list them in .cadreignore "
            "or use a dataset"
        )
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=6) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for rel, path in files:
                info = tarfile.TarInfo(rel)
                st = path.stat()
                info.size = st.st_size
                info.mode = 0o755 if st.st_mode & 0o111 else 0o644
                info.mtime = 0
                with open(path, "rb") as fh:
                    tar.addfile(info, fh)
    data = buf.getvalue()
    ref = schemas.SnapshotRef(
        content_hash=hashlib.sha256(data).hexdigest(),
        size=len(data),
        file_count=len(files),
        md5=hashlib.md5(data, usedforsecurity=False).hexdigest(),
    )
    return Snapshot(ref=ref, data=data)


def git_info(root: Path) -> schemas.GitInfo | None:
    """The repository, branch, commit and dirtiness of source_directory, when it is in a git work tree.

    Outside one no git process is started at all; inside, two questions go to git at once (one ``git status``
    answers commit, branch and dirtiness; the other is the remote), a third only for a repository with no remote
    and a fourth for the diff of a dirty tree: this is on every submit's path, where each process costs ms."""
    where = root.resolve()
    if "GIT_DIR" not in os.environ and not any((d / ".git").exists() for d in (where, *where.parents)):
        return None

    def start(*args: str) -> subprocess.Popen[str] | None:
        try:
            return subprocess.Popen(["git", "-C", str(root), *args], stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True)  # fmt: skip
        except OSError:
            return None

    def answer(proc: subprocess.Popen[str] | None) -> str | None:
        if proc is None:
            return None
        try:
            out, _ = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return None
        return out.strip() if proc.returncode == 0 else None

    asked = [start("status", "--porcelain=v2", "--branch", "--", "."), start("config", "--get", "remote.origin.url")]
    status, remote = (answer(p) for p in asked)
    if status is None:  # not in a work tree after all (or no git)
        return None
    commit = branch = None
    dirty = False
    for line in status.splitlines():
        if line.startswith("# branch.oid "):
            oid = line.removeprefix("# branch.oid ")
            commit = None if oid == "(initial)" else oid  # a repository with no commit yet
        elif line.startswith("# branch.head "):
            head = line.removeprefix("# branch.head ")
            branch = "HEAD" if head == "(detached)" else head  # what rev-parse --abbrev-ref says of a detached HEAD
        elif not line.startswith("#"):
            dirty = True
    top = None if remote else answer(start("rev-parse", "--show-toplevel"))
    diff = ""
    if dirty:
        diff = answer(start("diff", "HEAD", "--", ".")) or ""
    if len(diff) > MAX_DIFF:
        diff = diff[:MAX_DIFF] + f"\n[diff truncated at {MAX_DIFF} characters]\n"
    return schemas.GitInfo(repository=remote or top, branch=branch, commit=commit, dirty=dirty, diff=diff)
