"""`make chaos`: the project's own fault suite, on a local cluster of its own (loopback only).

    python -m tests.chaos [--only NAME ...] [--quick]

Each fault is injected at a random moment of a 2-node x 2-rank run that prints numbered lines and writes outputs
(``--seed`` makes the moments repeatable). For each fault it records the run's final state and cause, the log
lines lost or doubled, whether every output file's SHA-256 is intact, processes of the run left behind, and the
time from the fault to a final state; it prints a table and writes docs/reliability.md. Figures, not a gate: the
command fails only when it cannot run.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cadre import Estimator, Experiment, MpiConfiguration, Workspace, _local
from tests.helpers import private_mounts, tmpfs

ROOT = Path(__file__).resolve().parents[2]
LINES = 600  # per rank, one every 50 ms: a run of ~30 s
NODE_GRACE = 15.0  # the cluster's: a stall past it loses the node, and the run is retried from its checkpoint
OUTPUT_BYTES = 6 << 20  # per rank

JOB = f"""
import hashlib, os, time
rank = int(os.environ["RANK"])
os.makedirs("checkpoints", exist_ok=True)
state = f"checkpoints/rank{{rank}}.txt"
start = int(open(state).read()) + 1 if os.path.exists(state) else 0  # a retry resumes from the checkpoint
for i in range(start, {LINES}):
    print(f"tick {{rank}} {{i}}", flush=True)
    with open(state + ".tmp", "w") as fh:
        fh.write(str(i))
    os.replace(state + ".tmp", state)
    time.sleep(0.05)
