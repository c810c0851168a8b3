"""Queueing with reasons, restarts that lose nothing, cancellation and time limits."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import AGENT_SLOTS, eventually

from cadre import Estimator, Experiment, Run, RunFailedError, Workspace, _local

# Holds its slots until the test creates the release file; writes its pid so the test can check it is gone.
HOLD = """
import os, sys, time
open(os.environ["PID_FILE"] + os.environ["RANK"], "w").write(str(os.getpid()))
print("holding", flush=True)
while not os.path.exists(os.environ["RELEASE"]):
    time.sleep(0.05)
print("released")
"""


def hold(ws: Workspace, make_project: Callable[..., Path], tmp_path: Path, processes: int = AGENT_SLOTS) -> Run:
    env = {"RELEASE": str(tmp_path / "release"), "PID_FILE": str(tmp_path / "pid")}
    est = Estimator(
        source_directory=make_project(**{"hold.py": HOLD}),
        entry_script="hold.py",
        process_count_per_node=processes,
        environment_variables=env,
    )
    run = Experiment(ws, "hold").submit(est)
    eventually(lambda: run.get_status() == "Running")
    return run


def quick(ws: Workspace, make_project: Callable[..., Path], name: str = "quick") -> Run:
    est = Estimator(source_directory=make_project(**{"q.py": "print('quick done')"}), entry_script="q.py")
    return Experiment(ws, name).submit(est)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] not in "ZX"


def test_busy_node_queues_with_reason_and_a_scheduler_crash_loses_nothing(
    ws: Workspace, make_project: Callable[..., Path], tmp_path: Path, cluster_home: Path
) -> None:
    holder = hold(ws, make_project, tmp_path)
    waiting = quick(ws, make_project)
    reason = eventually(lambda: waiting.get_details()["queueReason"])
    assert reason == "needs 1 node(s) with 1 free slot(s) on compute target 'local'; 0 of 1 live node(s) have them"
    assert waiting.get_status() == "Queued"

    # The scheduler dies; a run is submitted while it is down; it comes back.
    state = json.loads((cluster_home / "cluster" / "state.json").read_text())
    pid = next(p["pid"] for p in state["processes"] if p["name"] == "scheduler")
    os.killpg(pid, signal.SIGKILL)
    eventually(lambda: not alive(pid))
    submitted_while_down = quick(ws, make_project, "while-down")
    _local.restart("scheduler", home=cluster_home)
    time.sleep(0.5)  # the restarted scheduler rebuilds its view; the holder still holds every slot
    assert waiting.get_status() == "Queued" and submitted_while_down.get_status() == "Queued"

    (tmp_path / "release").touch()
    assert holder.wait_for_completion(timeout=30)["status"] == "Completed"
    assert waiting.wait_for_completion(timeout=30)["status"] == "Completed"
    assert submitted_while_down.wait_for_completion(timeout=30)["status"] == "Completed"


def test_run_bigger_than_any_node_fails_fast(ws: Workspace, make_project: Callable[..., Path]) -> None:
    est = Estimator(
        source_directory=make_project(**{"q.py": ""}), entry_script="q.py", process_count_per_node=AGENT_SLOTS + 1
    )
    run = Experiment(ws, "too-big").submit(est)
    with pytest.raises(RunFailedError, match=r"needs 1 node\(s\) with 3 slot\(s\) each.*largest node: 2"):
        run.wait_for_completion(timeout=20)
    assert run.get_details()["error"]["code"] == "unschedulable"


def test_multi_node_run_beyond_the_pool_fails_fast(ws: Workspace, make_project: Callable[..., Path]) -> None:
    est = Estimator(source_directory=make_project(**{"q.py": ""}), entry_script="q.py", node_count=2)
    run = Experiment(ws, "multi").submit(est)
    # One agent: a 2-node run can never fit, which is reported before the multi-node limitation.
    with pytest.raises(RunFailedError, match=r"needs 2 node\(s\).*has 1 such node"):
        run.wait_for_completion(timeout=20)


def test_cancel_a_queued_run(ws: Workspace, make_project: Callable[..., Path], tmp_path: Path) -> None:
    holder = hold(ws, make_project, tmp_path)
    waiting = quick(ws, make_project)
    eventually(lambda: waiting.get_details()["queueReason"])
    assert waiting.cancel() == "Canceled"
    assert waiting.cancel() == "Canceled"  # idempotent
    (tmp_path / "release").touch()
    holder.wait_for_completion(timeout=30)
    assert waiting.get_status() == "Canceled"
    details = waiting.get_details()
    assert [h["state"] for h in details["history"]] == ["NotStarted", "Queued", "Canceled"]
    assert details["error"] == {"code": "canceled", "message": "canceled on request"}


def test_cancel_a_running_run_stops_its_processes(
    ws: Workspace, make_project: Callable[..., Path], tmp_path: Path
) -> None:
    run = hold(ws, make_project, tmp_path, processes=2)
    pids = [int(eventually(lambda r=r: (tmp_path / f"pid{r}").exists() and (tmp_path / f"pid{r}").read_text()))
            for r in (0, 1)]  # fmt: skip
    assert all(alive(p) for p in pids)
    assert run.cancel() == "CancelRequested"
    details = run.wait_for_completion(timeout=30)
    assert details["status"] == "Canceled" and details["error"]["code"] == "canceled", details["error"]
    assert not any(alive(p) for p in pids)
    assert {"logs/cadre/rank_0.log", "logs/cadre/rank_1.log"} <= set(run.get_file_names())


def test_max_run_duration_is_enforced(ws: Workspace, make_project: Callable[..., Path]) -> None:
    est = Estimator(
        source_directory=make_project(**{"s.py": "import time\nprint('sleeping')\ntime.sleep(60)"}),
        entry_script="s.py",
        max_run_duration_seconds=1,
    )
    started = time.monotonic()
    run = Experiment(ws, "slow").submit(est)
    with pytest.raises(RunFailedError, match="max_run_duration_seconds=1"):
        run.wait_for_completion(timeout=30)
    assert time.monotonic() - started < 20
    assert run.get_details()["error"]["code"] == "timeout"


def test_the_scheduler_state_comes_in_pages_that_each_fit_a_nats_message(cluster_home: Path, ws: Workspace) -> None:
    """1,000 nodes' state in one reply would pass NATS' 1 MB max_payload (docs/scale.md): it is paged."""
    import asyncio

    from shared import bus, schemas, subjects
    from shared.errors import ValidationError
    from shared.settings import BusSettings

    n, target = 450, "paging"
    env = json.loads((cluster_home / "cluster" / "process-env.json").read_text())["submitter"]
    settings = BusSettings(url=env["CADRE_NATS_URL"], user="submitter", password=env["CADRE_NATS_PASSWORD"])
    now = time.time()
    gpus = [schemas.GpuInfo(index=g, name="NVIDIA H200", memory_bytes=141 << 30) for g in range(8)]
    adverts = [
        schemas.NodeAdvert(
            node_id=f"page-{i:04d}", compute_target=target, hostname=f"gpu-host-{i:04d}.example.internal",
            address=f"10.1.{i // 250}.{i % 250}", cpus=192, memory_bytes=2 << 40, gpus=gpus, slots=8,
            started_at=now, heartbeat_at=now, heartbeat_interval=3600,
        )
        for i in range(n)
    ]  # fmt: skip

    async def go() -> None:
        nc = await bus.connect(settings)
        kv = await nc.jetstream().key_value(subjects.NODES_BUCKET)
        try:
            await asyncio.gather(*(kv.put(a.node_id, schemas.encode(a)) for a in adverts))
            deadline = time.monotonic() + 30
            while True:
                whole = await bus.scheduler_state(nc)
                mine = [s.advert.node_id for s in whole.nodes if s.advert.compute_target == target]
                if len(mine) == n:
                    break
                assert time.monotonic() < deadline, f"the scheduler knows {len(mine)} of {n} nodes"
                await asyncio.sleep(0.2)
            ids = [s.advert.node_id for s in whole.nodes]
            assert ids == sorted(set(ids))  # every node once, in order, across the pages
            raw = await nc.request(subjects.Api.SCHEDULER_STATE, b"{}", timeout=10)  # what an old client asks
            first = schemas.decode(raw.data, schemas.Reply[schemas.SchedulerState]).ok
            assert first is not None and len(first.nodes) == schemas.STATE_PAGE_NODES and first.more_nodes
            assert len(raw.data) < nc.max_payload // 2, len(raw.data)  # a page, with room to spare
            page = schemas.SchedulerStateRequest(nodes_after=ids[-3], node_limit=7)
            last = await bus.request(nc, subjects.Api.SCHEDULER_STATE, page, schemas.SchedulerState)
            assert [s.advert.node_id for s in last.nodes] == ids[-2:] and not last.more_nodes
            with pytest.raises(ValidationError, match="node_limit and queue_limit must be at least 1"):
                bad = schemas.SchedulerStateRequest(node_limit=0)
                await bus.request(nc, subjects.Api.SCHEDULER_STATE, bad, schemas.SchedulerState)
        finally:
            await asyncio.gather(*(kv.delete(a.node_id) for a in adverts))
            await nc.close()

    asyncio.run(go())
    eventually(lambda: not any(s.advert.compute_target == target for s in ws._scheduler_state().nodes), 30)


def _as_the_scheduler(home: Path, experiment: str):
    """The scheduler's bus user, and the spec of a run for a compute target no node serves (it stays queued)."""
    from shared import schemas
    from shared.settings import BusSettings

    env = json.loads((home / "cluster" / "process-env.json").read_text())["scheduler"]
    settings = BusSettings(url=env["CADRE_NATS_URL"], user="scheduler", password=env["CADRE_NATS_PASSWORD"])
    snap = schemas.SnapshotRef(content_hash="0" * 64, size=1, file_count=1, md5="0" * 32)
    return settings, schemas.RunSpec(
        experiment=experiment, entry_script="t.py", compute_target="nowhere", snapshot=snap
    )


