"""Gang-scheduled multi-node runs on a 3-agent cluster: MPI wire-up, rank environment, failures, cancel, races.

The agents are separate processes with their own credentials (as on separate hosts); their ranks are real
processes; MPI is MPICH from PyPI wired up through the master agent's PMI-1 server.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import eventually

from cadre import (
    Estimator,
    Experiment,
    MpiConfiguration,
    PyTorchConfiguration,
    Run,
    RunFailedError,
    TensorflowConfiguration,
    Workspace,
    _local,
)

ROOT = Path(__file__).resolve().parent.parent
ALLREDUCE = ROOT / "examples" / "mpi-allreduce"

# Records its pid and environment, then holds until the test releases it (or it is killed).
HOLD = """
import json, os, time
rank = os.environ["RANK"]
keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
        "CUDA_VISIBLE_DEVICES", "PMI_PORT")
info = {k: os.environ.get(k) for k in keys}
info["pid"] = os.getpid()
path = os.path.join(os.environ["SPOOL"], f"rank{rank}.json")
with open(path + ".tmp", "w") as fh:  # whole or not there: the test reads it as soon as it exists
    json.dump(info, fh)
os.replace(path + ".tmp", path)
print(f"rank {rank} holding", flush=True)
while not os.path.exists(os.path.join(os.environ["SPOOL"], "release")):
    time.sleep(0.05)
"""


@pytest.fixture(scope="module")
def gpu_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("cadre-gpu-home")
    _local.up(home=home, agents=3, gpus_per_agent=2, slots_per_agent=2, heartbeat=0.5, timeout=120)
    try:
        yield home
    finally:
        _local.down(home=home)


@pytest.fixture(scope="module")
def gws(gpu_home: Path) -> Iterator[Workspace]:
    with Workspace.from_config(gpu_home / "profile.json") as workspace:
        yield workspace


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] not in "ZX"


def mpi_run(ws: Workspace, nodes: int, ppn: int) -> tuple[Run, str]:
    est = Estimator(
        source_directory=ALLREDUCE,
        entry_script="train.py",
        compute_target="local",
        node_count=nodes,
        process_count_per_node=ppn,
        distributed_training=MpiConfiguration(),
        pip_packages=[],
    )
    run = Experiment(ws, "mpi").submit(est)
    out = io.StringIO()
    run.wait_for_completion(show_output=True, output=out, timeout=90)
    return run, out.getvalue()


@pytest.mark.parametrize(("nodes", "ppn"), [(2, 2), (3, 1), (1, 2)])
def test_mpi_allreduce_across_agents(gws: Workspace, tmp_path: Path, nodes: int, ppn: int) -> None:
    run, printed = mpi_run(gws, nodes, ppn)
    size = nodes * ppn
    details = run.get_details()
    assert details["status"] == "Completed"
    placement = details["placement"]
    assert [s["rank"] for s in placement] == list(range(size))
    assert len({s["node_id"] for s in placement}) == nodes
    for node in {s["node_id"] for s in placement}:
        gpus = [g for s in placement if s["node_id"] == node for g in s["gpu_ids"]]
        assert len(gpus) == len(set(gpus)) == ppn  # one GPU per process, never shared
    for rank in range(size):
        line = next(x for x in printed.splitlines() if x.startswith(f"[rank {rank}] rank {rank}/{size}"))
        assert f"allreduce={size * (size + 1) // 2}" in line
        slot = placement[rank]
        assert f"local_rank={slot['local_rank']}" in line
        assert f"gpus='{slot['gpu_ids'][0]}'" in line
    assert run.download_file("outputs/allreduce.txt", tmp_path / "r.txt").read_text().split()[0] == str(size)
    assert details["exitCodes"] == {r: 0 for r in range(size)}


def test_a_file_two_nodes_write_differently_completes_the_run_and_says_which_copy_it_kept(
    gws: Workspace, make_project: Callable[..., Path], tmp_path: Path
) -> None:
    # Each node's first rank saves "the model" (a common slip: LOCAL_RANK 0 instead of RANK 0), and node 1 changes
    # a file that came with the snapshot: both nodes upload both names, with different contents.
    script = """
import os
node = os.environ["NODE_RANK"]
with open("outputs/model.txt", "w") as fh:
    fh.write(f"model from node {node}\\n" * (1 + int(node)))
if node == "1":
    with open("outputs/notes.txt", "a") as fh:
        fh.write("node 1 was here\\n")
