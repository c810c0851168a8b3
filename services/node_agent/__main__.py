"""``python -m services.node_agent``: every flag can also come from ``CADRE_AGENT_<FLAG>`` (``--work-dir`` from
``CADRE_AGENT_WORK_DIR``), so a systemd EnvironmentFile or a compose ``environment:`` block can configure an agent;
a flag on the command line wins."""

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from services.node_agent.service import AgentConfig, NodeAgentService
from shared.environments import PULL_POLICIES, parse_size
from shared.errors import CadreError
from shared.logging import configure
from shared.settings import FENCE_AFTER_DEFAULT, BusSettings, log_level, secret_env

PIP_OPTIONS = {"PIP_INDEX_URL": "--pip-index-url", "PIP_FIND_LINKS": "--pip-find-links",
               "PIP_TRUSTED_HOST": "--pip-trusted-host"}  # fmt: skip


def parse() -> AgentConfig:
    p = argparse.ArgumentParser(prog="python -m services.node_agent", description="cadre node agent")

    def opt(group: Any, flag: str, help: str, **kwargs: Any) -> None:
        env = "CADRE_AGENT_" + flag.lstrip("-").upper().replace("-", "_")
        if env in os.environ:
            kwargs["default"] = kwargs.get("type", str)(os.environ[env])
            kwargs.pop("required", None)
        group.add_argument(flag, help=f"{help} [env {env}]", **kwargs)

    opt(p, "--node-id", "this node's name (letters, digits, '_' or '-')", required=True)
    opt(p, "--compute-target", "the pool this node serves", default="local")
    opt(p, "--gpus", "declare N GPUs (for hosts without NVML)", type=int, default=None)
    opt(p, "--slots", "processes at once (default: GPUs, else CPUs)", type=int, default=None)
    opt(p, "--work-dir", "where snapshots, environments and run directories live", type=Path, required=True)
    opt(p, "--heartbeat", "seconds between heartbeats", type=float, default=2.0)
    opt(p, "--grace", "seconds between SIGTERM and SIGKILL", type=float, default=10.0)
    opt(p, "--fence-after", "seconds cut off from the bus before the agent stops its own ranks", type=float,
        default=FENCE_AFTER_DEFAULT)  # fmt: skip
    opt(p, "--log-memory", "log lines per rank held in memory while the bus is away, then on disk", default="64m")
    opt(p, "--address", "address other nodes' ranks reach this host at", default="127.0.0.1")
    opt(p, "--cache-size", "disk for cached snapshots, datasets and venvs, e.g. 100g", default="100g")
    g = p.add_argument_group("runtime")
    opt(g, "--runtime", "ranks in containers (docker) or plain processes; auto: docker if an engine answers",
        choices=("auto", "docker", "process"), default="auto")  # fmt: skip
    opt(g, "--image", "image for runs that name no custom_docker_image", default="python:3.11-slim")
    opt(g, "--pull", "image pull policy", choices=PULL_POLICIES, default="if-not-present")
    opt(g, "--docker-host", "Docker API address (default: DOCKER_HOST, else the local socket)", default=None)
    opt(g, "--container-python", "the interpreter inside job images", default="python3")
    opt(g, "--warm-ranks", "Python interpreters kept started for the next run's ranks, process runtime (default: "
        "the slots, at most 8; 0: none)", type=int, default=None)  # fmt: skip
    for var, flag in PIP_OPTIONS.items():
        g.add_argument(flag, default=None, help=f"{var} for environment builds [env CADRE_{var}, or CADRE_{var}_FILE]")
    a = p.parse_args()
    pip_options = {}
    for var, flag in PIP_OPTIONS.items():
        value = getattr(a, flag.lstrip("-").replace("-", "_")) or secret_env(f"CADRE_{var}")
        if value:
            pip_options[var] = value
    return AgentConfig(
        node_id=a.node_id,
        compute_target=a.compute_target,
        declared_gpus=a.gpus,
        slots=a.slots,
        work_dir=a.work_dir,
        heartbeat_interval=a.heartbeat,
        kill_grace=a.grace,
        fence_after=a.fence_after,
        log_memory=parse_size(a.log_memory, "--log-memory", minimum=1024),
        address=a.address,
        runtime=a.runtime,
        default_image=a.image,
        pull_policy=a.pull,
        docker_host=a.docker_host or os.environ.get("DOCKER_HOST"),
        container_python=a.container_python,
        warm_ranks=a.warm_ranks,
        pip_options=pip_options,
        cache_bytes=parse_size(a.cache_size, "--cache-size"),
    )


config = parse()
configure("node_agent", log_level())
try:
    asyncio.run(NodeAgentService(BusSettings.from_env(f"agent-{config.node_id}"), config).run())
except CadreError as exc:  # refused (a wrong credential, a node id in use, a bad flag): said in one line
    print(f"cadre node agent {config.node_id}: {exc}", file=sys.stderr, flush=True)
    sys.exit(2)
