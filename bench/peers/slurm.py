"""Slurm as a measured peer: Debian's slurm-wlm + munge, daemons started by hand for the bench only.

The whole Slurm session (munged, slurmctld, slurmd, every slurmstepd and job) runs in its own PID, mount and
network namespace that has nothing but loopback: no packet can leave the machine, and when the namespace's first
process ends the kernel kills whatever is left in it, so no daemon outlives the bench, even after an error or a
KeyboardInterrupt. All state (conf, spool, logs, pid files, munge key and socket) lives in one temp dir.

measure(quick) returns raw figures (seconds); bench/__main__.py puts them next to cadre's, measured in the same run.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
ALLREDUCE = ROOT / "examples" / "mpi-allreduce"
NODE = "bench"  # slurmd -N: the node name, independent of the machine's hostname
# The tuned config: Slurm delays scheduling a batch job by up to batch_sched_delay (default 3 s) after submission.
SCHEDULER_PARAMETERS = "batch_sched_delay=0"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "sinfo", "squeue")
FIGURES = ("sbatch_start_p50_s", "sbatch_start_p99_s", "srun_true_p50_s", "srun_mpi_wall_p50_s")
MPI_RANKS = 4


def _which(name: str) -> str | None:
    # root's PATH usually has the sbin dirs, a CI runner's may not
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def install() -> str | None:
    """None when Slurm and munge are there (installing them first where allowed), else why they cannot be had."""
    if all(_which(b) for b in DAEMONS + CLIENTS):
        return None
    if os.geteuid() != 0:
        return "slurm-wlm/munge not installed and not running as root, so cannot apt-get install them"
    if not os.environ.get("CI") and sys.stdin.isatty():
        return "slurm-wlm/munge not installed; interactive session, so not apt-get installing (set CI=1 to allow)"
    if _which("apt-get") is None:
        return "slurm-wlm/munge not installed and there is no apt-get on this machine"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", "slurm-wlm", "munge"]
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if res.returncode != 0 and "Unable to locate package" in res.stderr:  # stale or empty package lists
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=300)
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as e:
        return f"`{' '.join(e.cmd)}` timed out after {e.timeout:.0f} s"
    if res.returncode != 0:
        return f"`{' '.join(cmd)}` failed (rc {res.returncode}): {(res.stderr or res.stdout).strip()[-300:]}"
    missing = [b for b in DAEMONS + CLIENTS if not _which(b)]
    return f"after apt-get install still missing: {', '.join(missing)}" if missing else None


def _unavailable(reason: str) -> dict[str, object]:
    return {**dict.fromkeys(FIGURES), "error": reason}


def measure(quick: bool) -> dict[str, object]:
    """Raw figures in seconds (see FIGURES), or all of them None and "error" saying why."""
    problem = install()
    if problem:
        return _unavailable(problem)
    if os.geteuid() != 0:
        return _unavailable("not root: slurmd must run as root to launch jobs, and the namespaces need root")
    if _which("unshare") is None or _which("ip") is None:
        return _unavailable("unshare/ip not available: Slurm runs here only inside a loopback-only namespace")
    with tempfile.TemporaryDirectory(prefix="cadre-slurm-") as tmp:
        # bash as the namespace's init reaps the slurmstepds Slurm orphans; its exit takes the namespace down.
        # 127.0.0.2 on lo: glibc's AI_ADDRCONFIG (Slurm resolves every address with it) finds no IPv4 at all when
        # 127.0.0.1 is the only address, and slurmctld cannot even resolve "127.0.0.1" then.
        inner = 'ip link set lo up && ip addr add 127.0.0.2/32 dev lo && "$@"; exit $?'
        ns = ["unshare", "--net", "--pid", "--mount-proc", "--fork", "--kill-child"]
        argv = [sys.executable, str(Path(__file__).resolve()), "--inside", tmp, "quick" if quick else "full"]
        cmd = [*ns, "bash", "-c", inner, "bash", *argv]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            return _unavailable("Slurm bench timed out after 900 s")
        lines = res.stdout.strip().splitlines()
        try:
            return json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            tail = (res.stderr or res.stdout).strip()[-400:]
            return _unavailable(f"Slurm bench failed (rc {res.returncode}): {tail}")


# ---- inside the namespace ---------------------------------------------------------------------------------------


def _conf(tmp: Path, cpus: int) -> str:
    d = {k: tmp / k for k in ("state", "spool", "log", "run", "munge")}
    return "\n".join(
        [
            "ClusterName=cadrebench",
            f"SlurmctldHost={socket.gethostname()}(127.0.0.1)",
            "SlurmctldPort=6817",  # the namespace has its own ports: nothing else can hold these
            "SlurmdPort=6818",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={d['munge'] / 'munge.socket'}",
            # without these slurmctld and slurmd listen on every address, not just the one configured
            "CommunicationParameters=NoInAddrAny,NoCtldInAddrAny",
            f"SchedulerParameters={SCHEDULER_PARAMETERS}",
            f"StateSaveLocation={d['state']}",
            f"SlurmdSpoolDir={d['spool']}",
            f"SlurmctldPidFile={d['run'] / 'slurmctld.pid'}",
            f"SlurmdPidFile={d['run'] / 'slurmd.pid'}",
            f"SlurmctldLogFile={d['log'] / 'slurmctld.log'}",
            f"SlurmdLogFile={d['log'] / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "LogTimeFormat=iso8601_ms",
            # the cheapest plugins: no cgroups, no accounting, no task binding (cadre's agents do none either)
            "ProctrackType=proctrack/pgid",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",  # jobs share the node by CPU, like cadre's agents
            "MpiDefault=none",
            "ReturnToService=2",
            "MinJobAge=5",  # finished jobs leave the controller quickly
            "KillWait=2",
            "InactiveLimit=0",
            f"NodeName={NODE} NodeAddr=127.0.0.1 NodeHostname={socket.gethostname()} CPUs={cpus} State=UNKNOWN",
            f"PartitionName=bench Nodes={NODE} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


class _Session:
    """munged + slurmctld + slurmd in tmp; stop() ends every one of them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def _start(self, name: str, argv: list[str]) -> None:
        with open(self.tmp / "log" / f"{name}.out", "wb") as out:  # the daemon keeps its own copy of the fd
            self.procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))

    def wait(self, what: str, ok: Callable[[], bool], timeout: float, poll: float = 0.05) -> None:
        """Until ok(); fails at once when a daemon has died rather than at the timeout."""
        deadline = time.monotonic() + timeout
        while not ok():
            dead = [Path(str(p.args[0])).name for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"{what}: {'exited: ' + ', '.join(dead) if dead else 'timed out'}"
                                   f"; {self.log_tail()}")  # fmt: skip
            time.sleep(poll)

    def log_tail(self) -> str:
        tails = []
        for f in sorted((self.tmp / "log").glob("*")):
            lines = f.read_text(errors="replace").strip().splitlines()
            if lines:
                tails.append(f"{f.name}: {' | '.join(lines[-3:])}")
        return "; ".join(tails)[-1500:]

    def start(self) -> None:
        for d in ("state", "spool", "log", "run", "munge"):
            (self.tmp / d).mkdir(mode=0o700)
        m = self.tmp / "munge"
        for d in (self.tmp, m):
            d.chmod(0o711)  # munged wants its socket's directories searchable by all (not readable, not writable)
        key = m / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)  # munged refuses a key others can read
        conf = self.tmp / "slurm.conf"
        conf.write_text(_conf(self.tmp, len(os.sched_getaffinity(0))))
        os.environ["SLURM_CONF"] = str(conf)  # for the daemons and every client command below
        sock = m / "munge.socket"
        self._start("munged", [_which("munged") or "munged", "--foreground", f"--socket={sock}", f"--key-file={key}",
                               f"--pid-file={m / 'munged.pid'}", f"--log-file={self.tmp / 'log' / 'munged.log'}",
                               f"--seed-file={m / 'munged.seed'}", "--origin=127.0.0.1"])  # fmt: skip
        self.wait("munged", sock.exists, 20)
        self._start("slurmctld", [_which("slurmctld") or "slurmctld", "-D", "-c", "-i"])
        self._start("slurmd", [_which("slurmd") or "slurmd", "-D", "-N", NODE])

        def idle() -> bool:
            res = subprocess.run(["sinfo", "-h", "-n", NODE, "-o", "%T"], capture_output=True, text=True)
            return res.stdout.strip() == "idle"

        self.wait("node idle in sinfo", idle, 60)

    def stop(self) -> None:
        for p in reversed(self.procs):  # slurmd, slurmctld, then munged, which both still talk to while stopping
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def _written(path: Path) -> bool:
    return path.exists() and path.read_text().endswith("\n")


