"""Sweeps: how fast the sweeper decides on a new metric, and whether a sweep's children run at the pace of runs
submitted directly (the sweeper must not be the bottleneck); and how TPE compares with random sampling over the
same number of children, over many seeds (the sampling code the sweeper runs, without the cluster)."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from bench.latency import pct
from cadre import Estimator, Experiment, Workspace
from cadre.hyperdrive import (
    BanditPolicy,
    HyperDriveConfig,
    RandomParameterSampling,
    uniform,
)
from shared import schemas, subjects

JOB = """
import argparse, time
from cadre import Run
p = argparse.ArgumentParser(); p.add_argument("--x", type=float); p.add_argument("--pause", type=float, default=0)
a = p.parse_args()
Run.get_context().log("score", a.x)
time.sleep(a.pause)
"""


def decision_latency(ws: Workspace, project: Path, children: int) -> list[float]:
    """Stored metric -> the sweeper's decision to stop the child: every child after the first with a lower x is
    outside a 1% slack at its first report (children one at a time; one not stopped runs 2 s)."""
    sampling = RandomParameterSampling({"x": uniform(0.0, 1.0)}, properties={"rngseed": 5})
    hd = HyperDriveConfig(run_config=Estimator(project, "job.py", arguments=["--pause", "2"]),
                          hyperparameter_sampling=sampling, primary_metric_name="score", primary_metric_goal="maximize",
                          max_total_runs=children, max_concurrent_runs=1, policy=BanditPolicy(slack_factor=0.01),
                          max_duration_minutes=10)  # fmt: skip
    run = Experiment(ws, "bench-sweep-decision").submit(hd)
    assert run.wait_for_completion(timeout=600)["status"] == "Completed"
    out: list[float] = []
    events = _events(ws, run.id)
    stopped = {e.run_id: e.at for e in events if isinstance(e, schemas.ChildTerminated)}
    for run_id, decided_at in stopped.items():
        stored = ws._loop.call(ws._js.get_last_msg(subjects.METRICS_STREAM, subjects.run_metrics(run_id)))
        assert stored.time is not None
        out.append(decided_at - stored.time.timestamp())
    return out


def _events(ws: Workspace, sweep_id: str) -> list[schemas.SweepEvent]:
    from services.sweeper.driver import read_events

    return ws._loop.call(read_events(ws._js, sweep_id))[0]


def pace(ws: Workspace, project: Path, n: int) -> tuple[float, float]:
    """Seconds for n trivial runs submitted directly, all at once, and for a sweep of n such children."""
    est = Estimator(project, "job.py", arguments=["--x", "0.5"])
    exp = Experiment(ws, "bench-sweep-pace")
    t0 = time.perf_counter()
    submitted = [exp.submit(est) for _ in range(n)]
    for r in submitted:
        r.wait_for_completion()
    direct = time.perf_counter() - t0
    sampling = RandomParameterSampling({"x": uniform(0.0, 1.0)})
    hd = HyperDriveConfig(run_config=Estimator(project, "job.py"), hyperparameter_sampling=sampling,
                          primary_metric_name="score", max_total_runs=n, max_concurrent_runs=n)  # fmt: skip
    t0 = time.perf_counter()
    sweep = Experiment(ws, "bench-sweep-pace").submit(hd)
    assert sweep.wait_for_completion(timeout=1800)["status"] == "Completed"
    return direct, time.perf_counter() - t0


def tpe_vs_random(seeds: int, children: int) -> tuple[int, float, float]:
    """Over ``seeds`` seeds: how often TPE's best beats random's, and the median best of each (a smooth 2-D bowl)."""
    from services.sweeper import sampling

    def best_of(kind: str, seed: int) -> float:
        space = {n: schemas.ParameterExpression(kind="uniform", args=[-1.0, 1.0]) for n in ("x", "y")}
        snap = schemas.SnapshotRef(content_hash="0" * 64, size=1, file_count=1, md5="")
        spec = schemas.SweepSpec(experiment="bench", run=schemas.RunSpec(experiment="bench", entry_script="j.py",
                                 snapshot=snap), sampling=kind, parameter_space=space, seed=seed,  # type: ignore[arg-type]
                                 primary_metric_name="score", primary_metric_goal="maximize",
                                 max_total_runs=children, max_concurrent_runs=1)  # fmt: skip
        study = sampling.open_study(spec, "hd_000000000000", sampling.BusJournal(None, "hd_000000000000", [], 0))  # type: ignore[arg-type]
        best = -1e9
        for _ in range(children):
            trial, params = sampling.ask(study, spec)
            value = -((float(params["x"]) - 0.37) ** 2 + (float(params["y"]) + 0.21) ** 2)
            study.tell(trial, value)
            best = max(best, value)
        return best

    tpe = [best_of("bayesian", s) for s in range(seeds)]
    rnd = [best_of("random", s) for s in range(seeds)]
    wins = sum(1 for a, b in zip(tpe, rnd, strict=True) if a > b)
    return wins, statistics.median(tpe), statistics.median(rnd)


def run(ws: Workspace, quick: bool) -> list[dict[str, object]]:
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        (project / "job.py").write_text(JOB)
        latencies = decision_latency(ws, project, 8 if quick else 25)
        n = 200 if quick else 1000
        direct, swept = pace(ws, project, n)
    wins, tpe, rnd = tpe_vs_random(20 if quick else 50, 24)
    seeds = 20 if quick else 50
    p50 = pct(latencies, 50) * 1e3
    return [
        {"metric": "sweep: stored metric -> stop decision, p50", "value": p50, "unit": "ms", "target": "< 10",
         "ok": p50 < 10, "note": f"p99 {pct(latencies, 99) * 1e3:.1f} ms over {len(latencies)} children stopped by "
         "BanditPolicy (the metric's JetStream time to the sweeper's decision)"},
        {"metric": f"sweep: {n} short children vs {n} runs submitted directly", "value": swept / direct, "unit": "x",
         "target": "~1 (the scheduler's pace)", "ok": swept / direct < 1.25,
         "note": f"sweep {swept:.1f} s ({n / swept:.0f} children/s), direct {direct:.1f} s ({n / direct:.0f} runs/s)"},
        {"metric": "sweep: TPE beats random (24 children, 2-D bowl)", "value": wins / seeds * 100, "unit": "% seeds",
         "target": None, "ok": None,
         "note": f"{wins} of {seeds} seeds; median best TPE {tpe:.4f}, random {rnd:.4f} (0 is the optimum)"},
    ]  # fmt: skip
