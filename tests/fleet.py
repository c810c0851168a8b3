"""A fleet on one machine: hosts as network namespaces on a bridge of their own (``make fleet``, and the fleet tests).

    python -m tests.fleet        # start it, run a 2 hosts x 2 ranks MPI job from the client host, tear it down

Each host is a network namespace with one address on a private /24; the bridge joining them lives in a namespace
of its own, so nothing in the namespace the harness started in routes to them. The roles are spread over the
hosts: a three-server NATS JetStream cluster (every stream and bucket at 3 replicas), the services with the S3
server beside them (they reach it on loopback; presigned URLs name the host's address:
CADRE_S3_PUBLIC_ENDPOINT), three agent hosts and a client host. The bus uses decentralized auth: the servers trust an
operator key (a keystore made per fleet) and every process joins with its own creds file, as
`cadre admin add-agent` / `add-user` make them. While the fleet is up, the calling thread (and
every thread it starts) works from the client host; teardown leaves no process, namespace or link behind, and
gives the caller its own network namespace back, also when a test fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cadre import _local, admin
from cadre._profile import Profile, save_profile
from shared.auth import Cluster, render_nats_config
from shared.settings import BusSettings
from shared.trust import Keystore

CLONE_NEWNET = 0x40000000
SUBNET = "10.77.0"
NATS_PORT, ROUTE_PORT, MONITOR_PORT, PORTAL_PORT = 4222, 6222, 8222, 8265
S3_PORTS = [9000, 9333, 8080, 8888, 23646]  # s3, master, volume, filer, admin (each + 10000 for gRPC)
AGENTS = 3


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def available() -> str | None:
    """Why a fleet cannot be made here (None: it can)."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return "needs root on Linux (network namespaces)"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "needs iproute2 with `ip netns`"
    return None


@dataclass
class Host:
    name: str
    ns: str
    ip: str
    port: str  # its link's end on the bridge


