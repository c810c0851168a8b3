"""Faults of the bus itself, on a cluster of the test's own: every service and agent rides out a nats-server
outage longer than any request timeout, running ranks keep running, no log line is lost or doubled, and the
scheduler goes back to placing runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import eventually

from cadre import Estimator, Experiment, Workspace, _local
from shared import schemas

OUTAGE = 15.0  # seconds: longer than a request's timeout (10 s) and JetStream's API timeout (5 s)
LINES = 400

TICKER = f"""
import time
for i in range({LINES}):
    print("line", i, flush=True)
    time.sleep(0.05)
"""


@pytest.fixture(scope="module")
def outage_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("cadre-outage-home")
    # Little memory for held log lines: an outage spills them to disk, and they must come back in order.
    _local.up(home=home, agents=1, slots_per_agent=2, heartbeat=0.5, timeout=120, agent_args=["--log-memory", "1k"])
    try:
        yield home
    finally:
        _local.down(home=home)


def _pids(home: Path) -> dict[str, int]:
    state = json.loads((home / "cluster" / "state.json").read_text())
    return {p["name"]: p["pid"] for p in state["processes"] if p["role"] != "infra"}


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _events(log: Path) -> list[str]:
    return re.findall(r'"event": "([a-z_]+)"', log.read_text(errors="replace"))


@pytest.mark.timeout(180)
def test_a_nats_outage_longer_than_any_timeout_loses_nothing(
    outage_home: Path, make_project: Callable[..., Path]
) -> None:
    before = _pids(outage_home)
    with Workspace.from_config(outage_home / "profile.json") as ws:
        project = make_project(**{"train.py": TICKER, "hello.py": "print('after the outage')"})
        run = Experiment(ws, "outage").submit(Estimator(project, "train.py"))
        deadline = time.monotonic() + 60
        while run.get_status() != "Running":
            assert time.monotonic() < deadline, run.get_details()
            time.sleep(0.1)
        out = io.StringIO()
        follower = threading.Thread(target=lambda: run.wait_for_completion(show_output=True, output=out, timeout=150))
        follower.start()  # the client follows through the outage too: it is under way before the fault
        while "line 20\n" not in out.getvalue():
            assert time.monotonic() < deadline and follower.is_alive(), out.getvalue()
            time.sleep(0.05)
        _local.restart("nats-server", home=outage_home, crash=True, down_for=OUTAGE)
        follower.join(timeout=150)
        assert run.get_status() == "Completed", run.get_details()
        numbers = [int(m) for m in re.findall(r"^line (\d+)$", out.getvalue(), re.M)]
        assert numbers == list(range(LINES)), f"{len(numbers)} lines, {len(set(numbers))} distinct"
        # The scheduler places new work again.
        after = Experiment(ws, "outage").submit(Estimator(project, "hello.py"))
        assert after.wait_for_completion(timeout=60)["status"] == "Completed"
    agent_log = (outage_home / "cluster" / "logs" / "agent-0.log").read_text()
    assert '"event": "log_lines_spilled"' in agent_log  # held past 1 KiB: on disk, then sent in order
    assert not list((outage_home / "cluster" / "agents").glob("*/runs/*.logspool/*"))  # and cleaned up
    # Nobody crashed or was restarted: the same processes rode it out, and said so once each.
    assert _pids(outage_home) == before and all(_running(pid) for pid in before.values())
    for name in before:
        events = _events(outage_home / "cluster" / "logs" / f"{name}.log")
        assert "task_crashed" not in events and "service_stopping" not in events, (name, events)
        if name not in ("agent-0", "supervisor"):
            assert events.count("bus_disconnected") == 1 and events.count("bus_reconnected") == 1, (name, events)


def _cadre(home: Path, *args: str) -> str:
    env = {**os.environ, "CADRE_HOME": str(home)}
    cli = Path(sys.executable).with_name("cadre")
    return subprocess.run([str(cli), *args], env=env, capture_output=True, text=True, timeout=60, check=True).stdout


@pytest.mark.timeout(120)
def test_the_supervisor_restarts_a_crashed_service_with_backoff_and_says_so(
    outage_home: Path, make_project: Callable[..., Path]
) -> None:
    restarted_at = []
    for _ in range(2):
        old = _pids(outage_home)["scheduler"]
        os.killpg(old, signal.SIGKILL)
        killed = time.monotonic()
        new = eventually(lambda old=old: (pid := _pids(outage_home)["scheduler"]) != old and _running(pid) and pid, 30)
        restarted_at.append(time.monotonic() - killed)
        assert _running(new)
    # Backoff: the second restart of the same process waits longer than the first.
    assert restarted_at[1] > restarted_at[0] and restarted_at[1] >= 0.9, restarted_at
    with Workspace.from_config(outage_home / "profile.json") as ws:
        project = make_project(**{"hello.py": "print('placed by the restarted scheduler')"})
        run = Experiment(ws, "supervised").submit(Estimator(project, "hello.py"))
        assert run.wait_for_completion(timeout=60)["status"] == "Completed"

    def services_after_the_restart_event() -> str:
        out = _cadre(outage_home, "services")
        return out if "killed by signal 9" in out else ""

    table = eventually(services_after_the_restart_event, 30)
    line = next(row for row in table.splitlines() if row.startswith("scheduler "))
    assert re.search(r"up \(pid \d+\)\s+ok [\d.]+ ms [0-9a-f]{8}\s+2\s+\d+s ago: killed by signal 9", line), table
    assert re.search(r"^submitter\s+up \(pid \d+\)\s+ok .*\s0\s+-$", table, re.M), table
    log = (outage_home / "cluster" / "logs" / "supervisor.log").read_text()
    assert log.count('"event": "process_restarted"') == 2


HOLDER = """
import os, time
open(os.path.join(os.environ["SPOOL"], "pid"), "w").write(str(os.getpid()))
for i in range(int(os.environ["TICKS"])):
    print("line", i, flush=True)
    time.sleep(0.05)
