"""Run states (as in Azure ML) and the one transition table that every writer obeys."""

from __future__ import annotations

import enum

from shared.errors import ConflictError


class RunState(enum.StrEnum):
    NOT_STARTED = "NotStarted"
    QUEUED = "Queued"
    PREPARING = "Preparing"
    STARTING = "Starting"
    RUNNING = "Running"
    FINALIZING = "Finalizing"
    CANCEL_REQUESTED = "CancelRequested"
    COMPLETED = "Completed"
    FAILED = "Failed"
    CANCELED = "Canceled"

    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES

    def is_decided(self) -> bool:
        """Finalizing or terminal: the outcome is decided, and no node may report into the run any more."""
        return self is RunState.FINALIZING or self in TERMINAL_STATES


TERMINAL_STATES = frozenset({RunState.COMPLETED, RunState.FAILED, RunState.CANCELED})

S = RunState
# Where each state may go next. A state listed as its own successor accepts annotation events
# (a new queue reason, a rank's exit) that do not move the run.
TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    S.NOT_STARTED: frozenset({S.QUEUED, S.FAILED, S.CANCELED}),
    S.QUEUED: frozenset({S.QUEUED, S.PREPARING, S.FAILED, S.CANCELED}),
    S.PREPARING: frozenset({S.PREPARING, S.STARTING, S.RUNNING, S.FINALIZING, S.FAILED, S.CANCEL_REQUESTED}),
    S.STARTING: frozenset({S.STARTING, S.RUNNING, S.FINALIZING, S.FAILED, S.CANCEL_REQUESTED}),
    S.RUNNING: frozenset({S.RUNNING, S.FINALIZING, S.FAILED, S.CANCEL_REQUESTED}),
    S.CANCEL_REQUESTED: frozenset({S.CANCEL_REQUESTED, S.FINALIZING, S.CANCELED, S.FAILED}),
    S.FINALIZING: frozenset({S.FINALIZING, S.COMPLETED, S.FAILED, S.CANCELED}),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELED: frozenset(),
}


def can_transition(current: RunState | None, new: RunState) -> bool:
    if current is None:
        return new is RunState.NOT_STARTED
    return new in TRANSITIONS[current]


def check_transition(current: RunState | None, new: RunState) -> None:
    if not can_transition(current, new):
        raise ConflictError(f"illegal run state change {current.value if current else None} -> {new.value}")
