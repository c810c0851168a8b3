"""Pure placement logic: which slots of which nodes a run gets, or why it cannot have them yet."""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from shared import schemas
from shared.environments import needs_container


@dataclass
class NodeState:
    advert: schemas.NodeAdvert
    used_slots: int = 0
    used_gpus: set[int] = field(default_factory=set)

    @property
    def free_slots(self) -> int:
        return self.advert.slots - self.used_slots

    def free_gpus(self) -> list[int]:
        return [g.index for g in self.advert.gpus if g.index not in self.used_gpus]

    def fits(self, processes: int) -> bool:
        if self.advert.slots - self.used_slots < processes:
            return False
        return not self.advert.gpus or len(self.advert.gpus) - len(self.used_gpus) >= processes

    def can_ever_fit(self, processes: int) -> bool:
        return self.advert.slots >= processes and (not self.advert.gpus or len(self.advert.gpus) >= processes)


@dataclass(frozen=True)
class Decision:
    placement: list[schemas.RankSlot] | None = None
    reason: str | None = None  # why it waits
    impossible: str | None = None  # why it can never run


class Pool:
    """A pass's live nodes of one compute target, indexed by free slots (each bucket in node-id order), so that a
    decision looks at the few nodes it may take instead of every node: the same choice as sorting all of them by
    (free slots, node id), at 10,000 nodes too. ``take`` keeps the index right as a pass hands out slots."""

    def __init__(self, nodes: list[NodeState], ordered: bool = False) -> None:
        """``ordered``: ``nodes`` come in node-id order already (the scheduler keeps them so)."""
        self.nodes = nodes
        self._buckets: dict[int, list[NodeState]] = {}  # each in node-id order
        buckets = self._buckets
        for node in nodes if ordered else sorted(nodes, key=lambda n: n.advert.node_id):
            free = node.advert.slots - node.used_slots
            bucket = buckets.get(free)
            if bucket is None:
                bucket = buckets[free] = []
            bucket.append(node)
        self._levels = sorted(buckets)

    def candidates(self, ppn: int, spread: bool) -> Iterator[NodeState]:
        """Nodes with at least ``ppn`` free slots, busiest first (``spread``: emptiest first), ties by node id."""
        start = bisect.bisect_left(self._levels, ppn)
        levels = self._levels[start:]
        for level in reversed(levels) if spread else levels:
            yield from self._buckets[level]

    def take(self, placement: list[schemas.RankSlot]) -> None:
        """Allocate ``placement``'s slots (and GPUs) on these nodes, moving each node to its new bucket."""
        by_node: dict[str, list[schemas.RankSlot]] = {}
        for slot in placement:
            by_node.setdefault(slot.node_id, []).append(slot)
        for node_id, slots in by_node.items():
            node = self._find(node_id)
            if node is not None:
                self._move(node, slots)

    def _find(self, node_id: str) -> NodeState | None:
        for level in self._levels:
            bucket = self._buckets[level]
            i = bisect.bisect_left(bucket, node_id, key=_node_id)
            if i < len(bucket) and bucket[i].advert.node_id == node_id:
                return bucket[i]
        return None

    def _move(self, node: NodeState, slots: list[schemas.RankSlot]) -> None:
        """Out of its bucket, ``slots`` used, into the bucket of what it has free now."""
        node_id = node.advert.node_id
        before = self._buckets[node.free_slots]
        del before[bisect.bisect_left(before, node_id, key=_node_id)]
        if not before:
            del self._buckets[node.free_slots]
            self._levels.remove(node.free_slots)
        node.used_slots += len(slots)
        for slot in slots:
            node.used_gpus.update(slot.gpu_ids)
        bucket = self._buckets.get(node.free_slots)
        if bucket is None:
            bucket = self._buckets[node.free_slots] = []
            bisect.insort(self._levels, node.free_slots)
        bisect.insort(bucket, node, key=_node_id)


def _node_id(node: NodeState) -> str:
    return node.advert.node_id


def place(
    spec: schemas.RunSpec, nodes: list[NodeState] | Pool, known: list[schemas.NodeAdvert] | None = None
) -> Decision:
    """Gang placement: all node_count x process_count_per_node slots on distinct nodes, or none.

    ``pack`` (the default) fills the busiest nodes that still fit, keeping whole nodes free for big gangs;
    ``spread`` prefers the emptiest. Ranks are numbered node by node, so rank 0's node is the master.
    ``known`` are all nodes of the target, live or not (a crashed agent may come back): a run is impossible
    only when even they could not hold it. A scheduling pass passes a :class:`Pool` it keeps across decisions.
    """
    pool = nodes if isinstance(nodes, Pool) else Pool(nodes)
    ppn, want = spec.process_count_per_node, spec.node_count
    target = spec.compute_target
    docker_only = needs_container(spec)
    if docker_only and known and not any(a.runtime == "docker" for a in known):
        # Another image, or conda packages: only agents running the Docker runtime can run it.
        return Decision(
            impossible=(
                f"needs the Docker runtime (it names a custom_docker_image or conda_packages), but no node of "
                f"compute target {target!r} runs it (agents started with --runtime docker do)"
            )
        )
    chosen: list[NodeState] = []
    for node in pool.candidates(ppn, spec.placement == "spread"):
        if node.fits(ppn) and (not docker_only or node.advert.runtime == "docker"):
            chosen.append(node)
            if len(chosen) == want:
                return Decision(placement=_ranks(chosen, ppn))
    return _why_not(spec, pool.nodes, known, docker_only)


