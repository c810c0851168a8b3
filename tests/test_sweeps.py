"""HyperDrive sweeps on the session cluster: real children whose metric depends on their parameters, so every
check has a computed answer (the grid's points, the set Bandit must stop, the best child)."""

from __future__ import annotations

import io
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import eventually

from cadre import Estimator, Experiment, MpiConfiguration, Run, Workspace
from cadre.hyperdrive import (
    BanditPolicy,
    BayesianParameterSampling,
    GridParameterSampling,
    HyperDriveConfig,
    HyperDriveRun,
    PrimaryMetricGoal,
    RandomParameterSampling,
    choice,
    uniform,
)
from shared import schemas, subjects
from shared.errors import ServiceUnavailableError, ValidationError

ROOT = Path(__file__).resolve().parent.parent

JOB = """
import argparse, math, time
from cadre import Run
p = argparse.ArgumentParser()
p.add_argument("--x", type=float, default=0.0)
p.add_argument("--y", type=float, default=0.0)
p.add_argument("--kind", default="a")
p.add_argument("--steps", type=int, default=2)
p.add_argument("--pause", type=float, default=0.0)
p.add_argument("--objective", default="grid")
a = p.parse_args()
if a.objective == "grid":
    score = a.x * 10 + "abcd".index(a.kind)
elif a.objective == "bowl":  # smooth, best at (0.37, -0.21)
    score = -((a.x - 0.37) ** 2 + (a.y + 0.21) ** 2)
else:
    score = a.x
run = Run.get_context()
for i in range(a.steps):
    run.log("score", score)
    time.sleep(a.pause)
"""


def _job(make_project: Callable[..., Path], *arguments: object, **kw: object) -> Estimator:
    return Estimator(make_project(**{"job.py": JOB}), "job.py", arguments=[str(a) for a in arguments], **kw)


def _cadre(*args: str, home: Path) -> str:
    env = {**os.environ, "CADRE_HOME": str(home)}
    res = subprocess.run([sys.executable, "-m", "cadre", *args], capture_output=True, text=True, timeout=60, env=env,
                         cwd=ROOT)  # fmt: skip
    assert res.returncode == 0, res.stderr
    return res.stdout


def _children(hd: HyperDriveRun) -> list[schemas.RunDetails]:
    return [Run.get(hd._ws, c.run_id)._details() for c in hd._details().children]


def test_a_grid_covers_every_point_once_and_the_best_child_is_the_computed_one(
    ws: Workspace, make_project: Callable[..., Path], cluster_home: Path
) -> None:
    sampling = GridParameterSampling({"x": choice(1, 2, 3), "kind": choice("a", "b", "c", "d")})
    hd = HyperDriveConfig(run_config=_job(make_project), hyperparameter_sampling=sampling,
                          primary_metric_name="score", primary_metric_goal=PrimaryMetricGoal.MAXIMIZE,
                          max_total_runs=20, max_concurrent_runs=2)  # fmt: skip
    run = Experiment(ws, "sweep-grid").submit(hd)
    out = io.StringIO()
    details = run.wait_for_completion(show_output=True, output=out, timeout=180)
    assert details["status"] == "Completed", details
    points = [(p["x"], p["kind"]) for p in run.get_hyperparameters().values()]
    assert sorted(points) == sorted((x, k) for x in (1, 2, 3) for k in "abcd")  # 12 of 20 allowed: the whole grid
    children = _children(run)
    assert [c.state.value for c in children] == ["Completed"] * 12
    for c in children:  # each child got its values as Azure passes them
        assert c.spec.arguments == ["--x", str(c.parent.params["x"]), "--kind", c.parent.params["kind"]]
    ranked = run.get_children_sorted_by_primary_metric()
    scores = [row["best_primary_metric"] for row in ranked]
    assert scores == sorted((x * 10 + "abcd".index(k) for x, k in points), reverse=True)
    best = run.get_best_run_by_primary_metric()
    assert best is not None and run.get_hyperparameters()[best.id] == {"x": 3, "kind": "d"}
    assert details["bestChildRunId"] == best.id and details["bestPrimaryMetric"] == 33
    assert f"{best.id} Completed: score 33 (best so far)" in out.getvalue()
    # The CLI: the list of sweeps, and one sweep with its children, their values and the best.
    assert run.id in _cadre("sweeps", home=cluster_home)
    shown = _cadre("show", run.id, home=cluster_home)
    assert "GridParameterSampling" in shown and f"best:        {best.id}  score 33  --x 3 --kind d" in shown
    assert sum(1 for line in shown.splitlines() if line.startswith(f"{run.id}_")) == 12
    assert f"sweep:       {run.id}" in _cadre("show", best.id, home=cluster_home)


