"""What to run: the Estimator (Azure ML's parameter names) and the distributed-training configurations."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared import environments, schemas
from shared.errors import ValidationError
from shared.runs import MAX_RETRIES, TORCH_BACKENDS, check_retry_cause


@dataclass(slots=True)
class MpiConfiguration:
    """Run ``node_count`` x ``process_count_per_node`` processes as one MPI job (MPICH, wired up through PMI-1).

    ``process_count_per_node`` (and ``node_count``, when given) here override the Estimator's, as in Azure ML.
    """

    process_count_per_node: int | None = None
    node_count: int | None = None


@dataclass(slots=True)
class PyTorchConfiguration:
    """torch.distributed wiring only: every process gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK,
    MASTER_ADDR and MASTER_PORT, so ``init_process_group(init_method="env://")`` works; no MPI.

    ``communication_backend`` reaches the job as ``CADRE_COMMUNICATION_BACKEND`` (the script passes it to
    ``init_process_group``). ``process_count`` is the total over all nodes, as in Azure ML.
    """

    communication_backend: str | None = None
    process_count: int | None = None
    node_count: int | None = None

    def __post_init__(self) -> None:
        if self.communication_backend is not None and self.communication_backend.lower() not in TORCH_BACKENDS:
            raise ValidationError(
                f"communication_backend must be one of {', '.join(TORCH_BACKENDS)}, not {self.communication_backend!r}"
            )


@dataclass(slots=True)
class TensorflowConfiguration:
    """TensorFlow's parameter-server wiring: ``worker_count`` workers and ``parameter_server_count`` parameter
    servers, as many processes in all, spread over ``node_count`` nodes. Each gets ``TF_CONFIG`` with every task's
    address (a port of its own on its node) and its own task type and index; ranks below ``worker_count`` are the
    workers (worker 0 first), the rest the parameter servers.
    """

    worker_count: int = 1
    parameter_server_count: int = 1

    def __post_init__(self) -> None:
        for name, value, least in (("worker_count", self.worker_count, 1),
                                   ("parameter_server_count", self.parameter_server_count, 0)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValidationError(f"TensorflowConfiguration.{name} must be an integer >= {least}, not {value!r}")


ArgValue = Any  # str | int | float | bool | DatasetConsumptionConfig (a dataset input's local path)


def render_arguments(arguments: list[ArgValue]) -> tuple[list[str], list[schemas.DatasetInput]]:
    """ScriptRunConfig's ``arguments``: a list of values, where a dataset input becomes its local path."""
    from cadre._dataset import DatasetConsumptionConfig

    if not isinstance(arguments, list | tuple):
        raise ValidationError(f"arguments must be a list, not {type(arguments).__name__}")
    argv: list[str] = []
    datasets: list[schemas.DatasetInput] = []
    for i, value in enumerate(arguments):
        if isinstance(value, DatasetConsumptionConfig):
            ds = value.to_input()
            if any(d.name == ds.name for d in datasets):
                raise ValidationError(f"two dataset inputs are named {ds.name!r}")
            datasets.append(ds)
            argv.append(ds.placeholder)
        elif isinstance(value, str | int | float | bool | Path):
            argv.append(str(value))
        else:
            raise ValidationError(
                f"arguments[{i}] is a {type(value).__name__}; values must be str, int, float, bool or a dataset input"
            )
    return argv, datasets


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
        environment_definition: Any = None,
        arguments: list[ArgValue] | None = None,
        max_retries: int = 0,
        retry_on: list[str | int] | None = None,
        checkpoint_folder: str = "checkpoints",
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
        if script_params is not None and arguments is not None:
            raise ValidationError("give script_params or arguments, not both")
        self.script_params, self.arguments, self.datasets = render_params(script_params)
        if arguments is not None:
            self.arguments, self.datasets = render_arguments(arguments)
        self.compute_target = compute_target if isinstance(compute_target, str) else str(compute_target.name)
        self.distributed_training = distributed_training
        self._distributed()  # an unknown configuration fails here, not at submit
        if isinstance(distributed_training, MpiConfiguration) and distributed_training.process_count_per_node:
            process_count_per_node = distributed_training.process_count_per_node
        if getattr(distributed_training, "node_count", None) is not None:
            node_count = distributed_training.node_count  # type: ignore[union-attr]
        for name, value in (("node_count", node_count), ("process_count_per_node", process_count_per_node)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValidationError(f"{name} must be a positive integer, not {value!r}")
        if isinstance(distributed_training, TensorflowConfiguration):
            total = distributed_training.worker_count + distributed_training.parameter_server_count
            if total % node_count:
                raise ValidationError(
                    f"TensorflowConfiguration: {distributed_training.worker_count} workers + "
                    f"{distributed_training.parameter_server_count} parameter servers do not split evenly over "
                    f"{node_count} nodes"
                )
            process_count_per_node = total // node_count
        if isinstance(distributed_training, PyTorchConfiguration) and distributed_training.process_count is not None:
            total = distributed_training.process_count
            if isinstance(total, bool) or not isinstance(total, int) or total < 1 or total % node_count:
                raise ValidationError(
                    f"PyTorchConfiguration.process_count must be a positive multiple of node_count ({node_count}), "
                    f"not {total!r}"
                )
            process_count_per_node = total // node_count
        self.node_count = node_count
        self.process_count_per_node = process_count_per_node
        if placement_policy not in ("pack", "spread"):
            raise ValidationError(f"placement_policy must be 'pack' or 'spread', not {placement_policy!r}")
        self.placement_policy = placement_policy
        self.environment: schemas.EnvironmentDefinition | None = None
        self._registry_password: str | None = None  # sent with the submit only, to be stored apart
        if environment_definition is not None:
            from cadre._config import Environment

            if not isinstance(environment_definition, Environment):
                raise ValidationError(
                    f"environment_definition must be an Environment, not {type(environment_definition).__name__}"
                )
            if pip_packages or conda_packages or custom_docker_image:
                raise ValidationError(
                    "give environment_definition or pip_packages/conda_packages/custom_docker_image, not both"
                )
            self.environment = environment_definition.to_definition()
            self._registry_password = environment_definition._registry_password()
            pip_packages, conda_packages = self.environment.pip_packages, self.environment.conda_packages
            custom_docker_image = self.environment.base_image
            environment_variables = {**self.environment.environment_variables, **(environment_variables or {})}
            if shm_size is None:
                shm_size = self.environment.shm_size
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
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or not 0 <= max_retries <= MAX_RETRIES:
            raise ValidationError(f"max_retries must be an integer from 0 to {MAX_RETRIES}, not {max_retries!r}")
        self.max_retries = max_retries
        if retry_on is not None and not isinstance(retry_on, list | tuple):
            raise ValidationError(f"retry_on must be a list of causes and exit codes, not {type(retry_on).__name__}")
        self.retry_on = [
            check_retry_cause(f"exit:{c}" if isinstance(c, int) and not isinstance(c, bool) else str(c))
            for c in retry_on or []
        ]
        if not isinstance(checkpoint_folder, str) or not checkpoint_folder.strip("/"):
            raise ValidationError(
                f"checkpoint_folder must be a folder name such as 'checkpoints', not {checkpoint_folder!r}"
            )
        self.checkpoint_folder = checkpoint_folder.strip("/")

    def _distributed(self) -> str:
        if self.distributed_training is None:
            return "none"
        if isinstance(self.distributed_training, MpiConfiguration):
            return "mpi"
        if isinstance(self.distributed_training, PyTorchConfiguration):
            return "pytorch"
        if isinstance(self.distributed_training, TensorflowConfiguration):
            return "tensorflow"
        raise ValidationError(
            "distributed_training must be MpiConfiguration(), PyTorchConfiguration() or TensorflowConfiguration()"
        )

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
            environment=self.environment,
            communication_backend=self._backend(),
            max_retries=self.max_retries,
            retry_on=self.retry_on,
            checkpoint_folder=self.checkpoint_folder,
            parameter_server_count=(
                self.distributed_training.parameter_server_count
                if isinstance(self.distributed_training, TensorflowConfiguration)
                else 0
            ),
        )

    def _backend(self) -> str | None:
        config = self.distributed_training
        if isinstance(config, PyTorchConfiguration) and config.communication_backend:
            return config.communication_backend.lower()
        return None
