"""A PMI-1 server (MPICH's "simple PMI" wire protocol), so that ranks started by separate node agents wire up
as one MPI job without hydra.

Why not hydra: with two or more proxies, a rank that dies leaves mpiexec and the other ranks hanging, and its
proxies own the ranks' output. Here every agent starts, watches and kills its own ranks; the job's master agent
only serves this small key-value space and barrier over TCP.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import Callable

import structlog

MAX_LINE = 1 << 16


def process_mapping(ranks_per_node: list[int]) -> str:
    """MPICH's PMI_process_mapping: ``(vector,(first_node,node_count,ranks_per_node),...)``, ranks in node blocks."""
    blocks: list[tuple[int, int, int]] = []
    for node, count in enumerate(ranks_per_node):
        if blocks and blocks[-1][2] == count and blocks[-1][0] + blocks[-1][1] == node:
            first, n, c = blocks[-1]
            blocks[-1] = (first, n + 1, c)
        else:
            blocks.append((node, 1, count))
    return "(vector," + ",".join(f"({a},{b},{c})" for a, b, c in blocks) + ")"


def _parse(line: str) -> dict[str, str]:
    out = {}
    for token in line.split():
        key, _, value = token.partition("=")
        out[key] = value
    return out


class PmiServer:
    """Serves one job of ``size`` ranks. ``on_abort(rank, code)`` is called when a rank calls MPI_Abort."""

    def __init__(
        self, size: int, ranks_per_node: list[int], on_abort: Callable[[int, int], None], kvs_name: str | None = None
    ) -> None:
        # MPICH names the job's shared-memory segments after the KVS: each job needs its own name.
        self.kvs_name = kvs_name or f"kvs_{secrets.token_hex(8)}"
        self.size = size
        self.kvs: dict[str, str] = {"PMI_process_mapping": process_mapping(ranks_per_node)}
        self._on_abort = on_abort
        self._barrier: list[asyncio.StreamWriter] = []
        self._server: asyncio.base_events.Server | None = None
        self._gone: set[int] = set()  # ranks whose connection has ended (they finalized, or died)
        self._all_gone = asyncio.Event()
        self.port = 0
        self.log = structlog.get_logger().bind(component="pmi")

    async def start(self, host: str = "0.0.0.0", port: int = 0, sock: socket.socket | None = None) -> int:
        """Serve on ``host:port``, or on ``sock``, a socket listening already (connections made before this are
        in its backlog: they are served now)."""
        if sock is not None:
            self._server = await asyncio.start_server(self._serve, sock=sock, limit=MAX_LINE)
        else:
            self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_LINE)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def drained(self, timeout: float) -> bool:
        """Wait until every rank of the job has let go of its connection (the other nodes' ranks may still be in
        MPI_Finalize when this node's are done); False after ``timeout``."""
        try:
            await asyncio.wait_for(self._all_gone.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in self._barrier:
                writer.close()
            self._barrier.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        rank = -1
        try:
            while line := (await reader.readline()).decode():
                msg = _parse(line)
                cmd = msg.get("cmd", "")
                reply: str | None
                if cmd == "initack":
                    rank = int(msg.get("pmiid", "-1"))
                    reply = f"cmd=initack rc=0\ncmd=set size={self.size}\ncmd=set rank={rank}\ncmd=set debug=0\n"
                elif cmd == "init":
                    reply = "cmd=response_to_init pmi_version=1 pmi_subversion=1 rc=0\n"
                elif cmd == "get_maxes":
                    reply = f"cmd=maxes kvsname_max=256 keylen_max=256 vallen_max={MAX_LINE // 2} rc=0\n"
                elif cmd == "get_appnum":
                    reply = "cmd=appnum appnum=0 rc=0\n"
                elif cmd == "get_my_kvsname":
                    reply = f"cmd=my_kvsname kvsname={self.kvs_name} rc=0\n"
                elif cmd == "get_universe_size":
                    reply = f"cmd=universe_size size={self.size} rc=0\n"
                elif cmd == "put":
                    self.kvs[msg.get("key", "")] = msg.get("value", "")
                    reply = "cmd=put_result rc=0\n"
                elif cmd == "get":
                    key = msg.get("key", "")
                    if key in self.kvs:
                        reply = f"cmd=get_result rc=0 value={self.kvs[key]}\n"
                    else:
                        reply = "cmd=get_result rc=-1 msg=key_not_found\n"
                elif cmd == "barrier_in":
                    self._barrier.append(writer)
                    reply = None
                    if len(self._barrier) == self.size:
                        waiting, self._barrier = self._barrier, []
                        for w in waiting:
                            w.write(b"cmd=barrier_out rc=0\n")
                            await w.drain()
                elif cmd == "finalize":
                    reply = "cmd=finalize_ack rc=0\n"
                elif cmd == "abort":
                    self._on_abort(rank, int(msg.get("exitcode", "1") or 1))
                    reply = None
                else:
                    self.log.warning("pmi_unknown_command", rank=rank, line=line.strip()[:200])
                    reply = f"cmd={cmd} rc=-1 msg=unsupported\n"
                if reply is not None:
                    writer.write(reply.encode())
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if writer in self._barrier:
                self._barrier.remove(writer)
            writer.close()
            if rank >= 0:
                self._gone.add(rank)
                if len(self._gone) >= self.size:
                    self._all_gone.set()