"""
GRACE = 3.0


@pytest.fixture(scope="module")
def partition_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A node grace of 3 s (heartbeats every 0.5 s) and agents that fence themselves after 2 s without the bus."""
    home = tmp_path_factory.mktemp("cadre-partition-home")
    # A small snapshot limit, which a checkpoint may outgrow (it is synced anyway, and the run's log says so).
    os.environ["CADRE_SNAPSHOT_MAX_BYTES"] = str(SNAPSHOT_LIMIT)
    try:
        _local.up(home=home, agents=1, slots_per_agent=2, heartbeat=0.5, timeout=120, node_grace=GRACE,
                  agent_args=["--fence-after", "2"])  # fmt: skip
    finally:
        del os.environ["CADRE_SNAPSHOT_MAX_BYTES"]
    try:
        yield home
    finally:
        _local.down(home=home)


def _held(ws: Workspace, make_project: Callable[..., Path], spool: Path, ticks: int):
    spool.mkdir()
    project = make_project(**{"train.py": HOLDER})
    est = Estimator(project, "train.py", environment_variables={"SPOOL": str(spool), "TICKS": str(ticks)})
    run = Experiment(ws, "partition").submit(est)
    pid = eventually(lambda: (spool / "pid").is_file() and int((spool / "pid").read_text() or 0), 60)
    return run, pid


