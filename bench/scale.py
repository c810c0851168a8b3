"""What a fleet's heartbeats cost the bus and the scheduler: N simulated nodes, each putting its advert into the
``cadre_nodes`` KV every heartbeat interval (as an agent does), measured at several N on a real nats-server and
scheduler. Writes docs/scale-heartbeats.svg; docs/scale.md reads the figures.

``python -m bench.scale`` (about a minute) prints the table and writes the plot.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from bench.cluster_costs import _ticks_and_rss
from bench.scheduler import advert
from cadre import _local
from shared import bus, schemas, subjects
from shared.settings import BusSettings

ROOT = Path(__file__).resolve().parent.parent
INTERVAL = 2.0  # the agents' default heartbeat
SIZES = (1000, 2500, 5000, 10000)


async def _measure(home: Path, n: int, seconds: float) -> dict[str, float]:
    env = json.loads((home / "cluster" / "process-env.json").read_text())["submitter"]
    settings = BusSettings(url=env["CADRE_NATS_URL"], user="submitter", password=env["CADRE_NATS_PASSWORD"])
    nc = await bus.connect(settings)
    js = nc.jetstream()
    kv = await js.key_value(subjects.NODES_BUCKET)
    procs = json.loads((home / "cluster" / "state.json").read_text())["processes"]
    pids = {p["name"]: p["pid"] for p in procs if p["name"] in ("nats-server", "scheduler")}
    tag = f"s{n}"
    base = [advert(i, time.time(), prefix=tag, target=f"scale-{tag}") for i in range(n)]
    stop = asyncio.Event()
    sent = 0

    async def stream() -> None:
        nonlocal sent
        per_tick = max(1, n // 100)  # 100 ticks per interval
        i = 0
        while not stop.is_set():
            t0 = time.monotonic()
            batch = []
            for _ in range(per_tick):
                a = base[i % n]
                i += 1
                beat = msgspec.structs.replace(a, heartbeat_at=time.time(), heartbeat_interval=INTERVAL)
                batch.append(kv.put(a.node_id, schemas.encode(beat)))
            await asyncio.gather(*batch)
            sent += len(batch)
            await asyncio.sleep(max(0.0, INTERVAL / 100 - (time.monotonic() - t0)))

    writer = asyncio.create_task(stream())
    await asyncio.sleep(INTERVAL * 2)  # every node has beaten, the scheduler knows them all
    before = {name: _ticks_and_rss(pid) for name, pid in pids.items()}
    sent_before, t0 = sent, time.monotonic()
    await asyncio.sleep(seconds)
    elapsed = time.monotonic() - t0
    after = {name: _ticks_and_rss(pid) for name, pid in pids.items()}
    rate = (sent - sent_before) / elapsed
    read_at = time.monotonic()
    try:  # the whole fleet's state, page by page (one reply for 1,000+ nodes would pass NATS' 1 MB)
        state = await bus.scheduler_state(nc)
        ready = sum(1 for s in state.nodes if s.advert.compute_target == f"scale-{tag}" and s.state == "Ready")
    except Exception as exc:
        print(f"{n} nodes: scheduler state: {exc}", file=sys.stderr)
        ready = -1
    state_ms = (time.monotonic() - read_at) * 1000
    stop.set()
    await writer
    info = await js.stream_info(f"KV_{subjects.NODES_BUCKET}")
    for a in base:
        await kv.purge(a.node_id)
    await nc.close()
    tck = os.sysconf("SC_CLK_TCK")
    cpu = {name: (after[name][0] - before[name][0]) / tck / elapsed * 100 for name in pids}
    return {
        "nodes": n,
        "beats_per_s": rate,
        "nats_cpu": cpu["nats-server"],
        "scheduler_cpu": cpu["scheduler"],
        "scheduler_rss_mib": after["scheduler"][1] / 2**20,
        "nats_rss_mib": after["nats-server"][1] / 2**20,
        "ready": ready,
        "state_ms": state_ms,
        "kv_bytes": info.state.bytes,
    }


def _svg(rows: list[dict[str, float]]) -> str:
    w, h, pad = 560, 300, 50
    top = max(max(r["nats_cpu"], r["scheduler_cpu"]) for r in rows) * 1.15 or 1
    xmax = max(r["nodes"] for r in rows)

    def xy(n: float, v: float) -> tuple[float, float]:
        return pad + n / xmax * (w - pad - 20), h - pad - v / top * (h - pad - 20)

    xlabel = f"simulated nodes (heartbeat every {INTERVAL:g} s)"
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - 20}" y2="{h - pad}" stroke="#999"/>',
        f'<line x1="{pad}" y1="20" x2="{pad}" y2="{h - pad}" stroke="#999"/>',
        f'<text x="{w / 2}" y="{h - 12}" text-anchor="middle">{xlabel}</text>',
        f'<text x="14" y="{h / 2}" transform="rotate(-90 14 {h / 2})" text-anchor="middle">% of one core</text>',
    ]
    for key, color, label in (("nats_cpu", "#2457c5", "nats-server"), ("scheduler_cpu", "#d0542c", "scheduler")):
        pts = [xy(r["nodes"], r[key]) for r in rows]
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
                     + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')  # fmt: skip
        for (x, y), r in zip(pts, rows, strict=True):
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>'
                         f'<text x="{x + 4:.1f}" y="{y - 5:.1f}" fill="{color}">{r[key]:.1f}</text>')  # fmt: skip
        parts.append(f'<text x="{w - 150}" y="{30 + 14 * (key == "scheduler_cpu")}" fill="{color}">{label}</text>')
    for r in rows:
        x, _ = xy(r["nodes"], 0)
        parts.append(f'<text x="{x:.1f}" y="{h - pad + 14}" text-anchor="middle">{r["nodes"]:,.0f}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main() -> int:
    rows = []
    with tempfile.TemporaryDirectory(prefix="cadre-scale-") as tmp:
        home = Path(tmp)
        _local.up(home=home, agents=0, timeout=120)
        try:
            for n in SIZES:
                rows.append(asyncio.run(_measure(home, n, 8.0)))
                print(rows[-1], file=sys.stderr, flush=True)
        finally:
            _local.down(home=home)
    head = ("nodes", "beats/s", "nats %", "sched %", "sched MiB", "nats MiB", "ready", "state ms", "KV bytes")
    print(" ".join(f"{h:>10}" for h in head))
    for r in rows:
        cells = (
            f"{r['nodes']:,.0f}", f"{r['beats_per_s']:,.0f}", f"{r['nats_cpu']:.1f}", f"{r['scheduler_cpu']:.1f}",
            f"{r['scheduler_rss_mib']:.0f}", f"{r['nats_rss_mib']:.0f}", f"{r['ready']:,.0f}",
            f"{r['state_ms']:,.0f}", f"{r['kv_bytes']:,.0f}",
        )  # fmt: skip
        print(" ".join(f"{c:>10}" for c in cells))
    (ROOT / "docs" / "scale-heartbeats.svg").write_text(_svg(rows))
    (ROOT / "bench" / "scale.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