def test_bandit_stops_exactly_the_children_outside_the_slack_of_the_best(
    ws: Workspace, make_project: Callable[..., Path]
) -> None:
    sampling = RandomParameterSampling({"x": uniform(0.0, 1.0)}, properties={"rngseed": 7})
    policy = BanditPolicy(slack_factor=0.25, evaluation_interval=1, delay_evaluation=2)
    hd = HyperDriveConfig(run_config=_job(make_project, "--objective", "x", "--steps", 10, "--pause", 0.2),
                          hyperparameter_sampling=sampling, policy=policy, primary_metric_name="score",
                          primary_metric_goal="maximize", max_total_runs=12, max_concurrent_runs=1)  # fmt: skip
    run = Experiment(ws, "sweep-bandit").submit(hd)
    assert run.wait_for_completion(timeout=240)["status"] == "Completed"
    sweep = run._details()
    children = _children(run)
    # One at a time (max_concurrent_runs=1, with two free slots): each child is submitted after the last ended.
    for before, after in itertools.pairwise(children):
        assert before.ended_at is not None and after.submitted_at >= before.ended_at - 0.05
    # Each child's score is its x at every step, so a child is stopped iff its x is under the best x so far / 1.25.
    expected, best = set(), 0.0
    for child in sweep.children:
        x = float(child.params["x"])
        if x < best / 1.25:
            expected.add(child.run_id)
        best = max(best, x)
    stopped = {c.run_id for c in sweep.children if c.terminated}
    assert stopped == expected and expected, (stopped, expected)
    for details in children:
        if details.run_id in stopped:
            assert details.state.value == "Canceled" and details.error is not None
            assert details.error.code == "early_terminated"
            assert (
                "BanditPolicy(slack_factor=0.25): score" in details.error.message
                and "threshold" in details.error.message
            )
        else:
            assert details.state.value == "Completed"
    reports = {c.run_id: c.reports for c in sweep.children}
    assert all(reports[r] < 10 for r in stopped) and all(
        reports[c.run_id] == 10 for c in sweep.children if c.run_id not in stopped
    )


def _sweeper_pid(home: Path) -> int:
    state = json.loads((home / "cluster" / "state.json").read_text())
    return next(p["pid"] for p in state["processes"] if p["name"] == "sweeper")


def test_a_sweeper_killed_mid_sweep_carries_on_and_never_exceeds_max_total_runs(
    ws: Workspace, make_project: Callable[..., Path], cluster_home: Path
) -> None:
    sampling = RandomParameterSampling({"x": uniform(0.0, 1.0), "y": uniform(-1.0, 1.0)}, properties={"rngseed": 3})
    hd = HyperDriveConfig(run_config=_job(make_project, "--objective", "bowl", "--steps", 3, "--pause", 0.2),
                          hyperparameter_sampling=sampling, primary_metric_name="score",
                          primary_metric_goal="maximize", max_total_runs=12, max_concurrent_runs=2)  # fmt: skip
    run = Experiment(ws, "sweep-restart").submit(hd)

    def created() -> int:
        try:
            return len(run._details().children)
        except ServiceUnavailableError:  # the sweeper is being restarted
            return 0

    for n in (2, 7):  # twice: once early, once with children ended and running
        eventually(lambda n=n: created() >= n, 60)
        old = _sweeper_pid(cluster_home)
        os.killpg(old, signal.SIGKILL)
        eventually(lambda old=old: _sweeper_pid(cluster_home) != old, 30)
    assert run.wait_for_completion(timeout=240)["status"] == "Completed"
    sweep = run._details()
    assert [c.trial for c in sweep.children] == list(range(12))
    runs = Experiment(ws, "sweep-restart").get_runs(limit=100)
    assert sorted(r.id for r in runs) == sorted(c.run_id for c in sweep.children)  # no child twice, none past 12
    assert {c.state for c in sweep.children} == {"Completed"}
    assert all(c.reports == 3 for c in sweep.children)  # a replayed child's values count once


