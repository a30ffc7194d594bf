"""benchmarks/async_vs_sync.py: both runs finish the same number of updates on the real simulator and the report
holds the timings and the learning-curve comparison; the comparison's arithmetic on known counts."""

from __future__ import annotations

import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import async_vs_sync  # noqa: E402

from gym_libero_vla.evaluate import difference_interval, wilson_interval  # noqa: E402


def test_curve_parity_counts_every_update_of_both_runs():
    sync = {"success_rate_per_update": [0.25, 0.5, 0.0], "episodes_per_update": [4, 4, 8]}
    asynchronous = {"success_rate_per_update": [0.0, 0.25, 0.125], "episodes_per_update": [4, 4, 8]}
    parity = async_vs_sync.curve_parity(sync, asynchronous)
    assert parity["sync"]["successes"] == 3 and parity["sync"]["episodes"] == 16
    assert parity["async"]["successes"] == 2 and parity["async"]["episodes"] == 16
    assert parity["difference"] == pytest.approx(2 / 16 - 3 / 16)
    assert parity["sync"]["ci95"] == pytest.approx(list(wilson_interval(3, 16)))
    low, high = parity["difference_ci95"]
    assert (low, high) == pytest.approx(difference_interval(2, 16, 3, 16))
    assert low < parity["difference"] < high


def test_difference_interval_is_newcombes():
    # Newcombe (1998), Table II, example (a): 56/70 vs 48/80 -> 0.2000, 95% CI [0.0524, 0.3339] (method 10).
    low, high = difference_interval(56, 70, 48, 80)
    assert (round(low, 4), round(high, 4)) == (0.0524, 0.3339)
    assert difference_interval(5, 10, 5, 10)[0] == pytest.approx(-difference_interval(5, 10, 5, 10)[1])


def test_both_modes_run_the_same_updates(tmp_path):
    out = tmp_path / "async_vs_sync.json"
    grpo = async_vs_sync.GRPOConfig(group_size=2, num_groups=1, num_epochs=1, max_sampling_rounds=1, seed=0)
    args = async_vs_sync.Args(max_episode_steps=5, num_settle_steps=1, grpo=grpo, num_updates=2, hidden_size=16, out=out,
                              pipeline=async_vs_sync.PipelineConfig(num_workers=1))  # fmt: skip
    report = async_vs_sync.main(args)
    assert json.loads(out.read_text())["speedup_wall"] == pytest.approx(report["speedup_wall"])
    for mode in ("sync", "async"):
        assert report[mode]["updates"] == 2 and len(report[mode]["success_rate_per_update"]) == 2
        assert report[mode]["episodes_per_update"] == [2, 2]
        assert 2 * 2 <= report[mode]["env_steps_trained"] <= 2 * 2 * 5  # 2 updates of 2 episodes of 1..5 steps
        assert 0.0 <= report[mode]["learner_idle_fraction"] <= 1.0 and report[mode]["wall_s"] > 0
    parity = report["learning_curve_parity"]
    assert parity["sync"]["episodes"] == parity["async"]["episodes"] == 4
    assert 0.0 <= report["async"]["worker_idle_fraction"] <= 1.0
