import argparse
import asyncio
from pathlib import Path

from services.node_agent.service import AgentConfig, NodeAgentService
from shared.logging import configure
from shared.settings import BusSettings, log_level


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
    a = p.parse_args()
    return AgentConfig(
        node_id=a.node_id,
        compute_target=a.compute_target,
        declared_gpus=a.gpus,
        slots=a.slots,
        work_dir=a.work_dir,
        heartbeat_interval=a.heartbeat,
        kill_grace=a.grace,
        address=a.address,
    )


config = parse()
configure("node_agent", log_level())
asyncio.run(NodeAgentService(BusSettings.from_env(f"agent-{config.node_id}"), config).run())
