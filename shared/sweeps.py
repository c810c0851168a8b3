"""Hyperparameter sweeps without Optuna: what a sweep may be (checked by the client before anything is uploaded,
and by the sweeper again), how a child's command line is made, and the fold of a sweep's events into its details.
The sampling itself is the sweeper's (services/sweeper/sampling.py)."""

from __future__ import annotations

import math
import re
import secrets

import msgspec

from shared import runs, schemas, subjects
from shared.errors import ValidationError

# kind -> the names of its arguments (choice: any number of options)
SIGNATURES: dict[str, tuple[str, ...]] = {
    "choice": (),
    "randint": ("upper",),
    "uniform": ("min_value", "max_value"),
    "quniform": ("min_value", "max_value", "q"),
    "loguniform": ("min_value", "max_value"),
    "qloguniform": ("min_value", "max_value", "q"),
    "normal": ("mu", "sigma"),
    "qnormal": ("mu", "sigma", "q"),
    "lognormal": ("mu", "sigma"),
    "qlognormal": ("mu", "sigma", "q"),
}
BAYESIAN_KINDS = ("choice", "uniform", "quniform")  # what Azure's BayesianParameterSampling accepts
SAMPLING_NAMES = {
    "random": "RandomParameterSampling",
    "grid": "GridParameterSampling",
    "bayesian": "BayesianParameterSampling",
}
POLICY_NAMES = {
    "none": "NoTerminationPolicy",
    "bandit": "BanditPolicy",
    "median": "MedianStoppingPolicy",
    "truncation": "TruncationSelectionPolicy",
}
_ARG_RE = re.compile(r"^-{0,2}[A-Za-z_][A-Za-z0-9_.-]{0,127}$")
ENDED = ("Completed", "Canceled", "Failed")


def argument(name: str) -> str:
    """How a hyperparameter reaches the script: as Azure passes it, ``--name value`` (a name given with its dashes
    is passed as it is)."""
    return name if name.startswith("-") else f"--{name}"