def test_pipelined_appends_keep_compare_and_set_per_run(cluster_home: Path, ws: Workspace) -> None:
    """RunEventLog.append_many (the scheduler writes a pass's placements with it): a run whose known last event is
    current is appended at once, one whose known event is stale or unknown is read again and still appended once,
    and one that moved on meanwhile (canceled) gets nothing: its guard sees the real last event."""
    import asyncio
    import uuid

    from shared import bus, lifecycle, schemas
    from shared.states import RunState

    settings, spec = _as_the_scheduler(cluster_home, "pipe")

    async def go() -> None:
        nc = await bus.connect(settings)
        pipeline = bus.Pipeline(nc)
        events = bus.RunEventLog(nc.jetstream())
        try:
            # Submitted only: the scheduler acts on queued runs, and these are queued by the appends under test.
            ids = {k: f"pipe_{k}_{uuid.uuid4().hex[:8]}" for k in ("current", "stale", "unknown", "canceled")}
            for run_id in ids.values():
                submitted = lifecycle.event(schemas.Submitted, run_id, experiment="pipe", compute_target="nowhere",
                                            entry_script="t.py")  # fmt: skip
                await events.begin(run_id, [submitted])
            known = {k: await events.last(run_id) for k, run_id in ids.items()}
            stale = (known["stale"][0], known["stale"][1] + 5)  # a sequence the subject is not at
            await events.append(ids["canceled"], lifecycle.append_if(lambda _: True, schemas.Canceled,
                                                                    ids["canceled"]))  # fmt: skip

            def queue(run_id: str):
                return lifecycle.append_if(lifecycle.in_state(RunState.NOT_STARTED), schemas.Queued, run_id,
                                           spec=spec, reason="pipelined")  # fmt: skip

            results = await events.append_many([
                (ids["current"], queue(ids["current"]), known["current"]),
                (ids["stale"], queue(ids["stale"]), stale),
                (ids["unknown"], queue(ids["unknown"]), None),
                (ids["canceled"], queue(ids["canceled"]), known["canceled"]),
            ], pipeline)  # fmt: skip
            assert [type(r).__name__ for r in results] == ["Queued", "Queued", "Queued", "NoneType"], results
            for key, run_id in ids.items():
                history = await events.history(run_id)
                kinds = [type(e).__name__ for e in history]
                expected = ["Submitted", "Canceled"] if key == "canceled" else ["Submitted", "Queued"]
                # (what the scheduler makes of a queued run comes after: its own appends are compare-and-set too)
                ours = [e for e in history if isinstance(e, schemas.Queued) and e.reason == "pipelined"]
                assert kinds[:2] == expected and len(ours) == (key != "canceled"), (key, kinds)
            assert await pipeline.publish([]) == []
        finally:  # no run of this test stays queued for the tests after it (the cluster is shared)
            for run_id in ids.values():
                await events.append(run_id, lifecycle.append_if(lifecycle.undecided(), schemas.Canceled, run_id))
            await nc.close()

    asyncio.run(go())
    eventually(lambda: not any(q.run_id.startswith("pipe_") for q in ws._scheduler_state().queue))


