"""Pure placement logic: which slots of which nodes a run gets, or why it cannot have them yet."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

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


def place(spec: schemas.RunSpec, nodes: list[NodeState], known: list[schemas.NodeAdvert] | None = None) -> Decision:
    """Gang placement: all node_count x process_count_per_node slots on distinct nodes, or none.

    ``pack`` (the default) fills the busiest nodes that still fit, keeping whole nodes free for big gangs;
    ``spread`` prefers the emptiest. Ranks are numbered node by node, so rank 0's node is the master.
    ``known`` are all nodes of the target, live or not (a crashed agent may come back): a run is impossible
    only when even they could not hold it.
    """
    ppn, want = spec.process_count_per_node, spec.node_count
    target = spec.compute_target
    if needs_container(spec):
        # Another image, or conda packages: only agents running the Docker runtime can run it.
        if known and not any(a.runtime == "docker" for a in known):
            return Decision(
                impossible=(
                    f"needs the Docker runtime (it names a custom_docker_image or conda_packages), but no node of "
                    f"compute target {target!r} runs it (agents started with --runtime docker do)"
                )
            )
        nodes = [n for n in nodes if n.advert.runtime == "docker"]
        known = [a for a in known if a.runtime == "docker"] if known else known
    free = [n for n in nodes if n.fits(ppn)]
    if len(free) < want:
        # Only now is it worth asking whether it could ever fit (the common case never pays for this pass).
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
                f"{len(free)} of {len(nodes)} live node(s) have them"
            )
        )
    if spec.placement == "spread":
        chosen = heapq.nsmallest(want, free, key=lambda n: (-n.free_slots, n.advert.node_id))
    else:
        chosen = heapq.nsmallest(want, free, key=lambda n: (n.free_slots, n.advert.node_id))
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
    return Decision(placement=placement)


def allocate(nodes: dict[str, NodeState], placement: list[schemas.RankSlot]) -> None:
    for slot in placement:
        node = nodes.get(slot.node_id)
        if node is not None:
            node.used_slots += 1
            node.used_gpus.update(slot.gpu_ids)
