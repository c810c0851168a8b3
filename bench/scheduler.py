"""Scheduler placement: decision latency and end-to-end placement throughput with 1,000 simulated nodes.

Nodes are simulated as adverts written straight into the ``cadre_nodes`` KV (a node agent's only contribution
to scheduling), with a long heartbeat interval; runs are injected as records plus their first events, as the
submitter writes them. What is timed is the real scheduler process: from the burst of Queued events to every
run's Assigned event (its placement, appended with compare-and-set, plus the assignment messages).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from bench.latency import pct
from services.scheduler.placement import NodeState, Pool, place
from services.scheduler.service import SETTLE_SECONDS
from shared import bus, lifecycle, schemas, subjects
from shared.settings import BusSettings

NODES = 1000
SLOTS = 8
SNAP = schemas.SnapshotRef(content_hash="0" * 64, size=1, file_count=1, md5="0" * 32)


def advert(i: int, now: float, prefix: str = "sim", target: str = "bench") -> schemas.NodeAdvert:
    return schemas.NodeAdvert(
        node_id=f"{prefix}-{i:04d}",
        compute_target=target,
        hostname=f"{prefix}-{i:04d}",
        cpus=SLOTS,
        memory_bytes=64 << 30,
        gpus=[schemas.GpuInfo(index=g) for g in range(SLOTS)],
        slots=SLOTS,
        started_at=now,
        heartbeat_at=now,
        heartbeat_interval=3600,
    )


def decision_latency(runs: int, node_count: int, ppn: int) -> dict[str, float]:
    """The pure decision (place, then the pass's Pool.take) against 1,000 nodes, filling them up as it goes."""
    now = time.time()
    # One pool for the whole sequence, as a scheduling pass keeps one across its decisions.
    pool = Pool([NodeState(a) for a in (advert(i, now) for i in range(NODES))])
    spec = schemas.RunSpec(
        experiment="b", entry_script="t.py", compute_target="bench", node_count=node_count,
        process_count_per_node=ppn, snapshot=SNAP,
    )  # fmt: skip
    times = []
    placed = 0
    for _ in range(runs):
        t0 = time.perf_counter()
        decision = place(spec, pool)
        if decision.placement:
            pool.take(decision.placement)
            placed += 1
        times.append(time.perf_counter() - t0)
    return {
        "decisions": runs,
        "placed": placed,
        "p50_ms": pct(times, 50) * 1e3,
        "p99_ms": pct(times, 99) * 1e3,
        "per_s": runs / sum(times),
    }


async def end_to_end(home: Path, runs: int, node_count: int, ppn: int) -> dict[str, float]:
    import json

    env = json.loads((home / "cluster" / "process-env.json").read_text())["submitter"]
    settings = BusSettings(url=env["CADRE_NATS_URL"], user="submitter", password=env["CADRE_NATS_PASSWORD"])
    nc = await bus.connect(settings)
    js = nc.jetstream()
    nodes_kv = await js.key_value(subjects.NODES_BUCKET)
    runs_kv = await js.key_value(subjects.RUNS_BUCKET)
    now = time.time()
    tag = f"b{int(now)}{node_count}x{ppn}"
    # Nodes and a compute target of this measurement's own: the runs placed by an earlier one never finish (the
    # nodes are simulated), so they would still hold those nodes' slots.
    target = f"bench-{tag}"
    adverts = [advert(i, now, prefix=tag, target=target) for i in range(NODES)]
    await asyncio.gather(*(nodes_kv.put(a.node_id, schemas.encode(a)) for a in adverts))
    spec = schemas.RunSpec(
        experiment="bench", entry_script="t.py", compute_target=target, node_count=node_count,
        process_count_per_node=ppn, snapshot=SNAP,
    )  # fmt: skip
    run_ids = [f"{tag}_{i}" for i in range(runs)]
    for run_id in run_ids:
        await runs_kv.put(run_id, schemas.encode(schemas.RunRecord(run_id=run_id, spec=spec, submitted_at=now)))
    # The burst starts once the scheduler sees every node (and the target has settled): only placement is timed.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = await bus.scheduler_state(nc)
        if sum(1 for n in state.nodes if n.advert.compute_target == target) == NODES:
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(SETTLE_SECONDS)

    assigned: dict[str, float] = {}
    done = asyncio.Event()

    async def on_event(msg) -> None:
        ev = schemas.run_event_decoder.decode(msg.data)
        if isinstance(ev, schemas.Assigned) and ev.run_id.startswith(tag):
            assigned[ev.run_id] = time.perf_counter()
            if len(assigned) == runs:
                done.set()

    sub = await nc.subscribe(subjects.all_run_events(), cb=on_event)
    queued_at: dict[str, float] = {}
    start = time.perf_counter()
    acks = []
    for run_id in run_ids:
        event = lifecycle.event(schemas.Queued, run_id, spec=spec)
        queued_at[run_id] = time.perf_counter()
        acks.append(await js.publish_async(subjects.run_events(run_id), schemas.encode(event)))
    await asyncio.gather(*acks)
    await asyncio.wait_for(done.wait(), timeout=120)
    elapsed = max(assigned.values()) - start
    latencies = [assigned[r] - queued_at[r] for r in run_ids]
    await sub.unsubscribe()
    for a in adverts:  # leave the cluster as it was
        await nodes_kv.delete(a.node_id)
    await nc.close()
    return {
        "runs": runs,
        "per_s": runs / elapsed,
        "p50_ms": pct(latencies, 50) * 1e3,
        "p99_ms": pct(latencies, 99) * 1e3,
    }


def run(home: Path, quick: bool) -> list[dict[str, object]]:
    n = 2000 if quick else 8000
    gangs = 200 if quick else 400  # 4 nodes x 4 ranks = 16-rank gangs; 1,000 nodes x 8 slots hold 500 at once
    rows: list[dict[str, object]] = []
    single = decision_latency(n, 1, 1)
    gang = decision_latency(gangs, 4, 4)
    rows.append({"metric": "scheduler decision, 1-slot run, 1,000 nodes: p99", "value": single["p99_ms"],
                 "unit": "ms", "target": "< 5", "ok": single["p99_ms"] < 5,
                 "note": f"p50 {single['p50_ms']:.3f} ms, {single['per_s']:.0f} decisions/s"})  # fmt: skip
    rows.append({"metric": "scheduler decision, 16-rank gang, 1,000 nodes: p99", "value": gang["p99_ms"],
                 "unit": "ms", "target": "< 5", "ok": gang["p99_ms"] < 5,
                 "note": f"p50 {gang['p50_ms']:.3f} ms, {gang['per_s']:.0f} decisions/s"})  # fmt: skip
    e2e = asyncio.run(end_to_end(home, n, 1, 1))
    rows.append({"metric": "scheduler placements end to end, 1-slot runs", "value": e2e["per_s"], "unit": "runs/s",
                 "target": ">= 5000", "ok": e2e["per_s"] >= 5000,
                 "note": f"{e2e['runs']} queued at once; queued->assigned p50 {e2e['p50_ms']:.0f} ms, "
                         f"p99 {e2e['p99_ms']:.0f} ms"})  # fmt: skip
    e2e_gang = asyncio.run(end_to_end(home, gangs, 4, 4))
    rows.append({"metric": "scheduler placements end to end, 16-rank gangs", "value": e2e_gang["per_s"],
                 "unit": "gangs/s", "target": ">= 2000", "ok": e2e_gang["per_s"] >= 2000,
                 "note": f"{e2e_gang['runs']} queued at once; "
                         f"p99 queued->assigned {e2e_gang['p99_ms']:.0f} ms"})  # fmt: skip
    return rows
