"""How a node agent is configured (``python -m services.node_agent --help`` sets each of these)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from services.node_agent.logship import MEMORY_LIMIT
from shared.settings import FENCE_AFTER_DEFAULT


@dataclass(frozen=True)
class AgentConfig:
    node_id: str
    work_dir: Path
    compute_target: str = "local"
    declared_gpus: int | None = None
    slots: int | None = None
    heartbeat_interval: float = 2.0
    kill_grace: float = 10.0
    address: str = "127.0.0.1"  # how ranks on other nodes reach this one
    runtime: str = "process"  # process | docker | auto (docker when a Docker engine answers)
    default_image: str = "python:3.11-slim"  # for runs that name no custom_docker_image (Docker runtime)
    pull_policy: str = "if-not-present"
    docker_host: str | None = None  # default: DOCKER_HOST, else the local socket
    container_python: str = "python3"
    warm_ranks: int | None = None  # interpreters started ahead for the process runtime's ranks; None: the slots
    cache_bytes: int = 100 << 30  # snapshots, datasets and venvs kept on this node, least recently used go first
    # Cut off from the bus this long, the agent stops its ranks itself: by then the scheduler has given the node
    # up (its --node-grace), so no rank writes on after the run was decided. Long enough to outlast a bus restart.
    fence_after: float = FENCE_AFTER_DEFAULT
    log_memory: int = MEMORY_LIMIT  # bytes of log lines per rank held in memory while the bus is away; then disk
    # PIP_INDEX_URL / PIP_FIND_LINKS / PIP_TRUSTED_HOST for environment builds (may hold credentials: never logged)
    pip_options: dict[str, str] = field(default_factory=dict, repr=False)
