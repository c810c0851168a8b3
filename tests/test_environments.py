"""Job environments on the process runtime: pip packages in a venv built once per environment hash, reused after.

The packages come from a package index on loopback (the agent's --pip-index-url, as an operator's mirror would be).
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import PackageIndex

from cadre import Estimator, Experiment, RunFailedError, Workspace

SCRIPT = """
    import sys
    import cadre_demo_pkg
    import mpi4py  # the agent's own packages stay importable under the venv
    print("value:", cadre_demo_pkg.VALUE)
    print("python:", sys.prefix)
"""


def test_pip_packages_get_a_venv_built_once_then_reused(ws: Workspace, make_project: Callable[..., Path]) -> None:
    project = make_project(**{"train.py": SCRIPT})
    est = Estimator(source_directory=project, entry_script="train.py", pip_packages=[f"{PackageIndex.NAME}==1.0"])
    timings, outputs = [], []
    for _ in range(2):
        out = io.StringIO()
        started = time.monotonic()
        Experiment(ws, "env-venv").submit(est).wait_for_completion(show_output=True, output=out)
        timings.append(time.monotonic() - started)
        outputs.append(out.getvalue())
    first, second = outputs
    assert f"value: {PackageIndex.VALUE}" in first and f"value: {PackageIndex.VALUE}" in second
    assert re.search(r"\[prepare\] environment [0-9a-f]{24}: building a venv \(.*pip: cadre-demo-pkg==1.0\)", first)
    assert "[prepare] Successfully installed cadre-demo-pkg-1.0" in first
    assert re.search(r"\[prepare\] environment [0-9a-f]{24}: reusing the venv built earlier", second)
    assert "Successfully installed" not in second
    # Both ran in the same venv, which lives under the agent's work directory.
    prefixes = {line for text in outputs for line in text.splitlines() if line.startswith("python:")}
    assert len(prefixes) == 1 and "/envs/" in prefixes.pop()
    print(f"\nvenv environment: first run {timings[0]:.2f}s (built), second {timings[1]:.2f}s (reused)")


CONTEXT_SCRIPT = """
    import os, sys
    import cadre, cadre_demo_pkg
    from cadre import Run
    run = Run.get_context()
    run.log("accuracy", 0.75)
    run.log_row("epochs", epoch=1, loss=0.5)
    run.tag("python", sys.version.split()[0])
    print("cadre from:", os.path.dirname(cadre.__file__), "mode:", oct(os.stat(cadre.__file__).st_mode & 0o777))
    from cadre import Workspace  # the rest of the client: whatever cadre the environment has
    print("client:", getattr(Workspace, "__module__", Workspace))
"""


def test_run_context_in_a_pip_venv(ws: Workspace, make_project: Callable[..., Path]) -> None:
    """The tutorial's case: pip_packages and Run.get_context() together (ModuleNotFoundError before)."""
    project = make_project(**{"train.py": CONTEXT_SCRIPT})
    est = Estimator(project, "train.py", pip_packages=[f"{PackageIndex.NAME}=={PackageIndex.VERSION}"])
    run = Experiment(ws, "env-context").submit(est)
    out = io.StringIO()
    run.wait_for_completion(show_output=True, output=out)
    assert run.get_metrics() == {"accuracy": 0.75, "epochs": {"epoch": [1], "loss": [0.5]}}
    assert run.get_tags()["python"].startswith("3.")
    text = out.getvalue()
    assert re.search(r"cadre from: \S+/job-python/[0-9a-f]{16}/cadre mode: 0o444", text), text
    # The agent's own cadre (an editable install: an import hook in a .pth file) stays reachable under the venv.
    assert "client: cadre._workspace" in text, text


def test_run_context_beside_another_cadre_in_the_environment(ws: Workspace, make_project: Callable[..., Path]) -> None:
    """The environment's own cadre (another version) gives the client's names; Run stays the agent's."""
    project = make_project(**{"train.py": CONTEXT_SCRIPT})
    pins = [f"{PackageIndex.NAME}=={PackageIndex.VERSION}", f"cadre=={PackageIndex.OTHER_CADRE}"]
    run = Experiment(ws, "env-context").submit(Estimator(project, "train.py", pip_packages=pins))
    out = io.StringIO()
    run.wait_for_completion(show_output=True, output=out)
    assert run.get_metrics()["accuracy"] == 0.75
    assert "client: old" in out.getvalue().splitlines()  # cadre 0.0.1's Workspace


def test_a_failed_package_install_fails_the_run_with_pips_error(
    ws: Workspace, make_project: Callable[..., Path]
) -> None:
    project = make_project(**{"train.py": "print('never runs')"})
    est = Estimator(source_directory=project, entry_script="train.py", pip_packages=["cadre-no-such-package==9.9"])
    run = Experiment(ws, "env-bad").submit(est)
    with pytest.raises(RunFailedError, match=r"(?s)pip install failed.*No matching distribution found"):
        run.wait_for_completion(timeout=120)
    assert run.get_details()["error"]["code"] == "environment_build_failed"


def test_conda_and_other_images_need_the_docker_runtime(ws: Workspace, make_project: Callable[..., Path]) -> None:
    project = make_project(**{"train.py": "print('never runs')"})
    for kwargs in ({"conda_packages": ["numpy"]}, {"custom_docker_image": "pytorch/pytorch:2.3.0"}):
        run = Experiment(ws, "env-docker-only").submit(Estimator(project, "train.py", **kwargs))
        with pytest.raises(RunFailedError, match=r"needs the Docker runtime .* no node of compute target 'local'"):
            run.wait_for_completion(timeout=20)
