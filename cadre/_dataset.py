"""Datasets: upload a folder once (versioned, content-hashed), then hand it to runs as a mount or a download.

>>> ds = Dataset.upload(ws, "./data", name="mnist")                          # doctest: +SKIP
>>> Estimator(..., script_params={"--data": Dataset.get(ws, "mnist").as_named_input("mnist").as_mount()})
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from cadre._workspace import Workspace, http_put_file
from shared import files, schemas, subjects
from shared.errors import NotSupportedError, ValidationError

DATASET_INSTEAD = (
    "upload a folder with Dataset.upload(ws, './data', name='mnist') (versioned, content-hashed), then pass "
    "Dataset.get(ws, 'mnist').as_named_input('mnist').as_mount() as a script argument"
)


class FileDatasetFactory:
    """Azure's ``Dataset.File``: datasets here are folders uploaded with ``Dataset.upload``."""

    @staticmethod
    def from_files(*_: object, **__: object) -> None:
        raise NotSupportedError(f"Dataset.File.from_files is not supported (no datastores): {DATASET_INSTEAD}")


@dataclass(frozen=True)
class DatasetConsumptionConfig:
    """How a run reads a dataset: ``as_mount()`` (the node's shared read-only copy) or ``as_download()``
    (a private copy in the run's directory). The script receives the local path as the parameter's value."""

    name: str
    dataset: schemas.DatasetVersion
    mode: str = "mount"

    def as_mount(self) -> DatasetConsumptionConfig:
        return replace(self, mode="mount")

    def as_download(self) -> DatasetConsumptionConfig:
        return replace(self, mode="download")

    def to_input(self) -> schemas.DatasetInput:
        if not subjects.NAME_RE.match(self.name):
            raise ValidationError(f"input name {self.name!r} is invalid: use letters, digits, '_' or '-'")
        return schemas.DatasetInput(
            name=self.name, dataset=self.dataset.name, version=self.dataset.version,
            content_hash=self.dataset.content_hash, mode=self.mode,  # type: ignore[arg-type]
        )  # fmt: skip


class Dataset:
    """One version of a dataset."""

    File = FileDatasetFactory

    def __init__(self, version: schemas.DatasetVersion) -> None:
        self._v = version
        self.name = version.name
        self.version = version.version
        self.content_hash = version.content_hash
        self.files = [f.name for f in version.files]
        self.total_bytes = version.total_bytes

    @classmethod
    def get(cls, workspace: Workspace, name: str, version: int | None = None) -> Dataset:
        return cls(workspace._request(subjects.Api.DATASET_GET, schemas.DatasetRef(name=name, version=version),
                                      schemas.DatasetVersion))  # fmt: skip

    @staticmethod
    def list(workspace: Workspace) -> list[Dataset]:
        reply = workspace._request(subjects.Api.DATASET_LIST, schemas.Empty(), schemas.DatasetList)
        return [Dataset(v) for v in reply.datasets]

    @classmethod
    def upload(
        cls,
        workspace: Workspace,
        src_dir: str | Path,
        name: str,
        description: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Dataset:
        """Upload a folder as the next version of ``name`` (only files the store lacks travel; the same data
        again returns the existing version)."""
        root = Path(src_dir)
        if not root.is_dir():
            raise ValidationError(f"dataset folder {str(src_dir)!r} does not exist")
        paths = sorted(p for p in root.rglob("*") if p.is_file())
        entries = [files.digest(p, p.relative_to(root).as_posix()) for p in paths]
        urls = workspace._request(subjects.Api.DATASET_UPLOAD, schemas.DatasetUploadRequest(name=name, files=entries),
                                  schemas.DatasetFiles).urls  # fmt: skip
        total = sum(e.size for e in entries if e.name in urls)
        done = 0
        for entry, path in zip(entries, paths, strict=True):
            if entry.name in urls:
                http_put_file(urls[entry.name], path, entry.size)
                done += entry.size
                if progress:
                    progress(done, total)
        version = workspace._request(
            subjects.Api.DATASET_REGISTER,
            schemas.DatasetRegisterRequest(name=name, files=entries, description=description),
            schemas.DatasetVersion,
        )
        return cls(version)

    def as_named_input(self, name: str) -> DatasetConsumptionConfig:
        return DatasetConsumptionConfig(name=name, dataset=self._v)

    def __repr__(self) -> str:
        return f"Dataset(name={self.name!r}, version={self.version}, files={len(self.files)})"
