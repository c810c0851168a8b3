"""Scheduler decision time and memory against node count (100 to 10,000 nodes).

Decisions are timed in-process with the scheduler's own code, as bench/scheduler.py does: ``place`` and then the
pass's ``Pool.take`` over NodeState objects made from decoded adverts (8 slots, 8 GPUs each), the nodes filling
as it goes and reset at half full, so every decision finds room.
A whole ``schedule_pass`` for one arriving run is timed too (the real SchedulerService method, its bus writes
stubbed out): it builds the node table and the index first, which is what a lone run submitted to an idle or busy
cluster waits for.

Memory: the real scheduler process's RSS with that many nodes advertised into the ``cadre_nodes`` KV (a cluster of
its own with no agents; one advert per node with an hour-long heartbeat, so heartbeats cost nothing), and, in
process, what the scheduler keeps per node (its advert tables) and what one pass's node table costs, by tracemalloc.

Writes docs/scale-decisions.svg. ``python -m bench.decisions [full]`` prints the figures.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import sys
import tempfile
import time
import tracemalloc
from collections import OrderedDict
from pathlib import Path

from bench.cluster_costs import _ticks_and_rss
from bench.latency import pct
from bench.scheduler import SLOTS, SNAP, advert
from cadre import _local
from services.scheduler.placement import NodeState, Pool, place
from services.scheduler.service import SchedulerService
from shared import bus, schemas, subjects
from shared.settings import BusSettings

ROOT = Path(__file__).resolve().parent.parent
PLOT = ROOT / "docs" / "scale-decisions.svg"
SIZES = (100, 300, 1000, 3000, 10000)
TARGET_MS = 1.0
SHAPES = {"1-slot": (1, 1), "16-rank gang": (4, 4)}  # (node_count, process_count_per_node)
TARGET = "bench"  # compute target of the simulated nodes (bench.scheduler.advert's default)
# A pass builds one index of its target's nodes (Pool) and decides every queued run against it.


def _adverts(n: int, prefix: str = "sim", target: str = TARGET) -> list[schemas.NodeAdvert]:
    # Decoded from their JSON, as the scheduler's node watch gets them: the same objects, the same sizes.
    now = time.time()
    return [schemas.node_decoder.decode(schemas.encode(advert(i, now, prefix, target))) for i in range(n)]


def _spec(shape: str) -> schemas.RunSpec:
    nodes, ppn = SHAPES[shape]
    return schemas.RunSpec(experiment="b", entry_script="t.py", compute_target=TARGET, node_count=nodes,
                           process_count_per_node=ppn, snapshot=SNAP)  # fmt: skip


class _GcWatch:
    """Counts the collector's runs by generation, so a slow decision can be told apart from a slow placement."""

    def __init__(self) -> None:
        self.runs = [0, 0, 0]

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.runs[info["generation"]] += 1

    def __enter__(self) -> _GcWatch:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *_: object) -> None:
        gc.callbacks.remove(self)


