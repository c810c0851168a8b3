"""Pure logic: the state table, placement, script_params, snapshots. No servers."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import tarfile
import time
import types
import typing
from pathlib import Path

import hypothesis
import hypothesis.strategies as st
import msgspec
import pytest

from cadre._estimator import Estimator, render_params
from cadre._snapshot import collect, pack
from services.node_agent.cache import NodeCache
from services.scheduler.placement import NodeState, place
from shared import lifecycle, schemas
from shared.errors import ConflictError, ValidationError
from shared.lifecycle import fold
from shared.runs import validate_spec
from shared.settings import Limits
from shared.states import TRANSITIONS, RunState, can_transition, check_transition

SNAP = schemas.SnapshotRef(content_hash="a" * 64, size=10, file_count=1, md5="b" * 32)


def spec(**kw: object) -> schemas.RunSpec:
    base: dict[str, object] = {"experiment": "e", "entry_script": "train.py", "snapshot": SNAP}
    base.update(kw)
    return schemas.RunSpec(**base)  # type: ignore[arg-type]


def node(node_id: str, slots: int, gpus: int = 0, target: str = "local") -> NodeState:
    return NodeState(
        schemas.NodeAdvert(
            node_id=node_id,
            compute_target=target,
            hostname="h",
            cpus=slots,
            memory_bytes=0,
            gpus=[schemas.GpuInfo(index=i) for i in range(gpus)],
            slots=slots,
            started_at=0,
            heartbeat_at=time.time(),
            heartbeat_interval=2,
        )
    )


class TestStates:
    def test_terminal_states_go_nowhere(self) -> None:
        for state in (RunState.COMPLETED, RunState.FAILED, RunState.CANCELED):
            assert state.is_terminal()
            for other in RunState:
                assert not can_transition(state, other)

    def test_happy_path_is_legal(self) -> None:
        path = [
            None,
            RunState.NOT_STARTED,
            RunState.QUEUED,
            RunState.PREPARING,
            RunState.STARTING,
            RunState.RUNNING,
            RunState.FINALIZING,
            RunState.COMPLETED,
        ]
        for cur, nxt in itertools.pairwise(path):
            check_transition(cur, nxt)  # type: ignore[arg-type]

    def test_illegal_moves_are_refused(self) -> None:
        with pytest.raises(ConflictError):
            check_transition(RunState.QUEUED, RunState.RUNNING)
        with pytest.raises(ConflictError):
            check_transition(RunState.COMPLETED, RunState.RUNNING)
        with pytest.raises(ConflictError):
            check_transition(None, RunState.QUEUED)

    def test_every_state_has_a_row(self) -> None:
        assert set(TRANSITIONS) == set(RunState)


class TestPlacement:
    def test_packs_onto_the_fullest_node_that_fits(self) -> None:
        a, b = node("a", 4), node("b", 4)
        a.used_slots = 2
        decision = place(spec(process_count_per_node=2), [a, b])
        assert decision.placement is not None
        assert {s.node_id for s in decision.placement} == {"a"}
        assert [s.rank for s in decision.placement] == [0, 1]
        assert [s.local_rank for s in decision.placement] == [0, 1]

    def test_gpus_are_one_per_process_and_never_shared(self) -> None:
        n = node("g", 4, gpus=4)
        n.used_gpus = {0}
        n.used_slots = 1
        decision = place(spec(process_count_per_node=2), [n])
        assert decision.placement is not None
        assert [s.gpu_ids for s in decision.placement] == [[1], [2]]

    def test_waits_with_a_reason_when_busy(self) -> None:
        n = node("a", 2)
        n.used_slots = 2
        decision = place(spec(), [n])
        assert decision.placement is None and decision.impossible is None
        assert "1 free slot" in (decision.reason or "") and "0 of 1" in (decision.reason or "")

    def test_waits_when_no_node_is_live(self) -> None:
        assert "no live node" in (place(spec(), []).reason or "")

    def test_too_big_for_any_node_is_impossible(self) -> None:
        decision = place(spec(process_count_per_node=8), [node("a", 2)])
        assert decision.impossible and "largest node: 2" in decision.impossible

    def test_gang_gets_distinct_nodes_or_nothing(self) -> None:
        a, b, c = node("a", 2), node("b", 2), node("c", 2)
        c.used_slots = 1
        decision = place(spec(node_count=2, process_count_per_node=2), [a, b, c])
        assert decision.placement is not None
        assert [(s.rank, s.node_id, s.local_rank) for s in decision.placement] == [
            (0, "a", 0), (1, "a", 1), (2, "b", 0), (3, "b", 1),
        ]  # fmt: skip
        b.used_slots = 1
        decision = place(spec(node_count=2, process_count_per_node=2), [a, b, c])
        assert decision.placement is None and "1 of 3 live node(s)" in (decision.reason or "")

    def test_spread_prefers_the_emptiest_nodes(self) -> None:
        a, b = node("a", 4), node("b", 4)
        a.used_slots = 1
        assert {s.node_id for s in place(spec(), [a, b]).placement or []} == {"a"}
        assert {s.node_id for s in place(spec(placement="spread"), [a, b]).placement or []} == {"b"}

    def test_gpu_wording_in_reasons(self) -> None:
        n = node("g", 2, gpus=2)
        n.used_gpus = {0, 1}
        assert "2 free GPU(s)" in (place(spec(process_count_per_node=2), [n]).reason or "")


class TestParams:
    def test_render_in_order_with_bare_flags(self) -> None:
        params, argv, _ = render_params({"--regularization": 0.8, "--verbose": "", "--epochs": 3})
        assert argv == ["--regularization", "0.8", "--verbose", "--epochs", "3"]
        assert params["--verbose"] == ""

    @pytest.mark.parametrize("bad", [["--a", 1], {"--a": [1, 2]}, {"--a": None}, {1: "x"}])
    def test_bad_params_are_refused(self, bad: object) -> None:
        with pytest.raises(ValidationError):
            render_params(bad)  # type: ignore[arg-type]


class TestEstimator:
    def test_missing_source_directory(self, tmp_path: Path) -> None:
        with pytest.raises(ValidationError, match="does not exist"):
            Estimator(source_directory=tmp_path / "nope", entry_script="train.py")

    def test_entry_script_missing_or_outside(self, tmp_path: Path) -> None:
        (tmp_path / "src").mkdir()
        (tmp_path / "outside.py").write_text("")
        with pytest.raises(ValidationError, match="not found"):
            Estimator(source_directory=tmp_path / "src", entry_script="train.py")
        with pytest.raises(ValidationError, match="inside"):
            Estimator(source_directory=tmp_path / "src", entry_script="../outside.py")

    def test_environment_is_checked_before_anything_is_sent(self, tmp_path: Path) -> None:
        (tmp_path / "t.py").write_text("")
        ok = Estimator(
            source_directory=tmp_path,
            entry_script="t.py",
            pip_packages=["scikit-learn==1.5.0", "torch>=2.1,<3", "uvicorn[standard]"],
            custom_docker_image="registry.local:5000/team/pytorch:2.3-cuda12",
            shm_size="2g",
            memory_per_process="512m",
            cpus_per_process=1.5,
        )
        assert (ok.shm_size, ok.memory_per_process) == (2 << 30, 512 << 20)
        for bad in ("Not An Image!", "UPPER/case:1", "x:", "a//b"):
            with pytest.raises(ValidationError, match="not a valid image reference"):
                Estimator(source_directory=tmp_path, entry_script="t.py", custom_docker_image=bad)
        for pkg in ("--index-url=http://evil/", "-e .", "git+https://x/y.git", ""):
            with pytest.raises(ValidationError, match="not a package requirement"):
                Estimator(source_directory=tmp_path, entry_script="t.py", pip_packages=[pkg])
        with pytest.raises(ValidationError, match="shm_size"):
            Estimator(source_directory=tmp_path, entry_script="t.py", shm_size="lots")
        with pytest.raises(ValidationError, match="cpus_per_process"):
            Estimator(source_directory=tmp_path, entry_script="t.py", cpus_per_process=0)

    def test_reserved_environment_is_refused(self) -> None:
        with pytest.raises(ValidationError, match="RANK"):
            validate_spec(spec(environment_variables={"RANK": "3"}))


class TestSnapshot:
    def test_ignore_files_and_git_are_honoured(self, tmp_path: Path) -> None:
        (tmp_path / ".git").mkdir()
        (tmp_path / ".git" / "config").write_text("x")
        (tmp_path / "train.py").write_text("print(1)")
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "big.bin").write_bytes(b"0" * 100)
        (tmp_path / "notes.tmp").write_text("x")
        (tmp_path / "keep.tmp").write_text("x")
        (tmp_path / ".gitignore").write_text("*.tmp\n!keep.tmp\n")
        (tmp_path / ".cadreignore").write_text("data/\n")
        names = [rel for rel, _ in collect(tmp_path)]
        assert names == [".cadreignore", ".gitignore", "keep.tmp", "train.py"]

    def test_archive_is_deterministic(self, tmp_path: Path) -> None:
        (tmp_path / "a.py").write_text("a")
        first = pack(tmp_path)
        (tmp_path / "a.py").touch()
        assert pack(tmp_path).ref == first.ref
        (tmp_path / "a.py").write_text("b")
        assert pack(tmp_path).ref.content_hash != first.ref.content_hash

    def test_archive_round_trips(self, tmp_path: Path) -> None:
        (tmp_path / "pkg").mkdir()
        (tmp_path / "pkg" / "m.py").write_text("x = 1")
        out = tmp_path.parent / "snap.tar.gz"
        out.write_bytes(pack(tmp_path).data)
        with tarfile.open(out) as tar:
            assert tar.getnames() == ["pkg/m.py"]

    def test_sockets_fifos_and_dangling_links_are_left_out(self, tmp_path: Path) -> None:
        (tmp_path / "train.py").write_text("x = 1")
        os.mkfifo(tmp_path / "pipe")
        (tmp_path / "gone").symlink_to(tmp_path / "missing")
        with socket.socket(socket.AF_UNIX) as sock:  # a server's socket left in the project (it hung pack before)
            sock.bind(str(tmp_path / "s.sock"))
            assert [rel for rel, _ in collect(tmp_path)] == ["train.py"]
            pack(tmp_path)

    def test_limits_fail_before_packing(self, tmp_path: Path) -> None:
        for i in range(5):
            (tmp_path / f"f{i}.py").write_text("x" * 100)
        with pytest.raises(ValidationError, match="5 files"):
            pack(tmp_path, Limits(snapshot_max_files=4))
        with pytest.raises(ValidationError, match="MB"):
            pack(tmp_path, Limits(snapshot_max_bytes=200))


def test_fold_gives_state_reason_and_error() -> None:
    record = schemas.RunRecord(run_id="r", spec=spec(), submitted_at=1.0)

    def ev(cls: type, state: RunState, at: float, **kw: object) -> schemas.RunEvent:
        return cls(event_id=str(at), run_id="r", state=state, at=at, **kw)

    events = [
        ev(schemas.Submitted, RunState.NOT_STARTED, 1, experiment="e", compute_target="local", entry_script="t.py"),
        ev(schemas.Queued, RunState.QUEUED, 2),
        ev(schemas.Queued, RunState.QUEUED, 3, reason="busy"),
    ]
    d = fold(record, events)
    assert d.state is RunState.QUEUED and d.queue_reason == "busy"
    slot = schemas.RankSlot(rank=0, node_id="n", local_rank=0)
    events += [
        ev(schemas.Assigned, RunState.PREPARING, 4, placement=[slot]),
        ev(schemas.Running, RunState.RUNNING, 5, node_id="n"),
        ev(
            schemas.Finalizing,
            RunState.FINALIZING,
            6,
            outcome="failed",
            exit_codes={0: 3},
            error=schemas.ErrorInfo(code="nonzero_exit", message="rank 0 exited with code 3"),
        ),
        ev(schemas.Failed, RunState.FAILED, 7, error=schemas.ErrorInfo(code="nonzero_exit", message="boom")),
    ]
    d = fold(record, events)
    assert d.state is RunState.FAILED and d.queue_reason is None
    assert d.exit_codes == {0: 3} and d.error and d.error.message == "boom"
    assert d.started_at == 5 and d.ended_at == 7
    assert [h.state for h in d.history] == [
        RunState.NOT_STARTED,
        RunState.QUEUED,
        RunState.PREPARING,
        RunState.RUNNING,
        RunState.FINALIZING,
        RunState.FAILED,
    ]


class TestNodeCache:
    """The node's cache budget, on real files: least recently used first, never what a run holds or builds."""

    def make(self, root: Path, rel: str, size: int, age: float) -> Path:
        path = root / rel
        if rel.startswith(("datasets/", "envs/")):
            path.mkdir(parents=True)
            (path / "data.bin").write_bytes(b"x" * size)
            if rel.startswith("envs/"):
                (path / ".ready").write_text("")
            if rel.startswith("datasets/"):  # shared dataset copies are read-only
                (path / "data.bin").chmod(0o444)
                path.chmod(0o555)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x" * size)
        stamp = time.time() - age
        os.utime(path, (stamp, stamp))
        return path

    def test_trim_evicts_least_recently_used_but_not_what_is_held_or_being_built(self, tmp_path: Path) -> None:
        oldest = self.make(tmp_path, "snapshots/a.tar.gz", 400, age=500)
        held = self.make(tmp_path, "datasets/b", 400, age=400)
        old_env = self.make(tmp_path, "envs/c", 400, age=300)
        recent = self.make(tmp_path, "snapshots/d.tar.gz", 400, age=10)
        building = tmp_path / "envs" / "e"
        building.mkdir()
        (building / "half.bin").write_bytes(b"x" * 4000)  # no .ready yet
        partial = self.make(tmp_path, "snapshots/.f.tar.gz.1.run.part", 4000, age=900)
        cache = NodeCache(tmp_path, max_bytes=900)
        cache.hold(held)
        freed = asyncio.run(cache.trim())
        assert freed == 800
        assert not oldest.exists() and not old_env.exists()  # the two oldest that nobody holds
        assert held.exists() and recent.exists() and building.exists() and partial.exists()
        assert not [p for p in (tmp_path / "envs").iterdir() if p.name.startswith(".evicted")]
        cache.release(held)
        cache.max_bytes = 0
        assert asyncio.run(cache.trim()) == 800 and not held.exists() and not recent.exists()  # read-only, yet gone

    def test_holding_counts_as_a_use(self, tmp_path: Path) -> None:
        first = self.make(tmp_path, "snapshots/a.tar.gz", 400, age=500)
        second = self.make(tmp_path, "snapshots/b.tar.gz", 400, age=100)
        cache = NodeCache(tmp_path, max_bytes=400)
        cache.hold(first)  # used again just now: the other one is now the least recently used
        cache.release(first)
        asyncio.run(cache.trim())
        assert first.exists() and not second.exists()

    def test_sweep_removes_what_a_previous_life_left_half_done(self, tmp_path: Path) -> None:
        partial = self.make(tmp_path, "snapshots/.a.tar.gz.7.run.part", 10, age=5)
        evicted = self.make(tmp_path, "datasets/.evicted-b-1", 10, age=5)
        kept = self.make(tmp_path, "snapshots/c.tar.gz", 10, age=5)
        asyncio.run(NodeCache(tmp_path, max_bytes=1 << 30).sweep())
        assert not partial.exists() and not evicted.exists() and kept.exists()


