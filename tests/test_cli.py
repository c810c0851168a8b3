"""The `cadre` command against the session cluster (found through CADRE_HOME, with no arguments)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cadre(*args: str, home: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CADRE_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "cadre", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


def test_submit_status_logs_download_models(cluster_home: Path, tmp_path: Path) -> None:
    res = cadre("submit", "examples/sklearn-like", "--entry", "train.py", "--experiment", "cli", "--",
                "--regularization", "0.3", "--verbose", home=cluster_home)  # fmt: skip
    assert res.returncode == 0, res.stderr
    run_id = res.stdout.splitlines()[0]
    assert re.fullmatch(r"cli_\d+_[0-9a-f]{8}", run_id)
    assert "regularization=0.3" in res.stdout and "Status: Completed" in res.stdout

    status = cadre("status", run_id, home=cluster_home)
    assert "status:     Completed" in status.stdout and "node agent-0" in status.stdout

    logs = cadre("logs", run_id, home=cluster_home)
    assert logs.returncode == 0 and "epoch   1" in logs.stdout and "saved outputs/model.pkl" in logs.stdout

    runs = cadre("runs", "--experiment", "cli", home=cluster_home)
    assert run_id in runs.stdout and "Completed" in runs.stdout

    dest = tmp_path / "m.pkl"
    dl = cadre("download", run_id, "outputs/model.pkl", str(dest), home=cluster_home)
    assert dl.returncode == 0 and dest.stat().st_size > 0

    models = cadre("models", "list", home=cluster_home)
    assert models.returncode == 0 and "NAME" in models.stdout


def test_failed_run_exits_nonzero_and_errors_are_one_line(cluster_home: Path, tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text("raise SystemExit(4)")
    res = cadre("submit", str(tmp_path), "--entry", "bad.py", home=cluster_home)
    assert res.returncode == 1 and "Status: Failed" in res.stdout
    res = cadre("submit", str(tmp_path), "--entry", "missing.py", home=cluster_home)
    assert res.returncode == 2 and res.stderr.startswith("cadre: entry_script 'missing.py' not found")
    assert "Traceback" not in res.stderr


def test_second_up_says_a_cluster_is_running(cluster_home: Path) -> None:
    res = cadre("up", home=cluster_home)
    assert res.returncode == 2
    assert "already running" in res.stderr and "cadre down" in res.stderr


def test_no_cluster(tmp_path: Path) -> None:
    res = cadre("runs", home=tmp_path)
    assert res.returncode == 2 and "cadre up" in res.stderr
