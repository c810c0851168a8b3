"""Warm ranks (services/node_agent/warm.py): a rank started in an interpreter that was waiting before the run came
sees the process a cold ``python train.py`` would, and a rank whose variables change how Python starts is started
cold. Through the session cluster (process runtime, two slots: two warm interpreters per spare shim)."""

from __future__ import annotations

import io
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cadre import Estimator, Experiment, Workspace
from services.node_agent.warm import GROUP_NICE, WarmRank, group_nice_reversible, startup_env

SCRIPT = """
import os, pickle, sys, time
import __main__

from cadre import Run  # the job's package, from PYTHONPATH


def started_s_ago():
    with open("/proc/self/stat") as fh:
        ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
    return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")


class Point:
    x = 1


age = started_s_ago()
assert __name__ == "__main__" and __main__.Point is Point, "the script is not __main__"
assert __file__ == os.path.join(os.getcwd(), "train.py"), __file__
assert sys.argv == ["train.py", *sys.argv[1:]] and "--lr" in sys.argv, sys.argv
assert sys.path[0] == os.path.dirname(os.path.realpath(__file__)), sys.path[:3]
assert os.environ["GREETING"] == "hej" and os.environ["CADRE_RUN_ID"], "the run's variables are missing"
assert sys.dont_write_bytecode == (os.environ.get("PYTHONDONTWRITEBYTECODE") == "1")
assert pickle.loads(pickle.dumps(Point())).x == 1
assert os.sched_getscheduler(0) == os.SCHED_OTHER, "the rank runs at the idle priority its interpreter waited at"
if os.path.exists("/proc/self/autogroup"):  # its session's group, niced while it waited, is back to 0
    assert open("/proc/self/autogroup").read().split()[-1] == "0", open("/proc/self/autogroup").read()
assert not [m for m in sys.modules if m.startswith("services")], "the agent's modules leaked into the rank"
Run.get_context().log("started_s_ago", age)
print(f"started {age:.3f} s ago", flush=True)
if "--fail" in sys.argv:
    raise ValueError("boom from the script")
"""


def _run(ws: Workspace, project: Path, *args: object, **variables: str) -> tuple[str, dict[str, object], float]:
    est = Estimator(project, "train.py", script_params={"--lr": 0.1, **{a: "" for a in args}},
                    environment_variables={"GREETING": "hej", **variables})  # fmt: skip
    run = Experiment(ws, "warm").submit(est)
    out = io.StringIO()
    details = run.wait_for_completion(show_output=True, output=out, raise_on_error=False)
    text = out.getvalue()
    found = re.search(r"started ([\d.]+) s ago", text)
    assert found is not None, text
    return text, details, float(found.group(1))


def _settle(ws: Workspace, make_project: Callable[..., Path]) -> None:
    """A run that takes both slots (so the spare shim after it is the next run's), then time for that spare's
    warm interpreters to start: a rank started cold has run for milliseconds when its script begins."""
    est = Estimator(make_project(**{"t.py": "print('x')"}), "t.py", process_count_per_node=2)
    Experiment(ws, "warm").submit(est).wait_for_completion()
    time.sleep(1.5)


def test_a_warm_rank_runs_its_script_as_python_would(ws: Workspace, make_project: Callable[..., Path]) -> None:
    project = make_project(**{"train.py": SCRIPT})
    _settle(ws, make_project)
    text, details, age = _run(ws, project)
    assert details["status"] == "Completed", text
    assert age > 1.0, f"the rank's interpreter started {age:.3f} s before its script: it was not warm"


def test_a_warm_rank_that_raises_reports_it_from_the_script_down(
    ws: Workspace, make_project: Callable[..., Path]
) -> None:
    project = make_project(**{"train.py": SCRIPT})
    _settle(ws, make_project)
    text, details, age = _run(ws, project, "--fail")
    assert age > 1.0, "not warm"
    assert details["status"] == "Failed" and details["exitCodes"] == {0: 1}, details
    # The traceback python itself prints: the script's frame first, none of the loader's.
    trace = text[text.index("Traceback (most recent call last):") :]
    assert re.search(r'Traceback \(most recent call last\):\n.*File ".*/train\.py", line \d+, in <module>', trace)
    assert "<string>" not in trace and "_cadre_warm" not in trace, trace
    assert "ValueError: boom from the script" in trace


def test_a_rank_whose_variables_change_how_python_starts_is_started_cold(
    ws: Workspace, make_project: Callable[..., Path]
) -> None:
    project = make_project(**{"train.py": SCRIPT})
    _settle(ws, make_project)
    # The script asserts that the variable took effect at start-up (sys.dont_write_bytecode).
    text, details, age = _run(ws, project, PYTHONDONTWRITEBYTECODE="1")
    assert details["status"] == "Completed", text
    assert age < 1.0, f"started {age:.3f} s before its script: a warm interpreter, with the wrong start-up"


def _group_nice(pid: int) -> int:
    return int(Path(f"/proc/{pid}/autogroup").read_text().split()[-1])


@pytest.mark.skipif(not group_nice_reversible(), reason="no autogroups here, or no CAP_SYS_ADMIN to renice them")
def test_a_waiting_interpreter_yields_its_session_group_until_its_rank_comes() -> None:
    # SCHED_IDLE alone does not hold it back: its session is an autogroup the kernel weighs as one nice-0 task.
    waiting = WarmRank(sys.executable, startup_env(dict(os.environ)), [], idle=True, group=True)
    try:
        assert os.sched_getscheduler(waiting.proc.pid) == os.SCHED_IDLE
        assert waiting.grouped and _group_nice(waiting.proc.pid) == GROUP_NICE
        assert waiting.wake()
        assert _group_nice(waiting.proc.pid) == 0 and os.sched_getscheduler(waiting.proc.pid) == os.SCHED_OTHER
    finally:
        waiting.release()
        assert waiting.proc.wait(timeout=10) == 0


SIBLINGS = """
import os, time

def parent(pid):
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])

def children(pid):
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and parent(int(entry)) == pid:
                found.append(int(entry))
        except OSError:
            pass
    return found

time.sleep(0.3)  # (the spare forked as this run was handed out has had time to start interpreters, if it would)
shim = os.getppid()
spares = [c for c in children(parent(shim)) if c != shim]
print(f"spares {len(spares)} warm {sum(len(children(s)) for s in spares)}", flush=True)
"""


def test_the_next_runs_interpreters_start_after_this_run_not_beside_it(
    ws: Workspace, make_project: Callable[..., Path]
) -> None:
    _settle(ws, make_project)
    run = Experiment(ws, "warm").submit(Estimator(make_project(**{"train.py": SIBLINGS}), "train.py"))
    out = io.StringIO()
    details = run.wait_for_completion(show_output=True, output=out, raise_on_error=False)
    found = re.search(r"spares (\d+) warm (\d+)", out.getvalue())
    assert details["status"] == "Completed" and found is not None, out.getvalue()
    assert int(found.group(1)) >= 1, "no spare shim beside the run"
    assert found.group(2) == "0", "the spare started its interpreters while this run's ranks were starting"
