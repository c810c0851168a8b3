"""Azure ML's sklearn MNIST tutorial, submitted to a running cadre cluster (start one with `cadre up`).

    python examples/sklearn-mnist/submit.py [--regularization 0.5] [--experiment sklearn-mnist]

Makes a small MNIST-format data set in a temporary folder, uploads it as the dataset "mnist", runs train.py on
the cluster with scikit-learn from the nodes' package index, prints the run's metrics and files, registers the
model, downloads it and predicts a few test images with it. That last step needs scikit-learn here as well.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from make_data import FILES, make_data

from cadre import Dataset, Estimator, Experiment, Model, Run, Workspace

EXAMPLE = Path(__file__).resolve().parent
# The tutorial's LogisticRegression(multi_class="auto", solver="liblinear") on ten classes: 1.8 removed both.
SKLEARN = "scikit-learn<1.8"
MODEL_NAME = "sklearn-mnist"
MODEL_FILE = "sklearn_mnist_model.pkl"


@dataclass(frozen=True)
class Tutorial:
    run: Run
    model: Model
    model_file: Path  # the registered model, downloaded
    data_folder: Path


def run_tutorial(
    ws: Workspace,
    work_dir: Path,
    regularization: float = 0.5,
    experiment: str = "sklearn-mnist",
    output: IO[str] | None = None,
) -> Tutorial:
    """Make and upload the data, train on the cluster, register the model and download it, all under ``work_dir``."""
    out = output or sys.stdout
    data_folder = make_data(work_dir / "mnist")
    # The same files again are the version they were before, which need not be the latest: ask for that one.
    uploaded = Dataset.upload(ws, data_folder, name="mnist")
    mnist = Dataset.get(ws, "mnist", version=uploaded.version)
    est = Estimator(
        source_directory=EXAMPLE,
        entry_script="train.py",
        script_params={
            "--data-folder": mnist.as_named_input("mnist").as_mount(),
            "--regularization": regularization,
        },
        compute_target="local",
        pip_packages=[SKLEARN],
    )
    run = Experiment(ws, experiment).submit(est)
    run.wait_for_completion(show_output=True, output=out)
    print("metrics:", run.get_metrics(), file=out)
    print("files:", run.get_file_names(), file=out)
    registered = run.register_model(model_name=MODEL_NAME, model_path=f"outputs/{MODEL_FILE}")
    print(f"registered model {registered.name} version {registered.version}", file=out)
    model = Model(ws, MODEL_NAME, version=registered.version)
    target = model.download(target_dir=work_dir / "model", exist_ok=True)
    return Tutorial(run=run, model=model, model_file=target / MODEL_FILE, data_folder=data_folder)


def predict(model_file: str | Path, data_folder: str | Path, count: int | None = 10) -> tuple[list[int], list[int]]:
    """The model's predictions for the first ``count`` test images (all with None), and their true labels."""
    import joblib  # comes with scikit-learn, which unpickling the model needs anyway
    from utils import load_data

    images_file, labels_file = FILES["test"]
    X_test = load_data(Path(data_folder) / images_file, False)[:count] / 255.0
    y_test = load_data(Path(data_folder) / labels_file, True).reshape(-1)[:count]
    clf = joblib.load(model_file)
    return [int(y) for y in clf.predict(X_test)], [int(y) for y in y_test]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regularization", type=float, default=0.5)
    parser.add_argument("--experiment", default="sklearn-mnist")
    args = parser.parse_args()
    with Workspace.from_config() as ws, tempfile.TemporaryDirectory(prefix="sklearn-mnist-") as tmp:
        tutorial = run_tutorial(ws, Path(tmp), args.regularization, args.experiment)
        predicted, actual = predict(tutorial.model_file, tutorial.data_folder)
        print("predicted:", predicted)
        print("actual:   ", actual)
    return 0


if __name__ == "__main__":
    sys.exit(main())
