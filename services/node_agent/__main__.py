import argparse
import asyncio
import os
from pathlib import Path

from services.node_agent.service import AgentConfig, NodeAgentService
from shared.environments import PULL_POLICIES
from shared.logging import configure
from shared.settings import BusSettings, log_level, secret_env

PIP_OPTIONS = {"PIP_INDEX_URL": "--pip-index-url", "PIP_FIND_LINKS": "--pip-find-links",
               "PIP_TRUSTED_HOST": "--pip-trusted-host"}  # fmt: skip


def parse() -> AgentConfig:
    p = argparse.ArgumentParser(prog="python -m services.node_agent", description="cadre node agent")
    p.add_argument("--node-id", required=True, help="this node's name (letters, digits, '_' or '-')")
    p.add_argument("--compute-target", default="local", help="the pool this node serves (default: local)")
    p.add_argument("--gpus", type=int, default=None, help="declare N GPUs (for hosts without NVML)")
    p.add_argument("--slots", type=int, default=None, help="processes at once (default: GPUs, else CPUs)")
    p.add_argument("--work-dir", type=Path, required=True, help="where snapshots and run directories live")
    p.add_argument("--heartbeat", type=float, default=2.0, help="seconds between heartbeats")
    p.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    p.add_argument("--address", default="127.0.0.1", help="address other nodes' ranks reach this host at")
    g = p.add_argument_group("runtime")
    runtime_help = "ranks in containers (docker) or plain processes; auto: docker if an engine answers"
    g.add_argument("--runtime", choices=("auto", "docker", "process"), default="auto", help=runtime_help)
    g.add_argument("--image", default="python:3.11-slim", help="image for runs that name no custom_docker_image")
    g.add_argument("--pull", choices=PULL_POLICIES, default="if-not-present", help="image pull policy")
    g.add_argument("--docker-host", default=None, help="Docker API address (default: DOCKER_HOST, else the socket)")
    g.add_argument("--container-python", default="python3", help="the interpreter inside job images")
    for var, flag in PIP_OPTIONS.items():
        g.add_argument(flag, default=None, help=f"{var} for environment builds (or env CADRE_{var}[_FILE])")
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
        address=a.address,
        runtime=a.runtime,
        default_image=a.image,
        pull_policy=a.pull,
        docker_host=a.docker_host or os.environ.get("DOCKER_HOST"),
        container_python=a.container_python,
        pip_options=pip_options,
    )


config = parse()
configure("node_agent", log_level())
asyncio.run(NodeAgentService(BusSettings.from_env(f"agent-{config.node_id}"), config).run())
