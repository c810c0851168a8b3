"""One JetStream consumer per followed log subject, shared by every browser that follows it.

The shared consumer gathers the batches that arrive within a short window into a chunk, reads each rank's lines
once (every line once, by its number), and renders the chunk's server-sent events once: a browser that is live
gets the same text as every other, one write per chunk. A browser first catches up on its own (a replay up to
where the shared consumer is, or from the stream sequence its Last-Event-ID names), then takes the chunks. Each
browser has a bounded queue: one that falls behind is dropped from the live feed and catches up again from its
own position (a replay), so the portal holds at most ``QUEUE_CHUNKS`` chunks for the slowest browser, and
JetStream, not the portal, keeps what it has not read yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import AsyncIterator
from typing import Any

import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api

from shared import bus, schemas
from shared.runs import LogCursor

log = structlog.get_logger().bind(service="portal")

QUEUE_CHUNKS = 64
CHUNK_BATCHES, CHUNK_BYTES = 64, 256 * 1024  # a chunk goes out early once it holds this much
LINGER = 5.0  # seconds a tap with no follower stays, for a browser that reconnects
COALESCE = 0.02  # seconds a chunk gathers batches: fewer, larger writes, and lines still arrive within ms
# With many browsers on one subject the socket writes are the cost (one per chunk per browser; py-spy: most of the
# portal's time is uvicorn's transport.write): a chunk gathers longer, still inside the 250 ms line->page target.
COALESCE_CROWD, CROWD = 0.2, 8


class Batch:
    """A log batch (its lines from ``first`` on: the lines a reader had not had) with those lines encoded once."""

    __slots__ = ("batch", "encoded", "first")

    def __init__(self, batch: schemas.LogBatch, lines: list[schemas.LogLine] | None = None) -> None:
        self.batch = batch
        kept = batch.lines if lines is None else lines
        self.first = batch.first_line + len(batch.lines) - len(kept)
        self.encoded = json.dumps([[ln.t, ln.stream, ln.text] for ln in kept])

    def event(self, seq: int) -> str:
        """The server-sent event for it; its id is the stream sequence, where a reconnect resumes."""
        data = f'{{"rank": {self.batch.rank}, "first": {self.first}, "lines": {self.encoded}}}'
        return f"id: s{seq}\nevent: lines\ndata: {data}\n\n"


class Chunk:
    """Batches in stream order. ``shared``: the tap's, each rank's lines read once, the same for every live
    browser (``frame``: its events, rendered once); otherwise one browser's replay, its lines not yet read."""

    __slots__ = ("_frame", "items", "shared")

    def __init__(self, items: list[tuple[int, Batch]], shared: bool) -> None:
        self.items, self.shared = items, shared
        self._frame: bytes | None = None

    @property
    def frame(self) -> bytes:
        """Encoded once too: each live browser's response writes these very bytes."""
        if self._frame is None:
            self._frame = "".join(batch.event(seq) for seq, batch in self.items).encode()
        return self._frame


class Follower:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[Chunk] = asyncio.Queue(QUEUE_CHUNKS)
        self.lagged = False


class Tap:
    def __init__(self, js: JetStreamContext, stream: str, subject: str) -> None:
        self.js, self.stream, self.subject = js, stream, subject
        self.followers: set[Follower] = set()
        self.seq = 0  # the stream sequence of the last batch handed to the followers
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.idle_since: float | None = None
        self.cursors: dict[int, LogCursor] = {}
        self.pending: list[tuple[int, Batch]] = []
        self.pending_bytes = 0
        self.flush_at: asyncio.TimerHandle | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()

        async def take(msg: Msg) -> None:
            # A callback, not a loop on next_msg: nats-py makes two tasks, a timer and a uuid for every next_msg,
            # and with a job printing 100 lines a second that was most of what following a run cost the portal.
            if self.ready.is_set():
                self._take(msg, loop)
            else:
                early.append(msg)

        early: list[Msg] = []  # what came before the stream's position was known
        sub = await self.js.subscribe(
            self.subject, stream=self.stream, cb=take, ordered_consumer=True, deliver_policy=js_api.DeliverPolicy.NEW,
            pending_msgs_limit=4096,
        )  # fmt: skip
        try:
            info = await self.js.stream_info(self.stream)
            self.seq = info.state.last_seq  # NEW: everything after this comes here
            self.ready.set()
            for msg in early:
                self._take(msg, loop)
            early.clear()
            await asyncio.Event().wait()  # the messages come to ``take`` until the tap is closed (cancelled)
        finally:
            if self.flush_at is not None:
                self.flush_at.cancel()
            with contextlib.suppress(Exception):
                await asyncio.shield(bus.unsubscribe_and_drop(self.js, sub, self.stream))

    def _take(self, msg: Msg, loop: asyncio.AbstractEventLoop) -> None:
        seq = msg.metadata.sequence.stream
        if seq <= self.seq:
            return  # a browser that joins reads it from the stream (its replay goes up to self.seq)
        batch = schemas.log_batch_decoder.decode(msg.data)
        cursor = self.cursors.get(batch.rank)
        if cursor is None:  # first seen here: what came before was replayed by each browser
            cursor = self.cursors[batch.rank] = LogCursor()
            cursor.have, cursor.newest = batch.first_line, batch.attempt
        taken = cursor.take(batch)
        if not taken:
            return
        self.pending.append((seq, Batch(batch, taken)))
        self.pending_bytes += len(msg.data)
        if len(self.pending) >= CHUNK_BATCHES or self.pending_bytes >= CHUNK_BYTES:
            self.flush()
        elif self.flush_at is None:
            window = COALESCE_CROWD if len(self.followers) > CROWD else COALESCE
            self.flush_at = loop.call_later(window, self.flush)

    def flush(self) -> None:
        """Hand the batches gathered so far to every live follower, as one chunk."""
        if self.flush_at is not None:
            self.flush_at.cancel()
            self.flush_at = None
        if not self.pending:
            return
        chunk = Chunk(self.pending, shared=True)
        self.pending, self.pending_bytes = [], 0
        self.seq = chunk.items[-1][0]
        for follower in list(self.followers):
            if follower.lagged:
                continue
            try:
                follower.queue.put_nowait(chunk)
            except asyncio.QueueFull:
                follower.lagged = True  # it catches up from JetStream instead
                log.info("follower_lagged", subject=self.subject, queued=QUEUE_CHUNKS)