def _queue_empty() -> bool:
    return not subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.strip()


def _sbatch_start(session: _Session, tmp: Path, samples: int) -> list[float]:
    """submit -> the job script's first action: the job writes the time it starts, compared to the time before
    sbatch was called (one clock, one machine). Jobs run one at a time on an otherwise idle node.

    slurmctld starts pending batch jobs from its background loop, which ticks once a second; submitting right after
    the previous job ended would always land just after a tick and measure the worst case (~1 s). Real submissions
    arrive at any phase, so each one waits a golden-ratio fraction of that second first (evenly spread phases)."""
    script = tmp / "stamp.sh"
    script.write_text('#!/bin/bash\nprintf "%s\\n" "$EPOCHREALTIME" > "$1"\n')  # bash builtin: no fork first
    out = []
    for i in range(samples + 1):
        stamp = tmp / f"stamp-{i}"
        time.sleep(i * 0.6180339887 % 1.0)
        t0 = time.time()
        subprocess.run(["sbatch", "-Q", "-o", "/dev/null", "-D", str(tmp), str(script), str(stamp)], check=True,
                       capture_output=True, timeout=60)  # fmt: skip
        session.wait(f"batch job {i} start", partial(_written, stamp), 60, 0.005)
        out.append(float(stamp.read_text().strip().replace(",", ".")) - t0)  # $EPOCHREALTIME follows the locale
        # the next job starts on an idle node, not next to a completing one
        session.wait(f"batch job {i} leaving the queue", _queue_empty, 60, 0.02)
    return out[1:]  # the first job pays slurmd's first-launch costs


