"""`cadre events`: the operator's view of everything that happens, replayed from the streams and then live."""

from __future__ import annotations

import datetime as dt
import json
import queue
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from nats.js import api as js_api

from cadre._workspace import Workspace
from shared import subjects
from shared.errors import ValidationError

DURATION = re.compile(r"^(\d+)([smhd])$")


@dataclass(frozen=True)
class Item:
    stream: str
    seq: int
    at: float
    kind: str
    run_id: str | None
    node_ids: tuple[str, ...]
    body: dict[str, Any]

    def line(self) -> str:
        stamp = dt.datetime.fromtimestamp(self.at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        b = self.body
        if self.stream == subjects.EVENTS_STREAM:
            extra = {k: v for k, v in b.items() if k not in ("kind", "event_id", "run_id", "state", "at", "schema",
                                                            "spec")}  # fmt: skip
            if "placement" in extra:
                extra["placement"] = " ".join(f"{s['rank']}@{s['node_id']}" for s in extra["placement"])
            if isinstance(extra.get("error"), dict):
                extra["error"] = extra["error"]["message"].splitlines()[0]
            detail = " ".join(f"{k}={v}" for k, v in extra.items() if v not in (None, {}, [], ""))
            return f"{stamp} run   #{self.seq:<6} {self.run_id} {self.kind} -> {b['state']}  {detail}".rstrip()
        if self.stream == subjects.NODES_STREAM:
            return f"{stamp} node  #{self.seq:<6} {b['node_id']} {self.kind}  {b.get('detail', '')}".rstrip()
        return f"{stamp} model #{self.seq:<6} {b['name']}:{b['version']} {self.kind}".rstrip()


def parse_since(since: str | None) -> tuple[int | None, dt.datetime | None]:
    """A stream sequence (``1234``), a duration back from now (``10m``, ``2h``) or an ISO time."""
    if not since:
        return None, None
    if since.isdigit():
        return int(since), None
    m = DURATION.match(since)
    if m:
        seconds = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return None, dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds)
    try:
        when = dt.datetime.fromisoformat(since.replace("Z", "+00:00"))
    except ValueError:
        raise ValidationError(
            f"--since {since!r}: give a sequence number, a duration (10m, 2h) or an ISO time"
        ) from None
    return None, when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _item(stream: str, seq: int, data: bytes) -> Item:
    body = msgspec.json.decode(data)
    if stream == subjects.EVENTS_STREAM:
        nodes = [body["node_id"]] if "node_id" in body else [s["node_id"] for s in body.get("placement", [])]
        return Item(stream, seq, body["at"], body["kind"], body["run_id"], tuple(nodes), body)
    if stream == subjects.NODES_STREAM:
        return Item(stream, seq, body["at"], body["kind"], None, (body["node_id"],), body)
    return Item(stream, seq, body["at"], body["kind"], None, (), body)


def follow(
    ws: Workspace,
    emit: Callable[[Item], None],
    follow: bool = False,
    since: str | None = None,
    run_id: str | None = None,
    node_id: str | None = None,
    kind: str | None = None,
) -> int:
    """Print the matching events in time order; with ``follow``, then keep printing new ones until interrupted."""
    seq, start_time = parse_since(since)
    sources = [(subjects.EVENTS_STREAM, subjects.run_events(run_id) if run_id else subjects.all_run_events())]
    if not run_id:
        sources.append(
            (subjects.NODES_STREAM, subjects.node_events(node_id) if node_id else subjects.all_node_events())
        )
        if not node_id:
            sources.append((subjects.MODELS_STREAM, subjects.all_model_events()))
    items: queue.Queue[Item | None] = queue.Queue()

    def wanted(item: Item) -> bool:
        return (kind is None or item.kind == kind) and (node_id is None or node_id in item.node_ids)

    async def start() -> tuple[list[Any], dict[str, int]]:
        js = ws._js
        subs, last = [], {}
        for stream, subject in sources:
            info = await js.stream_info(stream)
            last[stream] = info.state.last_seq
            if seq is not None and stream == subjects.EVENTS_STREAM:
                cfg = js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=seq)
            elif start_time is not None:
                cfg = js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.BY_START_TIME,
                                            opt_start_time=start_time.isoformat())  # fmt: skip
            else:
                cfg = js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.ALL)

            async def cb(msg, stream: str = stream) -> None:
                items.put(_item(stream, msg.metadata.sequence.stream, msg.data))

            subs.append(await js.subscribe(subject, stream=stream, ordered_consumer=True, config=cfg, cb=cb))
        return subs, last

    subs, last = ws._loop.call(start())
    printed = 0
    backlog: list[Item] = []
    caught_up = {stream: last[stream] == 0 for stream, _ in sources}
    deadline = time.monotonic() + 10
    try:
        # Replay: gather what is stored (up to each stream's last sequence at start), then print it in time order.
        while not all(caught_up.values()) and time.monotonic() < deadline:
            try:
                item = items.get(timeout=0.3)
            except queue.Empty:
                break  # nothing (more) matches the filter
            assert item is not None
            backlog.append(item)
            if item.seq >= last[item.stream]:
                caught_up[item.stream] = True
        for item in sorted(backlog, key=lambda i: i.at):
            if wanted(item):
                emit(item)
                printed += 1
        while follow:
            item = items.get()
            if item is not None and wanted(item):
                emit(item)
                printed += 1
    except KeyboardInterrupt:
        pass
    finally:

        async def stop() -> None:
            for sub in subs:
                await sub.unsubscribe()

        ws._loop.call(stop())
    return printed


def as_json(item: Item) -> str:
    return json.dumps({"stream": item.stream, "seq": item.seq, **item.body})
