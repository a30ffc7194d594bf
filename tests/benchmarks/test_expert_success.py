"""benchmarks/expert_success.py runs the scripted expert in the real simulator, records the tasks it has no script
for as such, and writes strict JSON (no NaN) and a table even when nothing was timed in rgb+state mode."""

from __future__ import annotations

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import expert_success  # noqa: E402


def test_scripted_and_unscripted_tasks_are_reported(tmp_path, capsys):
    # LIBERO-Goal task 5 pushes a plate (no script); task 7 turns the stove on (~85 steps).
    args = expert_success.Args(
        suites=("goal",), task_ids=(5, 7), num_init_states=1, rgb_episodes=0, json_out=str(tmp_path / "out.json")
    )
    report = expert_success.main(args)
    tasks = report["suites"]["LiberoGoal-v0"]["tasks"]
    assert "needs a push" in tasks[5]["error"] and tasks[5]["instruction"] == "push the plate to the front of the stove"
    assert tasks[7]["episodes"] == 1 and tasks[7]["success_rate"] == 1.0
    assert tasks[7]["mean_success_length"] == tasks[7]["mean_length"] <= 300
    # The knob is grasped with the hand turned (by 90 degrees), and turned further: the wrist moves, short of its limit.
    assert tasks[7]["wrist_at_limit"] == 0 and tasks[7]["wrist_up"] + tasks[7]["wrist_down"] == 1
    assert "rgb" not in report["suites"]["LiberoGoal-v0"]

    with open(tmp_path / "out.json") as file:
        saved = json.load(file, parse_constant=_fail)  # NaN or Infinity would call it
    assert saved["suites"]["LiberoGoal-v0"]["tasks"]["7"]["success_rate"] == 1.0
    table = capsys.readouterr().out
    assert "| LiberoGoal-v0 | 5 | no script |" in table
    assert "| LiberoGoal-v0 | 100.0% (1/2 tasks scripted) |" in table and "| - | - |" in table and "nan" not in table


def _fail(constant: str):
    raise AssertionError(f"the JSON holds {constant}, which strict JSON readers reject")
