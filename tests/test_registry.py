"""The model registry against the real cluster: versions, concurrency, immutability, aliases, lineage, deletion."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from minio import Minio

from cadre import ConflictError, Estimator, Experiment, Model, NotFoundError, Run, ValidationError, Workspace
from shared import bus, schemas, subjects
from shared.settings import BusSettings

TRAIN = """
import os, sys
os.makedirs("outputs/model", exist_ok=True)
open("outputs/model/weights.bin", "wb").write(os.environ.get("CONTENT", "w").encode() * 1000)
open("outputs/model/config.json", "w").write('{"layers": 2}')
open("outputs/metrics.txt", "w").write("acc 0.91")
"""


def trained(ws: Workspace, make_project: Callable[..., Path], content: str = "w") -> Run:
    project = make_project(**{"train.py": TRAIN})
    run = Experiment(ws, "registry").submit(
        Estimator(source_directory=project, entry_script="train.py", environment_variables={"CONTENT": content})
    )
    run.wait_for_completion()
    return run


def test_versions_files_properties_and_tags(ws: Workspace, make_project: Callable[..., Path], tmp_path: Path) -> None:
    first, second = trained(ws, make_project, "a"), trained(ws, make_project, "b")
    v1 = first.register_model("reg-basic", "outputs/model", tags={"stage": "dev"}, properties={"accuracy": "0.91"},
                              description="first")  # fmt: skip
    v2 = second.register_model("reg-basic", "outputs/model/weights.bin")
    assert (v1.version, v2.version) == (1, 2)
    assert sorted(v1.files) == ["model/config.json", "model/weights.bin"] and v2.files == ["weights.bin"]
    # Files are the registry's own: each version keeps its content whatever happens to runs later.
    v1.download(tmp_path / "v1")
    v2.download(tmp_path / "v2")
    assert (tmp_path / "v1/model/weights.bin").read_bytes() == b"a" * 1000
    assert (tmp_path / "v2/weights.bin").read_bytes() == b"b" * 1000
    with pytest.raises(ValidationError, match="exists"):
        v2.download(tmp_path / "v2")
    # Properties gain keys but never change; tags change freely.
    v1.add_properties({"dataset": "mnist"})
    assert v1.properties == {"accuracy": "0.91", "dataset": "mnist"}
    with pytest.raises(ConflictError, match="accuracy"):
        v1.add_properties({"accuracy": "0.99"})
    v1.add_tags({"stage": "prod", "owner": "ml"}).remove_tags(["owner"])
    assert Model(ws, "reg-basic", version=1).tags == {"stage": "prod"}
    assert [m.version for m in Model.list(ws, tags={"stage": "prod"})] == [1]
    assert [m.version for m in Model.list(ws, name="reg-basic", properties={"dataset": "mnist"})] == [1]
    # model_path=None: the whole outputs/.
    whole = first.register_model("reg-whole")
    assert sorted(whole.files) == ["outputs/metrics.txt", "outputs/model/config.json", "outputs/model/weights.bin"]


def test_concurrent_registrations_get_distinct_consecutive_versions(
    ws: Workspace, make_project: Callable[..., Path]
) -> None:
    run = trained(ws, make_project)
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(run.register_model, "reg-race", "outputs/metrics.txt") for _ in range(20)]
        versions = sorted(f.result().version for f in futures)
    assert versions == list(range(1, 21))
    assert Model(ws, "reg-race").version == 20


def test_aliases_move_and_every_move_is_an_event(
    ws: Workspace, make_project: Callable[..., Path], cluster_home: Path
) -> None:
    run = trained(ws, make_project)
    v1 = run.register_model("reg-alias", "outputs/metrics.txt")
    v2 = run.register_model("reg-alias", "outputs/metrics.txt")
    v1.set_alias("production")
    assert Model(ws, "reg-alias", alias="production").version == 1
    v2.set_alias("production")
    assert Model(ws, "reg-alias", alias="production").version == 2
    assert Model(ws, "reg-alias", version=1).aliases == []
    with pytest.raises(ConflictError, match="aliased as production"):
        v2.delete()

    async def moves() -> list[schemas.AliasMoved]:
        profile = json.loads((cluster_home / "profile.json").read_text())
        nc = await bus.connect(BusSettings(url=profile["nats_url"], user="client", password=profile["password"]))
        js = nc.jetstream()
        last = await js.get_last_msg(subjects.MODELS_STREAM, subjects.model_events("reg-alias"))
        events = [
            schemas.model_event_decoder.decode(m.data)
            async for m in bus.replay(js, subjects.MODELS_STREAM, subjects.model_events("reg-alias"), last.seq or 0)
        ]
        await nc.close()
        return [e for e in events if isinstance(e, schemas.AliasMoved)]

    audit = asyncio.run(moves())
    assert [(e.alias, e.previous_version, e.version) for e in audit] == [("production", None, 1), ("production", 1, 2)]
    assert all(e.by and e.at for e in audit)


def test_lineage_records_the_runs_git_state(ws: Workspace, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "train.py").write_text(TRAIN)
    git = ["git", "-C", str(repo), "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    clean = Experiment(ws, "lineage").submit(Estimator(source_directory=repo, entry_script="train.py"))
    clean.wait_for_completion()
    (repo / "train.py").write_text(TRAIN + "\n# changed\n")
    dirty = Experiment(ws, "lineage").submit(Estimator(source_directory=repo, entry_script="train.py"))
    dirty.wait_for_completion()
    a = clean.register_model("reg-lineage", "outputs/metrics.txt")
    b = dirty.register_model("reg-lineage", "outputs/metrics.txt")
    assert a.lineage["run_id"] == clean.id and a.lineage["experiment"] == "lineage"
    assert a.lineage["git"]["commit"] == commit and a.lineage["git"]["branch"] == "main"
    assert a.lineage["git"]["dirty"] is False and b.lineage["git"]["dirty"] is True
    assert a.lineage["environment"]["compute_target"] == "local"


def test_local_registration_archive_and_delete(ws: Workspace, tmp_path: Path, cluster_home: Path) -> None:
    src = tmp_path / "local-model"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "w.bin").write_bytes(os.urandom(2 * 1024 * 1024))
    (src / "README").write_text("hello")
    v1 = Model.register(ws, model_path=src, model_name="reg-local", tags={"from": "laptop"})
    v2 = Model.register(ws, model_path=src / "README", model_name="reg-local")
    assert v1.version == 1 and sorted(v1.files) == ["local-model/README", "local-model/sub/w.bin"]
    assert v1.run_id is None
    v1.download(tmp_path / "out")
    assert (tmp_path / "out/local-model/sub/w.bin").read_bytes() == (src / "sub/w.bin").read_bytes()

    v2.archive()
    assert Model(ws, "reg-local").version == 1  # latest skips archived versions
    assert [m.version for m in Model.list(ws, "reg-local")] == [1]
    assert [m.version for m in Model.list(ws, "reg-local", include_archived=True)] == [1, 2]

    env = json.loads((cluster_home / "cluster" / "process-env.json").read_text())["registry"]
    s3 = Minio(env["CADRE_S3_ENDPOINT"], env["CADRE_S3_ACCESS_KEY"], env["CADRE_S3_SECRET_KEY"], secure=False,
               region="us-east-1")  # fmt: skip
    weights = next(f for f in v1._v.files if f.name.endswith("w.bin"))  # only v1 has it
    blob = subjects.model_blob_key("reg-local", weights.sha256)
    s3.stat_object("cadre", blob)
    v1.delete()
    with pytest.raises(NotFoundError, match="no version 1"):
        Model(ws, "reg-local", version=1)
    with pytest.raises(Exception, match="NoSuchKey|does not exist|Not Found"):
        s3.stat_object("cadre", blob)  # no leftovers
    assert Model(ws, "reg-local", version=2).files == ["README"]  # the shared README blob is kept


def test_clear_errors(ws: Workspace, make_project: Callable[..., Path]) -> None:
    with pytest.raises(NotFoundError, match="model reg-none is not registered"):
        Model(ws, "reg-none")
    run = trained(ws, make_project)
    run.register_model("reg-errors", "outputs/metrics.txt")
    with pytest.raises(NotFoundError, match="has no version 7"):
        Model(ws, "reg-errors", version=7)
    with pytest.raises(NotFoundError, match="no alias 'staging'"):
        Model(ws, "reg-errors", alias="staging")
    with pytest.raises(NotFoundError, match="no file or folder 'outputs/nope.pkl'"):
        run.register_model("reg-errors", "outputs/nope.pkl")
    with pytest.raises(ValidationError, match="model name 'bad name!' is invalid"):
        run.register_model("bad name!", "outputs/metrics.txt")
    with pytest.raises(ValidationError, match="clean relative path"):
        run.register_model("reg-errors", "../../etc/passwd")


def test_models_cli(ws: Workspace, make_project: Callable[..., Path], cluster_home: Path, tmp_path: Path) -> None:
    trained(ws, make_project).register_model("reg-cli", "outputs/model", tags={"k": "v"})

    def cadre(*args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "CADRE_HOME": str(cluster_home)}
        return subprocess.run([sys.executable, "-m", "cadre", "models", *args], capture_output=True, text=True,
                              env=env, timeout=60)  # fmt: skip

    assert cadre("alias", "reg-cli", "production", "1").returncode == 0
    listing = cadre("list", "reg-cli").stdout
    assert "reg-cli" in listing and "production" in listing and "k=v" in listing
    shown = cadre("show", "reg-cli@production").stdout
    assert "reg-cli version 1" in shown and "model/weights.bin" in shown and "sha256" in shown
    assert cadre("download", "reg-cli:1", str(tmp_path / "dl")).returncode == 0
    assert (tmp_path / "dl/model/config.json").read_text() == '{"layers": 2}'
    assert cadre("archive", "reg-cli", "1").returncode == 0
    bad = cadre("show", "reg-cli:x")
    assert bad.returncode == 2 and "must be a number" in bad.stderr
