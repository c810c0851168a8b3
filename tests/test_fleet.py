"""cadre across hosts (tests/fleet.py): network-namespace hosts on a bridge of their own, a three-server NATS
JetStream cluster with every stream at 3 replicas, the services and the S3 server on one host, agents on three
more, the client on its own. Ranks talk over the hosts' interfaces, files move through presigned URLs every host
reaches, and a run goes on when the server leading its streams is killed.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from fleet import PORTAL_PORT, Fleet, available
from helpers import eventually, violations

from cadre import Estimator, Experiment, MpiConfiguration, PyTorchConfiguration, Run, Workspace, _local, admin
from cadre.hyperdrive import GridParameterSampling, HyperDriveConfig, choice
from shared import bus, schemas, subjects
from shared.auth import agent_permissions
from shared.errors import AuthenticationError, ConflictError, NotFoundError, ServiceUnavailableError, ValidationError
from shared.procs import is_alive
from shared.settings import BusSettings
from shared.trust import Keystore

WHERE = """
import os, socket
from mpi4py import MPI
comm = MPI.COMM_WORLD
rank = comm.Get_rank()
probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
probe.connect((os.environ["MASTER_ADDR"], 9))  # no packet: only which interface reaches the master
me = probe.getsockname()[0]
total = comm.allreduce(rank + 1)
print(f"rank {rank} on {me} total {total}", flush=True)
os.makedirs("outputs", exist_ok=True)
with open(f"outputs/rank{rank}.txt", "w") as fh:
    fh.write(me)
"""

# Short, so that a host cut off is given up, and stops its ranks, within seconds; yet past a JetStream leader
# election (nats-server's raft waits 4-9 s for a lost leader), which must not fence anything.
# torch.distributed across hosts, in the pattern of pytorch/examples' multinode DDP (env:// from cadre's variables).
DDP = """
import os, socket, sys, time
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

