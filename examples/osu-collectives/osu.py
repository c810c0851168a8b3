"""Latency of MPI collectives, in the manner of the OSU micro-benchmarks (osu_barrier, osu_allgather).

For Barrier and for Allgather at a few message sizes (bytes contributed per rank), each rank runs ``skip`` warm-up
operations, then ``iters`` timed ones, and takes its average latency per operation in microseconds. The figure
reported is the average of that over ranks, as OSU reports by default (the minimum and maximum over ranks go in
the JSON as well). Runs under cadre (``distributed_training=MpiConfiguration()``) and under a plain mpiexec.

Rank 0 writes ``outputs/osu.json`` and prints one line per measurement, ``osu <op> <bytes> <avg_us>``, e.g.
``osu allgather 1024 12.3`` (Barrier's size is 0), so a log reader can parse the figures.

Options: ``--quick`` (or OSU_QUICK=1) for fewer iterations; ``--sizes 8,1024`` to pick Allgather's sizes;
``--iters N`` / ``--skip N`` to set the counts for every size.
"""

import argparse
import json
import os
from collections.abc import Callable

import numpy as np
from mpi4py import MPI

SIZES = (8, 1024, 65536)
LARGE = 8192  # OSU's threshold: above it, fewer iterations (each one costs more)
# (skip, iters): OSU's defaults, and a quick mode for a short benchmark.
COUNTS = {"small": (200, 1000), "large": (10, 100)}
QUICK = {"small": (50, 300), "large": (5, 50)}

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", default=os.environ.get("OSU_QUICK", "") not in ("", "0"))
    p.add_argument("--sizes", default=",".join(str(s) for s in SIZES), help="Allgather bytes per rank, comma list")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--skip", type=int, default=None)
    return p.parse_args()


def counts(args: argparse.Namespace, nbytes: int) -> tuple[int, int]:
    skip, iters = (QUICK if args.quick else COUNTS)["large" if nbytes > LARGE else "small"]
    return (skip if args.skip is None else args.skip), (iters if args.iters is None else args.iters)


def timed(op: Callable[[], object], skip: int, iters: int) -> dict[str, float]:
    """Per-rank average latency of ``op`` in microseconds, then avg/min/max over ranks (the same on every rank)."""
    for _ in range(skip):
        op()
    comm.Barrier()  # start the timed loop together, as OSU does
    t0 = MPI.Wtime()
    for _ in range(iters):
        op()
    mine = (MPI.Wtime() - t0) / iters * 1e6
    every = comm.allgather(mine)
    return {"avg_us": sum(every) / size, "min_us": min(every), "max_us": max(every), "skip": skip, "iters": iters}


def main() -> None:
    args = parse()
    results = []
    skip, iters = counts(args, 0)
    results.append({"op": "barrier", "bytes": 0, **timed(comm.Barrier, skip, iters)})
    for nbytes in (int(s) for s in args.sizes.split(",") if s):
        send = np.full(nbytes, rank % 251, dtype=np.uint8)
        recv = np.empty(nbytes * size, dtype=np.uint8)
        skip, iters = counts(args, nbytes)
        figures = timed(lambda s=send, r=recv: comm.Allgather(s, r), skip, iters)
        # A benchmark of wrong results measures nothing: every rank's block must have arrived.
        assert np.array_equal(recv.reshape(size, nbytes)[:, 0], np.arange(size) % 251), "Allgather gave wrong data"
        results.append({"op": "allgather", "bytes": nbytes, **figures})
    if rank == 0:
        os.makedirs("outputs", exist_ok=True)
        report = {"world_size": size, "library": MPI.Get_library_version().splitlines()[0].strip(),
                  "statistic": "avg over ranks of each rank's mean latency per op", "results": results}  # fmt: skip
        with open("outputs/osu.json", "w") as fh:
            json.dump(report, fh, indent=2)
        for r in results:
            print(f"osu {r['op']} {r['bytes']} {r['avg_us']:.2f}", flush=True)


if __name__ == "__main__":
    main()
