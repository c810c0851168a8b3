"""The user's path, against the real cluster: submit, live logs, Completed, files, model versions."""

from __future__ import annotations

import hashlib
import io
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest

from cadre import Estimator, Experiment, Model, Run, RunFailedError, Workspace

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "sklearn-like"


def test_example_runs_end_to_end(ws: Workspace, tmp_path: Path) -> None:
    est = Estimator(
        source_directory=EXAMPLE,
        entry_script="train.py",
        script_params={"--regularization": 0.8, "--verbose": ""},
        compute_target="local",
    )
    run = Experiment(ws, "demo").submit(est)
    out = io.StringIO()
    details = run.wait_for_completion(show_output=True, output=out)
    assert details["status"] == "Completed" == run.get_status()
    printed = out.getvalue()
    assert "regularization=0.8" in printed and "epoch   1" in printed and "saved outputs/model.pkl" in printed
    assert details["runDefinition"]["arguments"] == ["--regularization", "0.8", "--verbose"]
    assert [h["state"] for h in details["history"]] == [
        "NotStarted", "Queued", "Preparing", "Starting", "Running", "Finalizing", "Completed",
    ]  # fmt: skip
    assert details["exitCodes"] == {0: 0}

    names = run.get_file_names()
    assert {"outputs/model.pkl", "logs/metrics.jsonl", "logs/cadre/rank_0.log"} <= set(names)
    model_file = run.download_file(name="outputs/model.pkl", output_file_path=tmp_path / "model.pkl")
    model = pickle.loads(model_file.read_bytes())
    assert model["regularization"] == 0.8 and model["test_mse"] < 1.0
    driver = run.download_file("logs/cadre/rank_0.log", tmp_path / "driver.log").read_text()
    assert driver.splitlines() == [
        line
        for line in printed.splitlines()
        if line and not line.startswith(("RunId:", "Execution summary", "  RunId:", "  Status:"))
    ]

    first = run.register_model(model_name="sklearn-sample", model_path="outputs/model.pkl")
    second = run.register_model(model_name="sklearn-sample", model_path="outputs/model.pkl", tags={"k": "v"})
    assert (first.version, second.version) == (1, 2)
    assert first.files == ["model.pkl"] and second.tags == {"k": "v"}
    assert Model(ws, "sklearn-sample").version == 2
    assert Model(ws, "sklearn-sample", version=1).run_id == run.id
    assert [m.version for m in Model.list(ws, "sklearn-sample")] == [1, 2]


def test_outputs_are_byte_identical(ws: Workspace, make_project: Callable[..., Path], tmp_path: Path) -> None:
    project = make_project(
        **{
            "train.py": """
                import os
                os.makedirs("outputs/nested", exist_ok=True)
                data = os.urandom(3 * 1024 * 1024 + 17)
                open("outputs/nested/blob.bin", "wb").write(data)
                open("outputs/empty.txt", "wb").close()
                print("wrote", len(data))
            """
        }
    )
    run = Experiment(ws, "files").submit(Estimator(source_directory=project, entry_script="train.py"))
    run.wait_for_completion()
    local = tmp_path / "dl"
    paths = run.download_files(prefix="outputs", output_directory=local)
    assert sorted(p.relative_to(local).as_posix() for p in paths) == ["outputs/empty.txt", "outputs/nested/blob.bin"]
    blob = (local / "outputs/nested/blob.bin").read_bytes()
    assert len(blob) == 3 * 1024 * 1024 + 17
    entry = next(f for f in run._files("outputs/nested") if f.name == "outputs/nested/blob.bin")
    assert hashlib.md5(blob).hexdigest() == entry.md5


def test_log_lines_complete_and_in_order(ws: Workspace, make_project: Callable[..., Path]) -> None:
    project = make_project(
        **{
            "train.py": """
                import sys
                for i in range(100000):
                    print(f"line {i}")
                    if i % 5000 == 0:
                        print(f"err {i}", file=sys.stderr)
            """
        }
    )
    run = Experiment(ws, "logs").submit(Estimator(source_directory=project, entry_script="train.py"))
    out = io.StringIO()
    run.wait_for_completion(show_output=True, output=out)
    lines = [line for line in out.getvalue().splitlines() if line.startswith("line ")]
    assert lines == [f"line {i}" for i in range(100000)]
    assert sum(1 for line in out.getvalue().splitlines() if line.startswith("err ")) == 20
    # A later reader (cadre logs RUN) gets the same complete stream.
    again = io.StringIO()
    assert Run.get(ws, run.id).stream_logs(follow=False, output=again) == 100020
    assert [x for x in again.getvalue().splitlines() if x.startswith("line ")] == lines
    # A reader that stopped at line 100,010 (stdout and stderr share one numbering per rank) resumes there.
    tail = io.StringIO()
    assert Run.get(ws, run.id).stream_logs(follow=True, output=tail, from_line=100_010) == 10
    assert tail.getvalue().splitlines() == again.getvalue().splitlines()[100_010:]


def test_failing_script_ends_failed_with_exit_code_and_last_lines(
    ws: Workspace, make_project: Callable[..., Path]
) -> None:
    project = make_project(
        **{
            "train.py": """
                import sys
                print("about to fail")
                print("ValueError: bad learning rate", file=sys.stderr)
                sys.exit(3)
            """
        }
    )
    run = Experiment(ws, "failing").submit(Estimator(source_directory=project, entry_script="train.py"))
    with pytest.raises(RunFailedError) as err:
        run.wait_for_completion()
    assert "exited with code 3" in str(err.value) and "bad learning rate" in str(err.value)
    details = run.get_details()
    assert details["status"] == "Failed" and details["exitCodes"] == {0: 3}
    assert details["error"]["code"] == "nonzero_exit"
    assert "logs/cadre/rank_0.log" in run.get_file_names()  # a failed run's logs are kept too
    assert run.wait_for_completion(raise_on_error=False)["status"] == "Failed"


def test_processes_get_their_rank_environment_and_no_credentials(
    ws: Workspace, make_project: Callable[..., Path], tmp_path: Path
) -> None:
    project = make_project(
        **{
            "train.py": """
                import json, os
                rank = os.environ["RANK"]
                keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR",
                        "MASTER_PORT", "CUDA_VISIBLE_DEVICES", "CADRE_RUN_ID", "MY_SETTING")
                seen = {k: os.environ.get(k) for k in keys}
                seen["leaked"] = sorted(k for k in os.environ if k.startswith(("CADRE_NATS", "CADRE_S3")))
                os.makedirs("outputs", exist_ok=True)
                json.dump(seen, open(f"outputs/env_{rank}.json", "w"))
            """
        }
    )
    est = Estimator(
        source_directory=project,
        entry_script="train.py",
        process_count_per_node=2,
        environment_variables={"MY_SETTING": "x"},
    )
    run = Experiment(ws, "env").submit(est)
    run.wait_for_completion()
    import json

    for rank in (0, 1):
        env = json.loads(run.download_file(f"outputs/env_{rank}.json", tmp_path / f"{rank}.json").read_text())
        assert env["RANK"] == str(rank) and env["WORLD_SIZE"] == "2" and env["LOCAL_RANK"] == str(rank)
        assert env["LOCAL_WORLD_SIZE"] == "2" and env["NODE_RANK"] == "0" and env["MY_SETTING"] == "x"
        assert env["CADRE_RUN_ID"] == run.id and env["leaked"] == []
    placement = run.get_details()["placement"]
    assert [(s["rank"], s["node_id"], s["local_rank"]) for s in placement] == [(0, "agent-0", 0), (1, "agent-0", 1)]
