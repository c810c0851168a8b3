"""One JetStream consumer per followed log subject, shared by every browser that follows it.

A browser first catches up on its own (a replay up to where the shared consumer is), then takes the shared
consumer's batches, decoded once. Each browser has a bounded queue: one that falls behind is dropped from the
live feed and catches up again from its own position (a replay), so the portal never holds more than
``QUEUE_BATCHES`` batches for a slow browser, and JetStream, not the portal, keeps what it has not read yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import AsyncIterator
from typing import Any

import structlog
from nats.js import JetStreamContext
from nats.js import api as js_api

from shared import bus, schemas

log = structlog.get_logger().bind(service="portal")

QUEUE_BATCHES = 256
LINGER = 5.0  # seconds a tap with no follower stays, for a browser that reconnects
COALESCE = 0.02  # seconds a browser's next write waits for more batches: fewer, larger writes


class Batch:
    """A log batch with its lines encoded once (what every browser following it is sent)."""

    __slots__ = ("batch", "encoded")

    def __init__(self, batch: schemas.LogBatch) -> None:
        self.batch = batch
        self.encoded = json.dumps([[ln.t, ln.stream, ln.text] for ln in batch.lines])


class Follower:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[int, Batch]] = asyncio.Queue(QUEUE_BATCHES)
        self.lagged = False


class Tap:
    def __init__(self, js: JetStreamContext, stream: str, subject: str) -> None:
        self.js, self.stream, self.subject = js, stream, subject
        self.followers: set[Follower] = set()
        self.seq = 0  # the last stream sequence delivered
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.idle_since: float | None = None

    async def run(self) -> None:
        sub = await self.js.subscribe(
            self.subject, stream=self.stream, ordered_consumer=True, deliver_policy=js_api.DeliverPolicy.NEW,
            pending_msgs_limit=QUEUE_BATCHES,
        )  # fmt: skip
        try:
            info = await self.js.stream_info(self.stream)
            self.seq = info.state.last_seq  # NEW: everything after this comes here
            self.ready.set()
            while True:
                try:
                    msg = await sub.next_msg(timeout=60)
                except TimeoutError:
                    continue
                self.seq = msg.metadata.sequence.stream
                batch = Batch(schemas.log_batch_decoder.decode(msg.data))
                for follower in list(self.followers):
                    if follower.lagged:
                        continue
                    try:
                        follower.queue.put_nowait((self.seq, batch))
                    except asyncio.QueueFull:
                        follower.lagged = True  # it catches up from JetStream instead
                        log.info("follower_lagged", subject=self.subject, queued=QUEUE_BATCHES)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(sub.unsubscribe())


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

    async def batches(self, subject: str) -> AsyncIterator[list[Batch]]:
        """Every batch on ``subject`` from the start, then as they come, a few at a time (what arrives within
        ``COALESCE`` of the first goes out with it: one write to the browser, not one per batch); an empty list
        after 15 s of quiet."""
        tap = await self._tap(subject)
        follower = Follower()
        last = 0  # the stream sequence of the last batch this browser was given
        try:
            while True:
                # Join the live feed first, then read what came before it: nothing falls in between.
                follower.lagged = False
                tap.followers.add(follower)
                upto = tap.seq
                earlier = _replay if last == 0 else functools.partial(_after, last=last)
                chunk: list[Batch] = []
                async for seq, batch in earlier(self.js, self.stream, subject, upto):
                    chunk.append(batch)
                    last = seq
                    if len(chunk) >= 64:
                        yield chunk
                        chunk = []
                if chunk:
                    yield chunk
                while not follower.lagged:
                    try:
                        first = await asyncio.wait_for(follower.queue.get(), 15)
                    except TimeoutError:
                        yield []
                        continue
                    await asyncio.sleep(COALESCE)
                    taken = [first]
                    while not follower.queue.empty():
                        taken.append(follower.queue.get_nowait())
                    fresh = [(seq, batch) for seq, batch in taken if seq > upto]
                    if fresh:
                        last = fresh[-1][0]
                    yield [batch for _, batch in fresh]
                # Fell behind: the queue is dropped, and what it missed is read from the stream, from the last
                # batch it was given on.
                tap.followers.discard(follower)
                follower.queue = asyncio.Queue(QUEUE_BATCHES)
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
    async for msg in bus.replay(js, stream, subject, upto):
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
