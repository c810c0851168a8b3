"""Azure ML v1's configuration objects: ScriptRunConfig, RunConfiguration, Environment, CondaDependencies.

The checks that need no cluster come first; then runs on the session's real cluster, and the environment registry.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import PackageIndex

from cadre import (
    AmlCompute,
    ComputeTarget,
    CondaDependencies,
    Dataset,
    Environment,
    Estimator,
    Experiment,
    Model,
    NotFoundError,
    NotSupportedError,
    PyTorch,
    PyTorchConfiguration,
    RunConfiguration,
    ScriptRunConfig,
    SKLearn,
    TensorFlow,
    TensorflowConfiguration,
    ValidationError,
    Workspace,
)


def test_objects_refuse_attributes_they_do_not_have() -> None:
    env = Environment("sk-env")
    with pytest.raises(AttributeError, match=r"Environment has no attribute 'pip_packages'; its attributes are: name"):
        env.pip_packages = ["numpy"]  # type: ignore[attr-defined]
    with pytest.raises(AttributeError, match="DockerSection has no attribute 'baseimage'"):
        env.docker.baseimage = "x"  # type: ignore[attr-defined]
    with pytest.raises(AttributeError, match="RunConfiguration has no attribute 'nodes'"):
        RunConfiguration().nodes = 2  # type: ignore[attr-defined]
    with pytest.raises(ValidationError, match="environment name 'bad name' is invalid"):
        Environment("bad name")


def test_environment_files(tmp_path: Path) -> None:
    req = tmp_path / "requirements.txt"
    req.write_text("# the tutorial's\nscikit-learn==1.5.0  # pinned\n\njoblib\n")
    env = Environment.from_pip_requirements("from-req", req)
    assert env.python.conda_dependencies.pip_packages == ["scikit-learn==1.5.0", "joblib"]
    req.write_text("numpy\n--index-url http://elsewhere/simple\n")
    with pytest.raises(ValidationError, match=r"requirements.txt line 2: pip_packages entry '--index-url"):
        Environment.from_pip_requirements("from-req", req)
    conda = tmp_path / "environment.yml"
    conda.write_text(
        textwrap.dedent(
            """
            name: tutorial
            dependencies:
              - python=3.11
              - numpy=1.26
              - pip
              - pip:
                - scikit-learn
            """
        )
    )
    env = Environment.from_conda_specification("from-conda", conda)
    deps = env.python.conda_dependencies
    assert (deps.pip_packages, deps.conda_packages, deps.python_version) == (["scikit-learn"], ["numpy=1.26"], "3.11")
    conda.write_text("dependencies: [python=3.11, {pip: [x]}, {nope: 1}]\n")
    with pytest.raises(ValidationError, match="is neither a package nor a pip list"):
        Environment.from_conda_specification("from-conda", conda)
    with pytest.raises(ValidationError, match="cannot read the pip requirements file"):
        Environment.from_pip_requirements("x", tmp_path / "missing.txt")


def test_bad_configurations_fail_at_construction(make_project: Callable[..., Path]) -> None:
    project = make_project(**{"train.py": "print(1)"})
    with pytest.raises(ValidationError, match=r"arguments\[1\] is a dict"):
        ScriptRunConfig(project, script="train.py", arguments=["--x", {"a": 1}])
    with pytest.raises(ValidationError, match="needs script="):
        ScriptRunConfig(project)
    with pytest.raises(ValidationError, match="worker_count must be an integer >= 1"):
        TensorflowConfiguration(worker_count=0)
    tf = TensorflowConfiguration(worker_count=2, parameter_server_count=1)
    with pytest.raises(ValidationError, match="2 workers \\+ 1 parameter servers do not split evenly over 2 nodes"):
        Estimator(project, "train.py", node_count=2, distributed_training=tf)
    with pytest.raises(ValidationError, match="communication_backend must be one of gloo, nccl"):
        PyTorchConfiguration(communication_backend="carrier-pigeon")
    with pytest.raises(ValidationError, match="process_count must be a positive multiple of node_count"):
        Estimator(project, "train.py", node_count=2, distributed_training=PyTorchConfiguration(process_count=3))
    env = Environment("managed")
    env.python.user_managed_dependencies = True
    env.python.conda_dependencies = CondaDependencies.create(pip_packages=["numpy"])
    with pytest.raises(ValidationError, match="user_managed_dependencies is True"):
        ScriptRunConfig(project, script="train.py", environment=env)
    env = Environment("private")
    env.docker.base_image = "team/image:1"
    env.docker.base_image_registry.address = "registry.example:5000"
    env.docker.base_image_registry.password = "s3cret-pw"
    with pytest.raises(ValidationError, match="must be an image of the registry registry.example:5000"):
        Estimator(project, "train.py", environment_definition=env)
    assert "s3cret-pw" not in repr(env.docker.base_image_registry)
    env.docker.base_image_registry.address = "https://registry.example"
    with pytest.raises(ValidationError, match="is not a registry host"):
        Estimator(project, "train.py", environment_definition=env)
    with pytest.raises(NotSupportedError, match="base_dockerfile is not supported"):
        env = Environment("dockerfile")
        env.docker.base_dockerfile = "FROM x"
        Estimator(project, "train.py", environment_definition=env)
    with pytest.raises(ValidationError, match="max_retries must be an integer from 0 to 10"):
        Estimator(project, "train.py", max_retries=-1)
    with pytest.raises(ValidationError, match="retry_on entry 'bogus' is not a cause; causes are: nonzero_exit"):
        Estimator(project, "train.py", max_retries=1, retry_on=["bogus"])
    with pytest.raises(ValidationError, match="an exit code is 1-255"):
        ScriptRunConfig(project, script="train.py", max_retries=1, retry_on=[0])
    assert Estimator(project, "train.py", max_retries=2, retry_on=[3, "node_lost"]).retry_on == ["exit:3", "node_lost"]
    rc = RunConfiguration()
    rc.communicator = "ParameterServer"
    rc.tensorflow.worker_count = 3
    assert ScriptRunConfig(project, script="train.py", run_config=rc)._estimator.process_count_per_node == 4
    rc.communicator = "Carrier"
    with pytest.raises(ValidationError, match="communicator must be one of None, Mpi"):
        ScriptRunConfig(project, script="train.py", run_config=rc)


SCRIPT = """
    import os, sys
    import cadre_demo_pkg
    from cadre import Run
    run = Run.get_context()
    data, reg = sys.argv[2], float(sys.argv[4])
    run.log("regularization rate", reg)
    run.log("rows", len(open(os.path.join(data, "rows.csv")).read().splitlines()))
    print("argv", sys.argv[1:])
    print("backend", os.environ.get("CADRE_COMMUNICATION_BACKEND"), "rank", os.environ["RANK"])
    print("greeting", os.environ.get("GREETING"), cadre_demo_pkg.VALUE)
    os.makedirs("logs", exist_ok=True)
    with open("logs/notes.txt", "w") as fh:
        fh.write("epoch 1 done\\n")
