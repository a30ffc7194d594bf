"""benchmarks/rollout_temperature.py rolls a policy out greedily and sampled at each temperature in the real
simulator and reports success, mixed groups and the table."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from gym_libero_vla.policies import CompactVLA, CompactVLAConfig, WordTokenizer
from gym_libero_vla.wrappers.action_tokenizer import ActionBins

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import rollout_temperature  # noqa: E402


def test_reports_greedy_and_each_temperature(tmp_path):
    checkpoint = tmp_path / "policy"
    CompactVLA(
        CompactVLAConfig(cameras=(), hidden_size=16, num_layers=1, num_heads=2),
        ActionBins(low=-np.ones(7, np.float32), high=np.ones(7, np.float32), num_bins=16),
        WordTokenizer.from_texts(["pick up the black bowl"]),
    ).save_pretrained(checkpoint)
    args = rollout_temperature.Args(
        checkpoint=str(checkpoint), task_ids=(0,), init_state_ids=(0, 1), temperatures=(1.0, 0.5), episodes_per_start=2,
        max_episode_steps=5, num_envs=3, json_out=str(tmp_path / "out.json"),
    )  # fmt: skip
    report = rollout_temperature.main(args)
    assert list(report["rows"]) == ["greedy", "T=1", "T=0.5"]
    assert report["rows"]["greedy"]["episodes"] == 2 and report["rows"]["T=1"]["episodes"] == 4
    for row in report["rows"].values():
        low, high = row["ci95"]
        assert 0.0 <= low <= row["success_rate"] <= high <= 1.0 and 1 <= row["mean_length"] <= 5
        assert row["mixed_group_fraction"] in (0.0, 0.5, 1.0)
    with open(tmp_path / "out.json") as file:
        assert json.load(file)["rows"] == json.loads(json.dumps(report["rows"]))
    assert "| T=0.5 |" in (tmp_path / "out.md").read_text()
    with pytest.raises(ValueError, match="temperature 0.0 must be a finite number > 0"):
        rollout_temperature.main(rollout_temperature.Args(checkpoint=str(checkpoint), temperatures=(0.0,)))
    with pytest.raises(ValueError, match="episodes_per_start 1 must be >= 2"):
        rollout_temperature.main(rollout_temperature.Args(checkpoint=str(checkpoint), episodes_per_start=1))


def test_mixed_groups_are_the_starts_whose_episodes_disagree():
    def row(init_state_id, seed, success, length):
        return {"task_id": 0, "init_state_id": init_state_id, "seed": seed, "success": success, "length": length}

    rows = [row(0, 0, True, 3), row(0, 1, False, 5), row(1, 0, False, 5), row(1, 1, False, 5)]
    summary = rollout_temperature.summarize(rows, [(0, 0), (0, 1)])
    assert summary["mixed_group_fraction"] == 0.5 and summary["successes"] == 1 and summary["success_rate"] == 0.25