def _ranks(chosen: list[NodeState], ppn: int) -> list[schemas.RankSlot]:
    placement: list[schemas.RankSlot] = []
    rank = 0
    for node in chosen:
        gpus = node.free_gpus()
        for local_rank in range(ppn):
            gpu_ids = [gpus[local_rank]] if node.advert.gpus else []
            placement.append(
                schemas.RankSlot(
                    rank=rank,
                    node_id=node.advert.node_id,
                    local_rank=local_rank,
                    gpu_ids=gpu_ids,
                    host=node.advert.address,
                )
            )
            rank += 1
    return placement


def _why_not(
    spec: schemas.RunSpec, nodes: list[NodeState], known: list[schemas.NodeAdvert] | None, docker_only: bool
) -> Decision:
    """Why the run gets no slots now: it never can on this target, or it waits (and for what)."""
    ppn, want = spec.process_count_per_node, spec.node_count
    target = spec.compute_target
    if docker_only:
        nodes = [n for n in nodes if n.advert.runtime == "docker"]
        known = [a for a in known if a.runtime == "docker"] if known else known
    free = sum(1 for n in nodes if n.fits(ppn))
    pool = [NodeState(a) for a in known] if known else nodes
    capable = [n for n in pool if n.can_ever_fit(ppn)]
    if pool and len(capable) < want:
        largest = max(n.advert.slots for n in pool)
        return Decision(
            impossible=(
                f"needs {want} node(s) with {ppn} slot(s) each, but compute target {target!r} has "
                f"{len(capable)} such node(s) (largest node: {largest} slot(s))"
            )
        )
    if not nodes:
        return Decision(reason=f"no live node on compute target {target!r}; waiting for an agent to join")
    unit = "GPU(s)" if any(n.advert.gpus for n in nodes) else "slot(s)"
    return Decision(
        reason=(
            f"needs {want} node(s) with {ppn} free {unit} on compute target {target!r}; "
            f"{free} of {len(nodes)} live node(s) have them"
        )
    )


class Allocations(dict[str, list[schemas.RankSlot]]):
    """run id -> the slots it holds, and each node's NodeState kept up to date as runs come and go: a scheduling
    pass takes the nodes as they stand instead of going over every running rank."""

    def __init__(self) -> None:
        super().__init__()
        self.slots: dict[str, int] = {}
        self.gpus: dict[str, dict[int, int]] = {}  # node -> GPU index -> how many placements hold it
        self.states: dict[str, NodeState] = {}
        self._runs: dict[str, set[str]] = {}  # node -> the runs with ranks on it (a node lost touches only those)

    def __setitem__(self, run_id: str, placement: list[schemas.RankSlot]) -> None:
        self.pop(run_id, None)
        super().__setitem__(run_id, placement)
        self._count(run_id, placement, 1)

    def pop(self, run_id: str, default: Any = None) -> Any:
        placement = super().pop(run_id, _MISSING)
        if placement is _MISSING:
            return default
        self._count(run_id, placement, -1)
        return placement

    def runs_on(self, nodes: set[str]) -> set[str]:
        """The runs holding slots on any of ``nodes``."""
        return set().union(*(self._runs.get(node, ()) for node in nodes))

    def _count(self, run_id: str, placement: list[schemas.RankSlot], step: int) -> None:
        touched = set()
        for slot in placement:
            node = slot.node_id
            touched.add(node)
            self.slots[node] = self.slots.get(node, 0) + step
            if slot.gpu_ids:
                held = self.gpus.setdefault(node, {})
                for gpu in slot.gpu_ids:
                    held[gpu] = held.get(gpu, 0) + step
                    if not held[gpu]:
                        del held[gpu]
        for node in touched:
            if step > 0:
                self._runs.setdefault(node, set()).add(run_id)
            elif (runs := self._runs.get(node)) is not None:
                runs.discard(run_id)
                if not runs:
                    del self._runs[node]
            if not self.slots.get(node):
                self.slots.pop(node, None)
            if node in self.gpus and not self.gpus[node]:
                del self.gpus[node]
            if (state := self.states.get(node)) is not None:  # set, not added to: a pass's Pool.take agrees
                state.used_slots = self.slots.get(node, 0)
                state.used_gpus = set(self.gpus.get(node, ()))

    def state_of(self, advert: schemas.NodeAdvert) -> NodeState:
        """The node as it stands: its latest advert, and what the runs placed on it hold."""
        node_id = advert.node_id
        state = self.states.get(node_id)
        if state is None:
            used = self.slots.get(node_id, 0)
            state = self.states[node_id] = NodeState(advert, used, set(self.gpus.get(node_id, ())))
        elif state.advert is not advert:
            state.advert = advert
        return state

    def forget(self, node_id: str) -> None:
        """The node left (its runs' slots stay counted until those runs end)."""
        self.states.pop(node_id, None)


_MISSING: Any = object()
