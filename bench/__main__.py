"""`make bench`: start a local cluster, measure, print a table, write bench/results.json and docs/benchmarks.md.

Quick by default; BENCH=full for more samples. Figures never fail the command: only an inability to run does.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from bench import (
    cluster_costs,
    decisions,
    environments,
    latency,
    mpi_latency,
    portal,
    ray,
    scheduler,
    soak,
    sweeps,
    transfer,
)
from bench.peers import slurm
from cadre import Workspace, _local

ROOT = Path(__file__).resolve().parent.parent


def machine() -> dict[str, object]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version(), "os": platform.platform()}


def add_ray(rows: list[dict[str, object]], quick: bool) -> None:
    """Ray Jobs, measured in the same invocation: the peer's figure and the ratio go next to cadre's."""
    peer = ray.measure(30 if quick else 100, 1_000_000)
    pairs = {  # row -> the peer's figure, which way is better, and how far ahead cadre must be (issue #16)
        "submit -> first log line, p50": ("first_p50_ms", "lower", 1.0),
        "submit -> Completed, p50": ("done_p50_ms", "lower", 1.0),
        "log lines end to end (1,000,000 lines)": ("flood_lines_per_s", "higher", 3.0),
    }
    for row in rows:
        if row["metric"] not in pairs:
            continue
        key, better, ahead = pairs[str(row["metric"])]
        if isinstance(peer, str):
            row["peer"] = f"Ray Jobs: not measured ({peer})"
            continue
        value, theirs = float(row["value"]), float(peer[key])  # type: ignore[arg-type]
        row["peer"] = f"Ray Jobs 2.x {theirs:,.1f}"
        row["peer_value"] = theirs
        row["ratio"] = theirs / value if better == "lower" else value / theirs  # > 1: cadre is ahead
        if ahead > 1.0:
            row["ok"] = bool(row["ok"]) and row["ratio"] >= ahead


def add_slurm(rows: list[dict[str, object]], quick: bool) -> None:
    """Slurm (Debian's slurm-wlm on loopback, tuned: batch_sched_delay=0), measured in the same invocation: how
    long a batch job takes to start, and a 4-rank MPI job's wall under srun, next to cadre's."""
    figures = slurm.measure(quick)
    by = {str(r["metric"]): r for r in rows}
    first = by.get("submit -> first log line, p50")
    mpi = by.get("4-rank MPI allreduce (2 agents x 2) submit -> Completed vs mpiexec -n 4")
    version = ".".join(str(figures.get("slurm_version") or "22.05").split(".")[:2])
    samples = figures.get("samples") or {}
    assert isinstance(samples, dict)
    pairs = [
        ("submit -> job started, p50, vs Slurm sbatch", first and first["value"], "sbatch_start_p50_s",
         f"Slurm {version} sbatch -> the job's first action",
         f"cadre: submit -> the job's first log line at the client (the run started, printed, and the line came "
         f"back); Slurm: {samples.get('sbatch', '?')} jobs, p99 {{p99}}, time before sbatch vs a timestamp the job "
         "writes, submissions spread over slurmctld's 1 s scheduling tick"),
        ("4-rank MPI job wall (submit -> Completed), p50, vs Slurm srun", mpi and mpi.get("cadre_s", 0) * 1e3,
         "srun_mpi_wall_p50_s", f"Slurm {version} srun -n 4 --mpi=pmi2",
         f"the same examples/mpi-allreduce/train.py; Slurm {samples.get('srun_mpi', '?')} runs, --overcommit onto "
         f"{figures.get('cpus', '?')} CPUs; srun -n1 true p50 {{srun_true}}"),
    ]  # fmt: skip
    for metric, ours, key, peer, note in pairs:
        theirs = figures.get(key)
        p99, srun_true = figures.get("sbatch_start_p99_s"), figures.get("srun_true_p50_s")
        note = note.format(p99=f"{p99 * 1e3:.0f} ms" if isinstance(p99, float) else "?",
                           srun_true=f"{srun_true * 1e3:.0f} ms" if isinstance(srun_true, float) else "?")  # fmt: skip
        row: dict[str, object] = {"metric": metric, "value": ours, "unit": "ms", "target": "ahead of Slurm",
                                  "ok": None, "note": note}  # fmt: skip
        if not isinstance(theirs, (int, float)) or not isinstance(ours, (int, float)) or not ours:
            row["peer"] = f"Slurm: not measured ({figures.get('error') or 'no figure'})"
        else:
            row.update(peer=f"{peer} {theirs * 1e3:,.1f}", peer_value=theirs * 1e3, ratio=theirs * 1e3 / ours)
            row["ok"] = theirs * 1e3 > ours
        rows.append(row)


def fmt(v: object) -> str:
    return f"{v:,.2f}" if isinstance(v, float) else str(v)


def main() -> int:
    quick = os.environ.get("BENCH", "quick") != "full"
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="cadre-bench-") as tmp:
        home = Path(tmp)
        _local.up(home=home, agents=2, timeout=120)
        try:
            with Workspace.from_config(home / "profile.json") as ws:
                rows += latency.run(ws, 30 if quick else 100)
                rows += environments.run(ws, 10 if quick else 30)
                rows += transfer.run(ws, home, quick)
                rows += cluster_costs.mpi_overhead(ws, 5 if quick else 20)
                rows += mpi_latency.run(ws, quick)
                rows += sweeps.run(ws, quick)
                rows += portal.run(ws, home, quick)
                rows += soak.run(ws, home, 2000)  # last: its 2,000 stored runs would weigh on the rows after it
            rows += scheduler.run(home, quick)
        finally:
            _local.down(home=home)
    rows += cluster_costs.idle_cost(30)  # 100 Hz ticks: a shorter window is too coarse for a 1% target
    rows += transfer.flood_ranks()
    rows += decisions.run(quick)
    add_ray(rows, quick)
    add_slurm(rows, quick)
    info = machine()
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    width = max(len(str(r["metric"])) for r in rows)
    print(f"\ncadre bench ({'quick' if quick else 'full'}) on {info['cpus']} x {info['cpu_model']}, {stamp}")
    for r in rows:
        verdict = "" if r["ok"] is None else ("pass" if r["ok"] else "FAIL")
        peer = f" | {r['peer']} ({r['ratio']:.1f}x cadre ahead)" if r.get("ratio") else (
            f" | {r['peer']}" if r.get("peer") else "")  # fmt: skip
        print(f"{r['metric']:<{width}}  {fmt(r['value']):>10} {r['unit']:<7} {verdict:<4}  {r['note']}{peer}")
    out = ROOT / "bench" / "results.json"
    out.write_text(json.dumps({"machine": info, "at": stamp, "mode": "quick" if quick else "full", "rows": rows},
                              indent=2) + "\n")  # fmt: skip
    lines = [
        "# Benchmarks",
        "",
        f"Latest `make bench` ({'quick' if quick else 'full'} mode), {stamp}, on {info['cpus']} x {info['cpu_model']}"
        f" (Python {info['python']}). Reproduce with `make bench` (`BENCH=full make bench` for more samples).",
        "",
        "| metric | cadre | unit | target | verdict | peer, same run | cadre ahead by | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        verdict = "" if r["ok"] is None else ("pass" if r["ok"] else "below target")
        ratio = f"{r['ratio']:.1f}x" if r.get("ratio") else ""
        cells = [r["metric"], fmt(r["value"]), r["unit"], r["target"] or "", verdict, r.get("peer", ""), ratio,
                 r["note"]]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += [
        "",
        "Scheduler decision time and memory against node count (`python -m bench.decisions`; the same run):",
        "",
        f"![decision time and scheduler memory by node count]({decisions.PLOT.name})",
    ]
    (ROOT / "docs" / "benchmarks.md").write_text("\n".join(lines) + "\n")
    print(f"\nwrote {out.relative_to(ROOT)} and docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
