"""`make demo`: a local cluster, the example script end to end, its model registered, the cluster stopped.

The demo uses its own cluster home (./.cadre/demo) so it never touches a cluster you started with `cadre up`.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from cadre import Estimator, Experiment, Workspace, _local

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / ".cadre" / "demo"


def main() -> int:
    started = time.monotonic()
    print("starting the embedded cluster (nats-server, SeaweedFS S3, 5 services, 1 node agent)...", flush=True)
    _local.up(home=HOME, agents=1, echo=lambda line: print(f"  {line}", flush=True))
    try:
        with Workspace.from_config(HOME / "profile.json") as ws:
            est = Estimator(
                source_directory=ROOT / "examples" / "sklearn-like",
                entry_script="train.py",
                script_params={"--regularization": 0.8, "--verbose": ""},
                compute_target="local",
            )
            run = Experiment(ws, "demo").submit(est)
            details = run.wait_for_completion(show_output=True)
            with tempfile.TemporaryDirectory() as tmp:
                path = run.download_file(name="outputs/model.pkl", output_file_path=Path(tmp) / "model.pkl")
                print(f"downloaded outputs/model.pkl ({path.stat().st_size} bytes)")
            model = run.register_model(model_name="sklearn-sample", model_path="outputs/model.pkl")
            print(f"run id: {run.id}")
            print(f"final state: {details['status']}")
            print(f"model {model.name} version {model.version}")
    finally:
        _local.down(home=HOME)
        print(f"cluster stopped ({time.monotonic() - started:.1f}s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
