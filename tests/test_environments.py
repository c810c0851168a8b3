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
