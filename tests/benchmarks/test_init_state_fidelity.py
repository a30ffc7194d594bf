"""benchmarks/init_state_fidelity.py on two LIBERO-Spatial tasks: real simulator, a worker process, JSON and Markdown."""

from __future__ import annotations

import json

import init_state_fidelity
import pytest

from gym_libero_vla.fidelity import PINNED_MUJOCO_VERSION


def test_reports_each_task_premise_with_the_mujoco_version(tmp_path):
    out = tmp_path / "fidelity.json"
    args = init_state_fidelity.Args(suites=("spatial",), task_ids=(4, 5), num_init_states=2, num_workers=1, json_out=str(out))
    init_state_fidelity.main(args)
    report = json.loads(out.read_text())
    assert report["machine"]["mujoco"] == PINNED_MUJOCO_VERSION
    tasks = report["suites"]["libero_spatial"]["tasks"]
    assert [task["task_id"] for task in tasks] == [4, 5]
    assert all(task["premise_holds"] and task["failing"] == {} and task["num_init_states"] == 2 for task in tasks)
    # task 4: the bowl in the open drawer and the other bowl on the cabinet; task 5: on the ramekin and the cookie box
    assert tasks[0]["predicates_by_kind"] == {"object-object": 2, "state": 1, "object-region": 5}
    assert tasks[1]["predicates_by_kind"] == {"object-object": 2, "object-region": 5}
    markdown = (tmp_path / "fidelity.md").read_text()
    assert f"under MuJoCo {PINNED_MUJOCO_VERSION} (the pinned version)" in markdown
    assert "| libero_spatial | 2 | 2 | - | 2-3 |" in markdown
    assert "No premise predicate failed." in markdown


def test_unknown_task_ids_are_refused():
    with pytest.raises(ValueError, match=r"task_ids \(12,\) for libero_spatial: valid 0..9"):
        init_state_fidelity.main(init_state_fidelity.Args(suites=("spatial",), task_ids=(12,)))
