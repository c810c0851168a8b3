"""The run lifecycle, as every writer and reader of a run's history uses it.

The states, the transition table that the event log enforces, the derived sets (placed, forward order) and the
failure causes are in ``shared/states.py``, which the event classes need; this module holds what the events do:
the state each one moves a run to, the guards under which a writer may append one, the attempts of a run, and
the fold that replays a history into the details readers see. Adding an event or a state touches these two
modules and the service that writes it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from shared import schemas
from shared.states import FORWARD_ORDER, RunState

Builder = Callable[[schemas.RunEvent | None], schemas.RunEvent | None]  # what RunEventLog.append takes
Guard = Callable[[schemas.RunEvent], bool]

S = RunState
# The state each event moves its run to. The others record a fact (a rank's exit, a node's report, where the
# nodes meet) and leave the run in the state it was in.
MOVES_TO: dict[type[schemas.RunEventBase], RunState] = {
    schemas.Submitted: S.NOT_STARTED,
    schemas.Queued: S.QUEUED,
    schemas.Assigned: S.PREPARING,
    schemas.Retried: S.QUEUED,
    schemas.Starting: S.STARTING,
    schemas.Running: S.RUNNING,
    schemas.CancelRequested: S.CANCEL_REQUESTED,
    schemas.Finalizing: S.FINALIZING,
    schemas.Completed: S.COMPLETED,
    schemas.Failed: S.FAILED,
    schemas.Canceled: S.CANCELED,
}


def new_event_id() -> str:
    return uuid.uuid4().hex


def event(
    cls: type[schemas.RunEventBase], run_id: str, last: schemas.RunEvent | None = None, **fields: object
) -> schemas.RunEvent:
    """A new event of ``cls``, in the state it moves the run to (or, for a fact, the state ``last`` left)."""
    state = MOVES_TO.get(cls) or (last.state if last is not None else None)
    if state is None:
        raise ValueError(f"{cls.__name__} records a fact about a run: it needs the run's last event")
    return cls(event_id=new_event_id(), run_id=run_id, state=state, at=time.time(), **fields)  # type: ignore[return-value]


def append_if(guard: Guard, cls: type[schemas.RunEventBase], run_id: str, **fields: object) -> Builder:
    """For RunEventLog.append: the event, if the run has a history and ``guard`` holds for its last event."""

    def build(last: schemas.RunEvent | None) -> schemas.RunEvent | None:
        if last is None or not guard(last):
            return None
        return event(cls, run_id, last, **fields)

    return build


# --- guards: when a writer may still append ---------------------------------------------------------------
def _of(attempt: int | None, last: schemas.RunEvent) -> bool:
    return attempt is None or attempt_of(last) == attempt


def undecided(attempt: int | None = None) -> Guard:
    """The outcome is open (not Finalizing or ended), and the run is still at ``attempt`` (None: any)."""
    return lambda last: not last.state.is_decided() and _of(attempt, last)


def not_ended(attempt: int | None = None) -> Guard:
    """Not in a terminal state, and still at ``attempt``."""
    return lambda last: not last.state.is_terminal() and _of(attempt, last)


def in_state(*states: RunState) -> Guard:
    return lambda last: last.state in states


def before(state: RunState, attempt: int | None = None) -> Guard:
    """Placed and not yet as far as ``state`` (the nodes of a run race to move it forward: the first wins)."""
    return lambda last: (
        last.state in FORWARD_ORDER and FORWARD_ORDER[last.state] < FORWARD_ORDER[state] and _of(attempt, last)
    )


# --- attempts -----------------------------------------------------------------------------------------------
def attempt_of(ev: schemas.RunEvent) -> int:
    """The attempt an event belongs to (events stored before attempts existed belong to the first)."""
    return ev.attempt or 1


def current_attempt(events: list[schemas.RunEvent]) -> list[schemas.RunEvent]:
    """The events of the run's latest attempt (all of them when it was never retried)."""
    if not events:
        return []
    latest = attempt_of(events[-1])
    return [ev for ev in events if attempt_of(ev) == latest]


# --- the fold -----------------------------------------------------------------------------------------------
def fold(record: schemas.RunRecord, events: list[schemas.RunEvent]) -> schemas.RunDetails:
    """Replay a run's events into its details (the projection every reader sees). Exit codes, log counts and the
    error are the latest attempt's; the attempts before it are listed with their causes."""
    state = RunState.NOT_STARTED
    started_at = ended_at = None
    queue_reason: str | None = None
    placement: list[schemas.RankSlot] = []
    exit_codes: dict[int, int] = {}
    log_lines: dict[int, int] = {}
    error: schemas.ErrorInfo | None = None
    warnings: list[str] = []
    history: list[schemas.StateChange] = []
    attempts: list[schemas.AttemptInfo] = []
    nodes: list[str] = []
    for ev in events:
        if ev.state is not state or not history:
            history.append(schemas.StateChange(state=ev.state, at=ev.at, kind=type(ev).__name__))
        state = ev.state
        match ev:
            case schemas.Queued(reason=reason):
                queue_reason = reason
            case schemas.Assigned(placement=p):
                placement, queue_reason = list(p), None
                nodes = sorted({s.node_id for s in p})
            case schemas.Retried(cause=cause, error=err, nodes=was_on):
                attempts.append(schemas.AttemptInfo(
                    attempt=ev.attempt - 1, cause=cause, message=err.message, nodes=was_on or nodes, ended_at=ev.at,
                ))  # fmt: skip
                exit_codes, log_lines, error, queue_reason = {}, dict(log_lines), None, "retrying"
                warnings = []
            case schemas.Running():
                started_at = started_at or ev.at
            case schemas.RankExited(rank=rank, exit_code=code):
                exit_codes[rank] = code
            case schemas.NodeFinished(exit_codes=codes, log_lines=lines):
                exit_codes.update(codes)
                log_lines.update(lines)
            case schemas.Finalizing(exit_codes=codes, log_lines=lines, error=err, warnings=said):
                exit_codes.update(codes)
                log_lines.update(lines)
                error, warnings = err or error, list(said)
            case schemas.Failed(error=err):
                error = err
            case schemas.CancelRequested(error=err) | schemas.Canceled(error=err) if err is not None:
                error = err
        if state.is_terminal():
            ended_at = ev.at
    return schemas.RunDetails(
        run_id=record.run_id,
        experiment=record.spec.experiment,
        state=state,
        spec=record.spec,
        submitted_at=record.submitted_at,
        started_at=started_at,
        ended_at=ended_at,
        queue_reason=queue_reason if state is RunState.QUEUED else None,
        placement=placement,
        exit_codes=exit_codes,
        log_lines=log_lines,
        error=error,
        history=history,
        attempt=(events[-1].attempt or 1) if events else 1,
        attempts=attempts,
        parent=record.parent,
        warnings=warnings,
    )