def test_failure_causes_are_one_enum_with_the_wire_codes() -> None:
    from shared.errors import CadreError
    from shared.states import INFRASTRUCTURE_CAUSES, Cause

    assert len({c.value for c in Cause}) == len(Cause)
    assert Cause("node_lost") is Cause.NODE_LOST and Cause.NODE_LOST == "node_lost"
    assert Cause.NODE_LOST.infrastructure and not Cause.NONZERO_EXIT.infrastructure
    assert INFRASTRUCTURE_CAUSES < set(Cause) and CadreError.code == Cause.INTERNAL
    # Encoded as its plain code on the wire, and read back as the same member.
    info = msgspec.json.decode(msgspec.json.encode(schemas.ErrorInfo(code=Cause.FENCED, message="m")))
    assert info == {"code": "fenced", "message": "m"}


def test_every_event_moves_the_run_where_the_transition_table_allows_and_facts_keep_the_state() -> None:
    events = typing.get_args(schemas.RunEvent)
    assert set(lifecycle.MOVES_TO) <= set(events)
    for cls, state in lifecycle.MOVES_TO.items():  # some state (or, for Submitted, none yet) can reach it
        assert can_transition(None, state) or any(can_transition(s, state) for s in RunState if s != state), cls
    queued = lifecycle.event(schemas.Queued, "r1")
    assert queued.state is RunState.QUEUED and queued.event_id
    with pytest.raises(ValueError, match="NodeLost records a fact"):
        lifecycle.event(schemas.NodeLost, "r1", node_id="n")
    running = msgspec.structs.replace(lifecycle.event(schemas.Running, "r1", node_id="n"), attempt=2)
    lost = lifecycle.append_if(lifecycle.undecided(2), schemas.NodeLost, "r1", node_id="n")(running)
    assert isinstance(lost, schemas.NodeLost) and lost.state is RunState.RUNNING  # a fact: the state stays
    assert lifecycle.append_if(lifecycle.undecided(1), schemas.NodeLost, "r1", node_id="n")(running) is None
    assert lifecycle.append_if(lifecycle.undecided(), schemas.NodeLost, "r1", node_id="n")(None) is None
    # Nodes race to move a placed run forward: only a move forward is written.
    assert lifecycle.before(RunState.RUNNING, 2)(running) is False
    starting = msgspec.structs.replace(lifecycle.event(schemas.Starting, "r1", node_id="n"), attempt=2)
    assert lifecycle.before(RunState.RUNNING, 2)(starting) and not lifecycle.before(RunState.RUNNING, 1)(starting)
    history = [queued, starting, running]
    assert lifecycle.current_attempt(history) == [starting, running]


