"""``python -m services.scheduler [--node-grace SECONDS]`` (or ``CADRE_NODE_GRACE``; the flag wins)."""

import argparse
import sys

from services.scheduler.service import SchedulerService
from shared import settings
from shared.service import main


def parse_grace(argv: list[str]) -> float:
    p = argparse.ArgumentParser(prog="python -m services.scheduler", description="cadre scheduler")
    p.add_argument("--node-grace", type=float, default=None,
                   help=f"seconds a silent node's runs go on before it is lost "
                        f"(default {settings.NODE_GRACE_DEFAULT:g}) [env CADRE_NODE_GRACE]")  # fmt: skip
    a = p.parse_args(argv)
    try:
        grace = a.node_grace if a.node_grace is not None else settings.node_grace()
    except ValueError:
        p.error("CADRE_NODE_GRACE must be a number of seconds")
    if not grace > 0:
        p.error(f"--node-grace must be a positive number of seconds, not {grace:g}")
    # No floor here: the agents say their heartbeat, and a node's grace is never under two of its beats (logged).
    return grace


if __name__ == "__main__":
    grace = parse_grace(sys.argv[1:])
    main(lambda: SchedulerService.from_env(grace), uvloop=True)
