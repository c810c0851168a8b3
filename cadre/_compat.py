"""More of Azure ML v1's names, so a user who follows its documents finds each one here: what maps onto cadre
works, and what does not refuses with a NotSupportedError that names what to use instead.
"""

from __future__ import annotations

from typing import Any

from cadre._dataset import DATASET_INSTEAD
from cadre._estimator import Estimator
from cadre._workspace import Workspace
from shared import schemas, subjects
from shared.errors import NotFoundError, NotSupportedError, ValidationError


class ComputeTarget:
    """A named pool of nodes: the agents started with ``--compute-target NAME`` (``local`` by default).

    ``ComputeTarget(ws, "gpu-cluster")`` checks that such a target has been seen; its ``nodes`` are the agents
    that advertise it now.
    """

    def __init__(self, workspace: Workspace, name: str, _targets: schemas.TargetList | None = None) -> None:
        reply = _targets or workspace._request(subjects.Api.TARGETS_LIST, schemas.Empty(), schemas.TargetList)
        known = sorted(t.name for t in reply.targets)
        if name not in known:
            raise NotFoundError(f"compute target {name!r} is not known; known targets: {', '.join(known) or 'none'}")
        self.workspace = workspace
        self.name = name
        self.nodes = [n.node_id for n in reply.nodes if n.compute_target == name]

    @staticmethod
    def list(workspace: Workspace) -> list[ComputeTarget]:
        reply = workspace._request(subjects.Api.TARGETS_LIST, schemas.Empty(), schemas.TargetList)
        return [ComputeTarget(workspace, t.name, reply) for t in sorted(reply.targets, key=lambda t: t.name)]

    @staticmethod
    def create(*_: Any, **__: Any) -> ComputeTarget:
        raise NotSupportedError(
            "cadre does not provision machines: a compute target is made by the agents that join it (start each "
            "GPU host's agent with --compute-target NAME, or CADRE_AGENT_COMPUTE_TARGET), then use "
            "ComputeTarget(ws, NAME) or compute_target='NAME'"
        )

    def wait_for_completion(self, show_output: bool = False, *_: Any, **__: Any) -> None:
        """Azure waits for provisioning; a cadre target is ready once an agent has joined it."""

    def __repr__(self) -> str:
        return f"ComputeTarget(name={self.name!r}, nodes={len(self.nodes)})"


class AmlCompute:
    @staticmethod
    def provisioning_configuration(*_: Any, **__: Any) -> None:
        ComputeTarget.create()


class SKLearn(Estimator):
    """Azure's scikit-learn estimator: an Estimator whose environment also has scikit-learn (``framework_version``
    pins it)."""

    def __init__(self, *args: Any, framework_version: str | None = None, **kwargs: Any) -> None:
        if framework_version is not None and not isinstance(framework_version, str):
            raise ValidationError(f"framework_version must be a version string, not {framework_version!r}")
        sklearn = f"scikit-learn=={framework_version}" if framework_version else "scikit-learn"
        pip = list(kwargs.pop("pip_packages", None) or [])
        if not any(p.split("=")[0].split("<")[0].split(">")[0].strip() == "scikit-learn" for p in pip):
            pip.append(sklearn)
        super().__init__(*args, pip_packages=pip, **kwargs)


class PyTorch:
    def __init__(self, *_: Any, **__: Any) -> None:
        raise NotSupportedError(
            "the PyTorch estimator is not supported (Azure deprecated it too): use Estimator or ScriptRunConfig with "
            "pip_packages=['torch==<version>'] or an image that has torch, and distributed_training="
            "PyTorchConfiguration()"
        )


class TensorFlow:
    def __init__(self, *_: Any, **__: Any) -> None:
        raise NotSupportedError(
            "the TensorFlow estimator is not supported (Azure deprecated it too): use Estimator or ScriptRunConfig "
            "with pip_packages=['tensorflow==<version>'] or an image that has it, and distributed_training="
            "TensorflowConfiguration(worker_count=..., parameter_server_count=...)"
        )


class Datastore:
    def __init__(self, *_: Any, **__: Any) -> None:
        raise NotSupportedError(f"datastores are not supported: {DATASET_INSTEAD}")

    @staticmethod
    def get(*_: Any, **__: Any) -> None:
        raise NotSupportedError(f"datastores are not supported: {DATASET_INSTEAD}")
