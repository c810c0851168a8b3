"""Run history: metrics, tags and properties from a real run, the offline context, git information."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from cadre import Estimator, Experiment, RunFailedError, Workspace

LOGGING = """
from cadre import Run
run = Run.get_context()
for step in range(5):
    run.log("loss", 1.0 / (step + 1), step=step)
run.log("accuracy", 0.91)
run.log_list("lrs", [0.1, 0.01])
run.log_row("epochs", epoch=1, acc=0.5)
run.log_row("epochs", epoch=2, acc=0.7)
run.log_table("confusion", {"tp": [5], "fp": [1]})
open("plot.png", "wb").write(b"\\x89PNG fake")
run.log_image("plot", "plot.png")
run.tag("team", "vision")
run.add_properties({"seed": "42"})
run.upload_file("outputs/extra/config.txt", "plot.png")
print("logged", run)
"""


def test_metrics_tags_properties_and_files_from_a_run(ws: Workspace, make_project: Callable[..., Path]) -> None:
    run = Experiment(ws, "history").submit(
        Estimator(source_directory=make_project(**{"train.py": LOGGING}), entry_script="train.py"),
        tags={"submitted": "yes"},
    )
    run.wait_for_completion()
    metrics = run.get_metrics()
    assert metrics["loss"] == [1.0, 0.5, 1 / 3, 0.25, 0.2]
    assert metrics["accuracy"] == 0.91 and metrics["lrs"] == [0.1, 0.01]
    assert metrics["epochs"] == {"epoch": [1, 2], "acc": [0.5, 0.7]}
    assert metrics["confusion"] == {"tp": [5], "fp": [1]}
    assert metrics["plot"].startswith("logs/images/") and metrics["plot"] in run.get_file_names()
    assert run.get_metrics("accuracy") == {"accuracy": 0.91}
    assert run.get_tags() == {"submitted": "yes", "team": "vision"}
    run.add_properties({"seed": "7", "extra": "x"})  # a property is set once
    assert run.get_properties() == {"seed": "42", "extra": "x"}
    assert "outputs/extra/config.txt" in run.get_file_names()
    exp = Experiment(ws, "history")
    assert run.id in [r.id for r in exp.get_runs(status="Completed", tags={"team": "vision"})]
    assert run.id not in [r.id for r in exp.get_runs(tags={"team": "nlp"})]


def test_a_run_cannot_write_another_runs_history(ws: Workspace, make_project: Callable[..., Path]) -> None:
    script = """
        import json, os, socket
        from cadre import Run
        Run.get_context().log("mine", 1)
        host, port = os.environ["CADRE_RUN_ENDPOINT"].rsplit(":", 1)
        with socket.create_connection((host, int(port))) as s:
            s.sendall(json.dumps({"op": "metric", "token": "guessed", "name": "forged", "value": 1}).encode() + b"\\n")
            print("reply", s.makefile().readline().strip())
        # Nor does it hold any bus credentials.
        assert not [k for k in os.environ if k.startswith(("CADRE_NATS", "CADRE_S3"))]
        """
    run = Experiment(ws, "history").submit(
        Estimator(source_directory=make_project(**{"train.py": script}), entry_script="train.py")
    )
    import io

    out = io.StringIO()
    run.wait_for_completion(show_output=True, output=out)
    assert "refused: this endpoint belongs to another run" in out.getvalue()
    assert run.get_metrics() == {"mine": 1}


def test_bad_upload_name_is_refused_inside_the_run(ws: Workspace, make_project: Callable[..., Path]) -> None:
    script = """
        from cadre import Run
        open("f.txt", "w").write("x")
        Run.get_context().upload_file("../../etc/evil", "f.txt")
        """
    run = Experiment(ws, "history").submit(
        Estimator(source_directory=make_project(**{"train.py": script}), entry_script="train.py")
    )
    with pytest.raises(RunFailedError, match="clean relative path"):
        run.wait_for_completion()


def test_offline_context_outside_cadre(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CADRE_")}
    res = subprocess.run(
        [sys.executable, "-c", "from cadre import Run\nr = Run.get_context()\nr.log('loss', 0.5)\nprint(r)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "[offline run] metric" in res.stdout and "offline" in res.stdout
    line = json.loads((tmp_path / "logs" / "offline_run.jsonl").read_text().splitlines()[0])
    assert line["name"] == "loss" and line["value"] == 0.5 and "token" not in line


def test_git_information_with_the_uncommitted_diff(ws: Workspace, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "train.py").write_text("print('v1')\n")
    git = ["git", "-C", str(repo), "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q", "-b", "exp"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    exp = Experiment(ws, "git")
    clean = exp.submit(Estimator(source_directory=repo, entry_script="train.py"))
    (repo / "train.py").write_text("print('v2')\n")
    dirty = exp.submit(Estimator(source_directory=repo, entry_script="train.py"))
    g1 = clean.get_details()["runDefinition"]["git"]
    g2 = dirty.get_details()["runDefinition"]["git"]
    assert g1["branch"] == "exp" and len(g1["commit"]) == 40 and g1["dirty"] is False and g1["diff"] == ""
    assert g2["dirty"] is True and "-print('v1')" in g2["diff"] and "+print('v2')" in g2["diff"]
    dirty.wait_for_completion()
