"""NATS plumbing: connecting, the JetStream topology, typed request/reply and the run event log."""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.client import RawCredentials
from nats.aio.msg import Msg
from nats.errors import (
    ConnectionReconnectingError,
    NoRespondersError,
    NoServersError,
    OutboundBufferLimitError,
    StaleConnectionError,
)
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import APIError, BadRequestError, KeyNotFoundError, NoStreamResponseError
from nats.js.errors import NotFoundError as JsNotFound
from nats.js.errors import ServiceUnavailableError as JsUnavailable
from nats.js.kv import KeyValue

from shared import lifecycle, schemas, subjects
from shared.errors import (
    AuthenticationError,
    ClusterNotRunningError,
    ConflictError,
    ServiceUnavailableError,
    ValidationError,
    error_class,
)
from shared.errors import NotFoundError as CadreNotFoundError
from shared.settings import BusSettings, retention_days, stream_replicas
from shared.states import check_transition

T = TypeVar("T")

# JetStream's answers when an expected-last-subject-sequence check fails: one server says which sequence it has
# (10071); a clustered stream's leader answers with the constant form (10164).
WRONG_LAST_SEQUENCE = frozenset({10071, 10164})

# What a bus outage (a server restarting, a partition, JetStream without quorum) raises: worth waiting out.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    TimeoutError,  # nats' own TimeoutError is one, and so is asyncio's
    ConnectionReconnectingError,
    StaleConnectionError,
    OutboundBufferLimitError,
    NoRespondersError,
    NoStreamResponseError,
    JsUnavailable,
    ServiceUnavailableError,
    ConnectionError,
)


