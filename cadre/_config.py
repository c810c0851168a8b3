"""Azure ML v1's general pattern: ``Environment`` (with ``CondaDependencies``), ``RunConfiguration`` and
``ScriptRunConfig``. ``Estimator`` is the shortcut over the same run description.

>>> env = Environment.from_pip_requirements("sklearn-env", "requirements.txt")        # doctest: +SKIP
>>> src = ScriptRunConfig("proj", script="train.py", arguments=["--data", ds.as_mount(), "--reg", 0.5],
...                       environment=env, compute_target="local")                  # doctest: +SKIP
>>> Experiment(ws, "mnist").submit(src)                                              # doctest: +SKIP

Every object refuses, at once, an attribute it does not have (a typo must not be stored and ignored).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from cadre._estimator import Estimator, MpiConfiguration, PyTorchConfiguration, TensorflowConfiguration
from shared import environments, schemas, subjects
from shared.errors import NotSupportedError, ValidationError

DEFAULT_ENVIRONMENT = "cadre-default"
REGISTRY_RE = re.compile(r"^(?:localhost|[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+|[A-Za-z0-9-]+:[0-9]+)(?::[0-9]+)?$")


class _Strict:
    """Attributes are declared in ``_fields``; setting any other one raises, naming the ones that exist."""

    _fields: tuple[str, ...] = ()

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._fields:
            raise AttributeError(
                f"{type(self).__name__} has no attribute {name!r}; its attributes are: {', '.join(self._fields)}"
            )
        object.__setattr__(self, name, value)


class CondaDependencies(_Strict):
    """The packages of an environment: conda packages (they need an image with conda) and pip packages."""

    _fields = ("_conda", "_pip", "python_version")

    def __init__(self) -> None:
        self._conda: list[str] = []
        self._pip: list[str] = []
        self.python_version: str | None = None

    @classmethod
    def create(
        cls,
        pip_packages: list[str] | None = None,
        conda_packages: list[str] | None = None,
        python_version: str | None = None,
        pin_sdk_version: bool = True,
    ) -> CondaDependencies:
        """``pin_sdk_version`` is accepted for Azure's sake: a job never needs cadre installed (the agent brings
        ``Run.get_context()`` into every environment)."""
        deps = cls()
        for pkg in pip_packages or []:
            deps.add_pip_package(pkg)
        for pkg in conda_packages or []:
            deps.add_conda_package(pkg)
        deps.python_version = python_version
        return deps

    def add_pip_package(self, pip_package: str) -> None:
        environments.check_packages([pip_package], "pip_packages")
        if pip_package not in self._pip:
            self._pip.append(pip_package)

    def add_conda_package(self, conda_package: str) -> None:
        environments.check_packages([conda_package], "conda_packages")
        if conda_package not in self._conda:
            self._conda.append(conda_package)

    def remove_pip_package(self, pip_package: str) -> None:
        self._pip = [p for p in self._pip if p != pip_package]

    def remove_conda_package(self, conda_package: str) -> None:
        self._conda = [p for p in self._conda if p != conda_package]

    @property
    def pip_packages(self) -> list[str]:
        return list(self._pip)

    @property
    def conda_packages(self) -> list[str]:
        return list(self._conda)

    def __repr__(self) -> str:
        return f"CondaDependencies(pip_packages={self._pip!r}, conda_packages={self._conda!r})"


class PythonSection(_Strict):
    """``user_managed_dependencies=True``: the image (or the node's Python) already has everything; nothing is
    built, and any packages listed are refused at submit so they are not silently dropped."""

    _fields = ("conda_dependencies", "user_managed_dependencies", "interpreter_path")

    def __init__(self) -> None:
        self.conda_dependencies = CondaDependencies()
        self.user_managed_dependencies = False
        self.interpreter_path: str | None = None


class ContainerRegistry(_Strict):
    """A private registry for ``docker.base_image``. The password travels once, to the service that stores it in
    the services-only secrets bucket; runs, events, logs and the stored environment name only where it is."""

    _fields = ("address", "username", "password", "_secret")

    def __init__(self, address: str | None = None, username: str | None = None, password: str | None = None) -> None:
        self.address = address
        self.username = username
        self.password = password
        self._secret: str | None = None  # where a registered environment's password is stored

    def __repr__(self) -> str:  # never the password
        return f"ContainerRegistry(address={self.address!r}, username={self.username!r})"


class DockerSection(_Strict):
    _fields = ("base_image", "base_dockerfile", "base_image_registry", "shm_size", "enabled")

    def __init__(self) -> None:
        self.base_image: str | None = None
        self.base_dockerfile: str | None = None
        self.base_image_registry = ContainerRegistry()
        self.shm_size: str | int | None = None
        self.enabled: bool | None = None  # Azure's older switch; an image is what selects Docker here


class Environment(_Strict):
    """A named, versioned job environment: image, packages and environment variables.

    ``register`` stores it as version 1, 2, ... of its name (the same definition again is the same version);
    ``Environment.get(ws, name, version=None)`` brings back the latest or a given version.
    """

    _fields = ("name", "version", "python", "docker", "environment_variables")

    def __init__(self, name: str) -> None:
        _check_name(name)
        self.name = name
        self.version: int | None = None
        self.python = PythonSection()
        self.docker = DockerSection()
        self.environment_variables: dict[str, str] = {}

    # --- from files -------------------------------------------------------------------------------------
    @classmethod
    def from_pip_requirements(cls, name: str, file_path: str | Path, pip_version: str | None = None) -> Environment:
        """A requirements file: one requirement per line; comments and blank lines are skipped. Options (``-r``,
        ``-e``, ``--index-url``) and URLs are refused: the node's operator configures the package index."""
        env = cls(name)
        lines = _read(file_path, "pip requirements file").splitlines()
        for number, raw in enumerate(lines, 1):
            line = re.sub(r"(^|\s)#.*$", "", raw).strip()
            if not line:
                continue
            try:
                env.python.conda_dependencies.add_pip_package(line)
            except ValidationError as exc:
                raise ValidationError(f"{file_path} line {number}: {exc}") from None
        if pip_version:
            env.python.conda_dependencies.add_pip_package(f"pip=={pip_version}")
        return env

    @classmethod
    def from_conda_specification(cls, name: str, file_path: str | Path) -> Environment:
        """A conda environment file (``dependencies:`` with an optional ``- pip:`` list). The pip section is
        installed as pip packages; conda packages need the Docker runtime and an image with conda. A ``python``
        entry is recorded as the Python version wanted; the interpreter is the image's (or the node's)."""
        import yaml

        text = _read(file_path, "conda specification")
        try:
            spec = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ValidationError(f"{file_path} is not valid YAML: {exc}") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("dependencies", []), list):
            raise ValidationError(f"{file_path}: expected a mapping with a 'dependencies' list")
        env = cls(name)
        deps = env.python.conda_dependencies
        for entry in spec.get("dependencies") or []:
            if isinstance(entry, dict) and set(entry) == {"pip"} and isinstance(entry["pip"], list):
                for pkg in entry["pip"]:
                    deps.add_pip_package(str(pkg))
            elif isinstance(entry, str | int | float):
                item = str(entry).strip()
                package = re.split(r"[=<>!~ ]", item, maxsplit=1)[0]
                if package == "python":
                    deps.python_version = item[len("python") :].lstrip("=<>!~ ") or None
                elif package != "pip":  # pip itself is the installer, not a package of the job
                    deps.add_conda_package(item)
            else:
                raise ValidationError(f"{file_path}: dependency {entry!r} is neither a package nor a pip list")
        return env

    # --- the registry -----------------------------------------------------------------------------------
    def register(self, workspace: Any) -> Environment:
        """Store this definition as the next version of its name (or return the version it already is)."""
        stored = workspace._request(
            subjects.Api.ENVIRONMENT_REGISTER,
            schemas.EnvironmentRegisterRequest(
                definition=self.to_definition(), registry_password=self._registry_password()
            ),
            schemas.EnvironmentVersion,
        )
        self.version = stored.version
        return Environment._from_stored(stored)

    @classmethod
    def get(cls, workspace: Any, name: str, version: int | None = None) -> Environment:
        _check_name(name)
        if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
            raise ValidationError(f"an environment version is a positive integer, not {version!r}")
        stored = workspace._request(
            subjects.Api.ENVIRONMENT_GET, schemas.EnvironmentRef(name=name, version=version), schemas.EnvironmentVersion
        )
        return cls._from_stored(stored)

    @staticmethod
    def list(workspace: Any) -> dict[str, Environment]:
        """The latest version of every registered environment, by name (as Azure's ``Environment.list``)."""
        reply = workspace._request(subjects.Api.ENVIRONMENT_LIST, schemas.Empty(), schemas.EnvironmentList)
        return {v.definition.name: Environment._from_stored(v) for v in reply.environments}

    # --- what a run gets -------------------------------------------------------------------------------
    def to_definition(self) -> schemas.EnvironmentDefinition:
        """The stored form, checked: a mistake fails here, before anything is sent."""
        deps = self.python.conda_dependencies
        docker = self.docker
        if self.python.interpreter_path is not None:
            raise NotSupportedError(
                "python.interpreter_path is not supported: the job runs the image's python3 (or the node's Python); "
                "set docker.base_image to an image whose python3 is the interpreter you want"
            )
        if docker.base_dockerfile is not None:
            raise NotSupportedError(
                "docker.base_dockerfile is not supported: build the image on the node (docker build) and set "
                "docker.base_image to its tag"
            )
        if docker.enabled is False and docker.base_image is not None:
            raise ValidationError("docker.enabled is False but docker.base_image is set: an image needs Docker")
        reg = docker.base_image_registry
        registry = None
        if reg.address:
            if not isinstance(reg.address, str) or not REGISTRY_RE.match(reg.address):
                raise ValidationError(
                    f"docker.base_image_registry.address {reg.address!r} is not a registry host "
                    "(expected e.g. 'registry.example.com' or 'localhost:5000')"
                )
            if not (docker.base_image or "").startswith(f"{reg.address}/"):
                raise ValidationError(
                    f"docker.base_image must be an image of the registry {reg.address}, e.g. "
                    f"'{reg.address}/team/image:tag', not {docker.base_image!r}"
                )
            registry = schemas.RegistryAuth(address=reg.address, username=reg.username, secret=reg._secret)
        elif reg.username or reg.password:
            raise ValidationError("docker.base_image_registry needs its address when a username or password is set")
        if self.python.user_managed_dependencies and (deps.pip_packages or deps.conda_packages):
            raise ValidationError(
                "python.user_managed_dependencies is True, so nothing is installed, yet packages are listed: "
                "remove them, or set user_managed_dependencies to False"
            )
        if docker.base_image is not None:
            environments.check_image(docker.base_image)
        variables = dict(self.environment_variables)
        for k, v in variables.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ValidationError(f"environment {self.name}: environment_variables must map str to str")
        shm = None if docker.shm_size is None else environments.parse_size(docker.shm_size, "docker.shm_size")
        return schemas.EnvironmentDefinition(
            name=self.name,
            pip_packages=deps.pip_packages,
            conda_packages=deps.conda_packages,
            python_version=deps.python_version,
            base_image=docker.base_image,
            environment_variables=variables,
            user_managed_dependencies=bool(self.python.user_managed_dependencies),
            shm_size=shm,
            registry=registry,
        )

    def _registry_password(self) -> str | None:
        return self.docker.base_image_registry.password if self.docker.base_image_registry.address else None

    @classmethod
    def _from_stored(cls, stored: schemas.EnvironmentVersion) -> Environment:
        d = stored.definition
        env = cls(d.name)
        env.version = stored.version
        env.python.conda_dependencies = CondaDependencies.create(d.pip_packages, d.conda_packages, d.python_version)
        env.python.user_managed_dependencies = d.user_managed_dependencies
        env.docker.base_image = d.base_image
        env.docker.shm_size = d.shm_size
        if d.registry is not None:
            env.docker.base_image_registry = ContainerRegistry(d.registry.address, d.registry.username)
            env.docker.base_image_registry._secret = d.registry.secret
        env.environment_variables = dict(d.environment_variables)
        return env

    def __repr__(self) -> str:
        deps = self.python.conda_dependencies
        return (
            f"Environment(name={self.name!r}, version={self.version}, base_image={self.docker.base_image!r}, "
            f"pip_packages={deps.pip_packages!r}, conda_packages={deps.conda_packages!r})"
        )


