"""TensorBoard on live runs: a job writes real event files (torch.utils.tensorboard), and the scalars are read
through TensorBoard's own HTTP API while the run goes on."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from helpers import eventually

from cadre import Estimator, Experiment, Workspace
from cadre.tensorboard import Tensorboard

WRITER = """
import time
from torch.utils.tensorboard import SummaryWriter
writer = SummaryWriter("logs/tb")
for step in range(40):
    writer.add_scalar("loss", 1.0 / (step + 1), step)
    writer.flush()
    time.sleep(0.25)
writer.close()
"""


def _scalars(url: str, run: str) -> list[list[float]]:
    query = urllib.parse.urlencode({"run": run, "tag": "loss"})
    try:
        with urllib.request.urlopen(f"{url}data/plugin/scalars/scalars?{query}", timeout=5) as response:
            return json.loads(response.read())
    except OSError:
        return []  # the run's folder not seen yet (TensorBoard answers 400 for an unknown run)


def test_tensorboard_reads_a_runs_event_files_while_it_runs(
    ws: Workspace, make_project: Callable[..., Path], tmp_path: Path
) -> None:
    runs = [Experiment(ws, "tensorboard").submit(Estimator(make_project(**{"w.py": WRITER}), "w.py")) for _ in range(2)]
    eventually(lambda: all(r.get_status() == "Running" for r in runs), 60)
    tb = Tensorboard(runs, local_root=tmp_path / "tb", port=0)
    url = tb.start()
    try:
        first = eventually(lambda: (pts := _scalars(url, f"{runs[0].id}/tb")) and len(pts) >= 3 and pts, 60)
        assert runs[0].get_status() == "Running"  # live: read while the job still writes
        steps = [int(p[1]) for p in first]
        assert steps == list(range(len(steps)))
        assert abs(first[1][2] - 0.5) < 1e-6  # loss at step 1
        for run in runs:
            run.wait_for_completion(timeout=120)
        # Either run may end last; the copier and TensorBoard's reload each take up to a second to see it.
        for run in runs:
            done = eventually(lambda run=run: len(pts := _scalars(url, f"{run.id}/tb")) >= 40 and pts, 30)
            assert [int(p[1]) for p in done] == list(range(40))  # appended, never lost or doubled
    finally:
        tb.stop()
    try:
        urllib.request.urlopen(url, timeout=2)
        raise AssertionError("TensorBoard still answers after stop()")
    except OSError:
        pass
