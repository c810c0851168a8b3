"""MPI launch overhead through cadre against a plain mpiexec, and what an idle cluster costs."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cadre import Estimator, Experiment, MpiConfiguration, Workspace, _local

ROOT = Path(__file__).resolve().parent.parent
ALLREDUCE = ROOT / "examples" / "mpi-allreduce"
# Before each sample, either side's: neither pays for what the other left running (the agent refills its warm
# interpreters after a run, at idle priority; mpiexec's processes exit).
SETTLE_S = 0.5


def mpi_overhead(ws: Workspace, samples: int) -> list[dict[str, object]]:
    est = Estimator(source_directory=ALLREDUCE, entry_script="train.py", node_count=2, process_count_per_node=2,
                    distributed_training=MpiConfiguration())  # fmt: skip
    exp = Experiment(ws, "bench-mpi")
    exp.submit(est).wait_for_completion()  # warm the snapshot cache
    cadre_s, plain_s = [], []
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    with tempfile.TemporaryDirectory() as scratch:  # mpiexec's outputs/ must not land in the example's folder
        shutil.copy(ALLREDUCE / "train.py", scratch)
        for _ in range(samples):
            time.sleep(SETTLE_S)
            t0 = time.perf_counter()
            exp.submit(est).wait_for_completion()
            cadre_s.append(time.perf_counter() - t0)
            time.sleep(SETTLE_S)
            t0 = time.perf_counter()
            subprocess.run([mpiexec, "-n", "4", sys.executable, "train.py"], cwd=scratch, check=True,
                           capture_output=True, timeout=120)  # fmt: skip
            plain_s.append(time.perf_counter() - t0)
    c, p = statistics.median(cadre_s), statistics.median(plain_s)
    return [{"metric": "4-rank MPI allreduce (2 agents x 2) submit -> Completed vs mpiexec -n 4", "value": c / p,
             "unit": "x", "target": "<= 1.1x", "ok": c <= 1.1 * p, "cadre_s": c,
             "note": f"cadre p50 {c * 1e3:.0f} ms (includes snapshot, scheduling, rendezvous, files, commit) vs "
                     f"mpiexec p50 {p * 1e3:.0f} ms"}]  # fmt: skip


def _ticks_and_rss(pid: int) -> tuple[int, int]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))  # fmt: skip
    return int(fields[11]) + int(fields[12]), rss * 1024


def idle_cost(seconds: float) -> list[dict[str, object]]:
    with tempfile.TemporaryDirectory(prefix="cadre-idle-") as tmp:
        home = Path(tmp)
        _local.up(home=home, agents=10, gpus_per_agent=0, timeout=180)
        try:
            time.sleep(3)  # past start-up
            procs = json.loads((home / "cluster" / "state.json").read_text())["processes"]
            before = {p["name"]: _ticks_and_rss(p["pid"]) for p in procs}
            time.sleep(seconds)
            after = {p["name"]: _ticks_and_rss(p["pid"]) for p in procs}
        finally:
            _local.down(home=home)
    hz = os.sysconf("SC_CLK_TCK")
    cpu = {n: (after[n][0] - before[n][0]) / hz / seconds * 100 for n in before}
    rss = {n: after[n][1] for n in before}
    agents = [n for n in cpu if n.startswith("agent-")]
    services = [n for n in cpu if n not in agents]
    total = sum(cpu.values())
    detail = ", ".join(f"{n} {cpu[n]:.2f}% {rss[n] / 2**20:.0f} MiB" for n in services)
    agent_cpu = sum(cpu[n] for n in agents)
    agent_rss = statistics.median(rss[n] for n in agents) / 2**20
    note = f"{detail}; 10 agents together {agent_cpu:.2f}% (median RSS {agent_rss:.0f} MiB each)"
    metric = f"idle cluster CPU, {len(_local.SERVICES)} services + 10 agents, {seconds:.0f} s"
    infra = ("nats-server", "weed")  # the bus and the S3 server: not cadre's code
    own = total - sum(cpu.get(n, 0.0) for n in infra)
    own_note = f"the {len(_local.SERVICES)} services, the supervisor and 10 agents (heartbeat every 2 s)"
    return [
        {"metric": metric, "value": total, "unit": "% CPU", "target": "near 0", "ok": total < 5, "note": note},
        {"metric": "idle CPU of cadre's own processes (without nats-server and the S3 server)", "value": own,
         "unit": "% CPU", "target": "< 1", "ok": own < 1, "note": own_note},
    ]  # fmt: skip