def _wall(argv: list[str], cwd: Path, samples: int, expect: str = "") -> list[float]:
    out = []
    for _ in range(samples + 1):
        t0 = time.perf_counter()
        res = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)
        wall = time.perf_counter() - t0
        if res.returncode != 0 or expect not in res.stdout:
            raise RuntimeError(f"`{' '.join(argv)}` rc {res.returncode}: {(res.stderr or res.stdout).strip()[-400:]}")
        out.append(wall)
    return out[1:]  # the first run warms the page cache and slurmd


def _inside(tmp: Path, quick: bool) -> dict[str, object]:
    n_batch, n_true, n_mpi = (10, 10, 5) if quick else (30, 30, 20)
    # slurmctld -V needs no config (a client without SLURM_CONF would go looking for one in DNS)
    version = subprocess.run([_which("slurmctld") or "slurmctld", "-V"], capture_output=True, text=True).stdout
    version = (version.split() or ["?"])[-1]
    session = _Session(tmp)
    try:
        t0 = time.perf_counter()
        session.start()
        up = time.perf_counter() - t0
        batch = _sbatch_start(session, tmp, n_batch)
        true = _wall(["srun", "-n1", "true"], tmp, n_true)
        scratch = tmp / "mpi"  # train.py writes outputs/: keep it out of the example's folder
        scratch.mkdir()
        shutil.copy(ALLREDUCE / "train.py", scratch)
        # 4 ranks on the machine's CPUs (2 here): --overcommit, as cadre's 2 agents x 2 processes also share them
        mpi_argv = ["srun", "-n", str(MPI_RANKS), "--overcommit", "--mpi=pmi2", sys.executable, "train.py"]
        mpi = _wall(mpi_argv, scratch, n_mpi, expect=f"world of {MPI_RANKS}: allreduce ok")
    except Exception as e:  # reported as the reason; the bench goes on without Slurm's figures
        return _unavailable(f"{type(e).__name__}: {e}".strip()[:2000])
    finally:
        session.stop()
    return {
        "sbatch_start_p50_s": statistics.median(batch),
        "sbatch_start_p99_s": _pct(batch, 99),
        "srun_true_p50_s": statistics.median(true),
        "srun_mpi_wall_p50_s": statistics.median(mpi),
        "samples": {"sbatch": n_batch, "srun_true": n_true, "srun_mpi": n_mpi},
        "slurm_version": version,
        "cpus": len(os.sched_getaffinity(0)),
        "cluster_up_s": up,
    }


def main(argv: list[str]) -> int:
    if argv[:1] == ["--inside"]:  # the namespace's side: the figures as one JSON line on stdout
        print(json.dumps(_inside(Path(argv[1]), argv[2] == "quick")), flush=True)
        return 0
    quick = os.environ.get("BENCH", "quick") != "full" and "--full" not in argv
    print(json.dumps(measure(quick), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