dist.init_process_group(backend=os.environ["CADRE_COMMUNICATION_BACKEND"].lower())
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = DistributedDataParallel(torch.nn.Linear(8, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
torch.manual_seed(100 + rank)  # each rank its own batches: only the gradients' allreduce keeps them equal
for _ in range(5):
    loss = model(torch.randn(16, 8)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
weights = torch.cat([p.detach().flatten() for p in model.parameters()])
every = [torch.zeros_like(weights) for _ in range(world)]
dist.all_gather(every, weights)
probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
probe.connect((os.environ["MASTER_ADDR"], 9))
same = all(torch.equal(w, every[0]) for w in every)
print(f"rank {rank} of {world} on {probe.getsockname()[0]} over {os.environ['GLOO_SOCKET_IFNAME']} in sync {same}")
dist.barrier()  # every rank is done with the group
# torch's teardown of gloo's threads can abort a process at exit (a known race with rank 0's store going away):
# not what this job is about, so the ranks leave without it, rank 0 (the store's host) last.
sys.stdout.flush()
if rank == 0:
    time.sleep(1.0)
os._exit(0)
"""

GRACE, FENCE = 10.0, 20.0
T = TypeVar("T")

STEPS = """
import os, time
spool, attempt = os.environ["SPOOL"], os.environ["CADRE_ATTEMPT"]
with open(os.path.join(spool, f"attempt{attempt}.pid"), "w") as fh:
    fh.write(str(os.getpid()))
os.makedirs("checkpoints", exist_ok=True)
state = "checkpoints/step.txt"
start = int(open(state).read()) + 1 if os.path.exists(state) else 0  # a retry resumes from the checkpoint
for i in range(start, 400):
    print(f"step {i} attempt {attempt}", flush=True)
    with open(state + ".tmp", "w") as fh:
        fh.write(str(i))
    os.replace(state + ".tmp", state)
    time.sleep(0.1 if attempt == "1" else 0.01)  # the first attempt outlasts the fence, by far
open(os.path.join(spool, f"attempt{attempt}.done"), "w").close()
"""

TICKS = """
import time
for i in range(300):
    print(f"tick {i}", flush=True)
    time.sleep(0.02)
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    why = available()
    if why:
        pytest.skip(why)
    with Fleet(tmp_path_factory.mktemp("fleet"), node_grace=GRACE, agent_args=["--fence-after", str(FENCE)]) as f:
        yield f


@pytest.fixture(scope="module")
def fws(fleet: Fleet) -> Iterator[Workspace]:
    assert fleet.profile_path is not None
    with Workspace.from_config(fleet.profile_path) as ws:
        yield ws


def test_mpi_ranks_on_two_hosts_talk_over_their_interfaces_and_files_cross_hosts(
    fleet: Fleet, fws: Workspace, make_project: Callable[..., Path], tmp_path: Path
) -> None:
    est = Estimator(
        make_project(**{"where.py": WHERE}), "where.py", node_count=2, process_count_per_node=2,
        distributed_training=MpiConfiguration(),
    )  # fmt: skip
    run = Experiment(fws, "fleet").submit(est)
    out = io.StringIO()
    assert run.wait_for_completion(show_output=True, output=out, timeout=120)["status"] == "Completed"
    placement = run.get_details()["placement"]
    hosts = {slot["rank"]: slot["host"] for slot in placement}
    assert len(set(hosts.values())) == 2  # two hosts, two ranks each
    for slot in placement:
        assert slot["host"] == fleet.hosts[slot["node_id"]].ip  # the rank map names each rank's host
    seen = dict(re.findall(r"rank (\d) on (\S+) total 10", out.getvalue()))
    assert {int(r): ip for r, ip in seen.items()} == hosts, out.getvalue()
    # Every rank's output went up from its own host and comes down to the client's, through presigned URLs that
    # name the S3 endpoint the services advertise (they themselves reach it on loopback).
    for rank, ip in hosts.items():
        path = run.download_file(f"outputs/rank{rank}.txt", tmp_path / f"rank{rank}.txt")
        assert path.read_text() == ip


def test_torch_ddp_over_gloo_on_two_hosts_keeps_the_replicas_in_sync(
    fleet: Fleet, fws: Workspace, make_project: Callable[..., Path]
) -> None:
    est = Estimator(make_project(**{"ddp.py": DDP}), "ddp.py", node_count=2, process_count_per_node=2,
                    distributed_training=PyTorchConfiguration(communication_backend="Gloo"))  # fmt: skip
    run = Experiment(fws, "fleet").submit(est)
    out = io.StringIO()
    assert run.wait_for_completion(show_output=True, output=out, timeout=180)["status"] == "Completed", out.getvalue()
    hosts = {slot["rank"]: slot["host"] for slot in run.get_details()["placement"]}
    seen = re.findall(r"rank (\d) of 4 on (\S+) over (\S+) in sync (\w+)", out.getvalue())
    assert {int(r): ip for r, ip, _, _ in seen} == hosts and len(set(hosts.values())) == 2, out.getvalue()
    assert {sync for *_, sync in seen} == {"True"}  # the gradients' allreduce crossed the hosts
    assert all(iface != "lo" for _, _, iface, _ in seen)


def test_a_sweep_of_two_host_mpi_children_places_each_child_across_hosts(
    fleet: Fleet, fws: Workspace, make_project: Callable[..., Path]
) -> None:
    job = make_project(**{"job.py": """
        import argparse
        from mpi4py import MPI
        from cadre import Run
        p = argparse.ArgumentParser(); p.add_argument("--x", type=int); a = p.parse_args()
        total = MPI.COMM_WORLD.allreduce(a.x)  # over both hosts' ranks
        Run.get_context().log("total", total)
    """})  # fmt: skip
    est = Estimator(job, "job.py", node_count=2, process_count_per_node=2, distributed_training=MpiConfiguration())
    hd = HyperDriveConfig(run_config=est, hyperparameter_sampling=GridParameterSampling({"x": choice(1, 3)}),
                          primary_metric_name="total", primary_metric_goal="maximize", max_total_runs=2,
                          max_concurrent_runs=1)  # fmt: skip
    sweep = Experiment(fws, "fleet").submit(hd)
    details = sweep.wait_for_completion(timeout=180)
    assert details["status"] == "Completed" and details["bestPrimaryMetric"] == 12  # 4 ranks x 3
    for child in sweep.get_children():
        placement = child.get_details()["placement"]
        assert len(placement) == 4 and len({slot["host"] for slot in placement}) == 2


def test_a_run_goes_on_when_the_server_leading_its_streams_is_killed(
    fleet: Fleet, fws: Workspace, make_project: Callable[..., Path]
) -> None:
    run = Experiment(fws, "fleet").submit(Estimator(make_project(**{"ticks.py": TICKS}), "ticks.py"))
    deadline = time.monotonic() + 60
    while run.get_status() != "Running" and time.monotonic() < deadline:
        time.sleep(0.05)
    leader = fleet.stream_leader(subjects.LOGS_STREAM)
    time.sleep(1.0)
    fleet.kill(f"nats-{leader}")
    try:
        out = io.StringIO()
        follower = threading.Thread(target=lambda: run.wait_for_completion(show_output=True, output=out, timeout=120))
        follower.start()
        follower.join(150)
        assert run.get_status() == "Completed", run.get_details().get("error")
        assert re.findall(r"tick (\d+)", out.getvalue()) == [str(i) for i in range(300)]
        assert fleet.stream_leader(subjects.LOGS_STREAM) != leader  # another server took over
    finally:  # the killed server comes back (the next tests need all three)
        fleet.restart_nats(leader)
    # It catches up: it holds every stream again, as current as the others.

    def caught_up() -> bool:
        info = fleet.monitor(leader, "jsz?streams=true")
        streams = {s["name"]: s for a in info.get("account_details", []) for s in a.get("stream_detail", [])}
        logs = streams.get(subjects.LOGS_STREAM)
        return logs is not None and logs["state"]["messages"] > 0 and len(streams) >= 7

    deadline = time.monotonic() + 60
    while not caught_up():
        assert time.monotonic() < deadline, "the restarted server did not catch up"
        time.sleep(0.2)


def test_a_host_cut_off_mid_run_fences_its_rank_and_the_run_completes_on_another_host_from_its_checkpoint(
    fleet: Fleet, fws: Workspace, make_project: Callable[..., Path], tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    est = Estimator(
        make_project(**{"steps.py": STEPS}), "steps.py", max_retries=1, environment_variables={"SPOOL": str(spool)}
    )
    run = Experiment(fws, "fleet").submit(est)
    first = spool / "attempt1.pid"
    deadline = time.monotonic() + 60
    while not first.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    node = run.get_details()["placement"][0]["node_id"]
    time.sleep(3.0)  # a checkpoint is synced (every 2 s)
    fleet.link(node, up=False)  # the cable pulled: no packet either way
    try:
        pid = int(first.read_text())
        deadline = time.monotonic() + FENCE + 10
        while is_alive(pid, None):  # the cut-off agent stops its own rank: no zombie writes on
            assert time.monotonic() < deadline, "the cut-off host's rank was not fenced"
            time.sleep(0.1)
        assert not (spool / "attempt1.done").exists()  # stopped, not finished
        details = run.wait_for_completion(timeout=120)
    finally:
        fleet.link(node, up=True)
    assert details["status"] == "Completed" and details["attempt"] == 2
    assert details["attempts"][0]["cause"] == "node_lost" and details["attempts"][0]["nodes"] == [node]
    assert details["placement"][0]["node_id"] != node  # attempt 2 ran on another host
    out = io.StringIO()
    run.stream_logs(follow=False, output=out)
    second = [int(i) for i in re.findall(r"step (\d+) attempt 2", out.getvalue())]
    assert second and second[0] > 0 and second[-1] == 399  # resumed from the checkpoint, not from step 0
    # The link is back: the host's agent rejoins by itself.
    deadline = time.monotonic() + 30
    while True:
        state = fws._scheduler_state()
        if any(n.advert.node_id == node and n.state == "Ready" for n in state.nodes):
            break
        assert time.monotonic() < deadline, "the healed host did not rejoin"
        time.sleep(0.2)


def test_with_two_of_three_servers_lost_requests_say_the_bus_cannot_make_progress_and_all_recovers(
    fleet: Fleet, fws: Workspace, make_project: Callable[..., Path]
) -> None:
    project = make_project(**{"hello.py": "print('hello from the fleet')"})
    before = Experiment(fws, "fleet").submit(Estimator(project, "hello.py"))
    assert before.wait_for_completion(timeout=60)["status"] == "Completed"
    fleet.kill("nats-2")
    fleet.kill("nats-3")
    try:
        # The services that were on the killed servers reconnect to the one left within seconds; until then a
        # request finds nobody to answer it. Once they are back, they say why they cannot do anything.
        deadline = time.monotonic() + 60  # (past one lost request's 30 s)
        while True:
            with pytest.raises(ServiceUnavailableError) as refused:
                Experiment(fws, "fleet").submit(Estimator(project, "hello.py"))
            # (A request sent as the servers die can be lost with them, core NATS being at-most-once: the client
            # then waits out its timeout and says "no answer". Either way it asks again.)
            waiting = ("no service answers", "no answer on")
            if not any(w in str(refused.value) for w in waiting) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert "fewer than a majority of its servers are up" in str(refused.value)
    finally:
        for i in (2, 3):
            fleet.restart_nats(i)
    # Back to three (once they have a leader again): nothing was lost or corrupted, and runs go on.
    assert _once_available(lambda: before.get_details()["status"]) == "Completed"
    after = _once_available(lambda: Experiment(fws, "fleet").submit(Estimator(project, "hello.py")))
    assert after.wait_for_completion(timeout=90)["status"] == "Completed"


def _once_available(fn: Callable[[], T], within: float = 60.0) -> T:
    deadline = time.monotonic() + within
    while True:
        try:
            return fn()
        except ServiceUnavailableError:
            assert time.monotonic() < deadline, "the bus did not recover"
            time.sleep(0.5)


def test_an_agent_with_a_node_id_in_use_or_credentials_of_another_bus_is_refused_and_says_why(fleet: Fleet) -> None:
    holder = fleet.hosts["agent-0"]
    deadline = time.monotonic() + 60
    while not _heartbeating(_once_available(lambda: fleet_state(fleet)), "agent-0"):  # (the bus may be recovering)
        assert time.monotonic() < deadline, "agent-0 is not heartbeating"
        time.sleep(0.2)
    twin = fleet.start_agent("agent-0", "client", log="agent-0-twin")  # the right credentials, another host
    other_bus = Keystore.create(fleet.root / "other-keys")  # another operator: a creds file this bus never trusted
    foreign = admin.write_creds(other_bus.issue("agent-1", "agent", agent_permissions("agent-1")), fleet.root / "x")
    wrong = fleet.start_agent("agent-1", "client", creds=foreign, log="agent-1-wrong")
    for rec, said in (
        (twin, f"node id 'agent-0' is in use by the agent at {holder.ip} (host "),
        (wrong, "refused 'agent-1' (Authorization Violation): the credentials file was revoked or replaced"),
    ):
        proc = next(p for r, p in fleet.records if r is rec)
        try:
            assert proc.wait(60) == 2
        finally:
            if proc.poll() is None:
                fleet.kill(rec.name)  # it took the name: it must not go on running as agent-0
        log = Path(rec.log).read_text()
        assert said in log, log[-2000:]
        assert "Traceback" not in log  # one clear line, not a stack
    state = _once_available(
        lambda: fleet_state(fleet),
    )
    assert {n.advert.node_id: n.advert.address for n in state.nodes}["agent-0"] == holder.ip  # the holder keeps it


def test_a_new_host_joins_with_its_creds_file_alone_and_revoking_the_file_cuts_it_off(
    fleet: Fleet, fws: Workspace, make_project: Callable[..., Path]
) -> None:
    name, creds = "gpu-new", fleet.root / "enrolled" / "gpu-new.creds"
    cli = [sys.executable, "-m", "cadre.cli", "admin"]
    keys = ["--keys", str(fleet.keys)]
    out = subprocess.run([*cli, "add-agent", name, "-o", str(creds), *keys], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert creds.stat().st_mode & 0o077 == 0  # its secret seed: the owner's only
    # The host gets the bus URLs and this file: no server is reconfigured or restarted.
    rec = fleet.start_agent(name, "client", creds=creds)
    proc = next(p for r, p in fleet.records if r is rec)
    try:
        deadline = time.monotonic() + 60
        while not _heartbeating(_once_available(lambda: fleet_state(fleet)), name):
            assert time.monotonic() < deadline and proc.poll() is None, Path(rec.log).read_text()[-2000:]
            time.sleep(0.2)
        est = Estimator(make_project(**{"hi.py": "print('joined')"}), "hi.py", node_count=fleet.agents + 1)
        run = Experiment(fws, "fleet").submit(est)
        assert run.wait_for_completion(timeout=90)["status"] == "Completed"
        assert name in {slot["node_id"] for slot in run.get_details()["placement"]}

        again = subprocess.run([*cli, "add-agent", name, *keys], capture_output=True, text=True)
        assert again.returncode == 2 and "already has bus credentials" in again.stderr, again.stderr

        out = subprocess.run([*cli, "revoke", name, "--nats", fleet.nats_urls(), *keys], capture_output=True,
                             text=True)  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert proc.wait(30) == 2  # cut off at once, and it says why
        log = Path(rec.log).read_text()
        assert "its credentials were revoked" in log, log[-2000:]
        assert "Traceback" not in log
        # The same file is refused from then on, by every server (the update went round the cluster).
        retry = fleet.start_agent(name, "client", creds=creds, log=f"{name}-retry")
        assert next(p for r, p in fleet.records if r is retry).wait(60) == 2
        assert "refused 'gpu-new' (Authorization Violation)" in Path(retry.log).read_text()
        # A server restarted after the revocation still refuses it: its resolver kept the pushed account on disk.
        fleet.kill("nats-3")
        fleet.restart_nats(3)
        only3 = f"nats://{fleet.hosts['nats-3'].ip}:4222"

        async def on_nats_3() -> None:
            nc = await bus.connect(BusSettings(url=only3, creds=fleet.creds[_local.CLIENT_USER].read_text()))
            await nc.close()  # it is up and takes the others
            with pytest.raises(AuthenticationError, match="refused 'gpu-new'"):
                await bus.connect(BusSettings(url=only3, creds=creds.read_text()))

        asyncio.run(on_nats_3())
        # The services that were on it have moved and answer again (the next tests go through them).
        _once_available(lambda: (Experiment(fws, "fleet").get_runs(limit=1), fleet_state(fleet)))
        listed = subprocess.run([*cli, "users", *keys], capture_output=True, text=True).stdout
        assert re.search(rf"^{name}\s+agent\s+.*revoked", listed, re.M), listed
    finally:
        if proc.poll() is None:
            fleet.kill(rec.name)


def test_a_person_logs_in_to_the_portal_with_their_creds_file_and_a_foreign_one_is_refused(fleet: Fleet) -> None:
    mine = fleet.enroll("alice", "user").read_text()
    foreign = Keystore.create(fleet.root / "alice-other-keys").issue("alice", "user", agent_permissions("x"))

    def login(creds: str) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection(fleet.hosts["services"].ip, PORTAL_PORT, timeout=10)
        body = urllib.parse.urlencode({"creds": creds, "next": "/experiments"})
        conn.request("POST", "/login", body, {"Content-Type": "application/x-www-form-urlencoded"})
        return conn.getresponse()

    refused = login(foreign)
    assert refused.status == 401 and "refused those credentials" in refused.read().decode()
    ok = login(mine)
    assert ok.status == 303, ok.read()[:500]
    cookie = ok.getheader("Set-Cookie", "").split(";")[0]
    conn = http.client.HTTPConnection(fleet.hosts["services"].ip, PORTAL_PORT, timeout=10)
    conn.request("GET", "/experiments", headers={"Cookie": cookie})
    page = conn.getresponse()
    assert page.status == 200 and "alice" in page.read().decode()  # signed in as the user its JWT names


def test_an_agent_writes_only_the_runs_it_was_given(
    fleet: Fleet, fws: Workspace, make_project: Callable[..., Path]
) -> None:
    # It runs until this test is done with it: what a node may ask about a run is checked while it runs.
    est = Estimator(make_project(**{"hi.py": "import time; print('mine', flush=True); time.sleep(300)"}), "hi.py",
                    node_count=2)  # fmt: skip
    # Right after the quorum drill a write may still time out once while the restarted servers catch up: the
    # submitter says so, and the caller tries again (what this test checks comes after).
    run = _once_available(lambda: Experiment(fws, "fleet").submit(est))
    try:
        eventually(lambda: run.get_status() == "Running" or None, timeout=90)
        _only_as_itself(fleet, run)
    finally:
        run.cancel()
    assert run.wait_for_completion(timeout=60, raise_on_error=False)["status"] == "Canceled"


def _only_as_itself(fleet: Fleet, run: Run) -> None:
    on = sorted({slot["node_id"] for slot in run.get_details()["placement"]})
    off = next(f"agent-{i}" for i in range(fleet.agents) if f"agent-{i}" not in on)
    url = fleet.nats_urls()
    snapshot = subjects.AgentApi.SNAPSHOT_URL

    async def go() -> None:
        own = BusSettings(url=url, creds=fleet.creds[on[0]].read_text())

        async def forge(nc) -> None:  # its own user writes no run, not even one it ran
            await nc.publish(subjects.run_events(run.id), b"{}")
            await nc.publish(subjects.run_logs(run.id, 0), b"{}")
            await nc.publish(subjects.run_metrics(run.id), b"{}")

        assert len(await violations(own, forge)) == 3

        async def as_another(nc) -> None:  # nor may it ask the artifact service as another node
            for api in subjects.AgentApi.ALL:
                await nc.publish(subjects.of_node(api, off), b"{}")

        assert len(await violations(own, as_another)) == len(subjects.AgentApi.ALL)
        nc = await bus.connect(BusSettings(url=url, creds=fleet.creds[off].read_text()))
        try:
            with pytest.raises(NotFoundError, match=f"has no rank on node {off}"):
                await bus.request(nc, subjects.agent_run_bus(off), schemas.RunRef(run_id=run.id),
                                  schemas.RunBusCredentials)  # fmt: skip
            # A run's code and files are for the nodes it runs on.
            with pytest.raises(ConflictError, match=f"node {off} has no ranks of run"):
                await bus.request(nc, subjects.of_node(snapshot, off), schemas.RunRef(run_id=run.id),
                                  schemas.SnapshotUrl)  # fmt: skip
            with pytest.raises(ConflictError, match=f"node {off} has no ranks of run"):
                req = schemas.UploadUrlsRequest(run_id=run.id, node_id=off, files=[])
                await bus.request(nc, subjects.of_node(subjects.AgentApi.UPLOAD_URLS, off), req, schemas.UploadUrls)
        finally:
            await nc.close()
        nc = await bus.connect(own)
        try:
            given = await bus.request(nc, subjects.agent_run_bus(on[0]), schemas.RunRef(run_id=run.id),
                                      schemas.RunBusCredentials)  # fmt: skip
            snap = await bus.request(nc, subjects.of_node(snapshot, on[0]), schemas.RunRef(run_id=run.id),
                                     schemas.SnapshotUrl)  # fmt: skip
            assert snap.url.startswith("http")
            # A node that names another in its request is refused, not trusted: the subject says who asks.
            with pytest.raises(ValidationError, match=f"node {on[0]} asked on behalf of node {on[1]}"):
                req = schemas.CommitRequest(run_id=run.id, node_id=on[1], files=[])
                await bus.request(nc, subjects.of_node(subjects.AgentApi.COMMIT, on[0]), req, schemas.RunSummary)
        finally:
            await nc.close()
        scoped = BusSettings(url=url, creds=given.creds)

        async def scoped_as_another(nc) -> None:  # nor may the run's credentials for this node
            await nc.publish(subjects.of_node(subjects.AgentApi.COMMIT, off), b"{}")

        assert len(await violations(scoped, scoped_as_another)) == 1

        async def elsewhere(nc) -> None:  # the run's credentials write that run alone
            await nc.publish(subjects.run_events("other_1_x"), b"{}")
            await nc.publish(subjects.run_logs("other_1_x", 0), b"{}")
            await nc.publish(subjects.node_events(off), b"{}")

        assert len(await violations(scoped, elsewhere)) == 3

        async def its_own(nc) -> None:
            await nc.publish(subjects.run_metrics(run.id), b"{}")

        assert await violations(scoped, its_own) == []

    asyncio.run(go())


def fleet_state(fleet: Fleet) -> schemas.SchedulerState:
    assert fleet.profile_path is not None
    with Workspace.from_config(fleet.profile_path) as ws:
        return ws._scheduler_state()


def _heartbeating(state: schemas.SchedulerState, node_id: str) -> bool:
    return any(n.advert.node_id == node_id and n.state == "Ready" and n.advert.alive(time.time()) for n in state.nodes)


# The agent as a host whose clock is ten minutes slow would run it: every time.time() it reads is off.
SLOW_CLOCK = (
    "import runpy, time; real = time.time; time.time = lambda: real() - 600; "
    "runpy.run_module('services.node_agent', run_name='__main__')"
)


def test_an_agent_whose_clock_is_ten_minutes_slow_stays_ready_and_takes_work(
    fleet: Fleet, fws: Workspace, make_project: Callable[..., Path]
) -> None:
    name = f"agent-{fleet.agents}"
    fleet.enroll(name)
    rec = fleet.start_agent(name, "client", launch=["-c", SLOW_CLOCK])
    try:
        deadline = time.monotonic() + 60
        while not _heartbeating_by_the_schedulers_clock(fleet_state(fleet), name):
            assert time.monotonic() < deadline, "the slow-clock agent did not join"
            time.sleep(0.2)
        time.sleep(GRACE + 2)  # past the node grace: liveness is judged by the scheduler's own clock
        state = fleet_state(fleet)
        assert _heartbeating_by_the_schedulers_clock(state, name), [(n.advert.node_id, n.state) for n in state.nodes]
        est = Estimator(make_project(**{"hello.py": "print('everywhere')"}), "hello.py", node_count=fleet.agents + 1)
        run = Experiment(fws, "fleet").submit(est)
        assert run.wait_for_completion(timeout=90)["status"] == "Completed"
        assert name in {slot["node_id"] for slot in run.get_details()["placement"]}
    finally:
        fleet.kill(rec.name)


def _heartbeating_by_the_schedulers_clock(state: schemas.SchedulerState, node_id: str) -> bool:
    return any(n.advert.node_id == node_id and n.state == "Ready" for n in state.nodes)


UNTIL_RELEASED = """
import os, time
spool = os.environ["SPOOL"]
for i in range(3000):
    print(f"line {i}", flush=True)
    if i == 20:
        open(os.path.join(spool, "started"), "w").close()
    if i > 40 and os.path.exists(os.path.join(spool, "release")):
        break
    time.sleep(0.02)
"""


def test_an_agent_killed_and_started_again_mid_run_takes_its_run_back_on_fresh_run_credentials(
    fleet: Fleet, fws: Workspace, make_project: Callable[..., Path], tmp_path: Path
) -> None:
    """An upgrade's restart, on a bus where the agent's own user writes no run: the new agent asks for the run's
    credentials again, adopts the ranks its shim kept, and every line arrives once."""
    spool = tmp_path / "spool"
    spool.mkdir()
    est = Estimator(make_project(**{"u.py": UNTIL_RELEASED}), "u.py", environment_variables={"SPOOL": str(spool)})
    run = Experiment(fws, "fleet").submit(est)
    deadline = time.monotonic() + 60
    while not (spool / "started").exists():
        assert time.monotonic() < deadline, run.get_status()
        time.sleep(0.1)
    victim = run.get_details()["placement"][0]["node_id"]
    rec, proc = next((r, p) for r, p in fleet.records if r.name == victim and p.poll() is None)
    os.kill(rec.pid, signal.SIGKILL)  # the agent only: its shim and the rank go on
    proc.wait(10)
    again = fleet.start_agent(victim, victim, log=f"{victim}-again", work=victim)
    log = Path(again.log)
    deadline = time.monotonic() + 60
    while "run_adopted" not in (text := log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, text[-2000:]
        time.sleep(0.2)
    (spool / "release").touch()
    out = io.StringIO()
    assert run.wait_for_completion(show_output=True, output=out, timeout=120)["status"] == "Completed"
    numbers = [int(m[1]) for m in re.finditer(r"line (\d+)", out.getvalue())]
    assert numbers == list(range(len(numbers))) and len(numbers) > 40, numbers[:5]  # each once, in order
    assert run.get_details()["attempt"] == 1
    assert "Permissions Violation" not in log.read_text()