def _number(name: str, kind: str, label: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValidationError(f"hyperparameter {name!r}: {kind}()'s {label} must be a finite number, not {value!r}")
    return float(value)


def validate_expression(name: str, expr: schemas.ParameterExpression) -> None:
    if expr.kind not in SIGNATURES:
        raise ValidationError(
            f"hyperparameter {name!r}: unknown distribution {expr.kind!r}; use one of {', '.join(SIGNATURES)}"
        )
    if expr.kind == "choice":
        if not expr.args:
            raise ValidationError(f"hyperparameter {name!r}: choice() needs at least one option")
        if len(set(map(repr, expr.args))) != len(expr.args):
            raise ValidationError(f"hyperparameter {name!r}: choice() lists an option twice: {expr.args}")
        return
    labels = SIGNATURES[expr.kind]
    if len(expr.args) != len(labels):
        raise ValidationError(
            f"hyperparameter {name!r}: {expr.kind}({', '.join(labels)}) takes {len(labels)} argument(s), "
            f"got {len(expr.args)}: {expr.args}"
        )
    values = {label: _number(name, expr.kind, label, v) for label, v in zip(labels, expr.args, strict=True)}
    if expr.kind == "randint" and (values["upper"] < 1 or values["upper"] != int(values["upper"])):
        raise ValidationError(f"hyperparameter {name!r}: randint(upper) needs a whole upper bound of at least 1")
    if "min_value" in values and values["min_value"] >= values["max_value"]:
        raise ValidationError(
            f"hyperparameter {name!r}: {expr.kind}(min_value, max_value) needs min_value < max_value, "
            f"got {expr.args[0]} and {expr.args[1]}"
        )
    if expr.kind in ("loguniform", "qloguniform") and values["max_value"] > 700:
        raise ValidationError(
            f"hyperparameter {name!r}: {expr.kind}'s bounds are exponents (the value is exp(uniform(min, max))): "
            f"{values['max_value']} overflows"
        )
    if values.get("sigma", 1.0) <= 0 or values.get("q", 1.0) <= 0:
        raise ValidationError(f"hyperparameter {name!r}: {expr.kind}'s sigma and q must be positive: {expr.args}")


def grid_size(space: dict[str, schemas.ParameterExpression]) -> int:
    return math.prod(len(expr.args) for expr in space.values())


def validate_sweep(spec: schemas.SweepSpec) -> None:
    """Everything a sweep can be checked for before it starts; raises with what to change."""
    runs.validate_spec(spec.run)
    if not spec.parameter_space:
        raise ValidationError("the parameter space is empty: give the sampling at least one hyperparameter")
    sampling = SAMPLING_NAMES[spec.sampling]
    taken = set(spec.run.arguments)
    for name, expr in spec.parameter_space.items():
        if not _ARG_RE.match(name):
            raise ValidationError(f"hyperparameter name {name!r} cannot be a script argument: use letters, digits, _")
        validate_expression(name, expr)
        if argument(name) in taken:
            raise ValidationError(
                f"the script's arguments already give {argument(name)}, which the sweep sets: remove it from them"
            )
        if spec.sampling == "grid" and expr.kind != "choice":
            raise ValidationError(
                f"{sampling} takes only choice(): hyperparameter {name!r} is {expr.kind}(...), a range with no "
                "points to enumerate; list the values with choice(...) or use RandomParameterSampling"
            )
        if spec.sampling == "bayesian" and expr.kind not in BAYESIAN_KINDS:
            raise ValidationError(
                f"{sampling} takes only {', '.join(BAYESIAN_KINDS)}: hyperparameter {name!r} is {expr.kind}(...)"
            )
    if len({argument(n) for n in spec.parameter_space}) != len(spec.parameter_space):
        raise ValidationError("two hyperparameters name the same script argument (with and without its dashes)")
    if not spec.primary_metric_name:
        raise ValidationError("primary_metric_name is empty: name the metric the script logs with run.log()")
    if spec.max_total_runs < 1:
        raise ValidationError(f"max_total_runs must be at least 1, not {spec.max_total_runs}")
    if spec.max_concurrent_runs < 1:
        raise ValidationError(f"max_concurrent_runs must be at least 1, not {spec.max_concurrent_runs}")
    if spec.max_concurrent_runs > spec.max_total_runs:
        raise ValidationError(
            f"max_concurrent_runs ({spec.max_concurrent_runs}) is greater than max_total_runs "
            f"({spec.max_total_runs}): lower max_concurrent_runs to at most {spec.max_total_runs}"
        )
    if not spec.max_duration_minutes > 0:
        raise ValidationError(f"max_duration_minutes must be positive, not {spec.max_duration_minutes}")
    validate_policy(spec)


def validate_policy(spec: schemas.SweepSpec) -> None:
    policy = spec.policy
    name = POLICY_NAMES[policy.kind]
    if policy.kind == "none":
        return
    if spec.sampling == "bayesian":
        raise ValidationError(
            f"BayesianParameterSampling does not support early termination ({name}): each child informs the next "
            "sampled values; use NoTerminationPolicy, or RandomParameterSampling with the policy"
        )
    if policy.evaluation_interval < 1 or policy.delay_evaluation < 0:
        raise ValidationError(f"{name}: evaluation_interval must be at least 1 and delay_evaluation at least 0")
    if policy.kind == "bandit":
        given = [v for v in (policy.slack_factor, policy.slack_amount) if v is not None]
        if len(given) != 1 or not given[0] > 0:
            raise ValidationError("BanditPolicy takes one of slack_factor or slack_amount, a positive number")
    if policy.kind == "truncation" and not (
        policy.truncation_percentage is not None and 1 <= policy.truncation_percentage <= 99
    ):
        raise ValidationError("TruncationSelectionPolicy: truncation_percentage must be a whole number from 1 to 99")


def render(value: schemas.ScalarParam) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def child_spec(base: schemas.RunSpec, params: dict[str, schemas.ScalarParam]) -> schemas.RunSpec:
    """The child's run: the sweep's, with each sampled value after its argument (``--lr 0.01``)."""
    arguments = list(base.arguments)
    for name, value in params.items():
        arguments += [argument(name), render(value)]
    script_params = {**base.script_params, **{argument(n): v for n, v in params.items()}}
    return msgspec.structs.replace(base, arguments=arguments, script_params=script_params)


def new_sweep_id() -> str:
    return f"hd_{secrets.token_hex(6)}"


def is_sweep_id(text: str) -> bool:
    return bool(subjects.SWEEP_ID_RE.match(text))


def best_of(values: list[float], goal: str) -> float | None:
    """The best of ``values`` for the goal (None for none)."""
    if not values:
        return None
    return max(values) if goal == "maximize" else min(values)


def better(a: float, b: float | None, goal: str) -> bool:
    """Whether ``a`` beats ``b`` for the goal (anything beats nothing)."""
    return b is None or (a > b if goal == "maximize" else a < b)


def fold(events: list[schemas.SweepEvent]) -> schemas.SweepDetails:
    """A sweep's events replayed into its details: children with their values, the best, the state."""
    first = events[0]
    assert isinstance(first, schemas.SweepSubmitted)
    spec = first.spec
    children: dict[int, schemas.SweepChild] = {}
    state, ended_at, reason, error = "Running", None, "", None
    for ev in events[1:]:
        match ev:
            case schemas.ChildCreated(trial=trial, run_id=run_id, params=params):
                children[trial] = schemas.SweepChild(trial=trial, run_id=run_id, params=params)
            case schemas.ChildTerminated(trial=trial, reason=why) if trial in children:
                children[trial] = msgspec.structs.replace(children[trial], terminated=why)
            case schemas.ChildEnded(trial=trial, state=run_state, value=value, reports=reports) if trial in children:
                children[trial] = msgspec.structs.replace(
                    children[trial], state=run_state.value, value=value, reports=reports
                )
            case schemas.SweepCancelRequested():
                state = "CancelRequested" if state == "Running" else state
            case schemas.SweepEnded(state=end, reason=why, error=err):
                state, ended_at, reason, error = end, ev.at, why, err
    best: schemas.SweepChild | None = None
    for child in sorted(children.values(), key=lambda c: c.trial):
        if child.value is not None and better(child.value, best.value if best else None, spec.primary_metric_goal):
            best = child
    return schemas.SweepDetails(
        sweep_id=first.sweep_id,
        experiment=spec.experiment,
        state=state,  # type: ignore[arg-type]
        spec=spec,
        submitted_at=first.at,
        ended_at=ended_at,
        reason=reason,
        error=error,
        children=sorted(children.values(), key=lambda c: c.trial),
        best_run_id=best.run_id if best else None,
        best_value=best.value if best else None,
    )
