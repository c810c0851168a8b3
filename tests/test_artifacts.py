"""Files and data: live logs/ sync, datasets as mounts and downloads, large files, an artifact service restart."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import eventually
from minio import Minio

from cadre import Dataset, Estimator, Experiment, ValidationError, Workspace, _local
from shared import subjects
from shared.files import check_relative, safe_destination

READER = """
import json, os, sys
mount, private = sys.argv[2], sys.argv[4]
def tree(root):
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f)).read()
            for d, _, fs in os.walk(root) for f in fs}
# The shared copy carries no write permission (a root job could still override it: containers mount it read-only).
mount_writable = any(os.stat(os.path.join(d, f)).st_mode & 0o222 for d, _, fs in os.walk(mount) for f in fs) or any(
    os.stat(d).st_mode & 0o222 for d, _, _ in os.walk(mount))
open(os.path.join(private, "scratch.txt"), "w").write("mine")
os.makedirs("outputs", exist_ok=True)
json.dump({"mount": tree(mount), "download": tree(private), "mount_writable": mount_writable,
           "env": os.environ["CADRE_DATASET_TRAIN"] == mount}, open("outputs/seen.json", "w"))
"""


def test_datasets_versioned_and_read_as_mount_and_download(
    ws: Workspace, make_project: Callable[..., Path], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    (data / "split").mkdir(parents=True)
    (data / "split" / "a.csv").write_text("1,2\n")
    (data / "b.txt").write_text("hello")
    v1 = Dataset.upload(ws, data, name="toy")
    assert (v1.version, sorted(v1.files)) == (1, ["b.txt", "split/a.csv"])
    assert Dataset.upload(ws, data, name="toy").version == 1  # same content: same version
    (data / "b.txt").write_text("hello again")
    v2 = Dataset.upload(ws, data, name="toy")
    assert v2.version == 2 and v2.content_hash != v1.content_hash
    assert Dataset.get(ws, "toy").version == 2 and Dataset.get(ws, "toy", version=1).content_hash == v1.content_hash

    est = Estimator(
        source_directory=make_project(**{"read.py": READER}),
        entry_script="read.py",
        script_params={
            "--train": Dataset.get(ws, "toy", version=1).as_named_input("train").as_mount(),
            "--eval": Dataset.get(ws, "toy").as_named_input("eval").as_download(),
        },
    )
    run = Experiment(ws, "data").submit(est)
    run.wait_for_completion()
    seen = json.loads(run.download_file("outputs/seen.json", tmp_path / "seen.json").read_text())
    assert seen["mount"] == {"b.txt": "hello", "split/a.csv": "1,2\n"}
    assert seen["download"]["b.txt"] == "hello again" and seen["download"]["scratch.txt"] == "mine"
    assert seen["mount_writable"] is False and seen["env"] is True
    model = run.register_model("data-model", "outputs/seen.json")
    assert sorted(model.lineage["datasets"]) == ["toy:1", "toy:2"]


def test_logs_are_synced_while_the_run_goes_on(
    ws: Workspace, make_project: Callable[..., Path], tmp_path: Path
) -> None:
    release = tmp_path / "release"
    script = f"""
import os, time
os.makedirs("logs/tb", exist_ok=True)
with open("logs/tb/events.txt", "w") as fh:
    fh.write("step 1\\n")
    fh.flush()
    while not os.path.exists({str(release)!r}):
        time.sleep(0.05)
    fh.write("step 2\\n")
"""
    run = Experiment(ws, "live").submit(
        Estimator(source_directory=make_project(**{"t.py": script}), entry_script="t.py")
    )
    eventually(lambda: "logs/tb/events.txt" in run.get_file_names(), timeout=20)
    assert run.get_status() == "Running"
    live = run.download_files(prefix="logs/", output_directory=tmp_path / "live")
    assert [p.read_text() for p in live] == ["step 1\n"]
    release.touch()
    run.wait_for_completion(timeout=30)
    final = run.download_file("logs/tb/events.txt", tmp_path / "final.txt").read_text()
    assert final == "step 1\nstep 2\n"


def test_large_output_round_trips_and_survives_an_artifact_restart(
    ws: Workspace, make_project: Callable[..., Path], tmp_path: Path, cluster_home: Path
) -> None:
    size = 200 * 1024 * 1024
    script = f"""
import hashlib, os, time
os.makedirs("outputs", exist_ok=True)
block = os.urandom(1 << 20)
digest = hashlib.sha256()
with open("outputs/big.bin", "wb") as fh:
    for i in range({size} >> 20):
        chunk = bytes([i % 256]) + block[1:]
        fh.write(chunk)
        digest.update(chunk)