block = hashlib.sha256(str(rank).encode()).digest() * ({OUTPUT_BYTES} // 32)
with open(f"outputs/rank{{rank}}.bin", "wb") as fh:
    fh.write(block)
"""


@dataclass
class Outcome:
    fault: str
    state: str
    cause: str
    lost: int
    doubled: int
    files_ok: bool
    orphans: int
    seconds_to_final: float
    note: str = ""
    attempts: str = "1"


def expected_sha(rank: int) -> str:
    return hashlib.sha256(hashlib.sha256(str(rank).encode()).digest() * (OUTPUT_BYTES // 32)).hexdigest()


def pids_of(home: Path) -> dict[str, int]:
    state = _local.read_state(home / "cluster")
    return {p.name: p.pid for p in state.processes} if state else {}


def orphans_of(run_id: str) -> int:
    """Processes still alive that belong to the run (its rank processes carry CADRE_RUN_ID)."""
    count = 0
    marker = f"CADRE_RUN_ID={run_id}".encode()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                count += 1
        except OSError:
            continue
    return count


# --- faults: each takes the cluster's home and returns a note --------------------------------------------
def kill9(name: str) -> Callable[[Path], str]:
    def inject(home: Path) -> str:
        os.killpg(pids_of(home)[name], signal.SIGKILL)
        return f"kill -9 {name}; the supervisor starts it again"

    return inject


def down(name: str, seconds: float) -> Callable[[Path], str]:
    def inject(home: Path) -> str:
        _local.restart(name, home=home, crash=True, down_for=seconds, timeout=60)
        return f"{name} down {seconds:.0f} s"

    return inject


def stop(name: str, seconds: float) -> Callable[[Path], str]:
    def inject(home: Path) -> str:
        pid = pids_of(home)[name]
        os.killpg(pid, signal.SIGSTOP)
        time.sleep(seconds)
        os.killpg(pid, signal.SIGCONT)
        return f"SIGSTOP {name} {seconds:.0f} s (a stalled or partitioned agent)"

    return inject


CLEANUPS: list[Callable[[], str]] = []  # run once the run is final; each returns a note
WORK_TMPFS = "64m"  # agent-1's work dir, so that it can fill up


def disk_full(name: str) -> Callable[[Path], str]:
    def inject(home: Path) -> str:
        work = home / "cluster" / "agents" / name
        if not os.path.ismount(work):
            return "not injected: the work dir is no tmpfs (needs root and a mount namespace)"
        pid = pids_of(home)[name]
        filler = work / "filler"
        with open(filler, "wb") as fh, contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * (1 << 20))
                fh.flush()

        def free_it() -> str:
            filler.unlink(missing_ok=True)
            alive = pids_of(home)[name] == pid and _local.is_running(home)
            return f"the agent {'lived through it' if alive else 'DID NOT live through it'} (same pid)"

        CLEANUPS.append(free_it)
        return f"{name}'s work dir (a {WORK_TMPFS} tmpfs) filled up; "

    return inject


def restart(name: str) -> Callable[[Path], str]:
    def inject(home: Path) -> str:
        _local.restart(name, home=home, timeout=60)
        return f"{name} stopped (SIGTERM) and started again, as an upgrade"

    return inject


FAULTS: dict[str, Callable[[Path], str]] = {
    "kill-submitter": kill9("submitter"),
    "kill-scheduler": kill9("scheduler"),
    "kill-artifact": kill9("artifact"),
    "kill-registry": kill9("registry"),
    "kill-agent": kill9("agent-1"),
    "restart-agent": restart("agent-1"),
    "nats-down-30s": down("nats-server", 30),
    "nats-down-120s": down("nats-server", 120),
    "s3-down-60s": down("weed", 60),
    "agent-sigstop-10s": stop("agent-1", 10),
    "agent-sigstop-past-grace": stop("agent-1", NODE_GRACE + 10),
    "agent-disk-full": disk_full("agent-1"),
}


def client_killed(ws: Workspace, home: Path, exp: Experiment, est: Estimator, rng: random.Random) -> Outcome:
    """A following client is killed; a new one gets every line."""
    run = exp.submit(est)
    follow = (
        f"from cadre import Workspace, Run\nws = Workspace.from_config({str(home / 'profile.json')!r})\n"
        f"Run.get(ws, {run.id!r}).wait_for_completion(show_output=True)"
    )
    follower = subprocess.Popen(
        [sys.executable, "-c", follow], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT
    )
    time.sleep(rng.uniform(3, 8))
    follower.kill()
    follower.wait()
    injected = time.monotonic()
    return measure("client-killed", run, injected, "the following client was killed; a new one read the run")


def measure(fault: str, run, injected: float, note: str) -> Outcome:
    out = io.StringIO()
    details = run.wait_for_completion(show_output=True, output=out, raise_on_error=False, timeout=600)
    final = time.monotonic()
    seen: dict[tuple[int, int], int] = {}
    for rank, i in re.findall(r"tick (\d+) (\d+)$", out.getvalue(), re.M):
        seen[(int(rank), int(i))] = seen.get((int(rank), int(i)), 0) + 1
    want = {(r, i) for r in range(4) for i in range(LINES)}
    ok = details["status"] == "Completed"
    lost = len(want - set(seen)) if ok else 0  # a failed run stopped printing: only a Completed run owes every line
    doubled = sum(n - 1 for n in seen.values() if n > 1)
    files_ok = False
    if ok:
        with tempfile.TemporaryDirectory() as tmp:
            files_ok = all(
                hashlib.sha256(run.download_file(f"outputs/rank{r}.bin", Path(tmp) / f"{r}.bin").read_bytes())
                .hexdigest() == expected_sha(r)
                for r in range(4)
            )  # fmt: skip
    time.sleep(1)  # what the agents kill on the way out has a moment to go
    error = details.get("error") or {}
    cause = f"{error.get('code', '')}: {error.get('message', '').splitlines()[0] if error.get('message') else ''}"
    retried = ", ".join(f"{a['attempt']}: {a['cause']}" for a in details["attempts"])
    return Outcome(
        fault=fault, state=details["status"], cause=cause if error else "-", lost=lost, doubled=doubled,
        files_ok=files_ok, orphans=orphans_of(run.id), seconds_to_final=final - injected, note=note,
        attempts=f"{details['attempt']}" + (f" (retried after {retried})" if retried else ""),
    )  # fmt: skip


def run_fault(name: str, inject: Callable[[Path], str], ws: Workspace, home: Path, exp: Experiment,
              est: Estimator, rng: random.Random) -> Outcome:  # fmt: skip
    run = exp.submit(est)
    deadline = time.monotonic() + 120
    while run.get_status() != "Running":
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: the run did not start: {run.get_details()}")
        time.sleep(0.1)
    time.sleep(rng.uniform(2, 12))
    note = inject(home)
    row = measure(name, run, time.monotonic(), note)
    while CLEANUPS:
        row.note += CLEANUPS.pop()()
    return row


def write_report(rows: list[Outcome], seed: int) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        "# Reliability",
        "",
        f"`make chaos` ({stamp}, seed {seed}): each fault injected at a random moment of a 2-node x 2-rank run "
        f"that prints {LINES} numbered lines per rank over ~30 s and writes a {OUTPUT_BYTES >> 20} MB output per "
        f"rank, checkpointing each step; the cluster's node grace is {NODE_GRACE:g} s and the run has max_retries=2. "
        "Lines lost counts only for a Completed run (a failed one stopped printing); in a retried run, the steps "
        "after the last synced checkpoint (synced every 2 s) run again, and count as doubled.",
        "",
        "| fault | final state | attempts | cause | lines lost | lines doubled | outputs intact | processes left | "
        "fault -> final state (the run's own remaining time included) | what was done |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.fault} | {r.state} | {r.attempts} | {r.cause} | {r.lost} | {r.doubled} | "
            f"{'yes' if r.files_ok else ('n/a' if r.state != 'Completed' else 'NO')} | {r.orphans} | "
            f"{r.seconds_to_final:.1f} s | {r.note} |"
        )
    text = "\n".join(lines) + "\n"
    (ROOT / "docs" / "reliability.md").write_text(text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", nargs="*", help=f"faults to run (default: all): {', '.join([*FAULTS, 'client-killed'])}"
    )
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped from outside: still tear the cluster down
    chosen = args.only or [*FAULTS, "client-killed"]
    rows: list[Outcome] = []
    mounts = private_mounts()  # while single-threaded: a tmpfs of our own, seen by the cluster only
    with tempfile.TemporaryDirectory(prefix="cadre-chaos-") as tmp, contextlib.ExitStack() as stack:
        home = Path(tmp)
        project = home / "project"
        project.mkdir()
        (project / "train.py").write_text(textwrap.dedent(JOB))
        if mounts:
            stack.enter_context(tmpfs(home / "cluster" / "agents" / "agent-1", WORK_TMPFS))
        _local.up(home=home, agents=2, slots_per_agent=2, timeout=120, node_grace=NODE_GRACE)
        try:
            with Workspace.from_config(home / "profile.json") as ws:
                exp = Experiment(ws, "chaos")
                est = Estimator(project, "train.py", node_count=2, process_count_per_node=2,
                                distributed_training=MpiConfiguration(), max_retries=2)  # fmt: skip
                for name in chosen:
                    if name == "client-killed":
                        row = client_killed(ws, home, exp, est, rng)
                    else:
                        row = run_fault(name, FAULTS[name], ws, home, exp, est, rng)
                    rows.append(row)
                    summary = (
                        f"{row.fault:<20} {row.state:<10} lost {row.lost} doubled {row.doubled} files "
                        f"{row.files_ok} left {row.orphans} in {row.seconds_to_final:.1f}s  {row.cause}"
                    )
                    print(summary, flush=True)
        finally:
            _local.down(home=home)
    print(write_report(rows, args.seed))
    print("wrote docs/reliability.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