def test_canceling_the_sweep_cancels_every_child_and_starts_no_more(
    ws: Workspace, make_project: Callable[..., Path]
) -> None:
    sampling = RandomParameterSampling({"x": uniform(0.0, 1.0)})
    hd = HyperDriveConfig(run_config=_job(make_project, "--objective", "x", "--steps", 300, "--pause", 0.1),
                          hyperparameter_sampling=sampling, primary_metric_name="score",
                          primary_metric_goal="maximize", max_total_runs=6, max_concurrent_runs=2)  # fmt: skip
    run = Experiment(ws, "sweep-cancel").submit(hd)
    eventually(lambda: [c.state.value for c in _children(run)] == ["Running", "Running"], 60)
    assert run.cancel()
    details = run.wait_for_completion(timeout=60, raise_on_error=False)
    assert details["status"] == "Canceled" and details["children"] == 2
    assert [c.state.value for c in _children(run)] == ["Canceled", "Canceled"]
    time.sleep(1.0)
    assert len(run._details().children) == 2


def test_bayesian_sampling_beats_random_on_a_smooth_objective_with_the_same_number_of_children(
    ws: Workspace, make_project: Callable[..., Path]
) -> None:
    space = {"x": uniform(-1.0, 1.0), "y": uniform(-1.0, 1.0)}
    runs = {}
    for name, sampling in (("bayesian", BayesianParameterSampling(space, properties={"rngseed": 11})),
                           ("random", RandomParameterSampling(space, properties={"rngseed": 11}))):  # fmt: skip
        hd = HyperDriveConfig(run_config=_job(make_project, "--objective", "bowl", "--steps", 1),
                              hyperparameter_sampling=sampling, primary_metric_name="score",
                              primary_metric_goal="maximize", max_total_runs=24, max_concurrent_runs=1)  # fmt: skip
        runs[name] = Experiment(ws, f"sweep-{name}").submit(hd)  # both at once, one child each at a time
    best = {}
    for name, run in runs.items():
        details = run.wait_for_completion(timeout=240)
        assert details["status"] == "Completed" and details["children"] == 24
        best[name] = details["bestPrimaryMetric"]
    print(f"best of 24 children: bayesian {best['bayesian']:.5f}, random {best['random']:.5f}")
    assert best["bayesian"] > best["random"], best


def test_mpi_children_log_from_rank_zero_and_are_ranked(ws: Workspace, make_project: Callable[..., Path]) -> None:
    job = make_project(**{"mpi.py": """
        import argparse
        from mpi4py import MPI
        from cadre import Run
        p = argparse.ArgumentParser(); p.add_argument("--x", type=int); a = p.parse_args()
        total = MPI.COMM_WORLD.allreduce(a.x)  # every rank's x: the metric needs both ranks
        Run.get_context().log("total", total)
    """})  # fmt: skip
    est = Estimator(job, "mpi.py", node_count=1, process_count_per_node=2, distributed_training=MpiConfiguration())
    hd = HyperDriveConfig(run_config=est, hyperparameter_sampling=GridParameterSampling({"x": choice(1, 5)}),
                          primary_metric_name="total", primary_metric_goal="minimize", max_total_runs=2,
                          max_concurrent_runs=1)  # fmt: skip
    run = Experiment(ws, "sweep-mpi").submit(hd)
    assert run.wait_for_completion(timeout=180)["status"] == "Completed"
    ranked = run.get_children_sorted_by_primary_metric()
    assert [(r["hyperparameters"]["x"], r["best_primary_metric"]) for r in ranked] == [(1, 2), (5, 10)]