"""
    project = make_project(**{"save.py": script, "outputs__notes.txt": "from the snapshot\n"})
    est = Estimator(source_directory=project, entry_script="save.py", node_count=2, process_count_per_node=1)
    run = Experiment(gws, "same-name").submit(est)
    out = io.StringIO()
    details = run.wait_for_completion(show_output=True, output=out, timeout=90)
    assert details["status"] == "Completed", details["error"]
    nodes = {s["rank"]: s["node_id"] for s in details["placement"]}  # one rank a node: its rank is its node rank
    warned = {w["message"].split()[0]: w["message"] for w in details["warnings"]}
    assert set(warned) == {"outputs/model.txt", "outputs/notes.txt"}, details["warnings"]
    for name, message in warned.items():
        assert f"differs between nodes {', '.join(sorted(nodes.values()))}" in message
        assert f"Warning: {message}" in out.getvalue()
        kept = re.search(r"the run keeps (\S+)'s", message)
        assert kept is not None
        node_rank = next(r for r, n in nodes.items() if n == kept.group(1))
        got = run.download_file(name, tmp_path / name.replace("/", "_")).read_text()
        if name == "outputs/model.txt":
            assert got == f"model from node {node_rank}\n" * (1 + node_rank)  # the copy it names, whole
        else:
            assert got == ("from the snapshot\n" + "node 1 was here\n" if node_rank == 1 else "from the snapshot\n")
    listed = [f for f in run.get_file_names() if f in warned]
    assert sorted(listed) == sorted(warned)  # once each
    assert Run.get(gws, run.id).get_details()["warnings"] == details["warnings"]


def hold(ws: Workspace, make_project: Callable[..., Path], spool: Path, nodes: int, ppn: int, **kw: object) -> Run:
    spool.mkdir(exist_ok=True)
    est = Estimator(
        source_directory=make_project(**{"hold.py": HOLD}),
        entry_script="hold.py",
        node_count=nodes,
        process_count_per_node=ppn,
        environment_variables={"SPOOL": str(spool)},
        **kw,  # type: ignore[arg-type]
    )
    run = Experiment(ws, "hold").submit(est)
    eventually(lambda: all((spool / f"rank{r}.json").exists() for r in range(nodes * ppn)), timeout=30)
    return run


def ranks(spool: Path, size: int) -> list[dict[str, object]]:
    return [json.loads((spool / f"rank{r}.json").read_text()) for r in range(size)]


def test_torch_style_environment_per_rank(gws: Workspace, make_project: Callable[..., Path], tmp_path: Path) -> None:
    run = hold(gws, make_project, tmp_path / "spool", 2, 2, distributed_training=PyTorchConfiguration())
    envs = ranks(tmp_path / "spool", 4)
    (tmp_path / "spool" / "release").touch()
    assert run.wait_for_completion(timeout=30)["status"] == "Completed"
    placement = run.get_details()["placement"]
    master = {(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs}
    assert len(master) == 1 and next(iter(master))[0] == "127.0.0.1"
    for rank, env in enumerate(envs):
        slot = placement[rank]
        assert env["RANK"] == str(rank) and env["WORLD_SIZE"] == "4"
        assert env["LOCAL_RANK"] == str(slot["local_rank"]) and env["LOCAL_WORLD_SIZE"] == "2"
        assert env["NODE_RANK"] == str(rank // 2)
        assert env["CUDA_VISIBLE_DEVICES"] == str(slot["gpu_ids"][0])
        assert env["PMI_PORT"] is None  # torch-style only: no MPI wiring


def test_a_rank_that_dies_fails_the_whole_run_and_leaves_no_process(
    gws: Workspace, make_project: Callable[..., Path], tmp_path: Path
) -> None:
    script = """
        import os, time
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        open(os.path.join(os.environ["SPOOL"], f"pid{comm.Get_rank()}"), "w").write(str(os.getpid()))
        comm.Barrier()
        if comm.Get_rank() == 1:
            print("rank 1 giving up", flush=True)
            os._exit(7)
        comm.Barrier()  # the others hang here, as MPI jobs do when a peer dies
        """
    spool = tmp_path / "spool"
    spool.mkdir()
    est = Estimator(
        source_directory=make_project(**{"train.py": script}),
        entry_script="train.py",
        node_count=2,
        process_count_per_node=2,
        distributed_training=MpiConfiguration(),
        environment_variables={"SPOOL": str(spool)},
    )
    segments_before = set(Path("/dev/shm").glob("mpich_shm_*"))
    started = time.monotonic()
    run = Experiment(gws, "dies").submit(est)
    with pytest.raises(RunFailedError, match=r"rank 1 on node agent-\d exited with code 7"):
        run.wait_for_completion(timeout=60)
    assert time.monotonic() - started < 30
    pids = [int((spool / f"pid{r}").read_text()) for r in range(4)]
    eventually(lambda: not any(alive(p) for p in pids), timeout=10)
    details = run.get_details()
    assert details["exitCodes"][1] == 7 and details["error"]["code"] == "nonzero_exit"
    # The killed ranks never unlinked their shared-memory segments (RAM until reboot): the agents did.
    eventually(lambda: not set(Path("/dev/shm").glob("mpich_shm_*")) - segments_before, timeout=10)


# An MPI job that prints numbered lines until released, then logs a metric and sums across the ranks.
THROUGH = """
import json, os, time
from mpi4py import MPI
from cadre import Run
comm, run = MPI.COMM_WORLD, Run.get_context()
rank, spool = comm.Get_rank(), os.environ["SPOOL"]
run.log("before", rank)
with open(os.path.join(spool, f"rank{rank}.tmp"), "w") as fh:  # whole or not there (as in HOLD)
    json.dump({"pid": os.getpid()}, fh)