def decision_times(n: int, shape: str, samples: int) -> dict[str, float]:
    """One decision as schedule_pass makes it for each queued run (place, then the pass takes the slots), against
    n nodes; the index a pass builds once is not timed here (pass_times has it). The collector runs as it would."""
    ads = _adverts(n)
    spec = _spec(shape)
    want = spec.node_count * spec.process_count_per_node
    times: list[float] = []
    clean: list[float] = []  # the decisions no full (generation 2) collection ran in
    with _GcWatch() as watch:
        while len(times) < samples:
            table = {a.node_id: NodeState(a) for a in ads}
            nodes = Pool(list(table.values()))
            for _ in range(min(samples - len(times), n * SLOTS // 2 // want)):  # reset at half full
                full = watch.runs[2]
                t0 = time.perf_counter()
                decision = place(spec, nodes, ads)
                assert decision.placement is not None, decision
                nodes.take(decision.placement)
                dt = time.perf_counter() - t0
                times.append(dt)
                if watch.runs[2] == full:
                    clean.append(dt)
    return {"p50_ms": pct(times, 50) * 1e3, "p99_ms": pct(times, 99) * 1e3, "max_ms": max(times) * 1e3,
            "p99_no_full_gc_ms": pct(clean, 99) * 1e3 if clean else math.nan, "full_gcs": watch.runs[2],
            "samples": len(times)}  # fmt: skip


def _service(ads: list[schemas.NodeAdvert]) -> SchedulerService:
    """A SchedulerService with these nodes live, as its node watch leaves it; no bus connection is made."""
    svc = SchedulerService(BusSettings(url="nats://127.0.0.1:1"))
    now = time.time()
    for a in ads:
        svc.known[a.node_id] = a
        svc.nodes[a.node_id] = a
        svc.heard_at[a.node_id] = now
    return svc


def _half_full(svc: SchedulerService, ads: list[schemas.NodeAdvert]) -> None:
    """Half of every node's slots held by 16-rank gangs (4 nodes x 4 ranks): a busy cluster's allocations."""
    for g in range(len(ads) // 4):
        group = ads[4 * g : 4 * g + 4]
        svc.allocations[f"busy_{g}"] = [
            schemas.RankSlot(rank=4 * j + r, node_id=a.node_id, local_rank=r, gpu_ids=[r], host=a.address)
            for j, a in enumerate(group)
            for r in range(4)
        ]


def pass_times(n: int, busy: bool, samples: int) -> dict[str, float]:
    """schedule_pass with one queued 1-slot run: the node table rebuilt, the target's nodes filtered, the decision."""
    ads = _adverts(n)
    svc = _service(ads)
    if busy:
        _half_full(svc, ads)

    async def assigned(placed: list[tuple[schemas.RunRecord, list[schemas.RankSlot]]]) -> None:
        return None  # the bus write is not what is timed

    svc._assign = assigned  # type: ignore[method-assign]
    spec = _spec("1-slot")
    loop = asyncio.new_event_loop()
    times: list[float] = []
    clean: list[float] = []
    try:
        with _GcWatch() as watch:
            for i in range(samples):
                run_id = f"pass_{i}"
                queue = svc.queues.setdefault(TARGET, OrderedDict())
                queue[run_id] = schemas.RunRecord(run_id=run_id, spec=spec, submitted_at=0.0)
                full = watch.runs[2]
                t0 = time.perf_counter()
                loop.run_until_complete(svc.schedule_pass())
                dt = time.perf_counter() - t0
                times.append(dt)
                if watch.runs[2] == full:
                    clean.append(dt)
                assert run_id in svc.allocations
                svc.allocations.pop(run_id)  # the run ends (pop: the scheduler's own way, which keeps its counts)
    finally:
        loop.close()
    return {"p50_ms": pct(times, 50) * 1e3, "p99_ms": pct(times, 99) * 1e3, "full_gcs": watch.runs[2],
            "p99_no_full_gc_ms": pct(clean, 99) * 1e3 if clean else math.nan}  # fmt: skip


def table_memory(n: int) -> dict[str, float]:
    """Bytes the scheduler keeps for n nodes between passes (its advert tables as the watch fills them, and what a
    pass leaves behind), and the peak one pass's node table and index add on top."""
    payloads = [schemas.encode(a) for a in _adverts(n)]
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        svc = _service([schemas.node_decoder.decode(p) for p in payloads])
        svc._node_table(time.time())  # the first pass: NodeStates the scheduler may keep from then on
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.reset_peak()
        table = svc._node_table(time.time())
        nodes = list(table.values())
        index = Pool(nodes)
        per_pass = tracemalloc.get_traced_memory()[1] - base - kept
        del index, nodes, table, svc
    finally:
        tracemalloc.stop()
    return {"kept_mib": kept / 2**20, "pass_table_mib": per_pass / 2**20}


async def _fill(home: Path, sizes: tuple[int, ...]) -> dict[int, dict[str, float]]:
    """Advertise nodes in steps up to each size; once the scheduler has taken every one in, read its RSS."""
    env = json.loads((home / "cluster" / "process-env.json").read_text())["submitter"]
    settings = BusSettings(url=env["CADRE_NATS_URL"], user="submitter", password=env["CADRE_NATS_PASSWORD"])
    pid = next(p["pid"] for p in json.loads((home / "cluster" / "state.json").read_text())["processes"]
               if p["name"] == "scheduler")  # fmt: skip
    nc = await bus.connect(settings)
    js = nc.jetstream()
    kv = await js.key_value(subjects.NODES_BUCKET)
    out: dict[int, dict[str, float]] = {0: {"rss_mib": _ticks_and_rss(pid)[1] / 2**20, "ingest_s": 0.0}}
    joined0 = (await js.stream_info(subjects.NODES_STREAM)).state.messages
    have = 0
    now = time.time()
    for n in sizes:
        t0 = time.monotonic()
        batch = [advert(i, now, prefix="dec", target="decisions") for i in range(have, n)]
        for k in range(0, len(batch), 512):
            await asyncio.gather(*(kv.put(a.node_id, schemas.encode(a)) for a in batch[k : k + 512]))
        have = n
        # The scheduler records each join as a node event once it has the node: counting them costs it nothing.
        deadline = time.monotonic() + 300
        while (await js.stream_info(subjects.NODES_STREAM)).state.messages - joined0 < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the scheduler took in fewer than {n} nodes in 300 s")
            await asyncio.sleep(0.2)
        ingest = time.monotonic() - t0
        await asyncio.sleep(1.0)  # past the last join's log line and node event
        rss = _ticks_and_rss(pid)[1] / 2**20
        t1 = time.monotonic()
        state = await bus.scheduler_state(nc, timeout=30)
        seen = sum(1 for s in state.nodes if s.advert.compute_target == "decisions")
        out[n] = {"rss_mib": rss, "ingest_s": ingest, "state_ms": (time.monotonic() - t1) * 1e3, "seen": seen}
    await nc.close()
    return out


def scheduler_rss(sizes: tuple[int, ...] = SIZES) -> dict[int, dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="cadre-decisions-") as tmp:
        home = Path(tmp)
        _local.up(home=home, agents=0, timeout=120)
        try:
            return asyncio.run(_fill(home, sizes))
        finally:
            _local.down(home=home)


# --- the plot -------------------------------------------------------------------------------------------------
def _panel(x0: float, w: float, h: float, xs: list[float], series: list[tuple[str, str, bool, list[float]]],
           ylabel: str, ylog: bool, hline: tuple[float, str] | None = None) -> list[str]:  # fmt: skip
    """One chart at x offset x0: log x axis over xs; series are (label, color, dashed, values)."""
    pad_l, pad_r, pad_t, pad_b = 52, 26, 28, 46
    values = [v for *_, vs in series for v in vs if v > 0 and math.isfinite(v)] + ([hline[0]] if hline else [])
    if ylog:
        # Headroom above the top value (and the target line) for the legend.
        lo, hi = 10 ** math.floor(math.log10(min(values))), 10 ** math.ceil(math.log10(max(values) * 1.5))
        ticks = [10**e for e in range(round(math.log10(lo)), round(math.log10(hi)) + 1)]
        frac = lambda v: (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))  # noqa: E731
    else:
        lo, step = 0.0, 10 ** math.floor(math.log10(max(values) / 2))
        hi = math.ceil(max(values) * 1.3 / step) * step
        ticks = [lo + step * k for k in range(int(hi / step) + 1)]
        if len(ticks) > 8:
            ticks = ticks[:: math.ceil(len(ticks) / 6)]
        frac = lambda v: (v - lo) / (hi - lo)  # noqa: E731
    xlo, xhi = math.log10(min(xs)), math.log10(max(xs))

    def xy(x: float, v: float) -> tuple[float, float]:
        px = x0 + pad_l + (math.log10(x) - xlo) / (xhi - xlo) * (w - pad_l - pad_r)
        return px, h - pad_b - frac(max(v, lo)) * (h - pad_b - pad_t)

    left, right, bottom = x0 + pad_l, x0 + w - pad_r, h - pad_b
    parts = [
        f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#999"/>',
        f'<line x1="{left}" y1="{pad_t}" x2="{left}" y2="{bottom}" stroke="#999"/>',
        f'<text x="{(left + right) / 2}" y="{h - 10}" text-anchor="middle">nodes (log scale)</text>',
        f'<text x="{x0 + 14}" y="{(pad_t + bottom) / 2}" transform="rotate(-90 {x0 + 14} {(pad_t + bottom) / 2})" '
        f'text-anchor="middle">{ylabel}</text>',
    ]
    for x in xs:
        px, _ = xy(x, lo)
        parts.append(f'<text x="{px:.1f}" y="{bottom + 14}" text-anchor="middle">{x:,.0f}</text>')
    for t in ticks:
        _, py = xy(xs[0], t)
        parts.append(f'<line x1="{left}" y1="{py:.1f}" x2="{right}" y2="{py:.1f}" stroke="#eee"/>'
                     f'<text x="{left - 4}" y="{py + 4:.1f}" text-anchor="end">{t:g}</text>')  # fmt: skip
    if hline:
        _, py = xy(xs[0], hline[0])
        parts.append(f'<line x1="{left}" y1="{py:.1f}" x2="{right}" y2="{py:.1f}" stroke="#c00" '
                     f'stroke-dasharray="2,3"/>')  # fmt: skip
        parts.append(f'<text x="{left + 4}" y="{py - 4:.1f}" fill="#c00">{hline[1]}</text>')
    for k, (label, color, dashed, vs) in enumerate(series):
        pts = [xy(x, v) for x, v in zip(xs, vs, strict=True) if math.isfinite(v) and v > 0]
        dash = ' stroke-dasharray="5,3"' if dashed else ""
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="'
                     + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')  # fmt: skip
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}"/>' for x, y in pts]
        ly = pad_t + 4 + 13 * k
        parts.append(f'<line x1="{left + 8}" y1="{ly - 4}" x2="{left + 28}" y2="{ly - 4}" stroke="{color}" '
                     f'stroke-width="2"{dash}/>')  # fmt: skip
        parts.append(f'<text x="{left + 32}" y="{ly}" fill="{color}">{label}</text>')
    return parts


def _svg(rows: list[dict[str, float]]) -> str:
    w, h = 880, 320
    xs = [r["nodes"] for r in rows]
    timing = [
        ("1-slot p99", "#2457c5", False, [r["1-slot_p99_ms"] for r in rows]),
        ("1-slot p50", "#2457c5", True, [r["1-slot_p50_ms"] for r in rows]),
        ("16-rank gang p99", "#d0542c", False, [r["16-rank gang_p99_ms"] for r in rows]),
        ("16-rank gang p50", "#d0542c", True, [r["16-rank gang_p50_ms"] for r in rows]),
        # What a lone arriving run waits for: the whole pass, node table and index rebuilt, then its decision.
        ("whole pass for 1 arriving run, p99", "#777", False, [r["pass_busy_p99_ms"] for r in rows]),
        ("whole pass for 1 arriving run, p50", "#777", True, [r["pass_busy_p50_ms"] for r in rows]),
    ]
    memory = [
        ("scheduler process RSS", "#2a8a3a", False, [r.get("rss_mib", math.nan) for r in rows]),
        ("node state kept (tracemalloc)", "#7a4fb0", False, [r["kept_mib"] for r in rows]),
        ("one pass's node table + index, peak (tracemalloc)", "#7a4fb0", True, [r["pass_table_mib"] for r in rows]),
    ]
    if not any(math.isfinite(v) for v in memory[0][3]):
        memory = memory[1:]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">',
        '<rect width="100%" height="100%" fill="white"/>',
        '<text x="10" y="14" font-weight="bold">scheduler decision time (place + take, in process)</text>',
        f'<text x="{w / 2 + 10}" y="14" font-weight="bold">scheduler memory</text>',
    ]
    parts += _panel(0, w / 2, h, xs, timing, "ms per decision (log scale)", True, (TARGET_MS, "target 1 ms"))
    parts += _panel(w / 2, w / 2, h, xs, memory, "MiB", False)
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


