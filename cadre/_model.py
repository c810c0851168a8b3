"""Registered models: versions, tags and properties, aliases, lineage, download."""

from __future__ import annotations

import getpass
import urllib.request
from pathlib import Path
from typing import Any

import msgspec

from cadre._workspace import Workspace, http_put_file
from shared import files, schemas, subjects
from shared.errors import ValidationError


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


class Model:
    """One version of a registered model.

    ``Model(ws, "name")`` is the latest version that is not archived; pass ``version=`` or ``alias=`` for another.
    """

    def __init__(self, workspace: Workspace, name: str, version: int | None = None, alias: str | None = None) -> None:
        found = workspace._request(
            subjects.Api.MODEL_GET, schemas.ModelRef(name=name, version=version, alias=alias), schemas.ModelVersion
        )
        self._set(workspace, found)

    def _set(self, workspace: Workspace, v: schemas.ModelVersion) -> None:
        self.workspace = workspace
        self._v = v
        self.name = v.name
        self.version = v.version
        self.run_id = v.lineage.run_id
        self.experiment_name = v.lineage.experiment
        self.source_path = v.source_path
        self.files = [f.name for f in v.files]
        self.tags = dict(v.tags)
        self.properties = dict(v.properties)
        self.description = v.description
        self.created_time = v.registered_at
        self.created_by = v.registered_by
        self.archived = v.archived
        self.aliases = list(v.aliases)

    @property
    def lineage(self) -> dict[str, Any]:
        """Run, experiment, git (repository, branch, commit, dirty), datasets and environment of this version."""
        return msgspec.to_builtins(self._v.lineage)

    @classmethod
    def _from_version(cls, workspace: Workspace, v: schemas.ModelVersion) -> Model:
        model = cls.__new__(cls)
        model._set(workspace, v)
        return model

    @classmethod
    def register(
        cls,
        workspace: Workspace,
        model_path: str | Path,
        model_name: str,
        tags: dict[str, str] | None = None,
        properties: dict[str, str] | None = None,
        description: str | None = None,
    ) -> Model:
        """Register local files (a file or a folder) as the next version of ``model_name``."""
        root = Path(model_path)
        if not root.exists():
            raise ValidationError(f"model_path {str(model_path)!r} does not exist")
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        if not paths:
            raise ValidationError(f"model_path {str(model_path)!r} holds no files")
        base = root.parent  # a folder keeps its own name, as a run's folder does
        entries = [files.digest(p, p.relative_to(base).as_posix()) for p in paths]
        urls = workspace._request(
            subjects.Api.MODEL_UPLOAD,
            schemas.ModelUploadRequest(model_name=model_name, files=entries),
            schemas.ModelFiles,
        ).urls
        for entry, path in zip(entries, paths, strict=True):
            if entry.name in urls:
                http_put_file(urls[entry.name], path, entry.size)
        return _register(workspace, model_name, tags, properties, description, files=entries)

    @staticmethod
    def list(
        workspace: Workspace,
        name: str | None = None,
        tags: dict[str, str] | None = None,
        properties: dict[str, str] | None = None,
        include_archived: bool = False,
    ) -> list[Model]:
        req = schemas.ModelListRequest(
            name=name, tags=_strs(tags, "tags"), properties=_strs(properties, "properties"),
            include_archived=include_archived,
        )  # fmt: skip
        reply = workspace._request(subjects.Api.MODEL_LIST, req, schemas.ModelList)
        return [Model._from_version(workspace, v) for v in reply.models]

    def _update(self, **changes: Any) -> Model:
        updated = self.workspace._request(
            subjects.Api.MODEL_UPDATE,
            schemas.ModelUpdateRequest(name=self.name, version=self.version, **changes),
            schemas.ModelVersion,
        )
        self._set(self.workspace, updated)
        return self

    def add_tags(self, tags: dict[str, str]) -> Model:
        return self._update(add_tags=_strs(tags, "tags"))

    def remove_tags(self, keys: list[str]) -> Model:
        return self._update(remove_tags=list(keys))

    def add_properties(self, properties: dict[str, str]) -> Model:
        """Add properties; a key that is set already cannot change."""
        return self._update(add_properties=_strs(properties, "properties"))

    def archive(self) -> Model:
        """Hide this version from "latest" and from listings (its files stay)."""
        return self._update(archived=True)

    def set_alias(self, alias: str) -> Model:
        """Point ``alias`` (e.g. "production") at this version; the move is recorded as an event."""
        updated = self.workspace._request(
            subjects.Api.MODEL_ALIAS,
            schemas.AliasRequest(name=self.name, alias=alias, version=self.version, by=_who()),
            schemas.ModelVersion,
        )
        self._set(self.workspace, updated)
        return self

    def delete(self) -> None:
        """Delete this version and its files (those no other version of the model shares)."""
        self.workspace._request(
            subjects.Api.MODEL_DELETE, schemas.ModelRef(name=self.name, version=self.version), schemas.ModelVersion
        )

    def download(self, target_dir: str | Path = ".", exist_ok: bool = False) -> Path:
        """Download this version's files under ``target_dir``, each verified against its SHA-256."""
        root = Path(target_dir)
        urls = self.workspace._request(
            subjects.Api.MODEL_DOWNLOAD, schemas.ModelRef(name=self.name, version=self.version), schemas.ModelFiles
        ).urls
        for entry in self._v.files:
            dest = files.safe_destination(root, entry.name)
            if dest.exists() and not exist_ok:
                raise ValidationError(f"{dest} exists; pass exist_ok=True to overwrite")
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".part")
            with urllib.request.urlopen(urls[entry.name], timeout=300) as resp, open(tmp, "wb") as fh:
                while chunk := resp.read(files.CHUNK):
                    fh.write(chunk)
            if files.digest(tmp, entry.name).sha256 != entry.sha256:
                tmp.unlink(missing_ok=True)
                raise OSError(f"download of {entry.name} is corrupt (SHA-256 mismatch); try again")
            tmp.replace(dest)
        return root

    @staticmethod
    def get_model_path(model_name: str, version: int | None = None, _workspace: Workspace | None = None) -> str:
        """Azure's ``Model.get_model_path``: where a registered model's files are on this machine, downloaded once
        per version under ``$CADRE_HOME/models/<name>/<version>``; a single-file model gives that file's path."""
        from cadre._profile import cadre_home

        ws = _workspace or Workspace.from_config()
        model = Model(ws, model_name, version=version)
        root = cadre_home() / "models" / model.name / str(model.version)
        if not (root / ".complete").exists():
            model.download(root, exist_ok=True)
            (root / ".complete").write_text("")
        return str(root / model.files[0]) if len(model.files) == 1 else str(root)

    def __repr__(self) -> str:
        return f"Model(name={self.name!r}, version={self.version}, run_id={self.run_id!r})"


def _register(
    workspace: Workspace,
    model_name: str,
    tags: dict[str, str] | None,
    properties: dict[str, str] | None,
    description: str | None,
    **source: Any,
) -> Model:
    """Register the next version of ``model_name`` from ``source``: a run's path, or uploaded local files."""
    req = schemas.ModelRegisterRequest(
        model_name=model_name,
        tags=_strs(tags, "tags"),
        properties=_strs(properties, "properties"),
        description=description,
        registered_by=_who(),
        **source,
    )
    return Model._from_version(workspace, workspace._request(subjects.Api.MODEL_REGISTER, req, schemas.ModelVersion))


def _strs(values: dict[str, str] | None, what: str) -> dict[str, str]:
    values = dict(values or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in values.items()):
        raise ValidationError(f"{what} must map str to str")
    return values