@contextlib.contextmanager
def _stopped(pid: int) -> Iterator[None]:
    """SIGSTOP the agent only (its ranks run in sessions of their own), as a stall or a short partition would."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _node(ws: Workspace) -> schemas.NodeStatus:
    state = ws._scheduler_state()
    return next(n for n in state.nodes if n.advert.node_id == "agent-0")


@pytest.mark.timeout(120)
def test_a_stall_inside_the_node_grace_keeps_the_run(
    partition_home: Path, make_project: Callable[..., Path], tmp_path: Path
) -> None:
    agent = _pids(partition_home)["agent-0"]
    with Workspace.from_config(partition_home / "profile.json") as ws:
        run, _ = _held(ws, make_project, tmp_path / "spool", 200)
        with _stopped(agent):
            silent = eventually(lambda: (node := _node(ws)).state == "NotResponding" and node, 10)
            assert silent.lost_in is not None and 0 < silent.lost_in <= GRACE
            time.sleep(0.5)
        out = io.StringIO()
        run.wait_for_completion(show_output=True, output=out, timeout=60)
        assert re.findall(r"^line (\d+)$", out.getvalue(), re.M) == [str(i) for i in range(200)]
        eventually(lambda: _node(ws).state == "Ready", 10)
        events = _cadre(partition_home, "events", "--node", "agent-0")
        assert "not_responding" in events and "recovered" in events and "lost" not in events.split("recovered")[-1]


@pytest.mark.timeout(120)
def test_a_stall_past_the_node_grace_loses_the_node_and_the_ranks_stop(
    partition_home: Path, make_project: Callable[..., Path], tmp_path: Path
) -> None:
    agent = _pids(partition_home)["agent-0"]
    with Workspace.from_config(partition_home / "profile.json") as ws:
        run, rank = _held(ws, make_project, tmp_path / "spool", 2000)
        with _stopped(agent):
            details = eventually(lambda: (d := run.get_details())["status"] == "Failed" and d, GRACE + 15)
        assert details["error"]["code"] == "node_lost"
        eventually(lambda: not _running(rank), 15)  # the resumed agent sees the run failed and stops its rank


@pytest.mark.timeout(120)
def test_an_agent_cut_off_from_the_bus_stops_its_own_ranks(
    partition_home: Path, make_project: Callable[..., Path], tmp_path: Path
) -> None:
    with Workspace.from_config(partition_home / "profile.json") as ws:
        run, rank = _held(ws, make_project, tmp_path / "spool", 2000)
        outage = threading.Thread(target=_local.restart, args=("nats-server",),
                                  kwargs={"home": partition_home, "crash": True, "down_for": 8.0})  # fmt: skip
        outage.start()
        try:
            eventually(lambda: not _running(rank), 8)  # fenced while the bus is still away
            assert outage.is_alive()
        finally:
            outage.join()
        details = run.wait_for_completion(timeout=60, raise_on_error=False)
    assert details["status"] == "Failed" and details["error"]["code"] == "fenced", details["error"]
    assert "could not reach the bus" in details["error"]["message"]


SNAPSHOT_LIMIT = 256 * 1024
RESUMING = """
import os, sys, time
os.makedirs("checkpoints", exist_ok=True)
state = "checkpoints/progress.txt"
start = int(open(state).read()) + 1 if os.path.exists(state) else 0  # the snapshot pattern: resume where it stopped
if os.environ.get("PAD") and not os.path.exists("checkpoints/pad.bin"):  # a model's weights, say
    open("checkpoints/pad.bin", "wb").write(os.urandom(int(os.environ["PAD"])))
attempt = int(os.environ["CADRE_ATTEMPT"])
print("attempt", attempt, "starts at", start, flush=True)
open(os.path.join(os.environ["SPOOL"], f"pid{attempt}"), "w").write(str(os.getpid()))
for i in range(start, int(os.environ["TICKS"])):
    print("step", i, flush=True)
    with open(state + ".tmp", "w") as fh:
        fh.write(str(i))
    os.replace(state + ".tmp", state)
    if i == int(os.environ.get("FAIL_AT", -1)) and attempt == 1:
        sys.exit(3)
    time.sleep(0.05)
