"""Soak: does any process's memory grow with the number of runs it has seen?

``runs`` trivial runs go through the public client with a bounded number in flight; every process's RSS is read
from /proc at quiescent checkpoints (all submitted runs ended, then a short settle), after a warm-up of the first
10% and every 500 runs after it. Sampling only when nothing is in flight measures what a process *keeps* per run,
not what it holds while runs are going on.

``python -m bench.soak [runs]`` starts its own local cluster (2 agents) and prints the rows.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.cluster_costs import _ticks_and_rss
from cadre import Estimator, Experiment, Workspace, _local

SCRIPT = "print('soak', flush=True)\n"
CONCURRENCY = 32  # far above the 2 agents' slots: the scheduler's queue is never empty while a batch runs
STEP = 500  # runs between checkpoints after the warm-up
SETTLE = 2.0  # after a batch: late writes (artifact commits, heartbeats, log flushes) land before the sample
INFRA = ("nats-server", "weed")  # the bus and the S3 server: not cadre's code, reported apart
FLAT_MIB = 4.0  # growth allowed over the whole soak: allocator noise and arena fragmentation, not per-run state
FLAT_FRACTION = 0.05  # ... or this share of the warm-up RSS, whichever is larger


def _rss(home: Path) -> dict[str, float]:
    """MiB resident per process, by the names `up` recorded."""
    procs = json.loads((home / "cluster" / "state.json").read_text())["processes"]
    out = {}
    for p in procs:
        try:
            out[p["name"]] = _ticks_and_rss(p["pid"])[1] / 2**20
        except (OSError, StopIteration):  # restarted by the supervisor, or gone: shows as missing, not as flat
            pass
    return out


def checkpoints(runs: int) -> list[int]:
    warm = max(1, runs // 10)
    return sorted({warm, *range(warm + STEP, runs, STEP), runs})


def _flat(growth: float, base: float) -> bool:
    return growth < max(FLAT_MIB, FLAT_FRACTION * base)


def _slope_kib_per_run(xs: list[int], ys: list[float]) -> float:
    """Least-squares slope over the checkpoints: a steady leak shows here even when the end-to-end delta is noisy."""
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den * 1024 if den else 0.0


def run(ws: Workspace, home: Path, runs: int = 2000) -> list[dict[str, object]]:
    marks = checkpoints(runs)
    samples: list[dict[str, float]] = []
    states: dict[str, int] = {}
    busy = 0.0  # seconds spent with runs in flight (the settles are not part of the rate)
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(CONCURRENCY) as pool:
        project = Path(tmp)
        (project / "soak.py").write_text(SCRIPT)
        est = Estimator(source_directory=project, entry_script="soak.py")
        exp = Experiment(ws, "bench-soak")

        def one(_: int) -> str:
            try:
                return str(exp.submit(est).wait_for_completion(raise_on_error=False, timeout=300)["status"])
            except Exception as exc:  # counted, not raised: one lost run must not hide the memory figures
                return f"error: {type(exc).__name__}"

        done = 0
        for mark in marks:
            t0 = time.perf_counter()
            for status in pool.map(one, range(done, mark)):
                states[status] = states.get(status, 0) + 1
            busy += time.perf_counter() - t0
            done = mark
            time.sleep(SETTLE)
            samples.append(_rss(home))
    completed = states.get("Completed", 0)
    others = ", ".join(f"{n} {s}" for s, n in sorted(states.items()) if s != "Completed") or "none other"
    rate = runs / busy
    at = "/".join(str(m) for m in marks)
    rows: list[dict[str, object]] = [
        {"metric": f"soak: {runs:,} trivial runs, {CONCURRENCY} in flight, all Completed", "value": completed,
         "unit": "runs", "target": f"{runs}", "ok": completed == runs,
         "note": f"{rate:.1f} runs/s over {busy:.0f} s (2 agents; checkpoints drain the queue); {others}"},
    ]  # fmt: skip
    names = [n for n in samples[0] if all(n in s for s in samples)]
    target = f"flat: < {FLAT_MIB:g} MiB (or < {FLAT_FRACTION:.0%} of warm-up RSS) over {runs - marks[0]:,} runs"

    def trend(series: list[float]) -> str:
        return " -> ".join(f"{v:.1f}" for v in series) + f" MiB at {at} runs"

    def row(label: str, series: list[float], extra: str = "") -> dict[str, object]:
        growth = series[-1] - series[0]
        slope = _slope_kib_per_run(marks, series)
        return {"metric": f"soak: {label} RSS growth, warm-up -> {runs:,} runs", "value": growth, "unit": "MiB",
                "target": target, "ok": _flat(growth, series[0]),
                "note": f"{trend(series)}; slope {slope:+.2f} KiB/run{extra}"}  # fmt: skip

    agents = [n for n in names if n.startswith("agent-")]
    for name in names:
        if name not in agents and name not in INFRA:
            rows.append(row(name, [s[name] for s in samples]))
    if agents:
        median = [statistics.median(s[a] for a in agents) for s in samples]
        each = "; ".join(f"{a} {samples[0][a]:.1f} -> {samples[-1][a]:.1f}" for a in agents)
        rows.append(row(f"node agents' median ({len(agents)})", median, f"; {each}"))
    infra = [n for n in INFRA if n in names]
    if infra:
        growth = {n: samples[-1][n] - samples[0][n] for n in infra}
        rows.append({"metric": f"soak: infrastructure RSS growth ({', '.join(infra)}), warm-up -> {runs:,} runs",
                     "value": sum(growth.values()), "unit": "MiB", "target": None, "ok": None,
                     "note": "not cadre's code (JetStream and S3 caches grow with stored data); "
                             + "; ".join(f"{n} {trend([s[n] for s in samples])}" for n in infra)})  # fmt: skip
    missing = sorted(set(samples[0]) - set(names))
    if missing:
        rows[0]["note"] = f"{rows[0]['note']}; not sampled throughout (restarted?): {', '.join(missing)}"
    return rows


def main() -> int:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    with tempfile.TemporaryDirectory(prefix="cadre-soak-") as tmp:
        home = Path(tmp)
        _local.up(home=home, agents=2, timeout=120)
        try:
            with Workspace.from_config(home / "profile.json") as ws:
                rows = run(ws, home, runs)
        finally:
            _local.down(home=home)
    for r in rows:
        verdict = "" if r["ok"] is None else ("pass" if r["ok"] else "FAIL")
        value = f"{r['value']:,.2f}" if isinstance(r["value"], float) else str(r["value"])
        print(f"{r['metric']:<62} {value:>8} {r['unit']:<5} {verdict:<4} {r['note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