class AppendInDoubt(TimeoutError):
    """An append that was sent but never answered (the bus went away, or its answer came too late): the event may
    be stored or not. Transient like any timeout; ``RunEventLog.stored`` tells which, once the bus answers."""

    def __init__(self, run_id: str, event: schemas.RunEvent, after: int, cause: BaseException) -> None:
        super().__init__(f"run {run_id}: no answer to appending {type(event).__name__} ({cause!r})")
        self.run_id, self.event, self.after, self.cause = run_id, event, after, cause


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` comes from the bus being away for a while (retry), not from a bug or bad input."""
    return isinstance(exc, TRANSIENT_ERRORS)


class Backoff:
    """Exponential waits between retries, from ``first`` up to ``cap`` seconds; ``reset`` once things work."""

    def __init__(self, first: float = 0.25, cap: float = 5.0) -> None:
        self.first, self.cap = first, cap
        self.attempts = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.first * (2**self.attempts))
        self.attempts += 1
        return delay

    async def wait(self) -> None:
        await asyncio.sleep(self.next_delay())

    def reset(self) -> None:
        self.attempts = 0


async def connect(settings: BusSettings, **kwargs: Any) -> NATS:
    """Connect with the role's credentials; a cluster that is not there, or refused credentials, is a clear
    error at once, not an endless retry. Once connected, reconnects are unlimited."""
    user_cb = kwargs.pop("error_cb", None)
    refused: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()

    async def on_error(exc: Exception) -> None:
        if "authorization" in str(exc).lower() and not refused.done():
            refused.set_result(exc)
        if user_cb is not None:
            await user_cb(exc)

    servers = [u.strip() for u in settings.url.split(",") if u.strip()]  # a cluster: every server's URL
    auth: dict[str, Any] = (
        {"user_credentials": RawCredentials(settings.creds)}
        if settings.creds
        else {"user": settings.user, "password": settings.password}
    )
    options: dict[str, Any] = {
        "servers": servers,
        **auth,
        "name": settings.name,
        "connect_timeout": 2,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "error_cb": on_error,
        **kwargs,
    }
    try:
        # nats-py retries a first connection forever when reconnects are unlimited: probe once first.
        await _probe_any(servers)
    except (TimeoutError, OSError) as exc:
        raise ClusterNotRunningError(
            f"cannot reach the cadre bus at {settings.url} ({exc.__class__.__name__}); "
            "start a local cluster with `cadre up` or check the connection profile"
        ) from exc
    attempt = asyncio.ensure_future(nats.connect(**options))
    await asyncio.wait([attempt, refused], return_when=asyncio.FIRST_COMPLETED)
    if attempt.done():
        try:
            return attempt.result()
        except (TimeoutError, NoServersError, OSError) as exc:
            raise ClusterNotRunningError(f"cannot connect to the cadre bus at {settings.url}: {exc}") from exc
    attempt.cancel()
    if settings.creds:
        raise AuthenticationError(
            f"the cadre bus at {settings.url} refused {settings.who!r} (Authorization Violation): the credentials "
            "file was revoked or replaced, or was issued for another bus; ask its admin for a new one "
            "(`cadre admin add-agent NAME --rotate` for a host, `cadre admin add-user NAME --rotate` for a person)"
        )
    raise AuthenticationError(
        f"the cadre bus at {settings.url} refused user {settings.user!r} (Authorization Violation): "
        "check the credentials in the connection profile"
    )


async def _probe_any(urls: list[str], timeout: float = 2.0) -> None:
    """One of the servers takes a connection (the first error is raised if none does)."""
    first: BaseException | None = None
    for url in urls:
        parsed = urllib.parse.urlparse(url)
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(parsed.hostname or "127.0.0.1", parsed.port or 4222), timeout
            )
        except (TimeoutError, OSError) as exc:
            first = first or exc
            continue
        writer.close()
        return
    raise first or OSError("no server URL")


async def ensure_topology(js: JetStreamContext) -> None:
    """Create (or update) every stream and KV bucket. Idempotent; services call it at start.

    Run history (events, metrics, node events) is kept for ``CADRE_HISTORY_DAYS`` (0, the default: forever);
    log lines for ``CADRE_LOG_RETENTION_DAYS`` (default 30; each rank's log is also stored as a run file).
    """
    days = retention_days()
    retention = days[0] * 86400 if days[0] else None
    replicas = stream_replicas()  # 3 on a three-server bus: a stream survives losing one server
    streams = [
        js_api.StreamConfig(
            name=subjects.EVENTS_STREAM,
            subjects=[subjects.all_run_events()],
            storage=js_api.StorageType.FILE,
            num_replicas=replicas,
            duplicate_window=120,
            max_age=retention,
            allow_direct=True,  # read with direct gets where that is consistent (see direct_reads)
        ),
        js_api.StreamConfig(
            name=subjects.LOGS_STREAM,
            subjects=[subjects.all_run_logs()],
            storage=js_api.StorageType.FILE,
            num_replicas=replicas,
            max_age=days[1] * 86400 if days[1] else None,
        ),
        js_api.StreamConfig(
            name=subjects.ASSIGNMENTS_STREAM,
            subjects=[subjects.all_node_assignments()],
            storage=js_api.StorageType.FILE,
            num_replicas=replicas,
            retention=js_api.RetentionPolicy.WORK_QUEUE,
            duplicate_window=120,
        ),
        js_api.StreamConfig(
            name=subjects.METRICS_STREAM,
            subjects=[subjects.all_run_metrics()],
            storage=js_api.StorageType.FILE,
            num_replicas=replicas,
            max_age=retention,
        ),
        js_api.StreamConfig(
            name=subjects.NODES_STREAM,
            subjects=[subjects.all_node_events()],
            storage=js_api.StorageType.FILE,
            num_replicas=replicas,
            max_age=retention,
        ),
        js_api.StreamConfig(
            name=subjects.SERVICES_STREAM,
            subjects=[subjects.all_service_events()],
            storage=js_api.StorageType.FILE,
            num_replicas=replicas,
            max_age=retention,
        ),
        js_api.StreamConfig(
            name=subjects.SWEEPS_STREAM,
            subjects=[subjects.all_sweep_subjects()],
            storage=js_api.StorageType.FILE,
            num_replicas=replicas,
            max_age=retention,
        ),
        js_api.StreamConfig(
            name=subjects.MODELS_STREAM,
            subjects=[subjects.all_model_events()],
            storage=js_api.StorageType.FILE,
            num_replicas=replicas,
        ),
    ]
    for cfg in streams:
        await _settled(lambda cfg=cfg: _add_or_update(js, cfg), cfg.name or "")
    for bucket, history in (
        (subjects.NODES_BUCKET, 1),
        (subjects.TARGETS_BUCKET, 1),
        (subjects.RUNS_BUCKET, 1),
        (subjects.MODELS_BUCKET, 1),
        (subjects.DATASETS_BUCKET, 1),
        (subjects.ENVIRONMENTS_BUCKET, 1),
        (subjects.SECRETS_BUCKET, 1),
    ):
        kv = js_api.KeyValueConfig(bucket=bucket, history=history, storage=js_api.StorageType.FILE, replicas=replicas)
        await _settled(lambda kv=kv: js.create_key_value(kv), bucket)


async def _add_or_update(js: JetStreamContext, cfg: js_api.StreamConfig) -> None:
    try:
        await js.add_stream(cfg)
    except BadRequestError:
        await js.update_stream(cfg)


async def _settled(create: Callable[[], Awaitable[object]], name: str, within: float = 30.0) -> None:
    """``create()``, again while another service is creating the same stream: on a clustered bus the creation is
    a proposal the servers agree on first, so for a moment the stream is neither new nor there to update."""
    deadline = time.monotonic() + within
    while True:
        try:
            await create()
            return
        except (JsNotFound, BadRequestError, *TRANSIENT_ERRORS) as exc:
            if time.monotonic() > deadline:
                raise ClusterNotRunningError(f"JetStream could not create {name}: {exc}") from exc
            await asyncio.sleep(0.1)


async def request(nc: NATS, subject: str, payload: msgspec.Struct, reply_type: type[T], timeout: float = 10.0) -> T:
    """Typed request/reply: returns the reply's value or raises the error it carries."""
    try:
        msg = await nc.request(subject, schemas.encode(payload), timeout=timeout)
    except NoRespondersError as exc:
        raise ServiceUnavailableError(f"no service answers {subject}; is the cluster fully started?") from exc
    except NatsTimeout as exc:
        raise ServiceUnavailableError(
            f"no answer on {subject} within {timeout:.0f}s (service down, or not permitted for this role)"
        ) from exc
    reply = msgspec.json.decode(msg.data, type=schemas.Reply[reply_type])  # type: ignore[valid-type]
    if reply.error is not None:
        raise error_class(reply.error.code)(reply.error.message)
    assert reply.ok is not None
    return reply.ok


async def get_record(runs_kv: KeyValue, run_id: str) -> schemas.RunRecord:
    """A run's immutable record; a malformed id or an unknown run is a clear error."""
    if not subjects.RUN_ID_RE.match(run_id):
        raise ValidationError(f"{run_id!r} is not a run id")
    try:
        entry = await runs_kv.get(run_id)
    except KeyNotFoundError:
        raise CadreNotFoundError(f"run {run_id} not found") from None
    assert entry.value is not None
    return schemas.record_decoder.decode(entry.value)


EventBuilder = Callable[[schemas.RunEvent | None], "schemas.RunEvent | None"]


class RunEventLog:
    """The run event stream as the source of truth for run state.

    Appends are compare-and-set on the run's subject (``Nats-Expected-Last-Subject-Sequence``), so two
    writers racing on one run can never both move it, and no illegal transition is ever stored.
    """

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def last(self, run_id: str) -> tuple[schemas.RunEvent | None, int]:
        try:
            raw = await get_msg(self._js, subjects.EVENTS_STREAM, subject=subjects.run_events(run_id))
        except JsNotFound:
            return None, 0
        assert raw.data is not None and raw.seq is not None
        return schemas.run_event_decoder.decode(raw.data), raw.seq

    async def stored(self, doubt: AppendInDoubt) -> tuple[schemas.RunEvent, int] | None:
        """The event of an append in doubt and its stream sequence, if it was stored; else None. Compare-and-set
        means it can only be the run's first event after the one it was appended to."""
        subject = subjects.run_events(doubt.run_id)
        async for raw in messages_after(self._js, subjects.EVENTS_STREAM, subject, doubt.after):
            event = schemas.run_event_decoder.decode(raw.data)
            return (event, raw.seq) if event.event_id == doubt.event.event_id else None
        return None

    async def append(
        self,
        run_id: str,
        build: EventBuilder,
        attempts: int = 20,
        known: tuple[schemas.RunEvent | None, int] | None = None,
    ) -> schemas.RunEvent | None:
        """Append the event ``build(last_event)`` returns; ``None`` from build means nothing to do.

        ``known`` is the caller's idea of the last event and its stream sequence (a consumer has it already): it
        saves a round trip, and if it is stale the compare-and-set fails and the real last event is read.
        Raises ConflictError when the event would be an illegal transition, and AppendInDoubt when the event was
        sent but its answer never came.
        """
        stored = await self.append_at(run_id, build, attempts, known)
        return None if stored is None else stored[0]

    async def append_at(
        self,
        run_id: str,
        build: EventBuilder,
        attempts: int = 20,
        known: tuple[schemas.RunEvent | None, int] | None = None,
    ) -> tuple[schemas.RunEvent, int, int] | None:
        """``append``, saying where the event went: ``(event, after, seq)``, the stream sequence of the event it
        was appended right after (the subject's last then: nothing came in between) and its own."""
        for _ in range(attempts):
            if known is not None:
                (last, seq), known = known, None
            else:
                last, seq = await self.last(run_id)
            event = _built(build, last)
            if event is None:
                return None
            try:
                subject, payload, headers = _after_message(run_id, event, seq)
                ack = await self._js.publish(subject, payload, headers=headers)
                return event, seq, ack.seq
            except APIError as exc:
                if exc.err_code not in WRONG_LAST_SEQUENCE:
                    raise
            except TRANSIENT_ERRORS as exc:
                raise AppendInDoubt(run_id, event, seq, exc) from exc
        raise ConflictError(f"run {run_id}: too much contention appending an event")

    async def append_many(
        self, items: list[tuple[str, EventBuilder, tuple[schemas.RunEvent | None, int] | None]], pipeline: Pipeline
    ) -> list[schemas.RunEvent | BaseException | None]:
        """``append`` for many runs at once, through ``pipeline``: each ``(run_id, build, known)`` with a known last
        event is published without waiting for the one before; one whose compare-and-set fails (or with nothing
        known) goes the one-at-a-time way. Each result is what ``append`` would return, or the error it would
        raise."""
        results: list[schemas.RunEvent | BaseException | None] = [None] * len(items)
        slow: list[int] = []
        batch: list[tuple[int, schemas.RunEvent, int, tuple[str, bytes, dict[str, str]]]] = []
        for i, (run_id, build, known) in enumerate(items):
            if known is None:
                slow.append(i)
                continue
            last, seq = known
            try:
                event = _built(build, last)
            except Exception as exc:
                results[i] = exc
                continue
            if event is not None:
                batch.append((i, event, seq, _after_message(run_id, event, seq)))
        errors = await pipeline.publish([message for *_, message in batch])
        for (i, event, seq, _), error in zip(batch, errors, strict=True):
            if error is None:
                results[i] = event
            elif isinstance(error, APIError) and error.err_code in WRONG_LAST_SEQUENCE:
                slow.append(i)  # someone wrote first: read what they wrote, and decide again
            elif is_transient(error):
                results[i] = AppendInDoubt(items[i][0], event, seq, error)
            else:
                results[i] = error

        async def one(i: int) -> None:
            run_id, build, _ = items[i]
            try:
                results[i] = await self.append(run_id, build)
            except Exception as exc:
                results[i] = exc

        await asyncio.gather(*(one(i) for i in slow))
        return results

    async def begin(self, run_id: str, events: list[schemas.RunEvent]) -> None:
        """A new run's first events, in order: the first only onto an empty subject, each next one only right after
        the one before (compare-and-set on the sequence the last ack gave: no read of the subject in between)."""
        last: schemas.RunEvent | None = None
        seq = 0
        for event in events:
            if event.attempt == 0:
                event = msgspec.structs.replace(event, attempt=1)
            check_transition(last.state if last else None, event.state)
            subject, payload, headers = _after_message(run_id, event, seq)
            ack = await self._js.publish(subject, payload, headers=headers)
            last, seq = event, ack.seq

    async def history(self, run_id: str) -> list[schemas.RunEvent]:
        """Every event of the run, in order, with no consumer (:func:`messages_after`): thousands of these run at
        once when a node with many runs leaves."""
        msgs = messages_after(self._js, subjects.EVENTS_STREAM, subjects.run_events(run_id), 0)
        return [schemas.run_event_decoder.decode(raw.data) async for raw in msgs]

    async def latest_per_run(self) -> list[schemas.RunEvent]:
        """The newest event of every run (one pass over the stream's last-per-subject index)."""
        info = await self._js.stream_info(subjects.EVENTS_STREAM)
        if info.state.messages == 0:
            return []
        msgs = replay(
            self._js,
            subjects.EVENTS_STREAM,
            subjects.all_run_events(),
            info.state.last_seq,
            js_api.DeliverPolicy.LAST_PER_SUBJECT,
        )
        return [schemas.run_event_decoder.decode(msg.data) async for msg in msgs]


async def consume(psub: Any, handle: Callable[[Msg], Awaitable[None]], batch: int = 64) -> None:
    """Long-poll a pull consumer forever; each message is acked once its handler returns (redelivered if the
    process dies first)."""
    backoff = Backoff()
    while True:
        try:
            msgs = await psub.fetch(batch, timeout=30)
        except NatsTimeout:
            continue
        except TRANSIENT_ERRORS:  # the bus is away: wait it out, the consumer is durable
            await backoff.wait()
            continue
        backoff.reset()
        for msg in msgs:
            try:
                await handle(msg)
            except TRANSIENT_ERRORS:
                # Not acked: handled again once the bus is back (sooner than ack_wait when the nak gets through).
                with contextlib.suppress(Exception):
                    await msg.nak(delay=1)
                await backoff.wait()
                continue
            await msg.ack()


async def kv_entries(js: JetStreamContext, bucket: str, prefix: str = "") -> dict[str, bytes]:
    """Every live key of a KV bucket (optionally under ``prefix``), read from its stream's last-per-subject index.

    nats-py's ``KeyValue.keys()`` can come back empty for a bucket that has keys when its watcher races the
    consumer's pending count. Here the stream says how many keys match first, and exactly that many last
    values are read, so nothing is missed and nothing waits on a timeout.
    """
    stream = f"KV_{bucket}"
    subject_prefix = f"$KV.{bucket}."
    pattern = f"{subject_prefix}{prefix}>"
    info = await js.stream_info(stream, subjects_filter=pattern)
    count = len(info.state.subjects or {})
    out: dict[str, bytes] = {}
    if count == 0:
        return out
    sub = await js.subscribe(pattern, stream=stream, ordered_consumer=True,
                             deliver_policy=js_api.DeliverPolicy.LAST_PER_SUBJECT)  # fmt: skip
    try:
        for _ in range(count):
            msg = await sub.next_msg(timeout=10)
            if (msg.headers or {}).get("KV-Operation") not in ("DEL", "PURGE"):
                out[msg.subject[len(subject_prefix) :]] = msg.data
    finally:
        await sub.unsubscribe()
    return out


async def replay(
    js: JetStreamContext,
    stream: str,
    subject: str,
    until_seq: int,
    policy: js_api.DeliverPolicy = js_api.DeliverPolicy.ALL,
    timeout: float = 10.0,
) -> AsyncIterator[Msg]:
    """Read ``subject`` from ``stream`` with an ephemeral ordered consumer up to stream sequence ``until_seq``."""
    sub = await js.subscribe(subject, stream=stream, ordered_consumer=True, deliver_policy=policy)
    try:
        while True:
            msg = await sub.next_msg(timeout=timeout)
            yield msg
            if msg.metadata.sequence.stream >= until_seq or msg.metadata.num_pending == 0:
                return
    finally:
        await unsubscribe_and_drop(js, sub, stream)


async def unsubscribe_and_drop(js: JetStreamContext, sub: Any, stream: str) -> None:
    """End a subscription and its ephemeral consumer now. Unsubscribing alone leaves the consumer on the server
    for its inactive threshold (5 s), heartbeating: fifty browsers' replays kept fifty of them busy."""
    consumer = getattr(sub, "_consumer", None)  # an ordered consumer's current name (it changes on a reset)
    await sub.unsubscribe()
    if consumer:
        with contextlib.suppress(Exception):  # no reply wanted: it must not slow the caller down
            await js._nc.publish(f"$JS.API.CONSUMER.DELETE.{stream}.{consumer}", b"")


async def read_subject(js: JetStreamContext, stream: str, subject: str) -> tuple[list[Msg], int]:
    """Every message on ``subject`` up to its newest, read with an ordered consumer, and the newest one's stream
    sequence ([] and 0 when the subject has none yet)."""
    try:
        last = await js.get_last_msg(stream, subject)
    except JsNotFound:
        return [], 0
    assert last.seq is not None
    return [msg async for msg in replay(js, stream, subject, last.seq)], last.seq


DIRECT_RECHECK = 60.0  # seconds: how long what a stream's config says of direct gets is taken as still true
_direct: dict[tuple[int, str], tuple[bool, float]] = {}


async def direct_reads(js: JetStreamContext, stream: str) -> bool:
    """Whether ``stream`` (the events stream only: every role may ask for its info) is read with direct gets: the
    server answers them from the store, without the API layer's JSON and base64, and so does the client. Only
    where that is consistent: one replica, so the one server answering is the leader (a follower may not have
    what the leader just stored). Asked of the stream itself, now and then, not of this process's settings."""
    if stream != subjects.EVENTS_STREAM:
        return False
    key = (id(js), stream)
    known = _direct.get(key)
    now = time.monotonic()
    if known is None or now - known[1] > DIRECT_RECHECK:
        try:
            cfg = (await js.stream_info(stream)).config
            known = (bool(cfg.allow_direct) and (cfg.num_replicas or 1) == 1, now)
        except (JsNotFound, *TRANSIENT_ERRORS):
            known = (False, now)
        _direct[key] = known
    return known[0]


async def get_msg(
    js: JetStreamContext, stream: str, seq: int | None = None, subject: str | None = None, next: bool = False
) -> js_api.RawStreamMsg:
    """``js.get_msg``, direct where :func:`direct_reads` says so."""
    direct = await direct_reads(js, stream)
    if direct and subject is not None and seq is None:
        return await js.get_last_msg(stream, subject, direct=True)
    return await js.get_msg(stream, seq=seq, subject=subject, next=next, direct=direct)


async def messages_after(
    js: JetStreamContext, stream: str, subject: str, seq: int, upto: int | None = None
) -> AsyncIterator[js_api.RawStreamMsg]:
    """The messages on ``subject`` after stream sequence ``seq`` (up to ``upto``), read one by one ("the next
    message on this subject after seq"), so that no consumer is created on the server: for a few messages, or
    for thousands of readers at once, whose ephemeral consumers would pile up until the server refuses more."""
    while upto is None or seq < upto:
        try:
            raw = await get_msg(js, stream, seq=seq + 1, subject=subject, next=True)
        except JsNotFound:
            return
        assert raw.data is not None and raw.seq is not None
        if upto is not None and raw.seq > upto:
            return
        seq = raw.seq
        yield raw


def _built(build: EventBuilder, last: schemas.RunEvent | None) -> schemas.RunEvent | None:
    """What ``build`` makes of ``last``, in the run's current attempt, checked as a transition from it."""
    event = build(last)
    if event is None:
        return None
    if event.attempt == 0:  # it belongs to the run's current attempt
        event = msgspec.structs.replace(event, attempt=lifecycle.attempt_of(last) if last else 1)
    check_transition(last.state if last else None, event.state)
    return event


EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"  # stored with the message: what it followed


def _after_message(run_id: str, event: schemas.RunEvent, seq: int) -> tuple[str, bytes, dict[str, str]]:
    """The event as a publish that JetStream stores only right after stream sequence ``seq`` on the run's subject
    (and once: its message id)."""
    headers = {EXPECTED_LAST_SUBJECT_SEQ: str(seq), "Nats-Msg-Id": event.event_id}
    return subjects.run_events(run_id), schemas.encode(event), headers


class _Ack(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


_ack_decoder = msgspec.json.Decoder(_Ack)


class Pipeline:
    """JetStream publishes sent back to back, their acks awaited together (one reply subscription, no timer per
    message). nats-py's publish_async would do, but an error ack (a failed compare-and-set) never resolves its
    future there (nats-io/nats.py#985: APIError.from_error raises instead of returning)."""

    def __init__(self, nc: NATS, timeout: float = 10.0) -> None:
        self._nc = nc
        self.timeout = timeout  # for a batch's acks, all together
        self._prefix = ""
        self._next = 0
        self._waiting: dict[str, asyncio.Future[_Ack]] = {}
        self._started: asyncio.Lock | None = None

    async def _start(self) -> None:
        self._started = self._started or asyncio.Lock()
        async with self._started:
            if not self._prefix:
                inbox = self._nc.new_inbox()
                await self._nc.subscribe(f"{inbox}.*", cb=self._on_ack)
                self._prefix = f"{inbox}."

    async def _on_ack(self, msg: Msg) -> None:
        future = self._waiting.pop(msg.subject, None)
        if future is None or future.done():
            return  # given up on (timed out)
        if msg.headers and msg.headers.get("Status") == "503":  # no stream takes the subject
            future.set_exception(NoStreamResponseError())
            return
        try:
            ack = _ack_decoder.decode(msg.data)
            if ack.error is not None:
                APIError.from_error(ack.error)  # raises the error's own class (503: unavailable, 400: bad request)
            future.set_result(ack)
        except Exception as exc:
            future.set_exception(exc)

    async def publish(self, messages: list[tuple[str, bytes, dict[str, str]]]) -> list[BaseException | None]:
        """Publish ``(subject, payload, headers)``: all go out before any ack is awaited, and the acks are
        awaited together, for ``timeout`` at most. Each result is None (stored) or the error; a missing ack is a
        TimeoutError (the message may still have been stored: only idempotent writes may be sent again)."""
        if not messages:
            return []
        if not self._prefix:
            await self._start()
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[_Ack]] = []
        replies: list[str] = []
        for subject, payload, headers in messages:
            self._next += 1
            reply = f"{self._prefix}{self._next}"
            future = loop.create_future()
            futures.append(future)
            replies.append(reply)
            self._waiting[reply] = future
            try:
                await self._nc.publish(subject, payload, reply=reply, headers=headers)
            except Exception as exc:  # not sent (the connection is away): the ones after it are tried all the same
                self._waiting.pop(reply, None)
                future.set_exception(exc)
        _, pending = await asyncio.wait(futures, timeout=self.timeout)
        results: list[BaseException | None] = []
        for reply, future in zip(replies, futures, strict=True):
            if future in pending:  # its reply is not waited for any more
                future.cancel()
                self._waiting.pop(reply, None)
                results.append(NatsTimeout())
            else:
                results.append(future.exception())
        return results


async def outlast(fn: Callable[[], Awaitable[T]], within: float | None = None) -> T:
    """``fn()``, retried with backoff while the bus is away (transient errors only), for ``within`` seconds at
    most (None: as long as it takes); then the last error is raised."""
    backoff = Backoff()
    deadline = None if within is None else time.monotonic() + within
    while True:
        try:
            return await fn()
        except TRANSIENT_ERRORS:
            delay = backoff.next_delay()
            if deadline is not None and time.monotonic() + delay > deadline:
                raise
            await asyncio.sleep(delay)


async def key_value(js: JetStreamContext, bucket: str) -> KeyValue:
    """A bucket that ensure_topology made: on a clustered bus, the server this connection talks to may not know
    of a bucket just created for a moment (not found, or a timeout), so it is asked again, for up to 30 s."""
    return await retry(lambda: js.key_value(bucket), attempts=300)


async def retry(fn: Callable[[], Awaitable[T]], attempts: int = 50, delay: float = 0.1) -> T:
    """Retry ``fn`` while the bus topology is still being created by a starting service."""
    for i in range(attempts):
        try:
            return await fn()
        except (JsNotFound, NatsTimeout, APIError):
            if i == attempts - 1:
                raise
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


async def scheduler_state(nc: NATS, timeout: float = 10.0) -> schemas.SchedulerState:
    """The scheduler's whole state, read a page at a time (one reply for 10,000 nodes would pass NATS' 1 MB)."""
    nodes: list[schemas.NodeStatus] = []
    queue: list[schemas.QueuedRun] = []
    page = schemas.SchedulerStateRequest()
    while True:
        got = await request(nc, subjects.Api.SCHEDULER_STATE, page, schemas.SchedulerState, timeout=timeout)
        nodes += got.nodes
        queue += got.queue
        if not (got.more_nodes or got.more_queue):
            return schemas.SchedulerState(nodes=nodes, queue=queue)
        # A list already read whole is asked from past its end (no node id sorts after U+10FFFF).
        page = schemas.SchedulerStateRequest(
            nodes_after=nodes[-1].advert.node_id if got.more_nodes and nodes else "\U0010ffff",
            queue_offset=len(queue) if got.more_queue else 1 << 62,
        )
