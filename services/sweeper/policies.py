"""Early termination: when a child's primary metric is evaluated, and Azure's Bandit rule (Optuna has no Bandit
pruner; median stopping and truncation selection are Optuna's, in sampling.py)."""

from __future__ import annotations

from shared import schemas


def evaluated_at(policy: schemas.TerminationPolicy, interval: int) -> bool:
    """Whether the policy looks at a child's ``interval``-th report (1-based): from ``delay_evaluation`` on, every
    ``evaluation_interval`` reports (Optuna's warm-up and interval steps, so every policy counts alike)."""
    if policy.kind == "none" or interval < max(1, policy.delay_evaluation):
        return False
    return (interval - policy.delay_evaluation) % policy.evaluation_interval == 0


def bandit_threshold(policy: schemas.TerminationPolicy, goal: str, best: float) -> float:
    """The worst value still within the slack of the best at the same interval."""
    if policy.slack_factor is not None:
        return best / (1 + policy.slack_factor) if goal == "maximize" else best * (1 + policy.slack_factor)
    assert policy.slack_amount is not None
    return best - policy.slack_amount if goal == "maximize" else best + policy.slack_amount


def bandit(
    policy: schemas.TerminationPolicy, goal: str, metric: str, interval: int, value: float, best: float
) -> str | None:
    """Why the child stops (None: it goes on): its value at this interval is outside the slack of the best value
    any child reported at the same interval."""
    threshold = bandit_threshold(policy, goal, best)
    outside = value < threshold if goal == "maximize" else value > threshold
    if not outside:
        return None
    slack = (
        f"slack_factor={policy.slack_factor:g}"
        if policy.slack_factor is not None
        else (f"slack_amount={policy.slack_amount:g}")
    )
    side = "below" if goal == "maximize" else "above"
    return (
        f"BanditPolicy({slack}): {metric} {value:g} at interval {interval} is {side} the threshold {threshold:g} "
        f"(best at that interval {best:g})"
    )


def percentile(
    policy: schemas.TerminationPolicy, goal: str, metric: str, interval: int, value: float, threshold: float
) -> str:
    name = (
        "MedianStoppingPolicy"
        if policy.kind == "median"
        else (f"TruncationSelectionPolicy(truncation_percentage={policy.truncation_percentage})")
    )
    side = "below" if goal == "maximize" else "above"
    compared = "the median" if policy.kind == "median" else "the cut-off"
    return (
        f"{name}: {metric}'s best so far {value:g} at interval {interval} is {side} {compared} {threshold:g} of "
        "the finished children at that interval"
    )