@dataclass
class Fleet:
    root: Path
    agents: int = AGENTS
    node_grace: float | None = None  # the scheduler's (CADRE_NODE_GRACE); None: its default
    agent_args: list[str] = field(default_factory=list)  # after the defaults, for every agent
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    hosts: dict[str, Host] = field(default_factory=dict)
    records: list[tuple[_local.ProcessRecord, subprocess.Popen[bytes]]] = field(default_factory=list)
    route_password: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    creds: dict[str, Path] = field(default_factory=dict)  # user -> its .creds file
    profile_path: Path | None = None
    _own_netns: int | None = None
    _switch: str | None = None

    # --- hosts ----------------------------------------------------------------------------------------
    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    def _make_hosts(self) -> None:
        names = ["nats-1", "nats-2", "nats-3", "services", *(f"agent-{i}" for i in range(self.agents)), "client"]
        self._switch = f"cf{self.tag}-sw"
        self._ip("netns", "add", self._switch)
        self._ip("-n", self._switch, "link", "add", "br0", "type", "bridge")
        self._ip("-n", self._switch, "link", "set", "br0", "up")
        for i, name in enumerate(names, start=1):
            port = f"p{i}{self.tag}"[:15]
            host = Host(name, f"cf{self.tag}-{name}", f"{SUBNET}.{10 + i}", port)
            self.hosts[name] = host
            self._ip("netns", "add", host.ns)
            self._ip("-n", self._switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host.ns)
            self._ip("-n", self._switch, "link", "set", port, "master", "br0")
            self._ip("-n", self._switch, "link", "set", port, "up")
            self._ip("-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
            self._ip("-n", host.ns, "link", "set", "eth0", "up")
            self._ip("-n", host.ns, "link", "set", "lo", "up")

    def enter(self, host: str) -> None:
        """Move the calling thread (and the threads it starts from now on) onto ``host``'s network."""
        fd = os.open(f"/run/netns/{self.hosts[host].ns}", os.O_RDONLY)
        try:
            if _libc().setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {host}")
        finally:
            os.close(fd)

    def _leave(self) -> None:
        if self._own_netns is not None:
            _libc().setns(self._own_netns, CLONE_NEWNET)
            os.close(self._own_netns)
            self._own_netns = None

    # --- processes -----------------------------------------------------------------------------------------
    def spawn(self, name: str, role: str, host: str, argv: list[str], env: dict[str, str]) -> _local.ProcessRecord:
        ns = self.hosts[host].ns
        rec, proc = _local._spawn(
            name, role, ["ip", "netns", "exec", ns, *argv], env, _local.REPO_ROOT, self.root / "logs" / f"{name}.log"
        )
        self.records.append((rec, proc))
        return rec

    def nats_urls(self) -> str:
        return ",".join(f"nats://{self.hosts[f'nats-{i}'].ip}:{NATS_PORT}" for i in (1, 2, 3))

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    def enroll(self, name: str, role: str = "agent") -> Path:
        """Credentials for a new user, as `cadre admin add-ROLE NAME -o FILE` makes them."""
        path = admin.write_creds(admin.add(self.keys, role, name), self.root / "creds" / f"{name}.creds")
        self.creds[name] = path
        return path

    def _nats_conf(self, i: int) -> Path:
        ip = self.hosts[f"nats-{i}"].ip
        routes = [f"{self.hosts[f'nats-{j}'].ip}:{ROUTE_PORT}" for j in (1, 2, 3)]
        text = render_nats_config(
            [],
            listen=f"{ip}:{NATS_PORT}",
            http=f"{ip}:{MONITOR_PORT}",
            store_dir=str(self.root / f"nats-{i}"),
            server_name=f"nats-{i}",
            header="Generated by tests/fleet.py",
            cluster=Cluster("cadre", f"{ip}:{ROUTE_PORT}", routes, "route", self.route_password),
            trust=Keystore.open(self.keys).server_config(str(self.root / f"nats-{i}" / "jwt")),
        )
        path = self.root / f"nats-{i}.conf"
        _local._write_private(path, text)
        return path

    def start_nats(self, i: int) -> _local.ProcessRecord:
        conf = self.root / f"nats-{i}.conf"
        return self.spawn(f"nats-{i}", "infra", f"nats-{i}", [_local._binary("nats-server"), "-c", str(conf)], {})

    def restart_nats(self, i: int, timeout: float = 60.0) -> None:
        """Start server ``i`` again (after a kill) and wait until it serves."""
        rec = self.start_nats(i)
        mine = [r for r in self.records if r[0] is rec]
        _local._wait_nats(MONITOR_PORT, rec, mine, time.monotonic() + timeout, timeout, host=self.hosts[f"nats-{i}"].ip)

    def nats_record(self, i: int) -> tuple[_local.ProcessRecord, subprocess.Popen[bytes]]:
        return next(r for r in self.records if r[0].name == f"nats-{i}" and r[1].poll() is None)

    def start(self, timeout: float = 120.0) -> Fleet:
        deadline = time.monotonic() + timeout
        self.root.mkdir(parents=True, exist_ok=True)
        self._make_hosts()
        self._own_netns = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        self.enter("client")
        agents = [f"agent-{i}" for i in range(self.agents)]
        # Decentralized auth: the servers trust the operator's key; every process joins with its creds file.
        Keystore.create(self.keys)
        self.enroll(_local.CLIENT_USER, "user")
        for name in _local.SERVICES:
            self.enroll(name, "service")
        for name in agents:
            self.enroll(name)
        for i in (1, 2, 3):
            self._nats_conf(i)
            self.start_nats(i)
        for i in (1, 2, 3):
            rec, _ = self.nats_record(i)
            _local._wait_nats(MONITOR_PORT, rec, self.records, deadline, timeout, host=self.hosts[f"nats-{i}"].ip)

        services = self.hosts["services"]
        access_key, secret_key = secrets.token_urlsafe(15), secrets.token_urlsafe(30)
        ids = self.root / "s3-identities.json"
        _local._write_private(ids, _local._s3_identities(access_key, secret_key))
        weed = _local._weed_argv(_local._binary("weed"), self.root, S3_PORTS, ids, ip="0.0.0.0")
        weed = [a.replace("-ip=0.0.0.0", f"-ip={services.ip}") for a in weed]
        weed_rec = self.spawn("weed", "infra", "services", weed, {})
        public = f"{services.ip}:{S3_PORTS[0]}"
        _local._wait_s3(public, access_key, secret_key, weed_rec, self.records, deadline, timeout)

        bus_env = {"CADRE_NATS_URL": self.nats_urls(), "CADRE_BUS_REPLICAS": "3"}
        s3_env = {
            "CADRE_S3_ENDPOINT": f"127.0.0.1:{S3_PORTS[0]}",  # the services reach the store on their own host
            "CADRE_S3_PUBLIC_ENDPOINT": public,  # what presigned URLs name, for every other host
            "CADRE_S3_ACCESS_KEY": access_key,
            "CADRE_S3_SECRET_KEY": secret_key,
        }
        started_at = time.time()
        service_recs = []
        for name in _local.SERVICES:
            env = {**bus_env, "CADRE_NATS_CREDS": str(self.creds[name])}
            if name in _local.S3_SERVICES:
                env.update(s3_env)
            if name == "submitter":  # signs each run's credentials for its nodes
                env["CADRE_RUN_SIGNING_SEED"] = Keystore.open(self.keys).run_signing_seed()
            if name == "portal":  # on the services host's address, for browsers on the client host
                env.update(CADRE_PORTAL_HOST=services.ip, CADRE_PORTAL_PORT=str(PORTAL_PORT))
            if name == "scheduler" and self.node_grace is not None:
                env["CADRE_NODE_GRACE"] = str(self.node_grace)
            argv = [sys.executable, "-m", f"services.{name}"]
            service_recs.append(self.spawn(name, "service", "services", argv, _local._child_env(env)))
        agent_recs = [self.start_agent(name, name) for name in agents]
        client_creds = self.creds[_local.CLIENT_USER].read_text()
        client = BusSettings(url=self.nats_urls(), creds=client_creds, name="fleet")
        _local._run_async(
            _local._await_bus_processes(
                client, service_recs, agent_recs, self.records, started_at, deadline, timeout, lambda *_: None
            )
        )
        profile = Profile(nats_url=self.nats_urls(), creds=client_creds, name="fleet")
        self.profile_path = save_profile(profile, self.root / "profile.json")
        return self

    def start_agent(
        self,
        name: str,
        host: str,
        creds: Path | None = None,
        log: str | None = None,
        launch: list[str] | None = None,
        work: str | None = None,
    ) -> Any:
        """An agent with node id ``name`` on ``host``, joining with its creds file alone (its own unless ``creds``
        says otherwise; ``launch``: the interpreter's arguments before the agent's, not ``-m services.node_agent``;
        ``work``: whose work dir it takes, as an agent started again on the same host does)."""
        env = {"CADRE_NATS_URL": self.nats_urls(), "CADRE_NATS_CREDS": str(creds or self.creds[name])}
        argv = [
            sys.executable, *(launch or ["-m", "services.node_agent"]), "--node-id", name, "--compute-target", "local",
            "--work-dir", str(self.root / "agents" / (work or log or name)), "--runtime", "process", "--address",
            self.hosts[host].ip, "--slots", "2", "--gpus", "0", "--heartbeat", "0.5", *self.agent_args,
        ]  # fmt: skip
        return self.spawn(log or name, "agent", host, argv, _local._child_env(env))

    def link(self, host: str, up: bool) -> None:
        """Take ``host``'s link to the bridge down (a cable pulled: no packet either way, no reset) or up."""
        self._ip("-n", self._switch or "", "link", "set", self.hosts[host].port, "up" if up else "down")

    def kill(self, name: str) -> None:
        rec = next(r for r, p in self.records if r.name == name and p.poll() is None)
        os.killpg(rec.pid, signal.SIGKILL)
        next(p for r, p in self.records if r is rec).wait(10)

    def monitor(self, i: int, path: str) -> Any:
        url = f"http://{self.hosts[f'nats-{i}'].ip}:{MONITOR_PORT}/{path}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())

    def stream_leader(self, stream: str) -> int:
        """Which NATS server (1, 2 or 3) leads ``stream`` now."""
        for i in (1, 2, 3):
            with contextlib.suppress(OSError, ValueError):
                info = self.monitor(i, "jsz?streams=true")
                for account in info.get("account_details", []):
                    for s in account.get("stream_detail", []):
                        if s["name"] == stream and s.get("cluster", {}).get("leader"):
                            return int(s["cluster"]["leader"].rsplit("-", 1)[1])
        raise RuntimeError(f"no server says who leads {stream}")

    def stop(self) -> None:
        try:
            _local._stop([r for r, _ in self.records], timeout=20)
            _local._stop(_local.shim_records(self.root / "agents"), 10)
        finally:
            self._leave()
            for host in self.hosts.values():
                subprocess.run(["ip", "netns", "del", host.ns], capture_output=True)
            if self._switch:
                subprocess.run(["ip", "netns", "del", self._switch], capture_output=True)

    def __enter__(self) -> Fleet:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> int:
    why = available()
    if why:
        print(f"make fleet: {why}", file=sys.stderr)
        return 2
    from cadre import Estimator, Experiment, MpiConfiguration, Workspace

    with tempfile.TemporaryDirectory(prefix="cadre-fleet-") as tmp, Fleet(Path(tmp)) as fleet:
        assert fleet.profile_path is not None
        print("fleet:", ", ".join(f"{h.name} {h.ip}" for h in fleet.hosts.values()))
        with Workspace.from_config(fleet.profile_path) as ws:
            est = Estimator(
                str(_local.REPO_ROOT / "examples" / "mpi-allreduce"), "train.py", node_count=2,
                process_count_per_node=2, distributed_training=MpiConfiguration(),
            )  # fmt: skip
            run = Experiment(ws, "fleet").submit(est)
            details = run.wait_for_completion(show_output=True, timeout=300)
            hosts = {s["node_id"]: fleet.hosts[s["node_id"]].ip for s in details["placement"]}
            print(f"\n{run.id}: {details['status']} on {', '.join(f'{n} ({ip})' for n, ip in sorted(hosts.items()))}")
    print("fleet torn down")
    return 0 if details["status"] == "Completed" else 1


if __name__ == "__main__":
    sys.exit(main())