class RunConfiguration(_Strict):
    """How a script runs: where, in which environment, on how many nodes, with which distributed wiring."""

    _fields = (
        "script", "arguments", "target", "environment", "node_count", "communicator", "framework", "mpi",
        "pytorch", "tensorflow", "environment_variables", "max_run_duration_seconds",
    )  # fmt: skip
    COMMUNICATORS = ("None", "Mpi", "IntelMpi", "OpenMpi", "ParameterServer", "Gloo", "Nccl")

    def __init__(
        self, script: str | None = None, arguments: list[Any] | None = None, framework: str = "Python"
    ) -> None:
        self.script = script
        self.arguments = list(arguments or [])
        self.target = "local"
        self.environment = Environment(DEFAULT_ENVIRONMENT)
        self.node_count = 1
        self.communicator = "None"
        self.framework = framework
        self.mpi = MpiConfiguration()
        self.pytorch = PyTorchConfiguration()
        self.tensorflow = TensorflowConfiguration()
        self.environment_variables: dict[str, str] = {}
        self.max_run_duration_seconds: int | None = None

    def distributed(self) -> MpiConfiguration | PyTorchConfiguration | TensorflowConfiguration | None:
        """The configuration ``communicator`` selects (Azure's names)."""
        if self.framework != "Python":
            raise NotSupportedError(f"framework {self.framework!r} is not supported: cadre runs Python scripts")
        if self.communicator not in self.COMMUNICATORS:
            choices = ", ".join(self.COMMUNICATORS)
            raise ValidationError(f"communicator must be one of {choices}, not {self.communicator!r}")
        if self.communicator in ("Gloo", "Nccl") and self.pytorch.communication_backend is None:
            self.pytorch.communication_backend = self.communicator.lower()
        return {
            "None": None, "Mpi": self.mpi, "IntelMpi": self.mpi, "OpenMpi": self.mpi,
            "ParameterServer": self.tensorflow, "Gloo": self.pytorch, "Nccl": self.pytorch,
        }[self.communicator]  # fmt: skip