def test_pipe_output_is_split_into_whole_lines_in_batches() -> None:
    from services.node_agent.runtime import LINE_LIMIT, LineSplitter

    split = LineSplitter()
    assert split.feed(b"one\ntw") == ["one"]
    assert split.feed(b"o\r\nthr") == ["two"]  # joined across reads; CRLF output loses its "\r"
    assert split.feed("ee \u00e9\n\xff\n".encode()[:-3] + b"\xff\n") == ["three \u00e9", "\ufffd"]
    assert split.feed(b"x" * (LINE_LIMIT + 5)) == ["x" * LINE_LIMIT]  # a runaway line is split, not held
    assert split.rest() == ["xxxxx"] and split.rest() == []


def test_a_flood_is_read_in_few_pieces_and_a_lone_line_at_once() -> None:
    """A process printing without pause is read in pieces a few ms apart (each piece is a record, a write and a
    wake-up for the agent), not a piece per write; every line comes, in order."""
    import sys

    from services.node_agent.runtime import LINE_LIMIT, merged_lines

    flood = "import sys, time\nw = sys.stdout.write\nfor i in range(200000): w(f'line {i}\\n')\n"
    flood += "time.sleep(0.5)\nprint('alone', time.time())\n"

    async def read() -> tuple[list[str], int, float]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", flood, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, limit=LINE_LIMIT,
        )  # fmt: skip
        lines: list[str] = []
        pieces, late = 0, 0.0
        async for stream, got in merged_lines(proc.stdout, proc.stderr):
            assert stream == "o"
            pieces += 1
            lines += got
            if got[-1].startswith("alone"):
                late = time.time() - float(got[-1].split()[1])
        await proc.wait()
        return lines, pieces, late

    lines, pieces, late = asyncio.run(read())
    assert lines[:-1] == [f"line {i}" for i in range(200000)]
    assert pieces < 1500, pieces  # read as it came, a piece per write or few, it was 4,000-13,000 here
    assert late < 0.1  # the line after a quiet spell is not held back