"""


def test_script_run_config_with_a_registered_environment_and_a_dataset(
    ws: Workspace, make_project: Callable[..., Path], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "rows.csv").write_text("a\nb\nc\n")
    ds = Dataset.upload(ws, data, name="config-rows")
    # A pin of its own: this venv must not be the one test_environments expects to build first.
    (tmp_path / "requirements.txt").write_text(f"{PackageIndex.NAME}>={PackageIndex.VERSION}\n")
    env = Environment.from_pip_requirements("config-env", tmp_path / "requirements.txt")
    env.environment_variables = {"GREETING": "hej"}
    registered = env.register(ws)
    assert registered.version is not None and registered.version >= 1
    rc = RunConfiguration()
    rc.environment_variables = {"FROM_RUN_CONFIG": "1"}
    src = ScriptRunConfig(
        source_directory=make_project(**{"train.py": SCRIPT}),
        script="train.py",
        arguments=["--data-folder", ds.as_named_input("rows").as_mount(), "--regularization", 0.5],
        run_config=rc,
        compute_target="local",
        environment=Environment.get(ws, "config-env"),
        distributed_job_config=PyTorchConfiguration(communication_backend="gloo", process_count=2),
    )
    run = Experiment(ws, "configs").submit(src)
    out = io.StringIO()
    run.wait_for_completion(show_output=True, output=out)
    text = out.getvalue()
    assert run.get_metrics() == {"regularization rate": [0.5, 0.5], "rows": [3, 3]}  # two ranks logged each
    assert "argv ['--data-folder'," in text and "'--regularization', '0.5']" in text
    assert "backend gloo rank 0" in text and "backend gloo rank 1" in text
    assert f"greeting hej {PackageIndex.VALUE}" in text
    details = run.get_details()
    assert details["inputDatasets"] == [
        {"name": "rows", "dataset": "config-rows", "version": ds.version, "mode": "mount"}
    ]
    assert details["runDefinition"]["environment"]["name"] == "config-env"
    assert details["runDefinition"]["environment_variables"] == {"GREETING": "hej", "FROM_RUN_CONFIG": "1"}
    assert details["status"] == "Completed" and "properties" in details
    used = run.get_environment()
    assert (
        used.name == "config-env"
        and used.python.conda_dependencies.pip_packages == env.python.conda_dependencies.pip_packages
    )
    logs = run.get_details_with_logs()["logFiles"]
    assert "backend gloo rank 1" in logs["driver_log_rank_1.txt"] and "rank 0" not in logs["driver_log_rank_1.txt"]
    assert logs["logs/notes.txt"] == "epoch 1 done\n"


def test_environment_versions(ws: Workspace) -> None:
    env = Environment("versioned-env")
    env.python.conda_dependencies = CondaDependencies.create(pip_packages=["numpy"])
    first = env.register(ws)
    assert env.register(ws).version == first.version  # the same definition again is the same version
    env.python.conda_dependencies.add_pip_package("joblib")
    second = env.register(ws)
    assert second.version == first.version + 1
    assert Environment.get(ws, "versioned-env").version == second.version
    old = Environment.get(ws, "versioned-env", version=first.version)
    assert old.python.conda_dependencies.pip_packages == ["numpy"]
    assert Environment.list(ws)["versioned-env"].version == second.version
    with pytest.raises(NotFoundError, match=r"environment versioned-env has no version 99: its versions are 1, 2"):
        Environment.get(ws, "versioned-env", version=99)
    with pytest.raises(NotFoundError, match="environment never-registered is not registered"):
        Environment.get(ws, "never-registered")


def test_more_azure_names_work_or_name_the_alternative(
    ws: Workspace, make_project: Callable[..., Path], tmp_path: Path
) -> None:
    project = make_project(**{"train.py": "print(1)"})
    assert "scikit-learn" in SKLearn(project, "train.py").pip_packages
    assert SKLearn(project, "train.py", framework_version="1.5.2", pip_packages=["joblib"]).pip_packages == [
        "joblib",
        "scikit-learn==1.5.2",
    ]
    for call, alternative in (
        (lambda: PyTorch(project, "train.py"), "PyTorchConfiguration"),
        (lambda: TensorFlow(project, "train.py"), "TensorflowConfiguration"),
        (lambda: ws.get_default_datastore(), r"Dataset.upload\(ws"),
        (lambda: Dataset.File.from_files(path="x"), r"Dataset.upload\(ws"),
        (lambda: AmlCompute.provisioning_configuration(vm_size="STANDARD_NC6"), "--compute-target NAME"),
    ):
        with pytest.raises(NotSupportedError, match=alternative):
            call()
    target = ComputeTarget(ws, "local")
    assert target.nodes and Estimator(project, "train.py", compute_target=target).compute_target == "local"
    with pytest.raises(NotFoundError, match="compute target 'gpu-cluster' is not known; known targets: local"):
        ComputeTarget(ws, "gpu-cluster")
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\x00\x01" * 100)
    registered = Model.register(ws, model_path=str(weights), model_name="path-model")
    path = Path(Model.get_model_path("path-model", _workspace=ws))
    assert path.name == "weights.bin" and path.read_bytes() == weights.read_bytes()
    assert f"/models/path-model/{registered.version}/" in str(path)
