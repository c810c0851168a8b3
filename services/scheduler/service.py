"""Scheduler: learns capacity from node adverts, queues runs per compute target, gang-assigns rank slots.

State is rebuilt from the bus on start: the node table from the ``cadre_nodes`` KV watch, queued and active
runs from the last event of every run (an ordered consumer with deliver-last-per-subject, which then goes on
delivering new events live). Nothing is polled except the heartbeat clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import OrderedDict

from nats.aio.msg import Msg
from nats.js import api as js_api
from nats.js.errors import KeyNotFoundError
from nats.js.errors import NotFoundError as JsNotFound
from nats.js.kv import KeyValue

from services.scheduler.placement import Allocations, NodeState, Pool, place
from shared import bus, lifecycle, runs, schemas, settings, subjects
from shared.errors import ConflictError, NotFoundError, ValidationError
from shared.service import Service
from shared.settings import BusSettings
from shared.states import PLACED_STATES, Cause, RunState

ASSIGN_BATCH = 256  # placements whose events are pipelined together; decisions themselves stay sequential
LOST_CONCURRENCY = 32  # runs whose node losses are being recorded at once
# A run too big for its compute target fails fast, but only once the target has stopped growing for this long:
# agents that are still registering (a cluster coming up) must not make a big gang fail as impossible.
SETTLE_SECONDS = 5.0
RETRY_SECONDS = 1.0  # a decision the bus did not take is tried again this soon


class SchedulerService(Service):
    name = "scheduler"

    def __init__(self, bus_settings: BusSettings, node_grace: float = settings.NODE_GRACE_DEFAULT) -> None:
        super().__init__(bus_settings)
        if node_grace <= 0:
            raise ValidationError(f"the node grace must be a positive number of seconds, not {node_grace}")
        self.node_grace = node_grace  # a silent node's runs go on this long before the node is lost
        self.nodes: dict[str, schemas.NodeAdvert] = {}  # live
        self.known: dict[str, schemas.NodeAdvert] = {}  # every node not deregistered, live or lost
        self.heard_at: dict[str, float] = {}  # node id -> when its last new heartbeat arrived, by this clock
        self.not_responding: set[str] = set()
        self.queues: dict[str, OrderedDict[str, schemas.RunRecord]] = {}
        self.reasons: dict[str, str] = {}
        self.allocations = Allocations()
        self._order: list[str] | None = None  # node ids, sorted; None once a node joined or left
        self.not_before: dict[str, tuple[float, int, str]] = {}  # a retried run's backoff: (until, attempt, cause)
        self._lost_locks: dict[str, asyncio.Lock] = {}  # one run's node losses are recorded one at a time
        self.target_grew_at: dict[str, float] = {}  # when a node last joined each compute target
        self._wake = asyncio.Event()
        # The last event (and its stream sequence) of each queued run, for compare-and-set without a lookup.
        self.last_seen: dict[str, tuple[schemas.RunEvent, int]] = {}
        self.runs_kv: KeyValue
        self.nodes_kv: KeyValue
        self.events: bus.RunEventLog
        self.pipeline: bus.Pipeline

    @classmethod
    def from_env(cls, node_grace: float | None = None) -> SchedulerService:
        """From the environment; ``node_grace`` (the command line's) wins over CADRE_NODE_GRACE."""
        grace = settings.node_grace() if node_grace is None else node_grace
        return cls(BusSettings.from_env(cls.name), node_grace=grace)

    async def setup(self) -> None:
        await bus.ensure_topology(self.js)
        self.runs_kv = await bus.key_value(self.js, subjects.RUNS_BUCKET)
        self.nodes_kv = await bus.key_value(self.js, subjects.NODES_BUCKET)
        self.pipeline = bus.Pipeline(self.nc)
        self.events = bus.RunEventLog(self.js)
        # Each loop is restarted with backoff when the bus is away (see Service.spawn), so none may hold state
        # across a restart that the restart would not rebuild: they subscribe again, and read from the start.
        self.spawn(self._watch_nodes, "watch_nodes")
        self.spawn(self._consume_events, "consume_events")
        self.spawn(self._schedule_loop, "schedule_loop")
        self.spawn(self._liveness_loop, "liveness_loop")
        await self.endpoint(subjects.Api.SCHEDULER_STATE, schemas.SchedulerStateRequest, self._state)

    # --- inputs ------------------------------------------------------------------------------------------
    async def _watch_nodes(self) -> None:
        watcher = await self.nodes_kv.watchall()
        try:
            await self._watch(watcher)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    async def _watch(self, watcher) -> None:
        async for entry in watcher:
            if entry is None:  # end of the initial values
                continue
            if entry.operation in ("DEL", "PURGE") or not entry.value:
                gone = self.known.pop(entry.key, None)
                self.heard_at.pop(entry.key, None)
                self.not_responding.discard(entry.key)
                self.allocations.forget(entry.key)
                self._order = None
                if self.nodes.pop(entry.key, None) is not None:
                    self.log.info("node_left", node_id=entry.key)
                    # In the background: the watch must go on seeing nodes join while those runs are failed.
                    self.spawn(self._nodes_gone({entry.key}), f"node_left:{entry.key}")
                if gone is not None:
                    await self._node_event(gone, "left", "the agent deregistered")
            else:
                advert = schemas.node_decoder.decode(entry.value)
                self._heard(advert)
                if advert.node_id not in self.known:
                    self.target_grew_at[advert.compute_target] = time.monotonic()
                self.known[advert.node_id] = advert
                before = self.nodes.get(advert.node_id)
                self.nodes[advert.node_id] = advert
                if before is None:
                    # After the insert, with no await between: a pass during the await below must not cache an
                    # order without this node (it would be offered no work until another node joined or left).
                    self._order = None
                    self.log.info("node_joined", node_id=advert.node_id, slots=advert.slots, gpus=len(advert.gpus))
                    if (grace := self._grace(advert)) > self.node_grace:
                        self.log.warning("node_grace_raised", node_id=advert.node_id, grace=grace,
                                         configured=self.node_grace, heartbeat=advert.heartbeat_interval,
                                         reason="never under two of the node's heartbeats")  # fmt: skip
                    await self._node_event(advert, "joined", f"agent started at {advert.started_at:.3f}")
                elif advert.node_id in self.not_responding:
                    self.not_responding.discard(advert.node_id)
                    await self._node_event(advert, "recovered", "heartbeats resumed")
                    before = None
                if before is not None and _offers_the_same(before, advert):
                    continue  # a heartbeat: nothing a pass would decide differently (thousands of these a second)
            self._wake.set()

    async def _consume_events(self) -> None:
        # A callback, not ``async for msg in sub.messages``: that makes a task and an asyncio.wait per message,
        # an eighth of the scheduler's CPU in a burst of placements. An event whose handling fails ends the
        # subscription as the loop did (the task starts again on a bus error; any other error stops the service).
        failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def take(msg: Msg) -> None:
            if failed.done():
                return
            try:
                await self._take(msg)
            except Exception as exc:
                failed.set_exception(exc)

        sub = await self.js.subscribe(
            subjects.all_run_events(), stream=subjects.EVENTS_STREAM, cb=take, ordered_consumer=True,
            deliver_policy=js_api.DeliverPolicy.LAST_PER_SUBJECT,
        )  # fmt: skip
        try:
            await failed
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _take(self, msg: Msg) -> None:
        event = schemas.run_event_decoder.decode(msg.data)
        if event.state is RunState.QUEUED:
            self.last_seen[event.run_id] = (event, msg.metadata.sequence.stream)
        else:
            self.last_seen.pop(event.run_id, None)
        await self._on_event(event)

    async def _on_event(self, event: schemas.RunEvent) -> None:
        run_id, state = event.run_id, event.state
        if state is RunState.QUEUED:
            if isinstance(event, schemas.Retried):  # the failed attempt's slots are free; the next one waits a bit
                if self.allocations.pop(run_id, None) is not None:
                    self._wake.set()
                self.not_before[run_id] = (event.not_before, event.attempt, event.cause)
                asyncio.get_running_loop().call_later(max(0.0, event.not_before - time.time()), self._wake.set)
            if not any(run_id in q for q in self.queues.values()):
                if isinstance(event, schemas.Queued) and event.spec is not None:
                    record: schemas.RunRecord | None = schemas.RunRecord(
                        run_id=run_id, spec=event.spec, submitted_at=event.at
                    )
                else:
                    record = await self._record(run_id)
                if record is not None:
                    self.queues.setdefault(record.spec.compute_target, OrderedDict())[run_id] = record
                    if isinstance(event, schemas.Queued) and event.reason:
                        self.reasons[run_id] = event.reason
                    self._wake.set()
            return
        for queue in self.queues.values():
            queue.pop(run_id, None)
        self.reasons.pop(run_id, None)
        self.not_before.pop(run_id, None)
        if state in PLACED_STATES:
            if run_id not in self.allocations:
                placement = await self._placement_of(run_id, event)
                if placement:
                    self.allocations[run_id] = placement
                    if state is RunState.PREPARING:
                        # Restart recovery: the assignment may not have reached the agent. Re-sending is safe:
                        # it is deduplicated by message id, and agents ignore runs they already took.
                        record = await self._record(run_id)
                        if record is not None:
                            await self._send_assignments(record, placement, lifecycle.attempt_of(event))
        elif self.allocations.pop(run_id, None) is not None:
            self._wake.set()

    async def _placement_of(self, run_id: str, event: schemas.RunEvent) -> list[schemas.RankSlot]:
        if isinstance(event, schemas.Assigned):
            return list(event.placement)
        for ev in reversed(await self.events.history(run_id)):
            if isinstance(ev, schemas.Assigned):
                return list(ev.placement)
        return []

    async def _record(self, run_id: str) -> schemas.RunRecord | None:
        try:
            return await bus.get_record(self.runs_kv, run_id)
        except NotFoundError:
            self.log.warning("run_record_missing", run_id=run_id)
            return None

    async def _schedule_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.schedule_pass()

    def _node_table(self, now: float) -> dict[str, NodeState]:
        """The nodes within their grace, in node-id order (what a pass's index wants; the order is kept while no
        node joins or leaves). Silent nodes within their grace still hold their runs' slots; they just get no new
        work (schedule_pass). This is _heard_from(lost=True) for every node, written out: at 10,000 nodes the
        calls were most of a pass."""
        if self._order is None:
            self._order = sorted(self.nodes)
        nodes, heard, up, grace = self.nodes, self.heard_at, self.bus_up_since, self.node_grace
        state_of = self.allocations.state_of
        table = {}
        for nid in self._order:
            advert = nodes.get(nid)
            if advert is None:
                continue
            last = max(heard.get(nid, up), up)
            if now - last <= max(grace, 2 * advert.heartbeat_interval):
                table[nid] = state_of(advert)
        return table

    async def schedule_pass(self) -> None:
        """Decide every queued run in FIFO order (sequentially, in memory), then write the decisions concurrently."""
        if not any(self.queues.values()):
            return  # nothing waits: no table to build (every node joining wakes a pass)
        table = self._node_table(time.time())
        writes = []
        placed: list[tuple[schemas.RunRecord, list[schemas.RankSlot]]] = []
        recheck = False
        backoff_ends = math.inf
        for target, queue in self.queues.items():
            nodes = Pool(
                [
                    n
                    for n in table.values()
                    if n.advert.compute_target == target and n.advert.node_id not in self.not_responding
                ],
                ordered=True,
            )
            known = [a for a in self.known.values() if a.compute_target == target]
            grew_at = self.target_grew_at.get(target)
            settling = grew_at is not None and time.monotonic() - grew_at < SETTLE_SECONDS
            for run_id, record in list(queue.items()):
                if run_id in self.not_before:
                    until, attempt, cause = self.not_before[run_id]
                    if time.time() < until:
                        # Looked at again then, whoever else wakes a pass: the wake the Retried event set runs by
                        # the loop's clock, which can be a hair ahead of this one (uvloop's timers, for one, count
                        # whole ms), and a run found still waiting would stay queued until some other change.
                        backoff_ends = min(backoff_ends, until)
                        at = time.strftime("%H:%M:%S", time.gmtime(until))
                        reason = f"attempt {attempt} (after {cause}) waits out its retry backoff until {at} UTC"
                        if reason != self.reasons.get(run_id):
                            self.reasons[run_id] = reason
                            writes.append(self._annotate(run_id, reason))
                        continue
                    del self.not_before[run_id]
                decision = place(record.spec, nodes, known)
                if decision.placement is not None:
                    nodes.take(decision.placement)  # on the table's NodeStates, which the pool holds
                    self.allocations[run_id] = decision.placement  # held now; released if the write loses
                    queue.pop(run_id, None)
                    placed.append((record, decision.placement))
                elif decision.impossible is not None and not settling:
                    queue.pop(run_id, None)
                    writes.append(self._unschedulable(record, decision.impossible))
                elif decision.impossible is not None:  # nodes are still joining: look again once they settle
                    reason = f"{decision.impossible} so far; nodes are still joining"
                    recheck = True
                    if reason != self.reasons.get(run_id):
                        self.reasons[run_id] = reason
                        writes.append(self._annotate(run_id, reason))
                elif decision.reason != self.reasons.get(run_id):
                    self.reasons[run_id] = decision.reason or ""
                    writes.append(self._annotate(run_id, decision.reason or ""))
        if recheck:
            asyncio.get_running_loop().call_later(SETTLE_SECONDS, self._wake.set)
        if backoff_ends < math.inf:
            asyncio.get_running_loop().call_later(max(0.0, backoff_ends - time.time()) + 0.005, self._wake.set)
        writes += [self._assign(placed[i : i + ASSIGN_BATCH]) for i in range(0, len(placed), ASSIGN_BATCH)]
        await asyncio.gather(*writes)

    async def _assign(self, placed: list[tuple[schemas.RunRecord, list[schemas.RankSlot]]]) -> None:
        """Store the runs' Assigned events (each compare-and-set on the run's last event, pipelined), then hand
        the ones that were stored to their nodes."""
        builds = [
            # Not if it was canceled or placed meanwhile.
            (record.run_id, lifecycle.append_if(lifecycle.in_state(RunState.QUEUED), schemas.Assigned,
                                                record.run_id, placement=placement),
             self.last_seen.get(record.run_id))
            for record, placement in placed
        ]  # fmt: skip
        results = await self.events.append_many(builds, self.pipeline)
        stored: list[tuple[schemas.RunRecord, list[schemas.RankSlot], int]] = []
        fatal: BaseException | None = None
        for (record, placement), result in zip(placed, results, strict=True):
            run_id = record.run_id
            if isinstance(result, bus.AppendInDoubt):  # its slots stay held until the log says whether it is placed
                self.spawn(self._settle(record, placement, result), f"settle_{run_id}")
            elif isinstance(result, BaseException) and not isinstance(result, ConflictError):
                self.allocations.pop(run_id, None)
                if bus.is_transient(result):
                    self._requeue(record, "assign", result)
                else:
                    fatal = fatal or result
            elif result is None or isinstance(result, ConflictError):
                self.allocations.pop(run_id, None)
                self._wake.set()
            else:
                self.reasons.pop(run_id, None)
                stored.append((record, placement, lifecycle.attempt_of(result)))
        await self._send_assignments_many(stored)
        if stored:  # one line per batch: at thousands of placements a second, a line each was 8% of the CPU
            assigned = {record.run_id: sorted({s.node_id for s in placement}) for record, placement, _ in stored}
            self.log.info("runs_assigned", count=len(assigned), runs=assigned)
        if fatal is not None:
            raise fatal

    async def _settle(
        self, record: schemas.RunRecord, placement: list[schemas.RankSlot], doubt: bus.AppendInDoubt
    ) -> None:
        """An Assigned event whose answer was lost may have been stored. If it was, the run is placed and its nodes
        must hear of it (the event watcher may have seen it already, while the slots were still held for it: it
        sends nothing then); if not, the run goes back to its place in the queue. Read once the bus answers."""
        stored = await bus.outlast(lambda: self.events.stored(doubt))
        run_id = record.run_id
        if stored is None:
            self.allocations.pop(run_id, None)
            self._requeue(record, "assign", doubt.cause)
        elif self.allocations.get(run_id) is not None:  # (not if the run ended meanwhile)
            self.log.info("assignment_settled", run_id=run_id)
            await self._send_assignments(record, placement, lifecycle.attempt_of(stored[0]))

    def _assignments(
        self, record: schemas.RunRecord, placement: list[schemas.RankSlot], attempt: int
    ) -> list[tuple[str, bytes, dict[str, str]]]:
        """The run's assignment messages, one per node, each with a message id that deduplicates a resend."""
        nodes = sorted({s.node_id for s in placement})
        hosts = {n: self.nodes[n].host_id for n in nodes if n in self.nodes}
        return [
            (subjects.node_assignments(node_id),
             schemas.encode(schemas.Assignment(run_id=record.run_id, node_id=node_id, attempt=attempt,
                                               spec=record.spec, placement=placement, hosts=hosts)),
             {"Nats-Msg-Id": f"{record.run_id}:{node_id}:{attempt}"})
            for node_id in nodes
        ]  # fmt: skip

    async def _send_assignments_many(self, runs: list[tuple[schemas.RunRecord, list[schemas.RankSlot], int]]) -> None:
        """Every run's assignments pipelined; a run any of whose messages was not acknowledged is sent again the
        patient way (_send_assignments)."""
        messages = [self._assignments(record, placement, attempt) for record, placement, attempt in runs]
        errors = await self.pipeline.publish([m for run in messages for m in run])
        again, at = [], 0
        for run, sent in zip(runs, messages, strict=True):
            if any(errors[at : at + len(sent)]):
                again.append(run)
            at += len(sent)
        await asyncio.gather(*(self._send_assignments(*run) for run in again))

    async def _send_assignments(
        self, record: schemas.RunRecord, placement: list[schemas.RankSlot], attempt: int
    ) -> None:
        """Hand the run to its nodes. The run is placed already (its Assigned event is stored), so a bus outage
        is waited out: re-sending is safe, each assignment is deduplicated by its message id."""
        for subject, payload, headers in self._assignments(record, placement, attempt):
            await bus.outlast(
                lambda subject=subject, payload=payload, headers=headers: self.js.publish(
                    subject, payload, headers=headers
                )
            )

    def _requeue(self, record: schemas.RunRecord, what: str, exc: BaseException) -> None:
        """A decision could not be written (the bus is away): the run goes back to its place in the queue, and the
        scheduler looks again shortly."""
        queue = self.queues.setdefault(record.spec.compute_target, OrderedDict())
        queue[record.run_id] = record
        for run_id in sorted(queue, key=lambda r: queue[r].submitted_at):  # back into FIFO order
            queue.move_to_end(run_id)
        self.reasons.pop(record.run_id, None)
        self.log.warning("decision_deferred", run_id=record.run_id, write=what, error=repr(exc))
        asyncio.get_running_loop().call_later(RETRY_SECONDS, self._wake.set)

    async def _annotate(self, run_id: str, reason: str) -> None:
        build = lifecycle.append_if(lifecycle.in_state(RunState.QUEUED), schemas.Queued, run_id, reason=reason)
        try:
            await self.events.append(run_id, build)
        except Exception as exc:
            if not bus.is_transient(exc):
                raise
            self.reasons.pop(run_id, None)  # written on a later pass
            asyncio.get_running_loop().call_later(RETRY_SECONDS, self._wake.set)
            return
        self.log.info("run_waiting", run_id=run_id, reason=reason)

    async def _unschedulable(self, record: schemas.RunRecord, message: str) -> None:
        try:
            await self._fail(record.run_id, Cause.UNSCHEDULABLE, message)
        except Exception as exc:
            if not bus.is_transient(exc):
                raise
            self._requeue(record, "fail", exc)

    async def _fail(self, run_id: str, code: str, message: str) -> None:
        error = schemas.ErrorInfo(code=code, message=message)
        build = lifecycle.append_if(lifecycle.undecided(), schemas.Failed, run_id, error=error)
        await self.events.append(run_id, build)
        self.log.warning("run_failed", run_id=run_id, reason=message)

    async def _liveness_loop(self) -> None:
        """A node that stops heartbeating is lost: its runs' other nodes stop their ranks and the run fails."""
        while True:
            await asyncio.sleep(1.0)
            if not self.bus_connected:
                continue  # no heartbeat can reach us now: silence says nothing about the nodes
            now = time.time()
            # The watch can lag behind the bucket (its consumer resets after a reconnect): before a node is
            # judged silent, its key is read directly.
            for nid, advert in list(self.nodes.items()):
                if not self._heard_from(advert, now):
                    await self._reread(nid)
            # Snapshots: the node watch changes self.nodes while this loop awaits its events.
            for nid, advert in list(self.nodes.items()):
                if nid not in self.not_responding and not self._heard_from(advert, now):
                    self.not_responding.add(nid)
                    grace = self._grace(advert)
                    await self._node_event(advert, "not_responding", f"missed heartbeats; lost after {grace:g}s")
                    self._wake.set()  # its free slots are no longer offered
            dead = {nid for nid, advert in list(self.nodes.items()) if not self._heard_from(advert, now, lost=True)}
            if not dead:
                continue
            for nid in sorted(dead):
                self.log.warning("node_lost", node_id=nid)
                self.not_responding.discard(nid)
                self.allocations.forget(nid)
                self._order = None
                if (advert := self.nodes.pop(nid, None)) is not None:
                    await self._node_event(advert, "lost", f"silent past its grace ({self._grace(advert):g}s)")
            await self._nodes_gone(dead)
            self._wake.set()

    async def _reread(self, node_id: str) -> None:
        try:
            entry = await self.nodes_kv.get(node_id)
        except KeyNotFoundError:
            return  # deregistered: the watch reports it
        except bus.TRANSIENT_ERRORS:
            # The bucket cannot be read (its servers are electing a leader, or too few are up): no heartbeat can
            # be stored either, so silence until it can does not count against any node.
            self.bus_up_since = time.time()
            raise
        if entry.value:
            fresh = schemas.node_decoder.decode(entry.value)
            current = self.nodes.get(node_id)
            if current is not None and fresh.heartbeat_at != current.heartbeat_at:  # a beat the watch has not shown
                self._heard(fresh)
                self.nodes[node_id] = fresh
                self.known[node_id] = fresh
                if node_id in self.not_responding:
                    self.not_responding.discard(node_id)
                    await self._node_event(fresh, "recovered", "heartbeats resumed")
                    self._wake.set()

    def _grace(self, advert: schemas.NodeAdvert) -> float:
        # Never under two heartbeats, whatever the setting: one late beat must not lose a node.
        return max(self.node_grace, 2 * advert.heartbeat_interval)

    def _heard(self, advert: schemas.NodeAdvert) -> None:
        """A new heartbeat arrived: when, by this scheduler's clock (an agent's clock may be off by minutes)."""
        known = self.known.get(advert.node_id)
        if known is None or known.heartbeat_at != advert.heartbeat_at or advert.node_id not in self.heard_at:
            self.heard_at[advert.node_id] = time.time()

    def _last_heard(self, advert: schemas.NodeAdvert) -> float:
        """Silence while this scheduler was cut off from the bus does not count against a node: its clock starts
        again when the connection came back."""
        return max(self.heard_at.get(advert.node_id, self.bus_up_since), self.bus_up_since)

    def _heard_from(self, advert: schemas.NodeAdvert, now: float, lost: bool = False) -> bool:
        """Whether the node's heartbeats are arriving (missing 1.5 beats: not responding), or with ``lost``,
        whether it is still within its grace. Times are this scheduler's own: the agent's only tells beats apart."""
        return now - self._last_heard(advert) <= (self._grace(advert) if lost else 1.5 * advert.heartbeat_interval)

    async def _node_event(self, advert: schemas.NodeAdvert, kind: str, detail: str) -> None:
        """Record a node's change for operators, once: a restarted scheduler does not repeat a join it saw."""
        subject = subjects.node_events(advert.node_id)
        try:
            raw = await self.js.get_last_msg(subjects.NODES_STREAM, subject)
            last = schemas.node_event_decoder.decode(raw.data or b"")
            if last.kind == kind and last.detail == detail:
                return
        except JsNotFound:
            pass
        event = schemas.NodeEvent(
            node_id=advert.node_id, kind=kind, at=time.time(), compute_target=advert.compute_target, detail=detail
        )  # type: ignore[arg-type]
        await self.js.publish(subject, schemas.encode(event))

    def state(self, now: float, page: schemas.SchedulerStateRequest | None = None) -> schemas.SchedulerState:
        """Nodes and queue as they stand (one page of each: see SchedulerStateRequest)."""
        page = page or schemas.SchedulerStateRequest(node_limit=1 << 30, queue_limit=1 << 30)
        if not (1 <= page.node_limit and 1 <= page.queue_limit and page.queue_offset >= 0):
            raise ValidationError("node_limit and queue_limit must be at least 1, queue_offset at least 0")
        table = self._node_table(now)
        runs_on: dict[str, list[str]] = {}
        for run_id, placement in self.allocations.items():
            for node_id in sorted({s.node_id for s in placement}):
                runs_on.setdefault(node_id, []).append(run_id)
        nodes = []
        ids = sorted(nid for nid in self.known if nid > page.nodes_after)
        more_nodes = len(ids) > page.node_limit
        for nid in ids[: page.node_limit]:
            advert = self.known[nid]
            used = table.get(nid)
            if nid in table:
                state = "NotResponding" if nid in self.not_responding else "Ready"
            else:
                state = "Lost"
            lost_in = None
            if state == "NotResponding":
                lost_in = max(0.0, self._last_heard(advert) + self._grace(advert) - now)
            nodes.append(schemas.NodeStatus(
                advert=advert, state=state, used_slots=used.used_slots if used else 0,
                used_gpus=sorted(used.used_gpus) if used else [], runs=runs_on.get(nid, []), lost_in=lost_in,
            ))  # fmt: skip
        queue = [
            schemas.QueuedRun(
                run_id=run_id, experiment=record.spec.experiment, compute_target=target, position=i + 1,
                reason=self.reasons.get(run_id, "being placed"), queued_at=record.submitted_at,
            )
            for target, q in sorted(self.queues.items())
            for i, (run_id, record) in enumerate(q.items())
        ]  # fmt: skip
        end = page.queue_offset + page.queue_limit
        return schemas.SchedulerState(
            nodes=nodes, queue=queue[page.queue_offset : end], more_nodes=more_nodes, more_queue=len(queue) > end
        )

    async def _state(self, page: schemas.SchedulerStateRequest) -> schemas.SchedulerState:
        return self.state(time.time(), page)

    async def _nodes_gone(self, gone: set[str]) -> None:
        """Record the loss on every run that had ranks there: runs concurrently, each run's losses in order."""
        # Through the node -> runs index: a fleet that loses a thousand nodes at once must not go over every
        # running run for each of them.
        affected = [
            (run_id, {s.node_id for s in self.allocations[run_id]}) for run_id in sorted(self.allocations.runs_on(gone))
        ]
        limit = asyncio.Semaphore(LOST_CONCURRENCY)

        async def one(run_id: str, nodes: set[str]) -> None:
            lock = self._lost_locks.setdefault(run_id, asyncio.Lock())
            async with limit, lock:
                for nid in sorted(nodes & gone):
                    await self._node_lost(run_id, nid, nodes)
            if not lock.locked() and self._lost_locks.get(run_id) is lock:
                del self._lost_locks[run_id]

        await asyncio.gather(*(one(run_id, nodes) for run_id, nodes in affected))

    async def _node_lost(self, run_id: str, node_id: str, nodes: set[str]) -> None:
        history = lifecycle.current_attempt(await self.events.history(run_id))
        if not history or any(isinstance(e, schemas.NodeFinished) and e.node_id == node_id for e in history):
            return  # its part was done and reported: losing it now costs the run nothing
        attempt = lifecycle.attempt_of(history[-1])
        build = lifecycle.append_if(lifecycle.undecided(attempt), schemas.NodeLost, run_id, node_id=node_id)
        if await self.events.append(run_id, build) is None:
            return
        lost = {e.node_id for e in history if isinstance(e, schemas.NodeLost)} | {node_id}
        reported = {e.node_id for e in history if isinstance(e, schemas.NodeFinished)}
        record = await self._record(run_id)
        if record is not None and runs.should_retry(record.spec, Cause.NODE_LOST, attempt):
            return  # the artifact service, following the loss, queues the next attempt
        if lost | reported >= nodes and not reported:
            # No node of the run is left to report back: nobody else can end it.
            await self._fail(
                run_id, "node_lost", f"node {', '.join(sorted(lost))} left or stopped heartbeating (node lost)"
            )


def _offers_the_same(before: schemas.NodeAdvert, after: schemas.NodeAdvert) -> bool:
    """Whether a node's new advert changes nothing that placement looks at (a plain heartbeat)."""
    return (
        before.slots == after.slots
        and before.gpus == after.gpus
        and before.compute_target == after.compute_target
        and before.runtime == after.runtime
        and before.address == after.address
        and before.started_at == after.started_at
    )