"""


def _resuming(ws: Workspace, make_project: Callable[..., Path], spool: Path, **kwargs: object):
    spool.mkdir()
    env = {"SPOOL": str(spool), "TICKS": "200", **{k: str(v) for k, v in kwargs.pop("env", {}).items()}}  # type: ignore[attr-defined]
    est = Estimator(make_project(**{"train.py": RESUMING}), "train.py", environment_variables=env, **kwargs)  # type: ignore[arg-type]
    return Experiment(ws, "retries").submit(est)


@pytest.mark.timeout(120)
def test_a_listed_exit_code_is_retried_from_the_checkpoint(
    partition_home: Path, make_project: Callable[..., Path], tmp_path: Path
) -> None:
    with Workspace.from_config(partition_home / "profile.json") as ws:
        env = {"FAIL_AT": 60, "PAD": SNAPSHOT_LIMIT + 40_000}  # the checkpoint outgrows the snapshot limit
        run = _resuming(ws, make_project, tmp_path / "spool", env=env, max_retries=2, retry_on=[3])
        out = io.StringIO()
        details = run.wait_for_completion(show_output=True, output=out, timeout=90)
        text = out.getvalue()
        assert details["status"] == "Completed" and details["attempt"] == 2
        assert [(a["attempt"], a["cause"]) for a in details["attempts"]] == [(1, "exit:3")]
        # The follower folds the events it got into the details (no request after the end): as the submitter does.
        assert details == {k: v for k, v in run.get_details().items() if k != "properties"}
        assert "attempt 1 starts at 0" in text and "attempt 2 starts at 61" in text  # from its checkpoint
        steps = [int(i) for i in re.findall(r"^step (\d+)$", text, re.M)]
        assert steps == list(range(200)), "every step once, across the two attempts"
        assert "checkpoints/progress.txt" in run.get_file_names()
        # Restored, synced over the limit, and said so: once per attempt, then as the retry starts.
        # (progress.txt.tmp may be there too when the folder is looked at)
        over = r"reached 295.1 KiB in [23] file\(s\), over the 256.0 KiB snapshot limit: it was synced all the same"
        assert len(re.findall(over, text)) == 2, text[-2000:]
        restored = r"\[prepare\] checkpoint restored for attempt 2: [23] file\(s\), 295.1 KiB, over the 256.0 KiB"
        assert re.search(restored, text), text[:2000]
        # Not listed: a user's exit code is not retried.
        failing = _resuming(ws, make_project, tmp_path / "spool2", env={"FAIL_AT": 5}, max_retries=2)
        failed = failing.wait_for_completion(timeout=60, raise_on_error=False)
        assert failed["status"] == "Failed" and failed["attempts"] == [] and failed["error"]["code"] == "nonzero_exit"


@pytest.mark.timeout(150)
def test_a_node_lost_past_its_grace_is_retried_and_completes_from_its_checkpoint(
    partition_home: Path, make_project: Callable[..., Path], tmp_path: Path
) -> None:
    agent = _pids(partition_home)["agent-0"]
    spool = tmp_path / "spool"
    with Workspace.from_config(partition_home / "profile.json") as ws:
        run = _resuming(ws, make_project, spool, env={"TICKS": 400}, max_retries=1)
        eventually(lambda: (spool / "pid1").is_file(), 60)
        time.sleep(3)  # a checkpoint synced meanwhile (every 2 s)
        with _stopped(agent):
            eventually(lambda: run.get_details()["attempt"] == 2, GRACE + 20)  # lost, then queued again
        out = io.StringIO()
        details = run.wait_for_completion(show_output=True, output=out, timeout=120)
    assert details["status"] == "Completed", details["error"]
    assert [(a["attempt"], a["cause"]) for a in details["attempts"]] == [(1, "node_lost")]
    resumed = int(re.search(r"attempt 2 starts at (\d+)", out.getvalue()).group(1))  # type: ignore[union-attr]
    assert resumed > 20, "attempt 2 carried on from the synced checkpoint"
    assert not _running(int((spool / "pid1").read_text()))  # the first attempt's rank was stopped


def test_a_full_disk_fails_the_run_as_disk_full_and_the_agent_goes_on(
    tmp_path: Path, make_project: Callable[..., Path]
) -> None:
    from conftest import PRIVATE_MOUNTS
    from helpers import tmpfs

    if not PRIVATE_MOUNTS:
        pytest.skip("needs root and a mount namespace of its own (for a small tmpfs)")
    home = tmp_path / "home"
    with tmpfs(home / "cluster" / "agents" / "agent-0", "48m"):
        _local.up(home=home, agents=1, heartbeat=0.5, timeout=120)
        try:
            with Workspace.from_config(home / "profile.json") as ws:
                filler = """
                    print("filling outputs/", flush=True)
                    with open("outputs/big.bin", "wb") as fh:
                        for _ in range(200):
                            fh.write(b"x" * (1 << 20))
                """
                run = Experiment(ws, "disk").submit(Estimator(make_project(**{"fill.py": filler}), "fill.py"))
                details = run.wait_for_completion(timeout=120, raise_on_error=False)
                assert details["status"] == "Failed" and details["error"]["code"] == "disk_full", details["error"]
                assert re.search(r"the work dir \S+agent-0 on node agent-0 is full \(\d+ KiB free\); rank 0 exited "
                                 r"with code 1", details["error"]["message"]), details["error"]["message"]  # fmt: skip
                # The agent is still there, the run's files are gone from its disk, and the next run works.
                ok = Experiment(ws, "disk").submit(Estimator(make_project(**{"ok.py": "print('fine')"}), "ok.py"))
                assert ok.wait_for_completion(timeout=60)["status"] == "Completed"
        finally:
            _local.down(home=home)