def test_a_shims_rank_log_is_read_in_both_formats(tmp_path: Path) -> None:
    """A shim started by an older agent wrote a line per line; an upgraded agent reads it (and the new batches)."""
    from services.node_agent.shim import LineRecord
    from services.node_agent.supervision import _read_record

    old = _read_record(b"1700000000.250000\te\ttab\tinside")
    assert old == [schemas.LogLine(1700000000.25, "e", "tab\tinside")]
    new = _read_record(msgspec.json.encode(LineRecord(1700000001.5, "o", ["a", "[b]", ""])))
    assert [(ln.t, ln.stream, ln.text) for ln in new] == [(1700000001.5, "o", "a"), (1700000001.5, "o", "[b]"),
                                                          (1700000001.5, "o", "")]  # fmt: skip


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(
    sizes=st.lists(st.tuples(st.integers(1, 8), st.booleans()), min_size=0, max_size=30),
    runs=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4), st.booleans()), min_size=1, max_size=25),
)
def test_the_indexed_pool_places_as_sorting_every_node_would(sizes: list[tuple[int, bool]], runs) -> None:
    """The scheduler's index (Pool) against the plain rule: the first node_count nodes that fit, ordered by
    (free slots, node id), or by (-free slots, node id) for spread; a pass's decisions one after another."""
    from services.scheduler.placement import Pool

    def fresh() -> list[NodeState]:
        return [node(f"n{i:02d}", slots, gpus=slots if gpu else 0) for i, (slots, gpu) in enumerate(sizes)]

    indexed, plain = fresh(), fresh()
    pool, table = Pool(indexed), {n.advert.node_id: n for n in plain}

    def use(placement: list[schemas.RankSlot]) -> None:  # the reference's own accounting
        for slot in placement:
            table[slot.node_id].used_slots += 1
            table[slot.node_id].used_gpus.update(slot.gpu_ids)

    for count, ppn, spread in runs:
        s = spec(node_count=count, process_count_per_node=ppn, placement="spread" if spread else "pack")
        got = place(s, pool)
        fits = [n for n in plain if n.fits(ppn)]
        order = sorted(fits, key=lambda n: ((-n.free_slots if spread else n.free_slots), n.advert.node_id))
        if len(order) < count:
            assert got.placement is None
            continue
        assert got.placement is not None
        chosen = [n.advert.node_id for n in order[:count]]
        assert [got.placement[i * ppn].node_id for i in range(count)] == chosen
        pool.take(got.placement)
        use(got.placement)
    used = [[(n.used_slots, sorted(n.used_gpus)) for n in nodes] for nodes in (indexed, plain)]
    assert used[0] == used[1]


