"""What to run: the Estimator (Azure ML's parameter names) and the distributed-training configurations."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared import environments, schemas
from shared.errors import ValidationError


@dataclass(frozen=True)
class MpiConfiguration:
    """Run ``node_count`` x ``process_count_per_node`` processes as one MPI job (MPICH, wired up through PMI-1).

    ``process_count_per_node`` here overrides the Estimator's, as in Azure ML.
    """

    process_count_per_node: int | None = None


@dataclass(frozen=True)
class PyTorchConfiguration:
    """torch.distributed wiring only: every process gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK,
    MASTER_ADDR and MASTER_PORT, so ``init_process_group(init_method="env://")`` works; no MPI."""

    communication_backend: str = "gloo"


def render_params(
    script_params: dict[str, Any] | None,
) -> tuple[dict[str, schemas.ScalarParam], list[str], list[schemas.DatasetInput]]:
    """Azure ML semantics: each key is a flag, its value the next argument; a value of "" is a bare flag.

    A dataset value (``Dataset.get(...).as_named_input(...).as_mount()``) becomes a placeholder the node agent
    replaces with the dataset's local path.
    """
    from cadre._dataset import DatasetConsumptionConfig

    if script_params is None:
        return {}, [], []
    if not isinstance(script_params, dict):
        raise ValidationError(f"script_params must be a dict of flag -> value, not {type(script_params).__name__}")
    params: dict[str, schemas.ScalarParam] = {}
    argv: list[str] = []
    datasets: list[schemas.DatasetInput] = []
    for key, value in script_params.items():
        if not isinstance(key, str) or not key:
            raise ValidationError(f"script_params keys must be non-empty strings, got {key!r}")
        if isinstance(value, DatasetConsumptionConfig):
            ds = value.to_input()
            if any(d.name == ds.name for d in datasets):
                raise ValidationError(f"two dataset inputs are named {ds.name!r}")
            datasets.append(ds)
            params[key] = f"dataset:{ds.dataset}:{ds.version}:{ds.mode}"
            argv += [key, ds.placeholder]
            continue
        if not isinstance(value, (str, int, float, bool)):
            raise ValidationError(
                f"script_params[{key!r}] is a {type(value).__name__}; values must be str, int, float, bool or a dataset"
            )
        params[key] = value
        argv.append(key)
        if value != "" or isinstance(value, bool):
            argv.append(str(value))
    return params, argv, datasets


class Estimator:
    """A training script and how to run it.

    >>> Estimator(source_directory="proj", entry_script="train.py", script_params={"--lr": 0.1},
    ...           compute_target="local")  # doctest: +SKIP

    Everything that can be checked locally is checked here, so a mistake fails before anything is sent.
    """

    def __init__(
        self,
        source_directory: str | Path,
        entry_script: str,
        script_params: dict[str, Any] | None = None,
        compute_target: str | Any = "local",
        node_count: int = 1,
        process_count_per_node: int = 1,
        distributed_training: MpiConfiguration | PyTorchConfiguration | None = None,
        pip_packages: list[str] | None = None,
        conda_packages: list[str] | None = None,
        custom_docker_image: str | None = None,
        environment_variables: dict[str, str] | None = None,
        max_run_duration_seconds: int | None = None,
        placement_policy: str = "pack",
        shm_size: str | int | None = None,
        cpus_per_process: float | None = None,
        memory_per_process: str | int | None = None,
    ) -> None:
        source = Path(source_directory).expanduser()
        if not source.is_dir():
            raise ValidationError(f"source_directory {str(source_directory)!r} does not exist or is not a directory")
        self.source_directory = source.resolve()
        entry = Path(entry_script)
        full = (self.source_directory / entry).resolve()
        if entry.is_absolute() or not full.is_relative_to(self.source_directory):
            raise ValidationError(f"entry_script {entry_script!r} must be inside source_directory {source}")
        if not full.is_file():
            raise ValidationError(f"entry_script {entry_script!r} not found in source_directory {source}")
        self.entry_script = full.relative_to(self.source_directory).as_posix()
        self.script_params, self.arguments, self.datasets = render_params(script_params)
        self.compute_target = compute_target if isinstance(compute_target, str) else str(compute_target.name)
        for name, value in (("node_count", node_count), ("process_count_per_node", process_count_per_node)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValidationError(f"{name} must be a positive integer, not {value!r}")
        if isinstance(distributed_training, MpiConfiguration) and distributed_training.process_count_per_node:
            process_count_per_node = distributed_training.process_count_per_node
        self.node_count = node_count
        self.process_count_per_node = process_count_per_node
        self.distributed_training = distributed_training
        if placement_policy not in ("pack", "spread"):
            raise ValidationError(f"placement_policy must be 'pack' or 'spread', not {placement_policy!r}")
        self.placement_policy = placement_policy
        self._distributed()  # an unknown configuration fails here, not at submit
        self.pip_packages = list(pip_packages or [])
        self.conda_packages = list(conda_packages or [])
        environments.check_packages(self.pip_packages, "pip_packages")
        environments.check_packages(self.conda_packages, "conda_packages")
        if custom_docker_image is not None:
            environments.check_image(custom_docker_image)
        self.custom_docker_image = custom_docker_image
        self.shm_size = None if shm_size is None else environments.parse_size(shm_size, "shm_size")
        self.memory_per_process = (
            None if memory_per_process is None else environments.parse_size(memory_per_process, "memory_per_process")
        )
        if cpus_per_process is not None and (
            isinstance(cpus_per_process, bool)
            or not isinstance(cpus_per_process, (int, float))
            or cpus_per_process <= 0
        ):
            raise ValidationError(f"cpus_per_process must be a positive number, not {cpus_per_process!r}")
        self.cpus_per_process = None if cpus_per_process is None else float(cpus_per_process)
        env = dict(environment_variables or {})
        for k, v in env.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ValidationError("environment_variables must map str to str")
        self.environment_variables = env
        if max_run_duration_seconds is not None and (
            not isinstance(max_run_duration_seconds, (int, float)) or max_run_duration_seconds <= 0
        ):
            raise ValidationError("max_run_duration_seconds must be a positive number")
        self.max_run_duration_seconds = None if max_run_duration_seconds is None else int(max_run_duration_seconds)

    def _distributed(self) -> str:
        if self.distributed_training is None:
            return "none"
        if isinstance(self.distributed_training, MpiConfiguration):
            return "mpi"
        if isinstance(self.distributed_training, PyTorchConfiguration):
            return "pytorch"
        raise ValidationError("distributed_training must be MpiConfiguration() or PyTorchConfiguration()")

    def to_spec(self, experiment: str, snapshot: schemas.SnapshotRef, git: schemas.GitInfo | None) -> schemas.RunSpec:
        return schemas.RunSpec(
            experiment=experiment,
            entry_script=self.entry_script,
            script_params=self.script_params,
            arguments=self.arguments,
            compute_target=self.compute_target,
            node_count=self.node_count,
            process_count_per_node=self.process_count_per_node,
            distributed=self._distributed(),  # type: ignore[arg-type]
            placement=self.placement_policy,  # type: ignore[arg-type]
            environment_variables=self.environment_variables,
            max_run_duration_seconds=self.max_run_duration_seconds,
            snapshot=snapshot,
            git=git,
            pip_packages=self.pip_packages,
            conda_packages=self.conda_packages,
            custom_docker_image=self.custom_docker_image,
            datasets=self.datasets,
            shm_size=self.shm_size,
            cpus_per_process=self.cpus_per_process,
            memory_per_process=self.memory_per_process,
        )
