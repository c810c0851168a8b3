"""Hyperparameter tuning, with Azure ML v1's HyperDrive names (``azureml.train.hyperdrive``).

>>> from cadre.hyperdrive import HyperDriveConfig, RandomParameterSampling, BanditPolicy, uniform, choice
>>> sampling = RandomParameterSampling({"--lr": uniform(0.001, 0.1), "--batch": choice(16, 32, 64)})
>>> hd = HyperDriveConfig(run_config=src, hyperparameter_sampling=sampling,
...                       primary_metric_name="accuracy", primary_metric_goal=PrimaryMetricGoal.MAXIMIZE,
...                       max_total_runs=20, max_concurrent_runs=4,
...                       policy=BanditPolicy(slack_factor=0.1))  # doctest: +SKIP
>>> run = Experiment(ws, "tune").submit(hd)  # doctest: +SKIP

Each child is a run of ``run_config`` with its sampled values after its arguments (``--lr 0.0123 --batch 32``);
the sweeper service samples them with Optuna and stops children early by the policy.
"""

from __future__ import annotations

import asyncio
import enum
import math
import sys
import time
from collections.abc import Iterable, Mapping
from typing import IO, TYPE_CHECKING, Any

import msgspec

from shared import bus, schemas, subjects, sweeps
from shared.errors import NotSupportedError, RunFailedError, ValidationError
from shared.runs import validate_spec

if TYPE_CHECKING:
    from cadre._config import ScriptRunConfig
    from cadre._estimator import Estimator
    from cadre._run import Experiment, Run

__all__ = [
    "BanditPolicy",
    "BayesianParameterSampling",
    "GridParameterSampling",
    "HyperDriveConfig",
    "HyperDriveRun",
    "MedianStoppingPolicy",
    "NoTerminationPolicy",
    "PrimaryMetricGoal",
    "RandomParameterSampling",
    "TruncationSelectionPolicy",
    "choice",
    "lognormal",
    "loguniform",
    "normal",
    "qlognormal",
    "qloguniform",
    "qnormal",
    "quniform",
    "randint",
    "uniform",
]

Expression = schemas.ParameterExpression


# --- parameter expressions -------------------------------------------------------------------------------------
def choice(*options: Any) -> Expression:
    """One of ``options``: ``choice(16, 32, 64)``, or ``choice([16, 32, 64])`` / ``choice(range(1, 5))``."""
    if len(options) == 1 and isinstance(options[0], list | tuple | range):
        options = tuple(options[0])
    for option in options:
        if not isinstance(option, str | int | float | bool):
            raise ValidationError(f"choice() options are numbers, strings or booleans, not {option!r}")
    return Expression(kind="choice", args=list(options))


def randint(upper: int) -> Expression:
    """A whole number in [0, upper)."""
    return Expression(kind="randint", args=[upper])


def uniform(min_value: float, max_value: float) -> Expression:
    return Expression(kind="uniform", args=[min_value, max_value])


def quniform(min_value: float, max_value: float, q: float) -> Expression:
    """round(uniform(min_value, max_value) / q) * q"""
    return Expression(kind="quniform", args=[min_value, max_value, q])


def loguniform(min_value: float, max_value: float) -> Expression:
    """exp(uniform(min_value, max_value)): the bounds are exponents, as in Azure."""
    return Expression(kind="loguniform", args=[min_value, max_value])


def qloguniform(min_value: float, max_value: float, q: float) -> Expression:
    return Expression(kind="qloguniform", args=[min_value, max_value, q])


def normal(mu: float, sigma: float) -> Expression:
    return Expression(kind="normal", args=[mu, sigma])


def qnormal(mu: float, sigma: float, q: float) -> Expression:
    return Expression(kind="qnormal", args=[mu, sigma, q])


def lognormal(mu: float, sigma: float) -> Expression:
    """exp(normal(mu, sigma))"""
    return Expression(kind="lognormal", args=[mu, sigma])


def qlognormal(mu: float, sigma: float, q: float) -> Expression:
    return Expression(kind="qlognormal", args=[mu, sigma, q])