class ScriptRunConfig:
    """Azure ML's ``ScriptRunConfig``: a script of ``source_directory`` with its command-line ``arguments`` (a
    list mixing values and dataset inputs), run as ``run_config`` and ``environment`` say.

    What is given here wins over ``run_config``: ``compute_target`` over ``run_config.target``, ``environment``
    over ``run_config.environment``, ``distributed_job_config`` over ``run_config.communicator``.
    """

    def __init__(
        self,
        source_directory: str | Path,
        script: str | None = None,
        arguments: list[Any] | None = None,
        run_config: RunConfiguration | None = None,
        compute_target: str | Any | None = None,
        environment: Environment | None = None,
        distributed_job_config: MpiConfiguration | PyTorchConfiguration | TensorflowConfiguration | None = None,
        max_run_duration_seconds: int | None = None,
        command: list[str] | str | None = None,
        max_retries: int = 0,
        retry_on: list[str | int] | None = None,
        checkpoint_folder: str = "checkpoints",
    ) -> None:
        if command is not None:
            raise NotSupportedError("command is not supported: give script= and arguments= instead")
        if run_config is not None and not isinstance(run_config, RunConfiguration):
            raise ValidationError(f"run_config must be a RunConfiguration, not {type(run_config).__name__}")
        if environment is not None and not isinstance(environment, Environment):
            raise ValidationError(f"environment must be an Environment, not {type(environment).__name__}")
        rc = run_config or RunConfiguration()
        script = script or rc.script
        if not script:
            raise ValidationError("ScriptRunConfig needs script= (the entry script, relative to source_directory)")
        self.source_directory = source_directory
        self.script = script
        self.arguments = list(arguments if arguments is not None else rc.arguments)
        self.run_config = rc
        self.environment = environment or rc.environment
        distributed = distributed_job_config if distributed_job_config is not None else rc.distributed()
        self._estimator = Estimator(
            source_directory=source_directory,
            entry_script=script,
            arguments=self.arguments,
            compute_target=compute_target if compute_target is not None else rc.target,
            node_count=rc.node_count,
            distributed_training=distributed,
            environment_definition=self.environment,
            environment_variables=rc.environment_variables,
            max_run_duration_seconds=max_run_duration_seconds or rc.max_run_duration_seconds,
            max_retries=max_retries,
            retry_on=retry_on,
            checkpoint_folder=checkpoint_folder,
        )

    def to_spec(self, experiment: str, snapshot: schemas.SnapshotRef, git: schemas.GitInfo | None) -> schemas.RunSpec:
        return self._estimator.to_spec(experiment, snapshot, git)

    @property
    def resolved_source_directory(self) -> Path:
        return self._estimator.source_directory

    def __repr__(self) -> str:
        return f"ScriptRunConfig(source_directory={str(self.source_directory)!r}, script={self.script!r})"


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not subjects.NAME_RE.match(name):
        raise ValidationError(f"environment name {name!r} is invalid: use letters, digits, '_' or '-' (at most 128)")


def _read(path: str | Path, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValidationError(f"cannot read the {what} {str(path)!r}: {exc.strerror or exc}") from None