os.replace(os.path.join(spool, f"rank{rank}.tmp"), os.path.join(spool, f"rank{rank}.json"))
i = 0
while not os.path.exists(os.path.join(spool, "release")):
    print(f"rank {rank} line {i}", flush=True)
    i += 1
    time.sleep(0.005)
for _ in range(200):
    print(f"rank {rank} line {i}")
    i += 1
run.log("after", rank)
total = comm.allreduce(i)
if rank == 0:
    run.log("total", total)
"""


def test_an_agent_killed_and_restarted_mid_run_takes_its_ranks_back(
    gws: Workspace, gpu_home: Path, make_project: Callable[..., Path], tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    est = Estimator(
        source_directory=make_project(**{"through.py": THROUGH}), entry_script="through.py", node_count=2,
        process_count_per_node=2, distributed_training=MpiConfiguration(), environment_variables={"SPOOL": str(spool)},
    )  # fmt: skip
    run = Experiment(gws, "through").submit(est)
    eventually(lambda: all((spool / f"rank{r}.json").exists() for r in range(4)), timeout=30)
    pids = [int(e["pid"]) for e in ranks(spool, 4)]  # type: ignore[call-overload]
    # The master's agent: the job's PMI server and Run.get_context() endpoint must live on without it.
    victim = run.get_details()["placement"][0]["node_id"]

    def agent() -> dict[str, object]:
        state = json.loads((gpu_home / "cluster" / "state.json").read_text())
        return next(p for p in state["processes"] if p["name"] == victim)  # type: ignore[no-any-return]

    old = int(agent()["pid"])  # type: ignore[call-overload]
    os.kill(old, signal.SIGKILL)
    time.sleep(1.0)  # the ranks print on with no agent; the supervisor starts a new one
    log = Path(str(agent()["log"]))
    eventually(lambda: f'"run_id": "{run.id}"' in log.read_text() and "run_adopted" in log.read_text(), timeout=30)
    assert int(agent()["pid"]) != old  # type: ignore[call-overload]
    _local.restart(victim, home=gpu_home)  # and then an upgrade's way: SIGTERM, the agent again
    assert all(alive(p) for p in pids), "the ranks lived through the agent's death and its stop"
    (spool / "release").touch()
    out = io.StringIO()
    assert run.wait_for_completion(show_output=True, output=out, timeout=120)["status"] == "Completed"
    # Every line exactly once and in order, those printed while no agent was there included.
    again = io.StringIO()
    run.stream_logs(follow=False, output=again)
    for text in (out.getvalue(), again.getvalue()):
        seen: dict[int, list[int]] = {r: [] for r in range(4)}
        for m in re.finditer(r"rank (\d) line (\d+)", text):
            seen[int(m[1])].append(int(m[2]))
        for rank, numbers in seen.items():
            assert numbers == list(range(len(numbers))) and len(numbers) > 200, (rank, numbers[:5], len(numbers))
    metrics = run.get_metrics()
    assert sorted(metrics["before"]) == sorted(metrics["after"]) == [0, 1, 2, 3]
    assert metrics["total"] == sum(len(seen[r]) for r in range(4))
    assert not any(alive(p) for p in pids)
    assert run.get_details()["attempt"] == 1  # no retry: the same attempt went on


def test_cancel_stops_every_rank_on_every_node(
    gws: Workspace, make_project: Callable[..., Path], tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    run = hold(gws, make_project, spool, 2, 2)
    pids = [int(e["pid"]) for e in ranks(spool, 4)]  # type: ignore[call-overload]
    assert all(alive(p) for p in pids)
    run.cancel()
    assert run.wait_for_completion(timeout=30)["status"] == "Canceled"
    assert not any(alive(p) for p in pids)
    # The slots are free again: a gang that needs all of two nodes runs.
    assert mpi_run(gws, 2, 2)[0].get_status() == "Completed"


def test_two_gangs_racing_for_the_same_nodes_both_complete(
    gws: Workspace, make_project: Callable[..., Path], tmp_path: Path
) -> None:
    script = """
        import time
        from mpi4py import MPI
        MPI.COMM_WORLD.Barrier()
        time.sleep(0.5)
        print("rank", MPI.COMM_WORLD.Get_rank(), "done")
        """
    project = make_project(**{"train.py": script})

    def gang() -> Run:
        est = Estimator(
            source_directory=project,
            entry_script="train.py",
            node_count=2,
            process_count_per_node=2,
            distributed_training=MpiConfiguration(),
        )
        return Experiment(gws, "race").submit(est)

    first, second = gang(), gang()  # 3 nodes of 2 slots: only one 2x2 gang fits at a time
    reason = eventually(lambda: first.get_details()["queueReason"] or second.get_details()["queueReason"])
    assert re.fullmatch(r"needs 2 node\(s\) with 2 free GPU\(s\) on compute target 'local'; 1 of 3 live node\(s\) "
                        r"have them", reason)  # fmt: skip
    assert first.wait_for_completion(timeout=60)["status"] == "Completed"
    assert second.wait_for_completion(timeout=60)["status"] == "Completed"


def test_a_gang_too_large_for_the_target_fails_fast(gws: Workspace) -> None:
    est = Estimator(
        source_directory=ALLREDUCE, entry_script="train.py", node_count=4, distributed_training=MpiConfiguration()
    )
    run = Experiment(gws, "too-big").submit(est)
    with pytest.raises(RunFailedError, match=r"needs 4 node\(s\) with 1 slot\(s\) each, but compute target 'local' "
                                             r"has 3 such node\(s\)"):  # fmt: skip
        run.wait_for_completion(timeout=20)


def test_a_big_gang_waits_while_nodes_are_still_joining(gws: Workspace, gpu_home: Path) -> None:
    # A restarted scheduler sees every node join again: the target is still growing for a few seconds, so a gang
    # bigger than it waits (saying why) instead of failing at once, and fails only once the target has settled.
    _local.restart("scheduler", home=gpu_home)
    est = Estimator(
        source_directory=ALLREDUCE, entry_script="train.py", node_count=4, distributed_training=MpiConfiguration()
    )
    run = Experiment(gws, "too-big").submit(est)
    reason = eventually(lambda: run.get_details()["queueReason"], timeout=5)
    assert reason.endswith("has 3 such node(s) (largest node: 2 slot(s)) so far; nodes are still joining")
    with pytest.raises(RunFailedError, match=r"compute target 'local' has 3 such node\(s\)"):
        run.wait_for_completion(timeout=30)


TF_TASKS = """
import json, os, socket, threading, time
from cadre import Run
config = json.loads(os.environ["TF_CONFIG"])
task, cluster = config["task"], config["cluster"]
me = cluster[task["type"]][task["index"]]
host, port = me.rsplit(":", 1)
server = socket.create_server((host, int(port)))  # the task's own address: it must be free on this node
def answer():
    while True:
        conn, _ = server.accept()
        conn.sendall(f"{task['type']}:{task['index']}".encode())
        conn.close()