def test_a_primary_metric_the_script_never_logs_fails_the_sweep_after_the_first_child(
    ws: Workspace, make_project: Callable[..., Path]
) -> None:
    hd = HyperDriveConfig(run_config=_job(make_project), primary_metric_name="accuracy",
                          hyperparameter_sampling=RandomParameterSampling({"x": uniform(0, 1)}),
                          max_total_runs=5, max_concurrent_runs=1)  # fmt: skip
    run = Experiment(ws, "sweep-nometric").submit(hd)
    details = run.wait_for_completion(timeout=120, raise_on_error=False)
    assert details["status"] == "Failed" and details["children"] == 1
    assert details["error"]["code"] == "primary_metric_missing"
    assert "'accuracy'" in details["error"]["message"] and "it logged 'score'" in details["error"]["message"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: RandomParameterSampling({"x": ["gaussian", [0, 1]]}), "unknown distribution 'gaussian'"),
        (lambda: RandomParameterSampling({"x": choice()}), "choice() needs at least one option"),
        (lambda: GridParameterSampling({"x": uniform(0, 1)}), "GridParameterSampling takes only choice()"),
        (lambda: RandomParameterSampling({"x": uniform(1, 0)}), "needs min_value < max_value"),
        (lambda: BayesianParameterSampling({"x": uniform(0, 1)}), "does not support early termination"),
        (lambda: RandomParameterSampling({"x": uniform(0, 1)}),
         "max_concurrent_runs (8) is greater than max_total_runs (4)"),
    ],
)  # fmt: skip
def test_bad_sweeps_are_refused_before_anything_is_uploaded_or_started(
    ws: Workspace, make_project: Callable[..., Path], make: Callable[[], object], message: str
) -> None:
    before = len(ws._request(subjects.Api.SWEEP_LIST, schemas.SweepListRequest(), schemas.SweepList).sweeps)
    with pytest.raises(ValidationError) as err:
        sampling = make()
        kind = type(sampling).__name__
        policy = BanditPolicy(slack_factor=0.1) if kind == "BayesianParameterSampling" else None
        concurrent = 8 if "max_concurrent" in message else 2
        hd = HyperDriveConfig(run_config=_job(make_project), hyperparameter_sampling=sampling,  # type: ignore[arg-type]
                              primary_metric_name="score", max_total_runs=4, max_concurrent_runs=concurrent,
                              policy=policy)  # fmt: skip
        Experiment(ws, "sweep-bad").submit(hd)
    assert message in str(err.value)
    assert len(ws._request(subjects.Api.SWEEP_LIST, schemas.SweepListRequest(), schemas.SweepList).sweeps) == before


def test_the_sweeper_checks_a_sweep_itself_and_the_submitter_refuses_a_child_past_max_total_runs(
    ws: Workspace, make_project: Callable[..., Path]
) -> None:
    hd = HyperDriveConfig(run_config=_job(make_project), primary_metric_name="score", max_total_runs=1,
                          hyperparameter_sampling=RandomParameterSampling({"x": uniform(0, 1)}))  # fmt: skip
    run = Experiment(ws, "sweep-guard").submit(hd)
    assert run.wait_for_completion(timeout=60)["status"] == "Completed"
    spec = run._details().spec
    bad = schemas.SweepSubmitRequest(spec=schemas.SweepSpec(**{**_fields(spec), "max_concurrent_runs": 5}))
    with pytest.raises(ValidationError, match=r"max_concurrent_runs \(5\) is greater than max_total_runs \(1\)"):
        ws._request(subjects.Api.SWEEP_SUBMIT, bad, schemas.SweepSummary)
    extra = schemas.SubmitRequest(spec=spec.run, parent=schemas.SweepTrial(sweep_id=run.id, trial=1))
    with pytest.raises(Exception, match="allows 1 runs: trial 1 is not one"):
        ws._request(subjects.Api.SUBMIT, extra, schemas.SubmitReply)


def _fields(spec: schemas.SweepSpec) -> dict[str, object]:
    return {f: getattr(spec, f) for f in spec.__struct_fields__}
