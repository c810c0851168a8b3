"""The Docker runtime against a real dockerd: jobs in containers, MPI across containers, environments, failures.

dockerd (Debian's docker.io) is started here, inside the session's loopback-only network namespace
(``--bridge=none --iptables=false``), with a data root of its own; the only image is built locally from a Debian
rootfs (tests/docker/build-rootfs.sh, run by ``make test``) with ``docker import``. No test ever pulls: the agents
run with ``--pull never``, and dockerd could not reach a registry anyway.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import docker.errors
import pytest
from conftest import ISOLATED
from helpers import PackageIndex, eventually

from cadre import (
    ContainerRegistry,
    Dataset,
    Environment,
    Estimator,
    Experiment,
    MpiConfiguration,
    Run,
    RunFailedError,
    ScriptRunConfig,
    Workspace,
    _local,
)

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parent.parent
ROOTFS = ROOT / ".cache" / "test-rootfs.tar"
IMAGE = "cadre-test:1"
IMAGE_PATH = "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ALLREDUCE = ROOT / "examples" / "mpi-allreduce"


def _unavailable(why: str) -> None:
    if os.environ.get("CI"):  # CI installs everything these tests need: missing pieces are a failure there
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="module")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real dockerd of the tests' own; yields its API address."""
    binary = shutil.which("dockerd")
    if binary is None:
        _unavailable("dockerd is not installed (apt-get install docker.io; .ci/run does)")
    if not ROOTFS.is_file():
        _unavailable(f"{ROOTFS} is missing: `make test` builds it (tests/docker/build-rootfs.sh, needs debootstrap)")
    if os.geteuid() != 0 or not ISOLATED:
        _unavailable("the Docker tests run dockerd as root inside a loopback-only network namespace")
    data = tmp_path_factory.mktemp("dockerd")
    run = Path(tempfile.mkdtemp(prefix="cadre-dockerd-", dir="/tmp"))  # short: unix socket paths are limited
    url = f"unix://{run}/docker.sock"
    log = open(data / "dockerd.log", "wb")
    argv = [binary, "--data-root", str(data / "root"), "--exec-root", str(run / "exec"), "--pidfile", str(run / "pid"),
            "-H", url, "--bridge=none", "--iptables=false", "--ip6tables=false"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client: docker.DockerClient | None = None
    try:
        deadline = time.monotonic() + 30
        while client is None:
            try:
                client = docker.DockerClient(base_url=url, version="auto")  # asks the server's API version
            except docker.errors.DockerException:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError((data / "dockerd.log").read_text()[-3000:]) from None
                time.sleep(0.1)
        client.api.import_image(src=str(ROOTFS), repository="cadre-test", tag="1", changes=[f"ENV PATH={IMAGE_PATH}"])
        yield url
    finally:
        if client is not None:
            for c in client.containers.list(all=True, ignore_removed=True):
                c.remove(force=True)
            client.close()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        _unmount_under(run, data)  # dockerd leaves its netns handle (and data root) mounted
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(data / "root", ignore_errors=True)


def _unmount_under(*roots: Path) -> None:
    with open("/proc/self/mountinfo") as fh:
        points = [line.split()[4] for line in fh]
    for point in sorted(points, key=len, reverse=True):
        if any(point == str(r) or point.startswith(f"{r}/") for r in roots):
            subprocess.run(["umount", "--lazy", point], check=False)


@pytest.fixture(scope="module")
def docker_client(dockerd: str) -> Iterator[docker.DockerClient]:
    client = docker.DockerClient(base_url=dockerd, version="auto")
    yield client
    client.close()


@pytest.fixture(scope="module")
def docker_home(tmp_path_factory: pytest.TempPathFactory, dockerd: str, package_index: PackageIndex) -> Iterator[Path]:
    """Two agents with the Docker runtime on this host (as two GPU hosts would be), 2 slots each."""
    home = tmp_path_factory.mktemp("cadre-docker-home")
    agent_args = ["--runtime", "docker", "--image", IMAGE, "--pull", "never", "--docker-host", dockerd,
                  "--grace", "3", "--pip-index-url", package_index.url]  # fmt: skip
    # 2 declared GPUs per agent: ranks get GPU ids (and NVIDIA_VISIBLE_DEVICES), but no device requests, since
    # NVML found no real GPU behind them.
    _local.up(home=home, agents=2, gpus_per_agent=2, slots_per_agent=2, heartbeat=0.5, timeout=120,
              agent_args=agent_args)  # fmt: skip
    try:
        yield home
    finally:
        _local.down(home=home)


@pytest.fixture(scope="module")
def dws(docker_home: Path) -> Iterator[Workspace]:
    with Workspace.from_config(docker_home / "profile.json") as workspace:
        yield workspace


def containers_of(client: docker.DockerClient, run: Run) -> list:
    # ignore_removed: docker-py inspects each listed container, and one the agent is creating or removing at that
    # moment can be listed and then not found (CI saw a NotFound from this list right as a rank started).
    return client.containers.list(all=True, filters={"label": f"io.cadre.run={run.id}"}, ignore_removed=True)


def output_of(run: Run) -> str:
    out = io.StringIO()
    run.wait_for_completion(show_output=True, output=out, raise_on_error=False, timeout=180)
    return out.getvalue()


def test_a_job_runs_in_a_container_end_to_end(
    dws: Workspace, docker_home: Path, docker_client: docker.DockerClient, make_project: Callable[..., Path]
) -> None:
    project = make_project(
        **{
            "train.py": """
                import os, sys
                print("in a container:", os.path.exists("/.dockerenv"), sys.executable)
                print("rank", os.environ["RANK"], "of", os.environ["WORLD_SIZE"], os.environ.get("GREETING"))
                print("gpus", os.environ["NVIDIA_VISIBLE_DEVICES"], os.environ["CUDA_VISIBLE_DEVICES"])
                print("to stderr", file=sys.stderr)
                print("x" * 200_000)  # one long line arrives as one line, however the stream is framed
                os.makedirs("outputs", exist_ok=True)
                with open("outputs/result.txt", "w") as fh:
                    fh.write("42")
                sys.exit(int(sys.argv[2]))
            """
        }
    )
    est = Estimator(project, "train.py", script_params={"--exit": 0}, environment_variables={"GREETING": "hello"})
    run = Experiment(dws, "container").submit(est)
    text = output_of(run)
    assert run.get_status() == "Completed", text
    lines = text.splitlines()
    assert "in a container: True /opt/venv/bin/python3" in lines
    assert "rank 0 of 1 hello" in lines and "to stderr" in lines
    assert "gpus 0 0" in lines
    assert "x" * 200_000 in lines
    (tmp := Path(tempfile.mkdtemp())).mkdir(exist_ok=True)
    run.download_file("outputs/result.txt", tmp / "result.txt")
    assert (tmp / "result.txt").read_text() == "42"
    eventually(lambda: not containers_of(docker_client, run), timeout=10)  # removed once the rank exited
    # The exit code comes back as such.
    failing = Experiment(dws, "container").submit(Estimator(project, "train.py", script_params={"--exit": 3}))
    with pytest.raises(RunFailedError, match=r"rank 0 on node agent-\d exited with code 3"):
        failing.wait_for_completion(timeout=60)
    log = (docker_home / "cluster" / "logs" / "agent-0.log").read_text()
    assert "docker runtime (configured with --runtime docker): dockerd" in log  # says which runtime, and why


def test_mpi_ranks_in_separate_containers_on_two_nodes(dws: Workspace, make_project: Callable[..., Path]) -> None:
    project = make_project(
        **{
            "train.py": """
                import os, re
                from mpi4py import MPI
                comm = MPI.COMM_WORLD
                rank = comm.Get_rank()
                container = re.search(r"docker[/-]([0-9a-f]{12})", open("/proc/self/cgroup").read()).group(1)
                total = comm.allreduce(rank + 1)
                blob = comm.bcast(b"x" * (8 << 20) if rank == 0 else None)  # large: shared memory and TCP paths
                print(f"rank {rank} node {os.environ['NODE_RANK']} container {container} sum {total} big {len(blob)}")
            """
        }
    )
    mpi = MpiConfiguration()
    est = Estimator(project, "train.py", node_count=2, process_count_per_node=2, distributed_training=mpi)
    run = Experiment(dws, "container-mpi").submit(est)
    text = output_of(run)
    assert run.get_status() == "Completed", text
    found = re.findall(r"rank (\d) node (\d) container ([0-9a-f]{12}) sum 10 big 8388608", text)
    assert sorted(int(r) for r, _, _ in found) == [0, 1, 2, 3], text
    assert len({c for _, _, c in found}) == 4  # one container per rank
    assert {n for _, n, _ in found} == {"0", "1"}
    # The repository's example (NumPy from the image) runs unchanged.
    example = Estimator(ALLREDUCE, "train.py", node_count=2, distributed_training=MpiConfiguration())
    assert Experiment(dws, "container-mpi").submit(example).wait_for_completion(timeout=120)["status"] == "Completed"


def test_pip_packages_build_an_image_once_then_reuse_it(
    dws: Workspace, docker_client: docker.DockerClient, make_project: Callable[..., Path]
) -> None:
    project = make_project(
        **{"train.py": "import cadre_demo_pkg, sys\nprint('value:', cadre_demo_pkg.VALUE, sys.executable)\n"}
    )
    est = Estimator(project, "train.py", pip_packages=[f"{PackageIndex.NAME}=={PackageIndex.VERSION}"])
    texts, seconds = [], []
    for _ in range(2):
        started = time.monotonic()
        run = Experiment(dws, "container-env").submit(est)
        texts.append(output_of(run))
        seconds.append(time.monotonic() - started)
        assert run.get_status() == "Completed", texts[-1]
    first, second = texts
    assert f"value: {PackageIndex.VALUE} /opt/venv/bin/python3" in first and f"value: {PackageIndex.VALUE}" in second
    built = re.search(r"\[prepare\] environment ([0-9a-f]{24}): building image cadre-env:\1 from cadre-test:1", first)
    assert built, first
    assert "[prepare] Successfully installed cadre-demo-pkg-1.0" in first
    assert f"[prepare] environment {built.group(1)}: reusing image cadre-env:{built.group(1)}" in second
    assert "Successfully installed" not in second
    image = docker_client.images.get(f"cadre-env:{built.group(1)}")
    assert image.labels["io.cadre.environment"] == built.group(1)
    print(f"\ndocker environment: first run {seconds[0]:.2f}s (image built), second {seconds[1]:.2f}s (reused)")
    assert seconds[1] < seconds[0]


def test_datasets_are_mounted_read_only_and_downloads_are_private(
    dws: Workspace, make_project: Callable[..., Path], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.csv").write_text("x,y\n1,2\n")
    Dataset.upload(dws, data, name="container-data")
    project = make_project(
        **{
            "train.py": """
                import sys
                mount, copy = sys.argv[2], sys.argv[4]
                print("mounted:", open(f"{mount}/train.csv").read().splitlines()[1])
                for where in (mount, copy):
                    try:
                        open(f"{where}/train.csv", "a").write("3,4\\n")
                        print("writable:", where == copy)
                    except OSError as exc:
                        print("read-only:", where == mount, exc.strerror)
            """
        }
    )
    ds = Dataset.get(dws, "container-data")
    params = {"--mount": ds.as_named_input("m").as_mount(), "--copy": ds.as_named_input("c").as_download()}
    run = Experiment(dws, "container-data").submit(Estimator(project, "train.py", script_params=params))
    text = output_of(run)
    assert run.get_status() == "Completed", text
    lines = text.splitlines()
    assert "mounted: 1,2" in lines
    assert "read-only: True Read-only file system" in lines  # even root in the container cannot change it
    assert "writable: True" in lines


def test_cancel_stops_then_removes_the_containers(
    dws: Workspace, docker_client: docker.DockerClient, make_project: Callable[..., Path]
) -> None:
    project = make_project(**{"train.py": "import time\nprint('holding', flush=True)\ntime.sleep(600)\n"})
    run = Experiment(dws, "container-cancel").submit(Estimator(project, "train.py", process_count_per_node=2))
    eventually(lambda: len([c for c in containers_of(docker_client, run) if c.status == "running"]) >= 2, 60)
    started = time.monotonic()
    run.cancel()
    assert run.wait_for_completion(timeout=30)["status"] == "Canceled"
    assert time.monotonic() - started < 3  # SIGTERM reached the job through the container's init
    eventually(lambda: not containers_of(docker_client, run), timeout=10)


def test_a_container_removed_from_under_the_agent_fails_the_run(
    dws: Workspace, docker_client: docker.DockerClient, make_project: Callable[..., Path]
) -> None:
    project = make_project(**{"train.py": "import time\nprint('holding', flush=True)\ntime.sleep(600)\n"})
    run = Experiment(dws, "container-gone").submit(Estimator(project, "train.py"))
    eventually(lambda: any(c.status == "running" for c in containers_of(docker_client, run)), 60)
    for container in containers_of(docker_client, run):
        container.remove(force=True)  # an operator's `docker rm -f`
    with pytest.raises(RunFailedError, match=r"rank 0 on node agent-\d (was killed by signal 9|was lost|exited)"):
        run.wait_for_completion(timeout=60)


def test_a_container_over_its_memory_limit_is_reported_out_of_memory(
    dws: Workspace, make_project: Callable[..., Path]
) -> None:
    project = make_project(
        **{
            "train.py": """
                block = bytearray(512 << 20)
                for i in range(0, len(block), 4096):
                    block[i] = 1
                print("survived")
            """
        }
    )
    run = Experiment(dws, "container-oom").submit(Estimator(project, "train.py", memory_per_process="64m"))
    oom = r"rank 0 on node agent-\d was killed: out of memory \(memory limit 64 MiB\)"
    with pytest.raises(RunFailedError, match=oom):
        run.wait_for_completion(timeout=60)
    assert run.get_details()["error"]["code"] == "out_of_memory"  # a cause of its own, not a plain exit code


def test_a_missing_image_or_conda_without_conda_fails_before_the_run_starts(
    dws: Workspace, make_project: Callable[..., Path]
) -> None:
    project = make_project(**{"train.py": "print('never runs')"})
    run = Experiment(dws, "container-bad").submit(Estimator(project, "train.py", custom_docker_image="cadre-missing:1"))
    missing = r"image 'cadre-missing:1' is not on this node and the agent's pull policy is 'never'"
    with pytest.raises(RunFailedError, match=missing):
        run.wait_for_completion(timeout=30)
    assert run.get_details()["error"]["code"] == "environment_build_failed"
    assert "Running" not in [h["state"] for h in run.get_details()["history"]]
    conda = Experiment(dws, "container-bad").submit(Estimator(project, "train.py", conda_packages=["numpy"]))
    with pytest.raises(RunFailedError, match=r"conda_packages need conda in the image, and cadre-test:1 has none"):
        conda.wait_for_completion(timeout=60)


def test_containers_outlive_a_crashed_and_an_upgraded_agent_and_are_taken_back(
    dws: Workspace, docker_home: Path, docker_client: docker.DockerClient, make_project: Callable[..., Path]
) -> None:
    script = "import time\nfor i in range(1200):\n    print(f'line {i}', flush=True)\n    time.sleep(0.01)\n"
    run = Experiment(dws, "container-through").submit(Estimator(make_project(**{"train.py": script}), "train.py"))
    eventually(lambda: any(c.status == "running" for c in containers_of(docker_client, run)), 60)
    before = {c.id for c in containers_of(docker_client, run)}
    node = run.get_details()["placement"][0]["node_id"]
    _local.restart(node, home=docker_home, crash=True)  # SIGKILL, as a crash
    _local.restart(node, home=docker_home)  # SIGTERM, then the agent again, as an upgrade
    assert {c.id for c in containers_of(docker_client, run) if c.status == "running"} == before
    out = io.StringIO()
    assert run.wait_for_completion(show_output=True, output=out, timeout=120)["status"] == "Completed"
    assert [x for x in out.getvalue().splitlines() if x.startswith("line ")] == [f"line {i}" for i in range(1200)]
    eventually(lambda: not containers_of(docker_client, run), 10)


def test_a_restarted_agent_removes_the_containers_whose_shim_died(
    dws: Workspace, docker_home: Path, docker_client: docker.DockerClient, make_project: Callable[..., Path]
) -> None:
    project = make_project(**{"train.py": "import time\nprint('holding', flush=True)\ntime.sleep(600)\n"})
    run = Experiment(dws, "container-orphan").submit(Estimator(project, "train.py"))
    eventually(lambda: any(c.status == "running" for c in containers_of(docker_client, run)), 60)
    node = run.get_details()["placement"][0]["node_id"]
    shim_pid = docker_home / "cluster" / "agents" / node / "runs" / f"{run.id}.shim" / "shim.pid"
    pid = int(shim_pid.read_text().split()[0])

    # The agent and then the run's shim killed while the agent is down (the containers stay: dockerd keeps them).
    killer = threading.Timer(0.5, os.kill, args=(pid, signal.SIGKILL))
    killer.start()
    _local.restart(node, home=docker_home, crash=True, down_for=1.5)
    killer.join()
    with pytest.raises(RunFailedError, match=rf"node agent {node} restarted, and the run's shim on it had died"):
        run.wait_for_completion(timeout=60)
    assert run.get_details()["error"]["code"] == "agent_restarted"
    eventually(lambda: not containers_of(docker_client, run), 10)
    # The restarted agent takes work again.
    again = Experiment(dws, "container-orphan").submit(Estimator(project, "train.py", max_run_duration_seconds=1))
    with pytest.raises(RunFailedError, match="max_run_duration_seconds"):
        again.wait_for_completion(timeout=60)


PYENV_38 = Path("/root/.pyenv/versions/3.8.18")
CONTEXT_IN_IMAGE = """
    import importlib.util, os, sys
    from cadre import Run
    run = Run.get_context()
    run.log("accuracy", 0.5)
    run.log_row("epochs", epoch=1, loss=0.25)
    run.tag("python", "%d.%d" % sys.version_info[:2])
    with open("outputs/model.txt", "w") as fh:
        fh.write("m")
    run.upload_file("outputs/copy.txt", "outputs/model.txt")
    print("python", sys.executable, "pip:", importlib.util.find_spec("pip") is not None)
    print("pythonpath", os.environ["PYTHONPATH"])
    try:
        from cadre import Workspace
    except ImportError as exc:
        print("client:", exc)
"""


def _build_image(client: docker.DockerClient, tag: str, dockerfile: str, files: dict[str, Path] | None = None) -> None:
    """A local build from a context written here (FROM a local image: nothing is pulled)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        body = dockerfile.encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
        for name, source in (files or {}).items():
            tar.add(source, arcname=name, filter=_lean)
    buf.seek(0)
    client.images.build(fileobj=buf, custom_context=True, tag=tag, pull=False, rm=True, network_mode="host")


def _lean(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """What a Python install needs to run a script: no tests, caches, headers, static libraries or site-packages."""
    skip = ("/test/", "/tests/", "__pycache__", "/site-packages/", "/include/", "/idlelib/", "/tkinter/", "/ensurepip/")
    name = f"/{info.name}/"
    return None if any(s in name for s in skip) or info.name.endswith(".a") else info


@pytest.fixture(scope="module")
def bare_image(docker_client: docker.DockerClient) -> str:
    """The test image's system Python: no pip, no cadre, and a PYTHONPATH of the image's own."""
    tag = "cadre-test-bare:1"
    _build_image(docker_client, tag, f"FROM {IMAGE}\nENV PATH=/usr/bin:/bin PYTHONPATH=/opt/image-lib\n")
    return tag


@pytest.fixture(scope="module")
def py38_image(docker_client: docker.DockerClient) -> str:
    """Python 3.8 (this machine's pyenv build, at the same path) and nothing else: no cadre, no site-packages."""
    if not PYENV_38.is_dir():
        pytest.skip(f"{PYENV_38} is not on this machine: no Python 3.8 to put in an image")
    tag = "cadre-test-py38:1"
    dockerfile = f"FROM {IMAGE}\nCOPY py {PYENV_38}\nENV PATH={PYENV_38}/bin:/usr/bin:/bin\n"
    _build_image(docker_client, tag, dockerfile, {"py": PYENV_38})
    return tag


@pytest.mark.parametrize("image", ["bare_image", "py38_image"])
def test_run_context_in_an_image_without_cadre(
    image: str, dws: Workspace, make_project: Callable[..., Path], request: pytest.FixtureRequest
) -> None:
    """Run.get_context() works in any image: the agent mounts its stdlib-only job package, first on the path."""
    tag = request.getfixturevalue(image)
    project = make_project(**{"train.py": CONTEXT_IN_IMAGE})
    run = Experiment(dws, "container-context").submit(Estimator(project, "train.py", custom_docker_image=tag))
    text = output_of(run)
    assert run.get_status() == "Completed", text
    want = "3.11" if image == "bare_image" else "3.8"
    assert run.get_metrics() == {"accuracy": 0.5, "epochs": {"epoch": [1], "loss": [0.25]}}
    assert run.get_tags()["python"] == want
    assert {"outputs/model.txt", "outputs/copy.txt"} <= set(run.get_file_names())
    assert "pip: False" in text if image == "bare_image" else "pip:" in text
    path = re.search(r"^pythonpath (\S+)$", text, re.M)
    assert path, text
    first, *rest = path.group(1).split(":")
    assert re.search(r"/job-python/[0-9a-f]{16}$", first), first  # the job's cadre package comes first ...
    assert rest == (["/opt/image-lib"] if image == "bare_image" else [])  # ... then the image's own PYTHONPATH
    assert "client: cadre.Workspace is not available in this job" in text


class RegistryDoor:
    """The door of a private registry on loopback (the Docker registry HTTP API's first steps): every request
    without credentials gets a Basic challenge; with them, the manifest is unknown. It records what dockerd sent,
    so a test sees the password reach the pull and nothing else."""

    def __init__(self) -> None:
        self.authorizations: list[str] = []
        door = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                auth = self.headers.get("Authorization")
                if auth:
                    door.authorizations.append(auth)
                if not auth:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="cadre-test"')
                    self.send_header("Docker-Distribution-API-Version", "registry/2.0")
                    body = b'{"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}'
                elif self.path == "/v2/":
                    self.send_response(200)
                    body = b"{}"
                else:
                    self.send_response(404)
                    body = b'{"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}'
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_HEAD = do_GET

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_a_private_registry_password_reaches_the_pull_and_nothing_else(
    dockerd: str, tmp_path_factory: pytest.TempPathFactory, make_project: Callable[..., Path]
) -> None:
    secret = "pw-" + "q7Zr4x" * 3
    door = RegistryDoor()
    home = tmp_path_factory.mktemp("cadre-registry-home")
    agent_args = ["--runtime", "docker", "--image", IMAGE, "--pull", "if-not-present", "--docker-host", dockerd]
    _local.up(home=home, agents=1, slots_per_agent=1, timeout=120, agent_args=agent_args)
    try:
        with Workspace.from_config(home / "profile.json") as ws:
            env = Environment("private-env")
            env.docker.base_image = f"{door.address}/team/trainer:1"
            env.docker.base_image_registry = ContainerRegistry(door.address, "puller", secret)
            registered = env.register(ws)
            fetched = Environment.get(ws, "private-env")
            assert fetched.docker.base_image_registry.password is None  # never handed back
            project = make_project(**{"train.py": "print('never runs')"})
            runs = [
                Experiment(ws, "private").submit(ScriptRunConfig(project, script="train.py", environment=fetched)),
                Experiment(ws, "private").submit(Estimator(project, "train.py", environment_definition=env)),
            ]
            for run in runs:
                with pytest.raises(RunFailedError, match=rf"pulling image '{door.address}/team/trainer:1' failed"):
                    run.wait_for_completion(timeout=60)
            # dockerd sent the credential with each pull ...
            basic = "Basic " + base64.b64encode(f"puller:{secret}".encode()).decode()
            assert door.authorizations.count(basic) >= 2, door.authorizations
            assert {a for a in door.authorizations} == {basic}
            # ... and it is nowhere a client, an operator or a log can see.
            seen = [json.dumps(r.get_details_with_logs()) for r in runs] + [repr(registered), repr(fetched)]
            seen.append(subprocess.run([str(ROOT / ".venv" / "bin" / "cadre"), "events", "--json", "--since", "1"],
                                       env={**os.environ, "CADRE_HOME": str(home)}, capture_output=True,
                                       text=True, timeout=60).stdout)  # fmt: skip
            seen += [p.read_text(errors="replace") for p in (home / "cluster" / "logs").glob("*.log")]
            assert "runDefinition" in seen[0] and "puller" in seen[0] and runs[1].id in seen[4]  # events were read
            assert not [text[:200] for text in seen if secret in text]
            stored = runs[1].get_details()["runDefinition"]["environment"]["registry"]
            assert stored == {"address": door.address, "username": "puller", "secret": f"run.{runs[1].id}"}
    finally:
        _local.down(home=home)
        door.close()