open("outputs/big.sha256", "w").write(digest.hexdigest())
while not os.path.exists({str(tmp_path / "go")!r}):
    time.sleep(0.05)
"""
    run = Experiment(ws, "big").submit(
        Estimator(source_directory=make_project(**{"t.py": script}), entry_script="t.py")
    )
    eventually(lambda: run.get_status() == "Running")
    state = json.loads((cluster_home / "cluster" / "state.json").read_text())
    artifact = next(p["pid"] for p in state["processes"] if p["name"] == "artifact")
    os.killpg(artifact, signal.SIGKILL)  # down while the run ends and wants to hand its files over
    (tmp_path / "go").touch()
    _local.restart("artifact", home=cluster_home)
    assert run.wait_for_completion(timeout=180)["status"] == "Completed"
    names = run.get_file_names()
    assert names.count("outputs/big.bin") == 1
    env = json.loads((cluster_home / "cluster" / "process-env.json").read_text())["artifact"]
    s3 = Minio(env["CADRE_S3_ENDPOINT"], env["CADRE_S3_ACCESS_KEY"], env["CADRE_S3_SECRET_KEY"], secure=False,
               region="us-east-1")  # fmt: skip
    stored = s3.stat_object("cadre", subjects.run_file_key(run.id, "outputs/big.bin"))
    assert stored.size == size and "-" in (stored.etag or "")  # it went up as a multipart upload
    path = run.download_file("outputs/big.bin", tmp_path / "big.bin")
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    assert path.stat().st_size == size
    assert digest.hexdigest() == run.download_file("outputs/big.sha256", tmp_path / "big.sha").read_text()


def test_an_upload_left_half_way_is_aborted_when_the_run_ends(
    ws: Workspace, cluster_home: Path, make_project: Callable[..., Path], tmp_path: Path
) -> None:
    hold = f"import os, time\nwhile not os.path.exists({str(tmp_path / 'go')!r}):\n    time.sleep(0.05)\n"
    run = Experiment(ws, "half").submit(Estimator(source_directory=make_project(**{"t.py": hold}), entry_script="t.py"))
    eventually(lambda: run.get_status() == "Running")
    # What an agent that died (or failed) half-way through a multipart upload leaves: an open upload with parts.
    env = json.loads((cluster_home / "cluster" / "process-env.json").read_text())["artifact"]
    s3 = Minio(env["CADRE_S3_ENDPOINT"], env["CADRE_S3_ACCESS_KEY"], env["CADRE_S3_SECRET_KEY"], secure=False,
               region="us-east-1")  # fmt: skip
    key = subjects.run_file_key(run.id, "outputs/half.bin")
    upload_id = s3._create_multipart_upload("cadre", key, {})
    s3._upload_part("cadre", key, os.urandom(5 << 20), None, upload_id, 1)
    prefix = subjects.run_file_prefix(run.id)
    assert [u.upload_id for u in s3._list_multipart_uploads("cadre", prefix=prefix).uploads] == [upload_id]
    (tmp_path / "go").touch()
    assert run.wait_for_completion(timeout=60)["status"] == "Completed"
    assert "outputs/half.bin" not in run.get_file_names()
    # Looked for once the run has ended, off its end's path.
    eventually(lambda: not s3._list_multipart_uploads("cadre", prefix=prefix).uploads, timeout=10)


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../b", "a\0b", "", "a\\..\\b"])
def test_names_that_escape_are_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        check_relative(name)
    with pytest.raises(ValidationError):
        safe_destination(tmp_path, name)


def test_a_snapshot_the_store_lost_is_uploaded_again_by_the_next_submit(
    ws: Workspace, cluster_home: Path, make_project: Callable[..., Path]
) -> None:
    """The client does not ask about a snapshot it saw stored before (a round trip on every submit); if the store
    lost it since, the submitter says so and the client uploads it again, once."""
    est = Estimator(source_directory=make_project(**{"t.py": "print('again')"}), entry_script="t.py")
    exp = Experiment(ws, "lost-snapshot")
    first = exp.submit(est)
    key = subjects.snapshot_key(first.get_details()["runDefinition"]["snapshot"]["content_hash"])
    env = json.loads((cluster_home / "cluster" / "process-env.json").read_text())["artifact"]
    s3 = Minio(env["CADRE_S3_ENDPOINT"], env["CADRE_S3_ACCESS_KEY"], env["CADRE_S3_SECRET_KEY"], secure=False,
               region="us-east-1")  # fmt: skip
    first.wait_for_completion(timeout=60)
    s3.remove_object("cadre", key)
    second = exp.submit(est)
    assert s3.stat_object("cadre", key).size > 0  # up again
    assert second.wait_for_completion(timeout=60)["status"] == "Completed"
