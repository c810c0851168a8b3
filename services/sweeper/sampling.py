"""A sweep's Optuna study, kept in JetStream.

Optuna's JournalStorage writes every change to a study (a trial asked, a parameter, an intermediate value, a
state) as a log entry; here the entries go to the sweep's journal subject in CADRE_SWEEPS. Optuna is synchronous,
the bus is not: entries are held until :meth:`BusJournal.flush`, which the driver awaits before it acts on what
Optuna decided (a child is submitted only once its trial is stored). A restarted sweeper replays the journal and
has the same study: the same trials, values and states, so it never samples past ``max_total_runs``.

Hyperparameters map onto Optuna's distributions. Those Optuna has no distribution for (the normal family) are
sampled as a uniform quantile that the normal's inverse CDF turns into the value; q-variants round the value.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from typing import Any

import numpy as np
import optuna
from nats.js import JetStreamContext
from optuna.storages.journal import BaseJournalBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from shared import bus, schemas, subjects, sweeps

optuna.logging.set_verbosity(optuna.logging.WARNING)

_EDGE = 1e-12  # a quantile of exactly 0 or 1 is an infinite normal value


class BusJournal(BaseJournalBackend):
    """Optuna's journal on a JetStream subject. Writes are compare-and-set on the subject's last sequence: a
    second sweeper writing the same study fails instead of interleaving."""

    def __init__(self, js: JetStreamContext, sweep_id: str, logs: list[dict[str, Any]], last_seq: int) -> None:
        self._js = js
        self._subject = subjects.sweep_journal(sweep_id)
        self._logs = logs
        self._pending: list[dict[str, Any]] = []
        self._last_seq = last_seq

    @classmethod
    async def load(cls, js: JetStreamContext, sweep_id: str) -> BusJournal:
        msgs, last_seq = await bus.read_subject(js, subjects.SWEEPS_STREAM, subjects.sweep_journal(sweep_id))
        return cls(js, sweep_id, [log for msg in msgs for log in json.loads(msg.data)], last_seq)

    def read_logs(self, log_number_from: int) -> Iterable[dict[str, Any]]:
        return self._logs[log_number_from:]

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        self._logs.extend(logs)
        self._pending.extend(logs)

    @property
    def dirty(self) -> bool:
        return bool(self._pending)

    async def flush(self) -> None:
        if not self._pending:
            return
        ack = await self._js.publish(
            self._subject,
            json.dumps(self._pending, separators=(",", ":")).encode(),
            headers={"Nats-Expected-Last-Subject-Sequence": str(self._last_seq)},
        )
        self._last_seq = ack.seq
        self._pending.clear()


class _Grid(optuna.samplers.GridSampler):
    """Optuna's grid, asked and told outside ``study.optimize``: its way of ending the study when the grid is
    covered (``study.stop()``) only works inside it. The sweep asks no more than the grid holds (total_runs)."""

    def after_trial(self, study, trial, state, values) -> None:  # type: ignore[no-untyped-def]
        return None


def _sampler(spec: schemas.SweepSpec) -> optuna.samplers.BaseSampler:
    if spec.sampling == "grid":
        space = {name: list(expr.args) for name, expr in spec.parameter_space.items()}
        return _Grid(space, seed=spec.seed)
    if spec.sampling == "bayesian":
        return optuna.samplers.TPESampler(seed=spec.seed)
    return optuna.samplers.RandomSampler(seed=spec.seed)


def _pruner(spec: schemas.SweepSpec) -> optuna.pruners.BasePruner:
    """Median stopping and truncation selection are Optuna's percentile pruners, compared with the finished
    children at the same interval; Bandit has no Optuna counterpart (policies.bandit)."""
    policy = spec.policy
    steps = {
        "n_startup_trials": 0,
        "n_warmup_steps": policy.delay_evaluation,
        "interval_steps": policy.evaluation_interval,
    }
    if policy.kind == "median":
        return optuna.pruners.MedianPruner(**steps)
    if policy.kind == "truncation":
        assert policy.truncation_percentage is not None
        return optuna.pruners.PercentilePruner(100.0 - policy.truncation_percentage, **steps)
    return optuna.pruners.NopPruner()


def open_study(spec: schemas.SweepSpec, sweep_id: str, journal: BusJournal) -> optuna.Study:
    return optuna.create_study(
        study_name=sweep_id,
        storage=JournalStorage(journal),
        sampler=_sampler(spec),
        pruner=_pruner(spec),
        direction=spec.primary_metric_goal,
        load_if_exists=True,
    )


def total_runs(spec: schemas.SweepSpec) -> int:
    """How many children the sweep makes: a grid has no more points than its size."""
    if spec.sampling == "grid":
        return min(spec.max_total_runs, sweeps.grid_size(spec.parameter_space))
    return spec.max_total_runs


def _raw(trial: optuna.Trial, name: str, expr: schemas.ParameterExpression) -> Any:
    a = [float(x) for x in expr.args] if expr.kind != "choice" else expr.args
    match expr.kind:
        case "choice":
            return trial.suggest_categorical(name, expr.args)
        case "randint":
            return trial.suggest_int(name, 0, int(a[0]) - 1)
        case "uniform" | "quniform":
            return trial.suggest_float(name, a[0], a[1])
        case "loguniform" | "qloguniform":  # Azure's bounds are exponents: exp(uniform(min, max))
            return trial.suggest_float(name, math.exp(a[0]), math.exp(a[1]), log=True)
        case _:  # the normal family: a quantile
            return trial.suggest_float(name, 0.0, 1.0)


def value_of(expr: schemas.ParameterExpression, raw: Any) -> schemas.ScalarParam:
    """The value a child is given, from what Optuna sampled (the same after a restart: a pure function)."""
    kind = expr.kind
    if kind in ("choice", "randint", "uniform", "loguniform"):
        return raw
    q = float(expr.args[-1]) if kind.startswith("q") else None
    if kind in ("quniform", "qloguniform"):
        value = float(raw)
    else:
        mu, sigma = float(expr.args[0]), float(expr.args[1])
        value = statistics.NormalDist(mu, sigma).inv_cdf(min(max(float(raw), _EDGE), 1 - _EDGE))
        if kind in ("lognormal", "qlognormal"):
            value = math.exp(value)
    if q is None:
        return value
    rounded = round(value / q) * q
    return round(rounded) if float(q).is_integer() else rounded  # quniform(16, 256, 16): 32, not 32.0


def ask(study: optuna.Study, spec: schemas.SweepSpec) -> tuple[optuna.Trial, dict[str, schemas.ScalarParam]]:
    trial = study.ask()
    params = {name: value_of(expr, _raw(trial, name, expr)) for name, expr in spec.parameter_space.items()}
    return trial, params


def params_of(frozen: FrozenTrial, spec: schemas.SweepSpec) -> dict[str, schemas.ScalarParam]:
    return {name: value_of(expr, frozen.params[name]) for name, expr in spec.parameter_space.items()}


def percentile_threshold(study: optuna.Study, spec: schemas.SweepSpec, step: int) -> float:
    """The value Optuna's percentile pruner compared with at ``step`` (for the reason a child is given)."""
    keep = 50.0 if spec.policy.kind == "median" else 100.0 - (spec.policy.truncation_percentage or 0)
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    values = [t.intermediate_values[step] for t in done if step in t.intermediate_values]
    if not values:
        return math.nan
    pct = 100 - keep if spec.primary_metric_goal == "maximize" else keep
    return float(np.nanpercentile(np.array(values, dtype=float), pct))
