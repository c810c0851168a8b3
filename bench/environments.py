"""Environments: the first build of a pip venv, then runs that reuse it against runs with no environment.

Target (#12): a run whose environment is already built starts within 50 ms of one with none. Both sides use the
run context (``Run.get_context().log``), alternate, and are timed submit -> Completed through the public client.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from cadre import Estimator, Experiment, Workspace

SCRIPT = "from cadre import Run\nRun.get_context().log('x', 1)\nprint('done', flush=True)\n"
PACKAGE = "six==1.16.0"  # small, pure Python, on PyPI (the agents here use the default index)


def _timed(exp: Experiment, est: Estimator) -> float:
    t0 = time.perf_counter()
    exp.submit(est).wait_for_completion()
    return time.perf_counter() - t0


def run(ws: Workspace, samples: int) -> list[dict[str, object]]:
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        (project / "train.py").write_text(SCRIPT)
        plain = Estimator(source_directory=project, entry_script="train.py")
        # A tag no earlier run used makes a new environment: the first run builds it.
        env = Estimator(source_directory=project, entry_script="train.py", pip_packages=[PACKAGE],
                        environment_variables={"BENCH_AT": str(time.time())})  # fmt: skip
        exp = Experiment(ws, "bench-env")
        build = _timed(exp, env)
        _timed(exp, plain)
        with_env, without = [], []
        for _ in range(samples):
            with_env.append(_timed(exp, env))
            without.append(_timed(exp, plain))
    gap = (statistics.median(with_env) - statistics.median(without)) * 1e3
    return [
        {"metric": "pip environment, first build (submit -> Completed)", "value": build * 1e3, "unit": "ms",
         "target": None, "ok": None, "note": f"venv with {PACKAGE} from PyPI, built on the agent"},
        {"metric": "reused environment vs none, submit -> Completed p50 gap", "value": gap, "unit": "ms",
         "target": "< 50", "ok": gap < 50, "note": f"p50 {statistics.median(with_env) * 1e3:.0f} ms with the "
         f"built venv vs {statistics.median(without) * 1e3:.0f} ms with none, {samples} alternating pairs; "
         "the container run with the injected context is not in the bench yet (it starts no dockerd)"},
    ]  # fmt: skip
