"""Registered models."""

from __future__ import annotations

from cadre._workspace import Workspace
from shared import schemas, subjects


class Model:
    """A version of a registered model. ``Model(ws, "name")`` is the latest; pass ``version`` for another."""

    def __init__(self, workspace: Workspace, name: str, version: int | None = None) -> None:
        found = workspace._request(
            subjects.Api.MODEL_GET, schemas.ModelGetRequest(name=name, version=version), schemas.ModelVersion
        )
        self._set(workspace, found)

    def _set(self, workspace: Workspace, v: schemas.ModelVersion) -> None:
        self.workspace = workspace
        self.name = v.name
        self.version = v.version
        self.run_id = v.run_id
        self.experiment_name = v.experiment
        self.source_path = v.source_path
        self.files = [f.name for f in v.files]
        self.tags = dict(v.tags)
        self.description = v.description
        self.created_time = v.registered_at

    @classmethod
    def _from_version(cls, workspace: Workspace, v: schemas.ModelVersion) -> Model:
        model = cls.__new__(cls)
        model._set(workspace, v)
        return model

    @staticmethod
    def list(workspace: Workspace, name: str | None = None) -> list[Model]:
        reply = workspace._request(subjects.Api.MODEL_LIST, schemas.ModelListRequest(name=name), schemas.ModelList)
        return [Model._from_version(workspace, v) for v in reply.models]

    def __repr__(self) -> str:
        return f"Model(name={self.name!r}, version={self.version}, run_id={self.run_id!r})"