def test_allocations_keep_each_nodes_use_as_runs_come_and_go() -> None:
    from services.scheduler.placement import Allocations

    allocations = Allocations()
    a, b = node("a", 4, gpus=4).advert, node("b", 4).advert
    allocations["early"] = [schemas.RankSlot(rank=0, node_id="a", local_rank=0, gpu_ids=[1])]  # before a is seen
    state = allocations.state_of(a)
    assert (state.used_slots, state.used_gpus) == (1, {1})
    gang = [schemas.RankSlot(rank=r, node_id=n, local_rank=r % 2, gpu_ids=[2 + r] if n == "a" else [])
            for r, n in enumerate(["a", "a", "b", "b"])]  # fmt: skip
    allocations["gang"] = gang
    assert (state.used_slots, state.used_gpus, allocations.state_of(b).used_slots) == (3, {1, 2, 3}, 2)
    allocations["gang"] = gang  # written again (a restarted scheduler re-reads it): counted once
    assert allocations.runs_on({"a"}) == {"early", "gang"} and allocations.runs_on({"b", "c"}) == {"gang"}
    assert state.used_slots == 3 and allocations.pop("gang") is gang and allocations.pop("gang") is None
    assert allocations.runs_on({"a", "b"}) == {"early"}
    assert (state.used_slots, state.used_gpus, allocations.state_of(b).free_slots) == (1, {1}, 4)
    newer = msgspec.structs.replace(a, heartbeat_at=a.heartbeat_at + 2)
    assert allocations.state_of(newer) is state and state.advert is newer


