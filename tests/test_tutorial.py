"""Azure ML's sklearn MNIST tutorial (examples/sklearn-mnist: its train.py as Azure wrote it, but for the import of
Run) end to end against the session's cluster: dataset, pip_packages, metrics, outputs, the registry, the model.

scikit-learn comes from the wheels `make test` downloads into .cache/test-wheels, served to the agents by the
session's loopback package index; the model is loaded back here from the same wheels, in a Python of its own.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
from helpers import TEST_WHEELS, PackageIndex

from cadre import Model, Workspace

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sklearn-mnist"


def _unavailable(why: str) -> None:
    if os.environ.get("CI"):  # CI downloads the wheels (`make test`): a missing folder is a failure there
        pytest.fail(why)
    pytest.skip(why)


def _example(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The example's submit.py, imported as its own script would be (its folder first on sys.path)."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    spec = importlib.util.spec_from_file_location("sklearn_mnist_submit", EXAMPLE / "submit.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # where its dataclass looks itself up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def sklearn_wheels() -> Path:
    """The downloaded wheels; session-scoped, so that without them the test ends before the cluster starts."""
    if not TEST_WHEELS.is_dir():
        _unavailable(f"{TEST_WHEELS} is missing: `make test` downloads it (pip download scikit-learn, needs PyPI)")
    return TEST_WHEELS


@pytest.mark.timeout(240)
def test_sklearn_mnist_tutorial(
    sklearn_wheels: Path, ws: Workspace, package_index: PackageIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "scikit-learn" in package_index.projects, f"no scikit-learn wheel in {sklearn_wheels}"
    tutorial = _example(monkeypatch)
    # scikit-learn for loading the model here, installed while the cluster trains it; --isolated: from the
    # downloaded wheels only, whatever pip configuration this machine has.
    site = tmp_path / "client-site"
    pip = subprocess.Popen(
        [sys.executable, "-m", "pip", "install", "--isolated", "--quiet", "--no-index", "--find-links",
         str(sklearn_wheels), "--target", str(site), tutorial.SKLEARN],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    out = io.StringIO()
    started = time.monotonic()
    try:
        result = tutorial.run_tutorial(ws, tmp_path / "work", regularization=0.5, output=out)
        pip_output, _ = pip.communicate(timeout=120)
    finally:
        pip.kill()
        print(out.getvalue())  # shown when the test fails
    elapsed = time.monotonic() - started

    run = result.run
    assert run.get_status() == "Completed"
    text = out.getvalue()
    assert "[prepare] Successfully installed" in text and "scikit-learn-1." in text
    metrics = run.get_metrics()
    accuracy = metrics["accuracy"]
    assert isinstance(accuracy, float) and 0.5 < accuracy <= 1.0, metrics  # ten classes: chance is 0.1
    assert metrics["regularization rate"] == 0.5
    assert "outputs/sklearn_mnist_model.pkl" in run.get_file_names()
    model = result.model
    assert model.version >= 1 and model.run_id == run.id
    assert Model(ws, "sklearn-mnist", version=model.version).files == ["sklearn_mnist_model.pkl"]
    assert result.model_file.is_file()

    # The downloaded model, unpickled with joblib in a Python with scikit-learn, scores the whole test set as the
    # run said it did: it is the model the run trained.
    assert pip.returncode == 0, pip_output
    code = "import json, sys; from submit import predict; print(json.dumps(predict(sys.argv[1], sys.argv[2], None)))"
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run(
        [sys.executable, "-c", code, str(result.model_file), str(result.data_folder)],
        cwd=EXAMPLE, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    predicted, actual = json.loads(done.stdout.splitlines()[-1])
    assert len(predicted) == len(actual) == 500
    assert sum(p == a for p, a in zip(predicted, actual, strict=True)) / len(actual) == pytest.approx(accuracy)
    print(f"\nsklearn MNIST tutorial: accuracy {accuracy:.3f}, {elapsed:.1f}s from data to downloaded model")
