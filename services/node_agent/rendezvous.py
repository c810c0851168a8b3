"""Rendezvous: where the nodes of one run meet.

The node of rank 0 (the master) chooses ``MASTER_ADDR``/``MASTER_PORT``, and for MPI jobs binds the listening
socket of the PMI-1 server its shim will serve; it publishes them in a ``Rendezvous`` event before it starts its
own ranks (a rank that dials the PMI server early waits in that socket's backlog), and the other nodes start
theirs when they see it: the nodes start side by side, not one after the other. TensorFlow jobs first gather
every rank's task address (``Endpoints`` events) so that each rank's TF_CONFIG lists them all.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import ipaddress
import json
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared import bus, lifecycle, schemas

if TYPE_CHECKING:
    from services.node_agent.execution import NodeContext

RENDEZVOUS_TIMEOUT = 120.0


def tf_config(endpoints: dict[int, str], workers: int, rank: int) -> str:
    """TensorFlow's cluster spec for one process: ranks below ``workers`` are workers, the rest parameter servers."""
    ranks = sorted(endpoints)
    cluster = {"worker": [endpoints[r] for r in ranks[:workers]], "ps": [endpoints[r] for r in ranks[workers:]]}
    task = {"type": "worker", "index": rank} if rank < workers else {"type": "ps", "index": rank - workers}
    return json.dumps({"cluster": {k: v for k, v in cluster.items() if v}, "task": task})


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


_SIOCGIFADDR = 0x8915


@functools.cache
def interface_of(address: str) -> str | None:
    """The network interface that holds ``address`` (None for loopback, or when no interface has it as its
    primary IPv4 address). Gloo and NCCL pick an interface from the host name otherwise, which on a host with
    several (or in a network namespace) may be one other nodes cannot reach."""
    try:
        if ipaddress.ip_address(address).is_loopback:
            return None
    except ValueError:
        return None  # a host name: nothing to pin
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address
            if socket.inet_ntoa(raw[20:24]) == address:
                return name
    return None


@dataclass(frozen=True)
class Place:
    """Where the ranks meet (what a Rendezvous event says)."""

    master_addr: str
    master_port: int
    pmi_port: int | None
    endpoints: dict[int, str]

    @classmethod
    def of(cls, rdv: schemas.Rendezvous) -> Place:
        return cls(rdv.master_addr, rdv.master_port, rdv.pmi_port, dict(rdv.endpoints))


class Meeting:
    """One node's side of a run's rendezvous. ``stopped`` returns when the run stops; ``give_up(reason)`` aborts
    it (the master, or the other nodes' addresses, did not come in time)."""

    def __init__(
        self,
        ctx: NodeContext,
        assignment: schemas.Assignment,
        nodes: list[str],
        stopped: Callable[[], Awaitable[None]],
        give_up: Callable[[str], None],
        append: Callable[[bus.EventBuilder], Awaitable[schemas.RunEvent | None]],
    ) -> None:
        self.ctx = ctx
        self._append = append  # the execution's: it knows the last event it appended
        self.run_id, self.attempt, self.spec = assignment.run_id, assignment.attempt, assignment.spec
        self.size = len(assignment.placement)
        self.node_id = ctx.config.node_id
        self.my_ranks = [s.rank for s in assignment.placement if s.node_id == self.node_id]
        self.nodes = nodes
        self.is_master = nodes[0] == self.node_id
        self._stopped, self._give_up = stopped, give_up
        self.rendezvous: asyncio.Future[schemas.Rendezvous] = asyncio.get_running_loop().create_future()
        self.endpoints: dict[int, str] = {}  # tensorflow: task addresses gathered by the master
        self.endpoints_complete = asyncio.Event()
        self.pmi_socket: socket.socket | None = None  # the master's, listening, until its shim has it

    def observe(self, event: schemas.RunEvent) -> None:
        if isinstance(event, schemas.Rendezvous) and not self.rendezvous.done():
            self.rendezvous.set_result(event)
        if isinstance(event, schemas.Endpoints):
            self._gather(event.endpoints)

    async def plan(self) -> Place | None:
        """The master chooses (and publishes it once its ranks run: ``publish``); the others wait for it, or for
        a reason to give up (None)."""
        tensorflow = self.spec.distributed == "tensorflow"
        if self.is_master:
            address = self.ctx.config.address
            if tensorflow:
                self._gather(self._my_endpoints())
                if not await self._until(self.endpoints_complete, "the other nodes' task addresses"):
                    return None
            pmi_port = None
            if self.spec.distributed == "mpi":
                self.pmi_socket = socket.create_server((address, 0), backlog=max(128, self.size))
                pmi_port = int(self.pmi_socket.getsockname()[1])
            return Place(address, free_port(address), pmi_port, dict(self.endpoints))
        if tensorflow:
            announce = lifecycle.append_if(
                lifecycle.undecided(self.attempt), schemas.Endpoints, self.run_id, node_id=self.node_id,
                endpoints=self._my_endpoints(),
            )  # fmt: skip
            await self._append(announce)
        if await self._until(self.rendezvous, f"the master node {self.nodes[0]} to start"):
            return Place.of(self.rendezvous.result())
        return None

    async def publish(self, place: Place) -> bool:
        """The master tells the other nodes where to meet: they may start their ranks."""
        build = lifecycle.append_if(
            lifecycle.not_ended(self.attempt), schemas.Rendezvous, self.run_id, node_id=self.node_id,
            master_addr=place.master_addr, master_port=place.master_port, pmi_port=place.pmi_port,
            endpoints=place.endpoints,
        )  # fmt: skip
        return isinstance(await self._append(build), schemas.Rendezvous)

    async def _until(self, awaitable: asyncio.Future[Any] | asyncio.Event, what: str) -> bool:
        """Wait for ``awaitable`` unless the run stops first; past RENDEZVOUS_TIMEOUT the run is aborted."""
        target = asyncio.ensure_future(awaitable.wait()) if isinstance(awaitable, asyncio.Event) else awaitable
        stop = asyncio.ensure_future(self._stopped())
        try:
            done, _ = await asyncio.wait([target, stop], timeout=RENDEZVOUS_TIMEOUT,
                                         return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        finally:
            stop.cancel()
            if target is not awaitable:
                target.cancel()
        if target.done() and not target.cancelled():
            return True
        if not done:
            self._give_up(f"waited {RENDEZVOUS_TIMEOUT:.0f}s for {what}")
        return False

    def _gather(self, endpoints: dict[int, str]) -> None:
        """The master collects every rank's task address; once it has them all, it can publish the Rendezvous."""
        self.endpoints.update(endpoints)
        if len(self.endpoints) >= self.size:
            self.endpoints_complete.set()

    def _my_endpoints(self) -> dict[int, str]:
        """A port of its own for each of this node's ranks (tensorflow's task servers), on the node's address."""
        address = self.ctx.config.address
        return {rank: f"{address}:{free_port(address)}" for rank in self.my_ranks}