def test_a_pass_while_a_node_joins_does_not_leave_the_node_out() -> None:
    """A scheduling pass that runs while the node watch awaits the join's event (a queued run woke it) must not
    cache a node order without the new node: CI saw a run wait forever on "no live node" beside a joined node."""
    from services.scheduler.service import SchedulerService
    from shared.settings import BusSettings

    sched = SchedulerService(BusSettings(url="nats://127.0.0.1:1"))
    seen_during_the_event: list[list[str]] = []

    async def node_event(advert: schemas.NodeAdvert, kind: str, detail: str) -> None:
        seen_during_the_event.append(sorted(sched._node_table(time.time())))  # the pass, mid-await

    sched._node_event = node_event  # type: ignore[method-assign]
    advert = node("agent-0", 2).advert

    async def watcher():  # what nats-py's KV watch yields: key, operation (None for a put), value
        yield types.SimpleNamespace(key=advert.node_id, operation=None, value=schemas.encode(advert))

    asyncio.run(sched._watch(watcher()))
    assert seen_during_the_event == [["agent-0"]]
    assert list(sched._node_table(time.time())) == ["agent-0"]


def test_a_copy_replaced_by_another_nodes_is_a_warning_and_one_nobody_wrote_fails_the_upload() -> None:
    from services.artifact.service import decide, in_doubt

    def entry(name: str, body: bytes) -> schemas.FileEntry:
        import hashlib

        return schemas.FileEntry(name=name, size=len(body), md5=hashlib.md5(body, usedforsecurity=False).hexdigest())

    running = lifecycle.event(schemas.Running, "r", node_id="n0")

    def ev(cls: type[schemas.RunEventBase], **fields: object) -> schemas.RunEvent:
        return lifecycle.event(cls, "r", running, **fields)

    a, b = entry("outputs/m.txt", b"from a"), entry("outputs/m.txt", b"from b, longer")
    finished = [
        ev(schemas.NodeFinished, node_id=n, outcome="succeeded", exit_codes={i: 0}) for i, n in enumerate(("n0", "n1"))
    ]
    # n0 committed after n1's PUT replaced its copy; n1 committed its own.
    replaced = [ev(schemas.NodeCommitted, node_id="n0", files=[a], overwritten=[b]),
                ev(schemas.NodeCommitted, node_id="n1", files=[b])]  # fmt: skip
    assert in_doubt(replaced) == {"outputs/m.txt"}
    d = decide([*finished, *replaced], [], {"outputs/m.txt": b})
    assert d.outcome == "succeeded" and d.error is None
    assert d.warnings == [
        "outputs/m.txt differs between nodes n0, n1 (each wrote its own, or changed the snapshot's copy); "
        "the run keeps n1's: write a shared file from one rank only"
    ]
    # Both committed before either copy was replaced: the store says whose PUT came last.
    both = [ev(schemas.NodeCommitted, node_id="n1", files=[b]), ev(schemas.NodeCommitted, node_id="n0", files=[a])]
    assert in_doubt(both) == {"outputs/m.txt"}
    for held, kept in ((a, "n0"), (b, "n1")):
        d = decide([*finished, *both], [], {"outputs/m.txt": held})
        assert d.outcome == "succeeded" and f"the run keeps {kept}'s" in d.warnings[0]
    # The same content from both: nothing in doubt, nothing to say.
    same = [ev(schemas.NodeCommitted, node_id="n0", files=[a]), ev(schemas.NodeCommitted, node_id="n1", files=[a])]
    assert in_doubt(same) == set()
    d = decide([*finished, *same], [], {})
    assert d.outcome == "succeeded" and d.warnings == []
    # What the store holds is nobody's copy: the upload went wrong.
    broken = entry("outputs/m.txt", b"garbage")
    d = decide([*finished, ev(schemas.NodeCommitted, node_id="n0", files=[a], overwritten=[broken])], [],
               {"outputs/m.txt": broken})  # fmt: skip
    assert d.outcome == "failed" and d.error is not None and d.error.code == "upload_failed"
    assert d.error.message == "files from n0 failed verification: outputs/m.txt does not match what n0 uploaded"


