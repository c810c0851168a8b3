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
# Placed on nodes and not decided: the nodes hold its slots, may take its assignment and upload its files.
PLACED_STATES = frozenset({RunState.PREPARING, RunState.STARTING, RunState.RUNNING, RunState.CANCEL_REQUESTED})
# The order nodes move a placed run forward in (several race to: the first wins, the others see it done).
FORWARD_ORDER = {RunState.PREPARING: 0, RunState.STARTING: 1, RunState.RUNNING: 2}

S = RunState
# Where each state may go next. A state listed as its own successor accepts annotation events
# (a new queue reason, a rank's exit) that do not move the run.
TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    S.NOT_STARTED: frozenset({S.QUEUED, S.FAILED, S.CANCELED}),
    S.QUEUED: frozenset({S.QUEUED, S.PREPARING, S.FAILED, S.CANCELED}),
    # ... -> QUEUED from a placed run: an attempt failed for a cause the run retries (a Retried event).
    S.PREPARING: frozenset({S.PREPARING, S.STARTING, S.RUNNING, S.FINALIZING, S.FAILED, S.CANCEL_REQUESTED, S.QUEUED}),
    S.STARTING: frozenset({S.STARTING, S.RUNNING, S.FINALIZING, S.FAILED, S.CANCEL_REQUESTED, S.QUEUED}),
    S.RUNNING: frozenset({S.RUNNING, S.FINALIZING, S.FAILED, S.CANCEL_REQUESTED, S.QUEUED}),
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


class Cause(enum.StrEnum):
    """Why a run failed (``error.code`` in events, ``get_details()['error']['code']`` and the CLI): one name per
    cause, so that operators, retries (``retry_on``) and dashboards can tell them apart."""

    NONZERO_EXIT = "nonzero_exit"  # a rank exited with a code other than 0 (the codes are in exitCodes)
    OUT_OF_MEMORY = "out_of_memory"  # a rank was killed over its memory limit
    MPI_ABORT = "mpi_abort"  # a rank called MPI_Abort
    TIMEOUT = "timeout"  # max_run_duration_seconds passed
    NODE_LOST = "node_lost"  # a node left, or stayed silent past its grace
    AGENT_RESTARTED = "agent_restarted"  # a node's agent came back and found the run's ranks gone
    FENCED = "fenced"  # a node cut off from the bus stopped its own ranks
    ABORTED = "aborted"  # stopped because the run failed elsewhere (never the cause when another is known)
    UNSCHEDULABLE = "unschedulable"  # no node of the compute target can ever hold the run
    PREPARE_FAILED = "prepare_failed"  # the snapshot, a dataset or the node's setup for the run failed
    ENVIRONMENT_BUILD_FAILED = "environment_build_failed"  # the image or the packages could not be made ready
    LAUNCH_FAILED = "launch_failed"  # the ranks could not be started
    UPLOAD_FAILED = "upload_failed"  # the run's files could not be stored
    DISK_FULL = "disk_full"  # a node's work dir filled up under the run (its outputs, or the node's own files)
    CANCELED = "canceled"  # someone asked for it (run.cancel(), `cadre cancel`, the portal)
    EARLY_TERMINATED = "early_terminated"  # a sweep's early termination policy stopped it (canceled, not failed)
    INTERNAL = "internal"  # a bug: the services' logs have it whole

    @property
    def infrastructure(self) -> bool:
        """Not the user's code: what a retry by default may recover from."""
        return self in INFRASTRUCTURE_CAUSES


INFRASTRUCTURE_CAUSES = frozenset(
    {Cause.NODE_LOST, Cause.AGENT_RESTARTED, Cause.FENCED, Cause.PREPARE_FAILED, Cause.UPLOAD_FAILED}
)