def test_an_append_whose_ack_is_lost_is_in_doubt_until_the_log_says_whether_it_was_stored(
    cluster_home: Path, ws: Workspace
) -> None:
    """The scheduler's Assigned whose ack never came (the bus went away after storing it) must not leave the run
    placed with no node told: the append says it is in doubt, and RunEventLog.stored settles it from the log.
    Here the acks are lost for real: the pipeline stops waiting for them before they can arrive."""
    import asyncio
    import uuid

    from shared import bus, lifecycle, schemas
    from shared.states import RunState

    settings, spec = _as_the_scheduler(cluster_home, "doubt")

    async def go() -> None:
        nc = await bus.connect(settings)
        events = bus.RunEventLog(nc.jetstream())
        ids = [f"doubt_{k}_{uuid.uuid4().hex[:8]}" for k in ("stored", "overtaken")]
        try:
            for run_id in ids:
                submitted = lifecycle.event(schemas.Submitted, run_id, experiment="doubt", compute_target="nowhere",
                                            entry_script="t.py")  # fmt: skip
                await events.begin(run_id, [submitted])
            known = [await events.last(run_id) for run_id in ids]

            def queue(run_id: str):
                return lifecycle.append_if(lifecycle.in_state(RunState.NOT_STARTED), schemas.Queued, run_id,
                                           spec=spec, reason="in doubt")  # fmt: skip

            lost = await events.append_many([(r, queue(r), k) for r, k in zip(ids, known, strict=True)],
                                            bus.Pipeline(nc, timeout=0))  # fmt: skip
            assert all(isinstance(d, bus.AppendInDoubt) and bus.is_transient(d) for d in lost), lost
            doubts: list[bus.AppendInDoubt] = lost  # type: ignore[assignment]
            assert [d.after for d in doubts] == [k[1] for k in known]
            # Stored after all: the log says so, with the event as it was sent and where it went.
            stored = await eventually_async(lambda: events.stored(doubts[0]))
            assert stored[0] == doubts[0].event and stored[1] > known[0][1]
            # An event that never went out, where the run moved on without it (canceled): not stored.
            never = lifecycle.event(schemas.Queued, ids[1], spec=spec, reason="never sent")
            moved = bus.AppendInDoubt(ids[1], never, (await events.last(ids[1]))[1], TimeoutError())
            await events.append(ids[1], lifecycle.append_if(lifecycle.undecided(), schemas.Canceled, ids[1]))
            assert await events.stored(moved) is None
            nothing_after = bus.AppendInDoubt(ids[1], never, (await events.last(ids[1]))[1], TimeoutError())
            assert await events.stored(nothing_after) is None
        finally:  # no run of this test stays queued for the tests after it (the cluster is shared)
            for run_id in ids:
                await events.append(run_id, lifecycle.append_if(lifecycle.undecided(), schemas.Canceled, run_id))
            await nc.close()

    async def eventually_async(fn, timeout: float = 10.0):
        deadline = asyncio.get_running_loop().time() + timeout
        while (value := await fn()) is None:
            assert asyncio.get_running_loop().time() < deadline, "not stored"
            await asyncio.sleep(0.02)
        return value

    asyncio.run(go())
    eventually(lambda: not any(q.run_id.startswith("doubt_") for q in ws._scheduler_state().queue))