def test_the_live_log_sync_ends_once_stopped_even_if_its_cancel_was_lost(tmp_path: Path) -> None:
    """A run's end waits for its live sync: on Python 3.11 a cancel that comes as a reply does is dropped by
    asyncio.wait_for (inside nats' request), so the loop must end on its stop flag alone, or the run waits forever
    (seen: a node's run retried on the same node sat for 60 s, then the old attempt stopped the new one's rank)."""
    from services.node_agent import uploads

    snap = schemas.SnapshotRef(content_hash="0" * 64, size=1, file_count=1, md5="0" * 32)
    spec = schemas.RunSpec(experiment="e", entry_script="t.py", snapshot=snap)
    assignment = schemas.Assignment(run_id="r_1_x", node_id="n", spec=spec, placement=[])
    ctx = types.SimpleNamespace(config=types.SimpleNamespace(node_id="n"))
    sync = uploads.Uploads(ctx, assignment, tmp_path, is_master=True, log=None)  # type: ignore[arg-type]

    async def go() -> float:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(sync.sync_loop())
        await asyncio.sleep(0.1)
        t0 = loop.time()
        sync.stop_sync()  # and no cancel: as if it had been lost
        await asyncio.wait_for(task, uploads.LOG_SYNC_INTERVAL + 1)
        return loop.time() - t0

    assert asyncio.run(go()) <= uploads.LOG_SYNC_INTERVAL + 0.5