# --- rows -----------------------------------------------------------------------------------------------------
def measure(quick: bool, process: bool = True) -> list[dict[str, float]]:
    samples = {"1-slot": 1000 if quick else 5000, "16-rank gang": 300 if quick else 1000}
    passes = 100 if quick else 300
    rss = scheduler_rss() if process else {}
    base = rss.get(0, {}).get("rss_mib", math.nan)
    rows: list[dict[str, float]] = []
    for n in SIZES:
        row: dict[str, float] = {"nodes": n}
        for shape, k in samples.items():
            for key, v in decision_times(n, shape, k).items():
                row[f"{shape}_{key}"] = v
        for busy in (False, True):
            for key, v in pass_times(n, busy, passes).items():
                row[f"pass_{'busy' if busy else 'idle'}_{key}"] = v
        row.update(table_memory(n))
        if n in rss:
            row.update(rss[n])
            row["rss_base_mib"] = base
        rows.append(row)
    return rows


def run(quick: bool, process: bool = True) -> list[dict[str, object]]:
    t0 = time.monotonic()
    rows = measure(quick, process)
    PLOT.write_text(_svg(rows))
    top = rows[-1]
    n = f"{top['nodes']:,.0f}"
    out: list[dict[str, object]] = []
    for shape in SHAPES:
        p99 = top[f"{shape}_p99_ms"]
        trend = ", ".join(f"{r['nodes']:,.0f}: {r[f'{shape}_p99_ms']:.3f}" for r in rows)
        out.append({"metric": f"scheduler decision, {shape} run, {n} nodes: p99", "value": p99, "unit": "ms",
                    "target": f"< {TARGET_MS:g}", "ok": p99 < TARGET_MS,
                    "note": f"p50 {top[f'{shape}_p50_ms']:.3f} ms, max {top[f'{shape}_max_ms']:.2f} ms over "
                            f"{top[f'{shape}_samples']:.0f} decisions ({top[f'{shape}_full_gcs']:.0f} with a full GC; "
                            f"p99 of the others {top[f'{shape}_p99_no_full_gc_ms']:.3f} ms); "
                            f"p99 by nodes {trend} ms"})  # fmt: skip
    busy = top["pass_busy_p99_ms"]
    out.append({"metric": f"scheduler pass for one arriving 1-slot run, {n} nodes: p99", "value": busy, "unit": "ms",
                "target": None, "ok": None,
                "note": f"wake -> decided: the whole schedule_pass, half the slots held by 16-rank gangs; p50 "
                        f"{top['pass_busy_p50_ms']:.2f} ms, p99 {top['pass_busy_p99_no_full_gc_ms']:.2f} ms leaving "
                        f"out the {top['pass_busy_full_gcs']:.0f} passes with a full GC; idle cluster p50 "
                        f"{top['pass_idle_p50_ms']:.2f}, p99 {top['pass_idle_p99_ms']:.2f} ms. The node table and its "
                        f"index are rebuilt every pass; the 1 ms target above is the decision alone"})  # fmt: skip
    mem = ", ".join(f"{r['nodes']:,.0f}: {r['rss_mib']:.0f}" for r in rows if "rss_mib" in r)
    inproc = (f"in process (tracemalloc): {top['kept_mib']:.1f} MiB kept for the nodes, peak "
              f"{top['pass_table_mib']:.1f} MiB more per pass")  # fmt: skip
    took = f"plot: docs/{PLOT.name} ({time.monotonic() - t0:.0f} s to measure)"
    if "rss_mib" in top:
        out.append({"metric": f"scheduler process RSS with {n} nodes", "value": top["rss_mib"], "unit": "MiB",
                    "target": None, "ok": None,
                    "note": f"MiB by nodes {mem} (none: {top['rss_base_mib']:.0f}); it took {top['ingest_s']:.0f} s "
                            f"to take in nodes {rows[-2]['nodes']:,.0f} to {n}; {inproc}; {took}"})  # fmt: skip
    else:
        out.append({"metric": f"scheduler node state with {n} nodes (tracemalloc)", "value": top["kept_mib"],
                    "unit": "MiB", "target": None, "ok": None,
                    "note": f"process not measured; {inproc}; {took}"})  # fmt: skip
    return out


def main() -> int:
    quick = not (len(sys.argv) > 1 and sys.argv[1] == "full")
    t0 = time.monotonic()
    rows = measure(quick)
    PLOT.write_text(_svg(rows))
    keys = list(rows[-1])
    print(" ".join(f"{k:>12.12}" for k in keys))
    for r in rows:
        print(" ".join(f"{r.get(k, math.nan):>12.3f}" for k in keys))
    print(f"wrote {PLOT.relative_to(ROOT)} in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