def _expression(name: str, value: Any) -> Expression:
    """An expression, or Azure's list form of one (``["uniform", [0, 1]]``, ``["choice", [[1, 2]]]``)."""
    if isinstance(value, Expression):
        return value
    if isinstance(value, list | tuple) and len(value) == 2 and isinstance(value[0], str):
        kind, args = value[0], list(value[1])
        if kind == "choice" and len(args) == 1 and isinstance(args[0], list | tuple | range):
            args = list(args[0])
        return Expression(kind=kind, args=args)
    raise ValidationError(
        f"hyperparameter {name!r}: expected an expression such as uniform(0.001, 0.1) or choice(16, 32), got {value!r}"
    )


# --- sampling ----------------------------------------------------------------------------------------------
class _Sampling:
    kind = "random"

    def __init__(self, parameter_space: Mapping[str, Any], properties: Mapping[str, Any] | None = None) -> None:
        if not isinstance(parameter_space, Mapping):
            raise ValidationError("the parameter space is a dict: hyperparameter name -> expression")
        self.parameter_space = {str(k): _expression(str(k), v) for k, v in parameter_space.items()}
        seed = (properties or {}).get("rngseed", (properties or {}).get("seed"))
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValidationError(f"the sampling's seed (properties={{'rngseed': N}}) is a whole number, not {seed!r}")
        self.seed: int | None = seed

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self.parameter_space)})"


class RandomParameterSampling(_Sampling):
    """Values drawn at random from each expression (every kind of expression)."""

    kind = "random"


class GridParameterSampling(_Sampling):
    """Every combination of the ``choice`` values, once each."""

    kind = "grid"


class BayesianParameterSampling(_Sampling):
    """Optuna's TPE: each child's values are chosen from how the children before it did (choice, uniform and
    quniform only; no early termination)."""

    kind = "bayesian"


# --- goals and policies --------------------------------------------------------------------------------------
class PrimaryMetricGoal(enum.Enum):
    MAXIMIZE = "MAXIMIZE"
    MINIMIZE = "MINIMIZE"


class _Policy:
    kind = "none"

    def __init__(self, evaluation_interval: int = 1, delay_evaluation: int = 0) -> None:
        self.evaluation_interval = evaluation_interval
        self.delay_evaluation = delay_evaluation

    def _spec(self) -> schemas.TerminationPolicy:
        return schemas.TerminationPolicy(
            kind=self.kind,  # type: ignore[arg-type]
            evaluation_interval=self.evaluation_interval,
            delay_evaluation=self.delay_evaluation,
        )


class NoTerminationPolicy(_Policy):
    kind = "none"

    def __init__(self) -> None:
        super().__init__()


class BanditPolicy(_Policy):
    """Stop a child whose primary metric, at an evaluation interval, is not within ``slack_factor`` (a ratio) or
    ``slack_amount`` (an absolute margin) of the best value any child reported at that interval."""

    kind = "bandit"

    def __init__(
        self,
        evaluation_interval: int = 1,
        slack_factor: float | None = None,
        slack_amount: float | None = None,
        delay_evaluation: int = 0,
    ) -> None:
        super().__init__(evaluation_interval, delay_evaluation)
        self.slack_factor, self.slack_amount = slack_factor, slack_amount

    def _spec(self) -> schemas.TerminationPolicy:
        return msgspec.structs.replace(super()._spec(), slack_factor=self.slack_factor, slack_amount=self.slack_amount)


class MedianStoppingPolicy(_Policy):
    """Stop a child whose best value so far is worse than the median of the finished children's values at the
    same interval (Optuna's MedianPruner)."""

    kind = "median"


class TruncationSelectionPolicy(_Policy):
    """Stop a child in the lowest ``truncation_percentage`` percent, at an interval, of the finished children's
    values (Optuna's PercentilePruner)."""

    kind = "truncation"

    def __init__(
        self,
        truncation_percentage: int,
        evaluation_interval: int = 1,
        delay_evaluation: int = 0,
        exclude_finished_jobs: bool = False,
    ) -> None:
        if exclude_finished_jobs:
            raise NotSupportedError(
                "TruncationSelectionPolicy(exclude_finished_jobs=True) is not supported: the cut-off is taken over "
                "the finished children (Optuna's PercentilePruner)"
            )
        super().__init__(evaluation_interval, delay_evaluation)
        self.truncation_percentage = truncation_percentage

    def _spec(self) -> schemas.TerminationPolicy:
        return msgspec.structs.replace(super()._spec(), truncation_percentage=self.truncation_percentage)