def test_a_warm_interpreter_is_used_only_for_a_rank_that_python_would_start_the_same_way() -> None:
    from services.node_agent.warm import starts_alike, startup_env

    warm = startup_env({"PATH": "/bin", "LANG": "C.UTF-8"})
    rank = {**warm, "RANK": "0", "CADRE_RUN_ID": "r", "PYTHONPATH": "/job/python"}  # set as start-up would
    assert starts_alike(warm, rank)
    assert not starts_alike(warm, {**rank, "PYTHONHASHSEED": "0"})  # read at start-up only
    assert not starts_alike(warm, {**rank, "LC_ALL": "de_DE.UTF-8"})  # the locale: stdio's encoding
    assert not starts_alike(warm, {k: v for k, v in rank.items() if k != "LANG"})
    assert not starts_alike(warm, {**rank, "PYTHONUNBUFFERED": ""})


def test_the_artifact_service_remembers_a_history_only_while_its_chain_holds() -> None:
    """Events its consumer brings extend a run's remembered history only when each is stored right after the last
    one remembered (what its append said it must follow): one delivered elsewhere, late or twice is left to a read."""
    from collections import OrderedDict
    from types import SimpleNamespace

    from services.artifact.service import ArtifactService
    from shared import bus

    svc = ArtifactService.__new__(ArtifactService)
    svc._read = OrderedDict()

    def deliver(event: schemas.RunEvent, seq: int, after: int | None) -> None:
        headers = None if after is None else {bus.EXPECTED_LAST_SUBJECT_SEQ: str(after)}
        svc._follow(
            event, SimpleNamespace(headers=headers, metadata=SimpleNamespace(sequence=SimpleNamespace(stream=seq)))
        )

    submitted = lifecycle.event(schemas.Submitted, "r1", experiment="e", compute_target="local", entry_script="t.py")
    queued = lifecycle.event(schemas.Queued, "r1")
    deliver(queued, 12, 10)  # the run's first event went elsewhere: nothing to chain on
    assert "r1" not in svc._read
    deliver(submitted, 10, 0)
    deliver(submitted, 10, 0)  # redelivered
    deliver(queued, 12, 10)
    assert svc._read["r1"] == ([submitted, queued], 12)
    assigned = lifecycle.event(schemas.Assigned, "r1", placement=[])
    deliver(assigned, 20, 15)  # something stored at 15 was not seen here
    deliver(assigned, 20, None)  # and an event that says nothing of what it follows
    assert svc._read["r1"] == ([submitted, queued], 12)
    canceled = lifecycle.event(schemas.Canceled, "r1")
    deliver(canceled, 13, 12)
    assert "r1" not in svc._read  # ended: nothing more to read of it
