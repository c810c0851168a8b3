"""The Docker runtime: one container per rank, through the ``docker`` SDK, behind the same interface as processes.

- Images come under an explicit pull policy (never / if-not-present / always). Asking dockerd for an image it
  does not have makes it pull, so the policy is checked here first: under "never" a missing image is a clear error
  and dockerd is never asked.
- pip and conda packages go into a derived image, built once per environment hash from a generated Dockerfile and
  reused by every later run (its tag is ``cadre-env:<hash>``). The build's output streams to the run's logs.
- Containers get the run directory (snapshot, ``outputs/``, ``logs/``) and the datasets mounted at the paths the
  agent would use itself, so every path in the job's environment stays valid; host networking (MPI ranks and the
  torch rendezvous reach each other as plain processes would); the assigned GPUs as device requests; shm size and
  CPU/memory limits; labels naming node, run and rank, so a restarted agent finds and removes its leftovers.
- Ranks of one run on one node share IPC and PID namespaces, as processes on one host would, so MPICH's
  shared-memory transport works between them. The namespaces belong to a small sandbox container (the "pause"
  container of a Kubernetes pod), so they outlive whichever rank exits first.
"""

from __future__ import annotations

import asyncio
import io
import shlex
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import docker
import docker.errors
from docker.types import DeviceRequest, LogConfig

from services.node_agent.runtime import (
    LABEL_NODE,
    LABEL_RUN,
    EnvironmentBuildError,
    LineSplitter,
    Prepared,
    ProcessHandle,
    ProcessSpec,
    Say,
    _index_fingerprint,
)
from shared.environments import PULL_POLICIES, Environment
from shared.schemas import RegistryCredential

ENV_REPOSITORY = "cadre-env"
_DONE = object()