# --- the configuration ---------------------------------------------------------------------------------------
def _goal(goal: PrimaryMetricGoal | str) -> str:
    text = goal.value if isinstance(goal, PrimaryMetricGoal) else str(goal)
    if text.lower() not in ("maximize", "minimize"):
        raise ValidationError(f"primary_metric_goal is PrimaryMetricGoal.MAXIMIZE or MINIMIZE, not {goal!r}")
    return text.lower()


class HyperDriveConfig:
    """A sweep: ``run_config`` (a ScriptRunConfig or an Estimator) run once per sampled set of values."""

    def __init__(
        self,
        run_config: ScriptRunConfig | Estimator | None = None,
        hyperparameter_sampling: _Sampling | None = None,
        primary_metric_name: str = "",
        primary_metric_goal: PrimaryMetricGoal | str = PrimaryMetricGoal.MAXIMIZE,
        max_total_runs: int | None = None,
        max_concurrent_runs: int | None = None,
        max_duration_minutes: float = 10080,
        policy: _Policy | None = None,
        estimator: Estimator | None = None,
    ) -> None:
        from cadre._run import _estimator_of

        given = run_config if run_config is not None else estimator
        if given is None:
            raise ValidationError("HyperDriveConfig needs run_config: the ScriptRunConfig or Estimator of each child")
        if not isinstance(hyperparameter_sampling, _Sampling):
            raise ValidationError(
                "hyperparameter_sampling is a RandomParameterSampling, GridParameterSampling or "
                f"BayesianParameterSampling, not {type(hyperparameter_sampling).__name__}"
            )
        if policy is not None and not isinstance(policy, _Policy):
            raise ValidationError(f"policy is an early termination policy, not {type(policy).__name__}")
        self.estimator = _estimator_of(given)
        self.hyperparameter_sampling = hyperparameter_sampling
        self.primary_metric_name = primary_metric_name
        self.primary_metric_goal = _goal(primary_metric_goal)
        if max_total_runs is None:
            if hyperparameter_sampling.kind != "grid":
                raise ValidationError("give max_total_runs: how many children the sweep may run in all")
            space = hyperparameter_sampling.parameter_space
            max_total_runs = sweeps.grid_size(space) if all(e.kind == "choice" for e in space.values()) else 1
        self.max_total_runs = max_total_runs
        self.max_concurrent_runs = max_concurrent_runs if max_concurrent_runs is not None else max_total_runs
        self.max_duration_minutes = max_duration_minutes
        self.policy = policy or NoTerminationPolicy()

    def _spec(self, run: schemas.RunSpec) -> schemas.SweepSpec:
        sampling = self.hyperparameter_sampling
        return schemas.SweepSpec(
            experiment=run.experiment,
            run=run,
            sampling=sampling.kind,  # type: ignore[arg-type]
            parameter_space=sampling.parameter_space,
            seed=sampling.seed,
            primary_metric_name=self.primary_metric_name,
            primary_metric_goal=self.primary_metric_goal,  # type: ignore[arg-type]
            max_total_runs=self.max_total_runs,
            max_concurrent_runs=self.max_concurrent_runs,
            max_duration_minutes=float(self.max_duration_minutes),
            policy=self.policy._spec(),
        )

    def _submit(self, experiment: Experiment) -> HyperDriveRun:
        if self.estimator._registry_password is not None:
            raise NotSupportedError("a sweep's children cannot use a registry password: register the environment")

        def check(run: schemas.RunSpec) -> None:
            validate_spec(run)
            sweeps.validate_sweep(self._spec(run))

        run = experiment._upload(self.estimator, check)
        request = schemas.SweepSubmitRequest(spec=self._spec(run))
        reply = experiment.workspace._request(subjects.Api.SWEEP_SUBMIT, request, schemas.SweepSummary)
        return HyperDriveRun(experiment, reply.sweep_id)