threading.Thread(target=answer, daemon=True).start()
reached = set()
peers = [(kind, i, addr) for kind, addrs in cluster.items() for i, addr in enumerate(addrs) if addr != me]
deadline = time.time() + 60
for kind, i, addr in peers:
    while True:
        try:
            with socket.create_connection(tuple([addr.rsplit(":", 1)[0], int(addr.rsplit(":", 1)[1])]), 2) as c:
                assert c.recv(64).decode() == f"{kind}:{i}"
                reached.add(addr)
                break
        except OSError:
            assert time.time() < deadline, f"{addr} never answered"
            time.sleep(0.05)
print("task", task["type"], task["index"], "rank", os.environ["RANK"], "reached", len(reached), flush=True)
Run.get_context().log("reached", len(reached))
time.sleep(1)  # the others may still be dialing this task
"""


def test_tensorflow_parameter_server_tasks_get_a_tf_config_across_nodes(
    gws: Workspace, make_project: Callable[..., Path]
) -> None:
    tf = TensorflowConfiguration(worker_count=3, parameter_server_count=1)
    est = Estimator(make_project(**{"train.py": TF_TASKS}), "train.py", node_count=2, distributed_training=tf)
    run = Experiment(gws, "tf-config").submit(est)
    out = io.StringIO()
    run.wait_for_completion(show_output=True, output=out, timeout=120)
    tasks = re.findall(r"task (worker|ps) (\d) rank (\d) reached 3", out.getvalue())
    assert sorted(tasks, key=lambda t: t[2]) == [("worker", "0", "0"), ("worker", "1", "1"), ("worker", "2", "2"),
                                                ("ps", "0", "3")], out.getvalue()  # fmt: skip
    assert run.get_metrics()["reached"] == [3, 3, 3, 3]
    assert len({slot["node_id"] for slot in run.get_details()["placement"]}) == 2