class DockerRuntime:
    kind = "docker"

    def __init__(
        self,
        default_image: str,
        pull_policy: str = "if-not-present",
        python: str = "python3",
        base_url: str | None = None,
        network: str = "host",
        gpu_devices: bool = False,
        pip_options: dict[str, str] | None = None,
        reason: str = "",
    ) -> None:
        if pull_policy not in PULL_POLICIES:
            raise ValueError(f"pull policy must be one of {', '.join(PULL_POLICIES)}, not {pull_policy!r}")
        self.default_image = default_image
        self.pull_policy = pull_policy
        self.python = python
        self.network = network
        self.gpu_devices = gpu_devices  # real NVIDIA GPUs: hand them over as device requests
        self.pip_options = dict(pip_options or {})
        self.reason = reason or "configured with --runtime docker"
        # Several log streams stay open at once (one per rank): give the pool room for them.
        self.client = docker.DockerClient(base_url=base_url, version="auto", max_pool_size=128) if base_url else (
            docker.from_env(version="auto", max_pool_size=128)
        )  # fmt: skip
        self._locks: dict[str, asyncio.Lock] = {}
        self._image_envs: dict[str, dict[str, str]] = {}  # by image id or env tag: the variables it sets

    def describe(self) -> str:
        version = self.client.version().get("Version", "?")
        return (
            f"docker runtime ({self.reason}): dockerd {version}, default image {self.default_image}, "
            f"pull policy {self.pull_policy}, network {self.network}"
        )

    # --- environments -------------------------------------------------------------------------------------
    async def prepare(self, env: Environment, say: Say, auth: RegistryCredential | None = None) -> Prepared:
        base = env.image or self.default_image
        image = await asyncio.to_thread(self._image, base, say, auth)
        if not env.needs_build:
            # By id: every rank of the run gets the same image, even if the tag moves meanwhile.
            return Prepared(python=self.python, image=image.id)
        key = env.build_key(image.id, _index_fingerprint(self.pip_options))
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            tag = f"{ENV_REPOSITORY}:{key}"
            try:
                await asyncio.to_thread(self.client.images.get, tag)
                say(f"environment {key}: reusing image {tag} ({env.describe()})")
                return Prepared(python=self.python, image=tag, key=key)
            except docker.errors.ImageNotFound:
                pass
            loop = asyncio.get_running_loop()
            started = time.monotonic()
            say(f"environment {key}: building image {tag} from {base} ({env.describe()})")
            await asyncio.to_thread(self._build, env, base, tag, key, lambda line: loop.call_soon_threadsafe(say, line))
            say(f"environment {key}: built in {time.monotonic() - started:.1f}s")
            return Prepared(python=self.python, image=tag, key=key)

    def _image(self, name: str, say: Say, auth: RegistryCredential | None = None) -> Any:
        if self.pull_policy != "always":
            try:
                return self.client.images.get(name)
            except docker.errors.ImageNotFound:
                if self.pull_policy == "never":
                    raise EnvironmentBuildError(
                        f"image {name!r} is not on this node and the agent's pull policy is 'never': load or build "
                        "it there first (docker load / docker build), or run the agent with --pull if-not-present"
                    ) from None
        say(f"pulling image {name}" + (f" as {auth.username or 'the registry user'}" if auth else ""))
        credential = {"username": auth.username or "", "password": auth.password} if auth else None
        try:
            return self.client.images.pull(name, auth_config=credential)
        except docker.errors.APIError as exc:
            raise EnvironmentBuildError(f"pulling image {name!r} failed: {exc.explanation or exc}") from None

    def _dockerfile(self, env: Environment, base: str, key: str) -> str:
        py = shlex.quote(self.python)
        lines = [f"FROM {base}"]
        if env.conda_packages:
            message = f"conda_packages need conda in the image, and {base} has none: use an image with conda"
            lines.append(f"RUN command -v conda >/dev/null 2>&1 || {{ echo {shlex.quote(message)} >&2; exit 1; }}")
            lines.append("RUN conda install --yes " + " ".join(map(shlex.quote, env.conda_packages)))
        if env.pip_packages:
            # The index settings arrive as build arguments, which pip reads from the environment: they may hold
            # credentials, and a build argument, unlike a RUN line, is not printed in the build output.
            lines += [f"ARG {name}" for name in sorted(self.pip_options)]
            lines.append(
                f"RUN PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore {py} -m pip install "
                "--no-cache-dir --progress-bar off " + " ".join(map(shlex.quote, env.pip_packages))
            )
        lines.append(f"LABEL io.cadre.environment={key}")
        return "\n".join(lines) + "\n"

    def _build(self, env: Environment, base: str, tag: str, key: str, say: Say) -> None:
        dockerfile = self._dockerfile(env, base, key).encode()
        tail: deque[str] = deque(maxlen=30)
        pending = ""
        error = None
        stream = self.client.api.build(
            fileobj=io.BytesIO(dockerfile),
            tag=tag,
            rm=True,
            forcerm=True,
            pull=False,
            network_mode=self.network,
            buildargs=self.pip_options or None,
            decode=True,
            use_config_proxy=False,
        )
        for chunk in stream:
            if "error" in chunk:
                error = str(chunk.get("error", "")).strip()
                continue
            pending += str(chunk.get("stream", ""))
            *complete, pending = pending.split("\n")
            for line in complete:
                if line.strip():
                    say(line.rstrip())
                    tail.append(line.rstrip())
        if pending.strip():
            say(pending.rstrip())
            tail.append(pending.rstrip())
        if error is not None:
            raise EnvironmentBuildError(f"building the environment image failed: {error}\n" + "\n".join(tail))

    # --- containers -------------------------------------------------------------------------------------
    async def start(self, spec: ProcessSpec) -> ProcessHandle:
        assert spec.prepared is not None and spec.prepared.image is not None, "prepare() comes first"
        return await asyncio.to_thread(self._start, spec)

    def _start(self, spec: ProcessSpec) -> _Container:
        env = dict(spec.env)
        assert spec.prepared is not None and spec.prepared.image is not None
        if spec.python_path:  # before the job's own PYTHONPATH: the one it sets, or else the image's
            base = env.get("PYTHONPATH") or self._image_env(spec.prepared.image, "PYTHONPATH")
            env["PYTHONPATH"] = spec.pythonpath(base)
        kwargs: dict[str, Any] = {}
        if spec.gpu_ids:
            env["NVIDIA_VISIBLE_DEVICES"] = ",".join(map(str, spec.gpu_ids))
            if self.gpu_devices:
                ids = [str(g) for g in spec.gpu_ids]
                kwargs["device_requests"] = [DeviceRequest(device_ids=ids, capabilities=[["gpu"]])]
                env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(len(ids)))  # renumbered inside
        if spec.share_with:
            kwargs["ipc_mode"] = f"container:{spec.share_with}"
            kwargs["pid_mode"] = f"container:{spec.share_with}"
        else:
            kwargs["shm_size"] = spec.shm_size
        if spec.memory:
            kwargs["mem_limit"] = spec.memory
            kwargs["memswap_limit"] = spec.memory  # no swap: over the limit is an OOM kill, not a crawl
        if spec.cpus:
            kwargs["nano_cpus"] = int(spec.cpus * 1e9)
        container = self.client.containers.create(
            spec.prepared.image,
            command=spec.argv,
            name=spec.name,
            environment=env,
            working_dir=str(spec.cwd),
            labels=spec.labels,
            volumes={str(m.path): {"bind": str(m.path), "mode": "ro" if m.read_only else "rw"} for m in spec.mounts},
            network_mode=self.network,
            init=True,  # signals reach the job (PID 1 would ignore SIGTERM) and zombies are reaped
            stdin_open=False,
            tty=False,  # separate stdout/stderr, whole lines, no terminal rewriting
            log_config=LogConfig(type="json-file", config={"max-size": "50m", "max-file": "2"}),
            **kwargs,
        )
        try:
            # Attach before start, so no line printed in the first moments is missed.
            frames = self.client.api.attach(container.id, stdout=True, stderr=True, stream=True, demux=True)
            container.start()
        except BaseException:
            container.remove(force=True)
            raise
        return _Container(self.client, container, frames)

    def _image_env(self, image: str, name: str) -> str | None:
        if image not in self._image_envs:
            pairs = self.client.images.get(image).attrs.get("Config", {}).get("Env") or []
            self._image_envs[image] = dict(pair.partition("=")[::2] for pair in pairs)
        return self._image_envs[image].get(name)

    async def open_group(self, spec: ProcessSpec) -> str | None:
        """The sandbox whose namespaces the node's ranks of one run join (its /dev/shm gets ``shm_size``)."""
        assert spec.prepared is not None and spec.prepared.image is not None

        def create() -> str:
            sandbox = self.client.containers.run(
                spec.prepared.image,  # type: ignore[union-attr]
                command=["sleep", "infinity"],
                name=spec.name,
                labels=spec.labels,
                network_mode=self.network,
                ipc_mode="shareable",
                shm_size=spec.shm_size,
                init=True,
                detach=True,
            )
            return str(sandbox.id)

        return await asyncio.to_thread(create)

    async def close_group(self, ident: str) -> None:
        def remove() -> None:
            try:
                self.client.containers.get(ident).remove(force=True)
            except docker.errors.NotFound:
                pass

        await asyncio.to_thread(remove)

    async def reclaim(self, since: float) -> int:
        return 0  # a container's /dev/shm goes with the container

    async def remove_run(self, node_id: str, run_id: str) -> None:
        def remove() -> None:
            labels = [f"{LABEL_NODE}={node_id}", f"{LABEL_RUN}={run_id}"]
            for c in self.client.containers.list(all=True, filters={"label": labels}, ignore_removed=True):
                c.remove(force=True)

        await asyncio.to_thread(remove)

    async def leftovers(self, node_id: str, keep: set[str]) -> set[str]:
        def sweep() -> set[str]:
            runs = set()
            for c in self.client.containers.list(
                all=True, filters={"label": f"{LABEL_NODE}={node_id}"}, ignore_removed=True
            ):
                run = c.labels.get(LABEL_RUN, "")
                if run in keep:
                    continue  # a run taken over: its shim still watches these containers
                runs.add(run)
                c.remove(force=True)
            return runs - {""}

        return await asyncio.to_thread(sweep)