# --- the sweep, once submitted -------------------------------------------------------------------------------
class HyperDriveRun:
    """A submitted sweep: its children, the best of them, and the sweep's own state."""

    def __init__(self, experiment: Experiment, run_id: str) -> None:
        self.experiment = experiment
        self.id = run_id
        self._ws = experiment.workspace

    @classmethod
    def get(cls, workspace: Any, run_id: str) -> HyperDriveRun:
        from cadre._run import Experiment

        details = workspace._request(subjects.Api.SWEEP_GET, schemas.SweepRef(sweep_id=run_id), schemas.SweepDetails)
        return cls(Experiment(workspace, details.experiment), run_id)

    def __repr__(self) -> str:
        return f"HyperDriveRun(id={self.id!r}, experiment={self.experiment.name!r})"

    def get_portal_url(self) -> str:
        from cadre._run import portal_url

        return portal_url(self._ws, f"/sweeps/{self.id}")

    def _details(self) -> schemas.SweepDetails:
        return self._ws._request(subjects.Api.SWEEP_GET, schemas.SweepRef(sweep_id=self.id), schemas.SweepDetails)

    def get_status(self) -> str:
        return self._details().state

    def get_details(self) -> dict[str, Any]:
        d = self._details()
        return {
            "runId": d.sweep_id,
            "experiment": d.experiment,
            "status": d.state,
            "submittedAt": d.submitted_at,
            "endTimeUtc": d.ended_at,
            "reason": d.reason,
            "error": msgspec.to_builtins(d.error) if d.error else None,
            "children": len(d.children),
            "bestChildRunId": d.best_run_id,
            "bestPrimaryMetric": d.best_value,
            "runDefinition": msgspec.to_builtins(d.spec),
        }

    def _child(self, run_id: str) -> Run:
        from cadre._run import Run

        return Run(self.experiment, run_id)

    def get_children(self) -> list[Run]:
        """The children, in the order they were created."""
        return [self._child(c.run_id) for c in self._details().children]

    def get_hyperparameters(self) -> dict[str, dict[str, Any]]:
        return {c.run_id: dict(c.params) for c in self._details().children}

    def get_metrics(self) -> dict[str, dict[str, Any]]:
        return {c.run_id: self._child(c.run_id).get_metrics() for c in self._details().children}

    def _children_with_values(self, d: schemas.SweepDetails) -> list[tuple[schemas.SweepChild, float | None]]:
        goal, primary = d.spec.primary_metric_goal, d.spec.primary_metric_name
        out = []
        for child in d.children:
            value = child.value
            if value is None and child.state == "Submitted":  # still going: its values so far
                logged = self._child(child.run_id).get_metrics(primary).get(primary)
                numbers = [v for v in (logged if isinstance(logged, list) else [logged]) if _finite(v)]
                value = sweeps.best_of(numbers, goal)
            out.append((child, value))
        return out

    def get_children_sorted_by_primary_metric(
        self, top: int = 0, reverse: bool = False, discard_no_metric: bool = False
    ) -> list[dict[str, Any]]:
        """Children best first by their best primary metric (``reverse``: worst first); those with none come last,
        or not at all with ``discard_no_metric``."""
        return self._ranked(self._details(), top, reverse, discard_no_metric)

    def _ranked(
        self, d: schemas.SweepDetails, top: int = 0, reverse: bool = False, discard_no_metric: bool = False
    ) -> list[dict[str, Any]]:
        goal = d.spec.primary_metric_goal
        rows = [
            {"run_id": c.run_id, "hyperparameters": dict(c.params), "best_primary_metric": v, "status": _status(c)}
            for c, v in self._children_with_values(d)
        ]
        scored = sorted((r for r in rows if r["best_primary_metric"] is not None),
                        key=lambda r: r["best_primary_metric"], reverse=(goal == "maximize") != reverse)  # fmt: skip
        rest = [] if discard_no_metric else [r for r in rows if r["best_primary_metric"] is None]
        ordered = scored + rest
        return ordered[:top] if top else ordered

    def get_best_run_by_primary_metric(self, include_failed: bool = True, include_canceled: bool = True) -> Run | None:
        skip = {s for s, keep in (("Failed", include_failed), ("Canceled", include_canceled)) if not keep}
        for row in self.get_children_sorted_by_primary_metric(discard_no_metric=True):
            if row["status"] not in skip:
                return self._child(row["run_id"])
        return None

    def cancel(self) -> bool:
        """Stop starting children and cancel those that run."""
        self._ws._request(subjects.Api.SWEEP_CANCEL, schemas.SweepRef(sweep_id=self.id), schemas.SweepSummary)
        return True

    def wait_for_completion(
        self,
        show_output: bool = False,
        raise_on_error: bool = True,
        timeout: float | None = None,
        output: IO[str] | None = None,
    ) -> dict[str, Any]:
        """Block until the sweep ends; with ``show_output`` print each child as it starts and ends."""
        out = output or sys.stdout
        if show_output:
            print(f"RunId: {self.id}", file=out, flush=True)
        self._ws._loop.call(self._follow(out if show_output else None, timeout))
        details = self.get_details()
        if show_output:
            best = details["bestChildRunId"]
            print(f"\nExecution summary\n  RunId: {self.id}\n  Status: {details['status']}\n  {details['reason']}",
                  file=out, flush=True)  # fmt: skip
            if best:
                print(f"  Best: {best} ({details['bestPrimaryMetric']:g})", file=out, flush=True)
        if raise_on_error and details["status"] == "Failed":
            err = details["error"]["message"] if details["error"] else "no error recorded"
            raise RunFailedError(f"sweep {self.id} failed: {err}")
        return details

    async def _follow(self, out: IO[str] | None, timeout: float | None) -> None:
        js = self._ws._js
        sub = await js.subscribe(subjects.sweep_events(self.id), stream=subjects.SWEEPS_STREAM, ordered_consumer=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        spec: schemas.SweepSpec | None = None
        best: float | None = None
        try:
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"sweep {self.id} did not end within {timeout:g}s")
                try:
                    msg = await sub.next_msg(timeout=min(left, 5.0) if left is not None else 5.0)
                except bus.TRANSIENT_ERRORS:
                    continue  # nothing new yet, or the bus is away for a moment
                event = schemas.sweep_event_decoder.decode(msg.data)
                if isinstance(event, schemas.SweepSubmitted):
                    spec = event.spec
                if out is not None and spec is not None:
                    best = _print_event(event, spec, best, out)
                if isinstance(event, schemas.SweepEnded):
                    return
        finally:
            await asyncio.shield(sub.unsubscribe())


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _status(child: schemas.SweepChild) -> str:
    return child.state if child.state != "Submitted" else "Running"


