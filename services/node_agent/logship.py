"""Ships a rank's output lines to the log stream in batches, without awaiting an ack per line."""

from __future__ import annotations

import asyncio
import time
from collections import deque

from nats.js import JetStreamContext

from shared import bus, schemas, subjects

MAX_BATCH_LINES = 512
MAX_BATCH_BYTES = 256 * 1024
LINGER = 0.005  # seconds to wait for more lines before sending a batch: latency stays in milliseconds


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
    ) -> None:
        self._js = js
        self._subject = subjects.run_logs(run_id, rank)
        self._run_id, self._rank, self._node_id = run_id, rank, node_id
        self._buf: list[schemas.LogLine] = []
        self._buf_bytes = 0
        self._wake = asyncio.Event()
        self._closed = False
        self.sent = first  # lines published and acknowledged (a retried run's attempts number on)
        self._attempt = attempt  # readers drop a stale attempt's batches that come after the next one's
        self.tail: deque[str] = deque(maxlen=tail)
        self._task = asyncio.create_task(self._loop())

    def add(self, stream: str, text: str) -> None:
        self._buf.append(schemas.LogLine(time.time(), stream, text))  # type: ignore[arg-type]
        self._buf_bytes += len(text)
        self.tail.append(text)
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            if not self._closed and self._buf_bytes < MAX_BATCH_BYTES:
                await asyncio.sleep(LINGER)
            self._wake.clear()
            while self._buf:
                lines, self._buf = self._buf, []
                self._buf_bytes = 0
                for i in range(0, len(lines), MAX_BATCH_LINES):
                    await self._send(lines[i : i + MAX_BATCH_LINES])
            if self._closed:
                return

    async def _send(self, lines: list[schemas.LogLine]) -> None:
        batch = schemas.LogBatch(
            run_id=self._run_id, rank=self._rank, node_id=self._node_id, first_line=self.sent, lines=lines,
            attempt=self._attempt,
        )  # fmt: skip
        # Held until the bus takes it, however long it is away: lines go out in order, and the message id makes a
        # batch whose ack was lost in a reconnect count once (the stream drops the repeat).
        headers = {"Nats-Msg-Id": f"{self._run_id}:{self._rank}:{self._attempt}:{self.sent}"}
        await bus.outlast(lambda: self._js.publish(self._subject, schemas.encode(batch), timeout=10, headers=headers))
        self.sent += len(lines)

    async def close(self) -> int:
        """Flush everything and return how many lines this rank produced."""
        self._closed = True
        self._wake.set()
        await self._task
        return self.sent