class Fanout:
    def __init__(self, js: JetStreamContext, stream: str) -> None:
        self.js, self.stream = js, stream
        self.taps: dict[str, Tap] = {}

    async def _tap(self, subject: str) -> Tap:
        tap = self.taps.get(subject)
        if tap is None or (tap.task is not None and tap.task.done()):
            tap = self.taps[subject] = Tap(self.js, self.stream, subject)
            tap.task = asyncio.create_task(tap.run(), name=f"tap {subject}")
        tap.idle_since = None
        await tap.ready.wait()
        return tap

    def _leave(self, subject: str, tap: Tap, follower: Follower) -> None:
        tap.followers.discard(follower)
        if not tap.followers:
            loop = asyncio.get_running_loop()
            tap.idle_since = loop.time()

            def close() -> None:
                if tap.idle_since is not None and not tap.followers and self.taps.get(subject) is tap:
                    del self.taps[subject]
                    if tap.task is not None:
                        tap.task.cancel()

            loop.call_later(LINGER, close)

    async def chunks(self, subject: str, after: int = 0) -> AsyncIterator[Chunk | None]:
        """Every batch on ``subject`` from the start (or after stream sequence ``after``), then as they come, in
        chunks; None after 15 s of quiet."""
        tap = await self._tap(subject)
        follower = Follower()
        last = after  # the stream sequence of the last batch this browser was given
        try:
            while True:
                # Join the live feed first, then read what came before it: nothing falls in between, since every
                # chunk handed out from now on starts past ``upto``.
                follower.lagged = False
                tap.followers.add(follower)
                upto = tap.seq
                earlier = _replay if last == 0 else functools.partial(_after, last=last)
                items: list[tuple[int, Batch]] = []
                async for seq, batch in earlier(self.js, self.stream, subject, upto):
                    items.append((seq, batch))
                    last = seq
                    if len(items) >= CHUNK_BATCHES:
                        yield Chunk(items, shared=False)
                        items = []
                if items:
                    yield Chunk(items, shared=False)
                last = max(last, upto)
                while not follower.lagged:
                    try:
                        async with asyncio.timeout(15):  # (wait_for would make a task per chunk)
                            chunk = await follower.queue.get()
                    except TimeoutError:
                        yield None
                        continue
                    last = chunk.items[-1][0]
                    yield chunk
                # Fell behind: the queue is dropped, and what it missed is read from the stream, from the last
                # batch it was given on.
                tap.followers.discard(follower)
                follower.queue = asyncio.Queue(QUEUE_CHUNKS)
        finally:
            self._leave(subject, tap, follower)


async def _replay(js: JetStreamContext, stream: str, subject: str, upto: int) -> AsyncIterator[tuple[int, Any]]:
    if upto <= 0:
        return
    try:
        info = await js.stream_info(stream, subjects_filter=subject)
    except Exception:
        return
    if not info.state.subjects:
        return
    async with contextlib.aclosing(bus.replay(js, stream, subject, upto)) as msgs:  # its consumer goes at once
        async for msg in msgs:
            seq = msg.metadata.sequence.stream
            if seq > upto:
                return
            yield seq, Batch(schemas.log_batch_decoder.decode(msg.data))


async def _after(
    js: JetStreamContext, stream: str, subject: str, upto: int, last: int
) -> AsyncIterator[tuple[int, Any]]:
    """The batches after stream sequence ``last`` up to ``upto``, read one by one (no consumer to create)."""
    async for raw in bus.messages_after(js, stream, subject, last, upto):
        assert raw.seq is not None
        yield raw.seq, Batch(schemas.log_batch_decoder.decode(raw.data))