class _Container:
    def __init__(self, client: docker.DockerClient, container: Any, frames: Any) -> None:
        self._client = client
        self._container = container
        self._frames = frames
        self._death: str | None = None
        self._exit: int | None = None

    @property
    def pid(self) -> int:
        return 0  # no host process group to kill: a restarted agent finds containers by their labels

    @property
    def death(self) -> str | None:
        return self._death

    async def lines(self) -> AsyncIterator[tuple[str, list[str]]]:
        """Whole lines, whatever the frame boundaries: a line split across frames is joined again."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def pump() -> None:
            split = {"o": LineSplitter(), "e": LineSplitter()}
            try:
                for out, err in self._frames:
                    for tag, data in (("o", out), ("e", err)):
                        if data and (complete := split[tag].feed(data)):
                            loop.call_soon_threadsafe(queue.put_nowait, (tag, complete))
                for tag, splitter in split.items():
                    if rest := splitter.rest():
                        loop.call_soon_threadsafe(queue.put_nowait, (tag, rest))
            except Exception:  # the container was removed under us: the stream just ends
                pass
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        threading.Thread(target=pump, name=f"logs-{self._container.name}", daemon=True).start()
        while (item := await queue.get()) is not _DONE:
            yield item

    async def wait(self) -> int:
        if self._exit is None:
            try:
                result = await asyncio.to_thread(self._container.wait)
                await asyncio.to_thread(self._container.reload)
            except Exception as exc:  # the engine restarted or the container vanished: the rank is lost
                self._death = f"lost: the Docker engine no longer knows its container ({str(exc)[:200]})"
                self._exit = -1
                return self._exit
            state = self._container.attrs.get("State", {})
            code = int(result.get("StatusCode", state.get("ExitCode", -1)))
            if state.get("OOMKilled"):
                limit = self._container.attrs.get("HostConfig", {}).get("Memory") or 0
                self._death = "killed: out of memory"
                if limit:
                    self._death += f" (memory limit {limit / (1 << 20):.0f} MiB)"
            self._exit = code
        return self._exit

    async def terminate(self, grace: float) -> None:
        try:
            await asyncio.to_thread(self._container.stop, timeout=max(1, round(grace)))
        except docker.errors.NotFound:
            pass

    async def cleanup(self) -> None:
        try:
            await asyncio.to_thread(self._container.remove, force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if "already in progress" not in str(exc):
                raise
