"""Ray Jobs, installed by the bench into its own venv (bench/.ray-venv) and run only inside a network namespace
that has nothing but loopback, as the platform notes require."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / "bench" / ".ray-venv"
SCRIPT = ROOT / "bench" / "peers" / "ray_jobs.py"


def install() -> str | None:
    """The venv's python, or why Ray cannot be had here."""
    python = VENV / "bin" / "python"
    if python.exists():
        return None
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare/ip not available: Ray must not run outside a loopback-only network namespace"
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    res = subprocess.run([str(python), "-m", "pip", "install", "-q", "ray[default]"], capture_output=True, text=True)
    if res.returncode != 0:
        shutil.rmtree(VENV, ignore_errors=True)
        return f"pip install ray[default] failed: {res.stderr.strip().splitlines()[-1:]}"
    return None


def measure(samples: int, lines: int) -> dict[str, float] | str:
    problem = install()
    if problem:
        return problem
    inner = f"ip link set lo up && PATH={VENV / 'bin'}:$PATH {VENV / 'bin' / 'python'} {SCRIPT} {samples} {lines}"
    try:
        res = subprocess.run(["unshare", "--net", "--fork", "--kill-child", "bash", "-c", inner],
                             capture_output=True, text=True, timeout=900)  # fmt: skip
    except subprocess.TimeoutExpired:
        return "Ray bench timed out after 900 s"
    if res.returncode != 0:
        return f"Ray bench failed: {(res.stderr or res.stdout).strip().splitlines()[-1:]}"
    return json.loads(res.stdout.strip().splitlines()[-1])
