"""Bad input gets a clear error at the earliest point, and nothing is half-created."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from cadre import (
    ClusterNotRunningError,
    Estimator,
    Experiment,
    ValidationError,
    Workspace,
)
from cadre._profile import Profile, save_profile
from shared import schemas, subjects
from shared.errors import AuthenticationError, NotFoundError


def _run_count(ws: Workspace) -> int:
    return len(ws._request(subjects.Api.RUN_LIST, schemas.RunListRequest(limit=10000), schemas.RunList).runs)


def test_unknown_compute_target_is_refused_by_the_submitter(ws: Workspace, make_project: Callable[..., Path]) -> None:
    before = _run_count(ws)
    est = Estimator(source_directory=make_project(**{"t.py": "print(1)"}), entry_script="t.py", compute_target="gpu9")
    with pytest.raises(ValidationError, match="unknown compute target 'gpu9'; known targets: local"):
        Experiment(ws, "bad").submit(est)
    assert _run_count(ws) == before  # nothing recorded


def test_bad_names_fail_before_anything_is_sent(ws: Workspace) -> None:
    with pytest.raises(ValidationError, match="experiment name"):
        Experiment(ws, "no spaces please")


def test_unknown_distributed_configuration_is_refused(make_project: Callable[..., Path]) -> None:
    with pytest.raises(ValidationError, match="MpiConfiguration"):
        Estimator(source_directory=make_project(**{"t.py": ""}), entry_script="t.py", distributed_training="mpi")


def test_submitter_enforces_limits_and_checks_the_upload(ws: Workspace) -> None:
    """A client that skips local checks still cannot get past the submitter."""
    huge = schemas.SnapshotRef(content_hash="0" * 64, size=400 * 1024 * 1024, file_count=3, md5="0" * 32)
    with pytest.raises(ValidationError, match="over the 315 MB limit"):
        ws._request(
            subjects.Api.SNAPSHOT_PREPARE, schemas.SnapshotPrepareRequest(snapshot=huge), schemas.SnapshotPrepareReply
        )
    never_uploaded = schemas.SnapshotRef(content_hash="1" * 64, size=10, file_count=1, md5="1" * 32)
    spec = schemas.RunSpec(experiment="bad", entry_script="t.py", snapshot=never_uploaded)
    with pytest.raises(NotFoundError, match="is not in the store: upload it"):
        ws._request(subjects.Api.SUBMIT, schemas.SubmitRequest(spec=spec), schemas.SubmitReply)
    tricky = schemas.RunSpec(experiment="bad", entry_script="../etc/passwd", snapshot=never_uploaded)
    with pytest.raises(ValidationError, match="inside"):
        ws._request(subjects.Api.SUBMIT, schemas.SubmitRequest(spec=tricky), schemas.SubmitReply)


def test_malformed_request_gets_a_typed_error(ws: Workspace) -> None:
    with pytest.raises(ValidationError, match="malformed request"):
        ws._request(subjects.Api.RUN_GET, schemas.Empty(), schemas.RunDetails)


def test_unknown_run_and_file(ws: Workspace, make_project: Callable[..., Path]) -> None:
    with pytest.raises(NotFoundError, match="run nope_1_abc not found"):
        ws._request(subjects.Api.RUN_GET, schemas.RunRef(run_id="nope_1_abc"), schemas.RunDetails)
    run = Experiment(ws, "files").submit(
        Estimator(source_directory=make_project(**{"t.py": "print(1)"}), entry_script="t.py")
    )
    run.wait_for_completion()
    with pytest.raises(NotFoundError, match="has no file 'outputs/missing.pkl'"):
        run.download_file("outputs/missing.pkl", "/tmp/never")
    with pytest.raises(NotFoundError, match="no file or folder"):
        run.register_model(model_name="m", model_path="outputs/missing.pkl")


def test_no_cluster_says_how_to_start_one(tmp_path: Path) -> None:
    with pytest.raises(ClusterNotRunningError, match="cadre up"):
        Workspace.from_config(tmp_path / "missing.json")
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = save_profile(Profile(nats_url=f"nats://127.0.0.1:{port}", user="client", password="x"), tmp_path / "p.json")
    with pytest.raises(ClusterNotRunningError, match="cadre up"):
        Workspace.from_config(path)


def test_wrong_password_is_refused(cluster_home: Path, tmp_path: Path) -> None:
    profile = json.loads((cluster_home / "profile.json").read_text())
    profile["password"] = "wrong"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(profile))
    with pytest.raises(AuthenticationError, match="refused user 'client'"):
        Workspace.from_config(path)


def test_a_node_grace_under_two_heartbeats_or_not_positive_is_refused_before_anything_starts(tmp_path: Path) -> None:
    import subprocess
    import sys

    from cadre import _local

    with pytest.raises(ValidationError, match="under twice the heartbeat interval"):
        _local.up(home=tmp_path / "home", agents=1, heartbeat=2.0, node_grace=3.0)
    assert not (tmp_path / "home").exists()
    for argv, env, said in (
        (["--node-grace", "0"], {}, "--node-grace must be a positive number of seconds, not 0"),
        ([], {"CADRE_NODE_GRACE": "soon"}, "CADRE_NODE_GRACE must be a number of seconds"),
    ):
        done = subprocess.run([sys.executable, "-m", "services.scheduler", *argv], capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin", **env}, timeout=60)  # fmt: skip
        assert done.returncode == 2 and said in done.stderr, done.stderr
