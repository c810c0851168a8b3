"""Ships a rank's output lines to the log stream in batches, without awaiting an ack per line.

While the bus is away, lines wait, in order, to be sent once it is back: in memory up to ``memory_limit`` bytes,
then in a spool file (one JSON line per log line) that is read back first. So a long outage costs disk, not the
agent's memory, and no line is lost or reordered.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from pathlib import Path
from typing import IO

import msgspec
import structlog
from nats.js import JetStreamContext

from shared import bus, schemas, subjects

MAX_BATCH_LINES = 4096  # a flood goes out in few messages: each publish waits for the stream's ack
MAX_BATCH_BYTES = 256 * 1024
# While lines keep coming, a batch goes at most every LINGER seconds (fewer, larger messages); the first line after
# a quiet spell goes at once: a job's first words are not held back. Each message costs every hop (the agent's
# publish and ack, the stream, each consumer: a portal tap spent ~200 us of Python per message here), so a job
# printing 100 lines/s sends 50 messages, not 100; a line waits at most this long (print -> client p99 at 1,000
# lines/s: 22 ms with it, 8 ms with 5 ms; the target is 50).
LINGER = 0.02
MEMORY_LIMIT = 64 << 20  # bytes of lines held in memory per rank before they spill to disk
_line_decoder = msgspec.json.Decoder(schemas.LogLine)


class LogShipper:
    def __init__(
        self,
        js: JetStreamContext,
        run_id: str,
        rank: int,
        node_id: str,
        tail: int = 30,
        first: int = 0,
        attempt: int = 1,
        spool: Path | None = None,
        memory_limit: int = MEMORY_LIMIT,
    ) -> None:
        self._js = js
        self._subject = subjects.run_logs(run_id, rank)
        self._run_id, self._rank, self._node_id = run_id, rank, node_id
        self._buf: deque[schemas.LogLine] = deque()
        self._buf_bytes = 0
        self._memory_limit = memory_limit
        self._spool_path = spool  # None: no spilling (everything stays in memory)
        self._spool_out: IO[bytes] | None = None
        self._spool_in: IO[bytes] | None = None
        self._spooled = 0  # lines in the spool not read back yet
        self.spilled = 0  # lines that ever went through the spool
        self._wake = asyncio.Event()
        self._closed = False
        self.sent = first  # lines published and acknowledged (a retried run's attempts number on)
        self.count = first  # lines taken, published or not: the number the next line gets
        self._attempt = attempt  # readers drop a stale attempt's batches that come after the next one's
        self.tail: deque[str] = deque(maxlen=tail)
        self.log = structlog.get_logger().bind(run_id=run_id, rank=rank, component="logship")
        self._sent_at = 0.0  # when the last batch was taken by the bus (monotonic)
        self._task = asyncio.create_task(self._loop())

    def add(self, stream: str, text: str, tail: bool = True) -> None:
        """A line of the node's own (``tail=False``: kept out of the lines a failure quotes)."""
        self.add_lines([schemas.LogLine(time.time(), stream, text)], tail)  # type: ignore[arg-type]

    def add_lines(self, lines: list[schemas.LogLine], tail: bool = True) -> None:
        """Lines with the time they were printed (the shim's clock read, not ours), as one batch: nothing here is
        done per line that need not be."""
        self.count += len(lines)
        if tail:
            self.tail.extend(line.text for line in lines[-(self.tail.maxlen or 0) :])
        if self._spooled:  # older lines wait on disk: these go after them
            self._spill(lines)
        else:
            self._buf.extend(lines)
            self._buf_bytes += sum(len(line.text) for line in lines)
            if self._buf_bytes > self._memory_limit and self._spool_path is not None:
                self._spill(list(self._buf))
                self._buf.clear()
                self._buf_bytes = 0
        self._wake.set()

    def _spill(self, lines: list[schemas.LogLine]) -> None:
        assert self._spool_path is not None
        if self._spool_out is None:
            self._spool_path.parent.mkdir(parents=True, exist_ok=True)
            self._spool_out = open(self._spool_path, "ab")
            self._spool_in = open(self._spool_path, "rb")
            self.log.warning("log_lines_spilled", spool=str(self._spool_path), memory_limit=self._memory_limit)
        self._spool_out.write(b"".join(msgspec.json.encode(line) + b"\n" for line in lines))
        self._spooled += len(lines)
        self.spilled += len(lines)

    def _next_batch(self) -> list[schemas.LogLine]:
        """Up to a batch of the oldest lines waiting: the spool's first, then memory's."""
        out: list[schemas.LogLine] = []
        size = 0
        if self._spooled:
            assert self._spool_out is not None and self._spool_in is not None
            self._spool_out.flush()
            while self._spooled and len(out) < MAX_BATCH_LINES and size < MAX_BATCH_BYTES:
                line = _line_decoder.decode(self._spool_in.readline())
                out.append(line)
                size += len(line.text)
                self._spooled -= 1
            if not self._spooled:
                self._drop_spool()  # drained: what comes next is in memory again
            return out
        while self._buf and len(out) < MAX_BATCH_LINES and size < MAX_BATCH_BYTES:
            line = self._buf.popleft()
            self._buf_bytes -= len(line.text)
            out.append(line)
            size += len(line.text)
        return out

    def _drop_spool(self) -> None:
        for fh in (self._spool_out, self._spool_in):
            if fh is not None:
                fh.close()
        self._spool_out = self._spool_in = None
        if self._spool_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._spool_path.unlink()

    async def _loop(self) -> None:
        try:
            while True:
                await self._wake.wait()
                since = time.monotonic() - self._sent_at
                if not self._closed and self._buf_bytes < MAX_BATCH_BYTES and not self._spooled and since < LINGER:
                    await asyncio.sleep(LINGER - since)
                self._wake.clear()
                while lines := self._next_batch():
                    await self._send(lines)
                if self._closed:
                    return
        finally:
            self._drop_spool()

    async def _send(self, lines: list[schemas.LogLine]) -> None:
        batch = schemas.LogBatch(
            run_id=self._run_id, rank=self._rank, node_id=self._node_id, first_line=self.sent, lines=lines,
            attempt=self._attempt,
        )  # fmt: skip
        # Held until the bus takes it, however long it is away: lines go out in order, and the message id makes a
        # batch whose ack was lost in a reconnect count once (the stream drops the repeat).
        headers = {"Nats-Msg-Id": f"{self._run_id}:{self._rank}:{self._attempt}:{self.sent}"}
        await bus.outlast(lambda: self._js.publish(self._subject, schemas.encode(batch), timeout=10, headers=headers))
        self._sent_at = time.monotonic()
        self.sent += len(lines)

    def cancel(self) -> None:
        """Stop without sending what waits (the agent is leaving: the lines are in the shim's files)."""
        self._task.cancel()

    async def close(self) -> int:
        """Flush everything and return how many lines this rank produced."""
        self._closed = True
        self._wake.set()
        await self._task
        return self.sent
