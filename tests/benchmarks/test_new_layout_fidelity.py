"""benchmarks/new_layout_fidelity.py on one LIBERO-Object task: real simulator, a worker process, JSON and Markdown."""

from __future__ import annotations

import json

import new_layout_fidelity
import pytest


def test_reports_robot_and_object_spread_on_both_kinds_of_start(tmp_path):
    out = tmp_path / "layouts.json"
    args = new_layout_fidelity.Args(suites=("object",), task_ids=(1,), num_starts=4, num_workers=1, json_out=str(out))
    new_layout_fidelity.main(args)
    report = json.loads(out.read_text())
    [task] = report["suites"]["libero_object"]["tasks"]
    assert task["task_id"] == 1 and task["num_starts"] == 4 and report["robot_init_noise"] == 0.02
    # The robot's start varies on new layouts as on stored starts (before ROBOT_INIT_NOISE it was one pose: 0 mm).
    (joints_stored, joints_new), (eef_stored, eef_new) = task["joint_spread_mrad"], task["eef_spread_mm"]
    assert joints_stored > 3 and joints_new > 3 and eef_stored > 1 and eef_new > 1
    # Object's cream cheese and basket sit in ~1 cm regions: both kinds of start put them within a few mm of each other.
    assert {"cream_cheese_1", "basket_1"} <= set(task["objects"])
    assert task["objects"]["cream_cheese_1"]["mean_shift_mm"] < 15
    assert "| 1 pick_up_the_cream_cheese_and_place_it_in_the_basket |" in (tmp_path / "layouts.md").read_text()


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match=r"task_ids \(12,\) for libero_object: valid 0..9"):
        new_layout_fidelity.main(new_layout_fidelity.Args(suites=("object",), task_ids=(12,)))
    with pytest.raises(ValueError, match="num_starts 60 for libero_object: its tasks store 50 init states"):
        new_layout_fidelity.main(new_layout_fidelity.Args(suites=("object",), num_starts=60))
    with pytest.raises(ValueError, match="num_starts 1 must be >= 2"):
        new_layout_fidelity.main(new_layout_fidelity.Args(num_starts=1))