def test_an_assignment_that_comes_after_its_run_ended_starts_nothing(
    cluster_home: Path, ws: Workspace, make_project: Callable[..., Path], tmp_path: Path
) -> None:
    """A late assignment (a redelivery after the run ended) is checked against the run's events before anything
    starts on the node: the script does not run again, the run gains no event, and the node takes the next run."""
    import asyncio

    from shared import bus, schemas, subjects

    marker = tmp_path / "ran"
    project = make_project(**{"t.py": f"open({str(marker)!r}, 'a').write('x')\nprint('ran')"})
    exp = Experiment(ws, "late-assignment")
    run = exp.submit(Estimator(source_directory=project, entry_script="t.py"))
    assert run.wait_for_completion(timeout=60)["status"] == "Completed"
    settings, _ = _as_the_scheduler(cluster_home, "late-assignment")
    agent_log = cluster_home / "cluster" / "logs" / "agent-0.log"

    async def resend() -> int:
        nc = await bus.connect(settings)
        try:
            history = await bus.RunEventLog(nc.jetstream()).history(run.id)
            queued = next(e for e in history if isinstance(e, schemas.Queued) and e.spec is not None)
            assigned = next(e for e in history if isinstance(e, schemas.Assigned))
            node = assigned.placement[0].node_id
            late = schemas.Assignment(run_id=run.id, node_id=node, spec=queued.spec, placement=assigned.placement)
            await nc.jetstream().publish(subjects.node_assignments(node), schemas.encode(late),
                                         headers={"Nats-Msg-Id": f"late-{run.id}"})  # fmt: skip
            return len(history)
        finally:
            await nc.close()

    async def events_now() -> int:
        nc = await bus.connect(settings)
        try:
            return len(await bus.RunEventLog(nc.jetstream()).history(run.id))
        finally:
            await nc.close()

    before = asyncio.run(resend())
    eventually(lambda: any(run.id in line and "assignment_stale" in line
                           for line in agent_log.read_text().splitlines()), 30)  # fmt: skip
    assert asyncio.run(events_now()) == before
    assert marker.read_text() == "x"
    assert quick(ws, make_project, "after-late").wait_for_completion(timeout=60)["status"] == "Completed"