def _args(params: Iterable[tuple[str, Any]]) -> str:
    return " ".join(f"{sweeps.argument(k)} {sweeps.render(v)}" for k, v in params)


def _print_event(event: schemas.SweepEvent, spec: schemas.SweepSpec, best: float | None, out: IO[str]) -> float | None:
    metric = spec.primary_metric_name
    match event:
        case schemas.SweepSubmitted():
            print(f"{sweeps.SAMPLING_NAMES[spec.sampling]}, {spec.max_total_runs} children at most, "
                  f"{spec.max_concurrent_runs} at once; {spec.primary_metric_goal} {metric}", file=out)  # fmt: skip
        case schemas.ChildCreated(run_id=run_id, params=params):
            print(f"{run_id} started: {_args(params.items())}", file=out)
        case schemas.ChildTerminated(run_id=run_id, reason=reason):
            print(f"{run_id} stopped early: {reason}", file=out)
        case schemas.ChildEnded(run_id=run_id, state=state, value=value):
            shown = f"{metric} {value:g}" if value is not None else f"no {metric}"
            if value is not None and sweeps.better(value, best, spec.primary_metric_goal):
                best, shown = value, shown + " (best so far)"
            print(f"{run_id} {state.value}: {shown}", file=out)
        case schemas.SweepCancelRequested():
            print("cancel requested: no more children start; those running are canceled", file=out)
    out.flush()
    return best
