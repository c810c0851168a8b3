"""The operator's view: the event stream (replayed and live), nodes, the queue, one run in full, restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from helpers import AGENT_SLOTS, eventually

from cadre import Estimator, Experiment, Run, Workspace, _local

ROOT = Path(__file__).resolve().parent.parent
LIFECYCLE = ["submitted", "queued", "assigned", "starting", "rendezvous", "running", "rank_exited", "node_finished",
             "node_committed", "finalizing", "completed"]  # fmt: skip
METRICS = """
from cadre import Run
run = Run.get_context()
for i in range(10):
    run.log("loss", 1.0 / (i + 1))
print("done")
"""


def cadre(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CADRE_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "cadre", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)  # fmt: skip


def kinds(output: str, run_id: str) -> list[str]:
    return [line.split()[4] for line in output.splitlines() if f" {run_id} " in line]


def test_events_follow_then_replay_and_show(
    ws: Workspace, cluster_home: Path, make_project: Callable[..., Path]
) -> None:
    env = {**os.environ, "CADRE_HOME": str(cluster_home)}
    follower = subprocess.Popen([sys.executable, "-m", "cadre", "events", "--follow", "--since", "10m"],
                                stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)  # fmt: skip
    try:
        time.sleep(0.5)  # the follower may start before or after the run: it replays from 10 minutes back
        run = Experiment(ws, "ops").submit(
            Estimator(source_directory=make_project(**{"train.py": METRICS}), entry_script="train.py")
        )
        run.wait_for_completion()
        seen: list[str] = []
        assert follower.stdout is not None
        deadline = time.monotonic() + 20
        while "completed" not in seen and time.monotonic() < deadline:
            line = follower.stdout.readline()
            if f" {run.id} " in line:
                seen.append(line.split()[4])
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(timeout=10)
    assert seen == LIFECYCLE

    replay = cadre(cluster_home, "events", "--run", run.id)
    assert kinds(replay.stdout, run.id) == LIFECYCLE
    assert "placement=0@agent-0" in replay.stdout
    as_json = [json.loads(x) for x in cadre(cluster_home, "events", "--run", run.id, "--json").stdout.splitlines()]
    assert [e["kind"] for e in as_json] == LIFECYCLE and all(e["stream"] == "CADRE_EVENTS" for e in as_json)
    only = cadre(cluster_home, "events", "--run", run.id, "--type", "assigned").stdout.splitlines()
    assert len(only) == 1 and "assigned -> Preparing" in only[0]

    shown = cadre(cluster_home, "show", run.id).stdout
    assert "status:      Completed" in shown and "loss" in shown and "▁" in shown and "rank 0: node agent-0" in shown


def test_nodes_and_queue(ws: Workspace, cluster_home: Path, make_project: Callable[..., Path], tmp_path: Path) -> None:
    release = tmp_path / "release"
    hold = f"import os, time\nwhile not os.path.exists({str(release)!r}): time.sleep(0.05)\n"
    project = make_project(**{"h.py": hold})
    holder = Experiment(ws, "ops").submit(
        Estimator(source_directory=project, entry_script="h.py", process_count_per_node=AGENT_SLOTS)
    )
    eventually(lambda: holder.get_status() == "Running")
    waiting = Experiment(ws, "ops").submit(
        Estimator(source_directory=make_project(**{"q.py": "print(1)"}), entry_script="q.py")
    )
    eventually(lambda: waiting.get_details()["queueReason"])
    nodes = cadre(cluster_home, "nodes").stdout
    row = next(line for line in nodes.splitlines() if line.startswith("agent-0"))
    assert "Ready" in row and f"{AGENT_SLOTS}/{AGENT_SLOTS}" in row and holder.id in row
    queue = cadre(cluster_home, "queue").stdout
    assert waiting.id in queue and "needs 1 node(s) with 1 free slot(s)" in queue
    release.touch()
    assert waiting.wait_for_completion(timeout=30)["status"] == "Completed"
    assert "(no run is waiting)" in cadre(cluster_home, "queue").stdout


def test_history_survives_restarting_every_service(
    ws: Workspace, cluster_home: Path, make_project: Callable[..., Path]
) -> None:
    run = Experiment(ws, "ops").submit(
        Estimator(source_directory=make_project(**{"train.py": METRICS}), entry_script="train.py")
    )
    run.wait_for_completion()
    before = (run.get_details()["history"], run.get_metrics(), cadre(cluster_home, "events", "--run", run.id).stdout)
    for name in ("submitter", "scheduler", "artifact", "registry", "agent-0"):
        _local.restart(name, home=cluster_home)
    again = Run.get(ws, run.id)
    after = eventually(lambda: _details_or_none(again))
    assert (after, again.get_metrics(), cadre(cluster_home, "events", "--run", run.id).stdout) == before
    # And the restarted cluster still runs work.
    eventually(
        lambda: "agent-0" in cadre(cluster_home, "nodes").stdout and "Ready" in cadre(cluster_home, "nodes").stdout
    )
    next_run = Experiment(ws, "ops").submit(
        Estimator(source_directory=make_project(**{"q.py": "print(1)"}), entry_script="q.py")
    )
    assert next_run.wait_for_completion(timeout=60)["status"] == "Completed"


def _details_or_none(run: Run) -> list[dict[str, object]] | None:
    try:
        return run.get_details()["history"]
    except Exception:  # the submitter is still starting
        return None


def test_a_silent_node_shows_not_responding_then_recovers(ws: Workspace, cluster_home: Path) -> None:
    state = json.loads((cluster_home / "cluster" / "state.json").read_text())
    agent = next(p["pid"] for p in state["processes"] if p["name"] == "agent-0")

    def node_state() -> str:
        reply = ws._scheduler_state()
        return next(n.state for n in reply.nodes if n.advert.node_id == "agent-0")

    os.kill(agent, signal.SIGSTOP)  # silent, not gone: it misses heartbeats
    try:
        eventually(lambda: node_state() == "NotResponding", timeout=15)
        assert "NotResponding" in cadre(cluster_home, "nodes").stdout
    finally:
        os.kill(agent, signal.SIGCONT)
    eventually(lambda: node_state() == "Ready", timeout=15)
    events = cadre(cluster_home, "events", "--node", "agent-0", "--since", "1m").stdout
    assert "agent-0 not_responding" in events and "agent-0 recovered" in events
