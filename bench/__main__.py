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

from bench import cluster_costs, environments, latency, portal, ray, scheduler, sweeps, transfer
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
    pairs = {
        "submit -> first log line, p50": ("first_p50_ms", "lower"),
        "submit -> Completed, p50": ("done_p50_ms", "lower"),
        "log lines end to end (1,000,000 lines)": ("flood_lines_per_s", "higher"),
    }
    for row in rows:
        if row["metric"] not in pairs:
            continue
        key, better = pairs[str(row["metric"])]
        if isinstance(peer, str):
            row["peer"] = f"Ray Jobs: not measured ({peer})"
            continue
        value, theirs = float(row["value"]), float(peer[key])  # type: ignore[arg-type]
        row["peer"] = f"Ray Jobs 2.x {theirs:,.1f}"
        row["peer_value"] = theirs
        row["ratio"] = theirs / value if better == "lower" else value / theirs  # > 1: cadre is ahead


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
                rows += sweeps.run(ws, quick)
                rows += portal.run(ws, home, quick)
            rows += scheduler.run(home, quick)
        finally:
            _local.down(home=home)
    rows += cluster_costs.idle_cost(10 if quick else 30)
    add_ray(rows, quick)
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
    (ROOT / "docs" / "benchmarks.md").write_text("\n".join(lines) + "\n")
    print(f"\nwrote {out.relative_to(ROOT)} and docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
