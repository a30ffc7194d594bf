"""gym_libero_vla.evaluate rolls a saved policy out in the real simulator and writes its report files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from gym_libero_vla.evaluate import EvalArgs, env_kwargs_for_policy, main, wilson_interval
from gym_libero_vla.policies import CompactVLA, CompactVLAConfig, WordTokenizer
from gym_libero_vla.wrappers.action_tokenizer import ActionBins


def tiny_policy(object_state_dim: int = 0) -> CompactVLA:
    config = CompactVLAConfig(cameras=(), object_state_dim=object_state_dim, hidden_size=16, num_layers=1, num_heads=2)
    bins = ActionBins(low=-np.ones(7, np.float32), high=np.ones(7, np.float32), num_bins=16)
    return CompactVLA(config, bins, WordTokenizer.from_texts(["pick up the black bowl and place it on the plate"]))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("policy") / "tiny"
    tiny_policy(object_state_dim=70).save_pretrained(path)
    return str(path)


def test_writes_table_json_plot_and_video(checkpoint, tmp_path, capsys):
    out_dir = tmp_path / "eval"
    args = EvalArgs(
        checkpoint=checkpoint, suite="spatial", task_ids=(0,), init_states=(20, 21), max_episode_steps=4,
        video_episodes=1, out_dir=str(out_dir), progress=False,
    )  # fmt: skip
    results = main(args)
    assert [(e["task_id"], e["init_state_id"]) for e in results["episodes"]] == [(0, 20), (0, 21)]
    assert all(e["length"] <= 4 for e in results["episodes"])
    with open(out_dir / "success.json") as file:
        saved = json.load(file)
    assert saved["per_task"]["0"]["episodes"] == 2 and 0.0 <= saved["success_rate"] <= 1.0
    assert "| task | instruction |" in (out_dir / "success.md").read_text()
    assert "| task | instruction |" in capsys.readouterr().out
    assert (out_dir / "success.png").read_bytes()[:4] == b"\x89PNG"
    (video,) = results["videos"]
    assert video.endswith(".mp4") and os.path.getsize(video) > 0


def test_env_follows_what_the_policy_reads():
    assert env_kwargs_for_policy(tiny_policy()) == {"obs_mode": "state"}
    assert env_kwargs_for_policy(tiny_policy(object_state_dim=70)) == {"obs_mode": "state", "privileged_state": True}


def test_bad_suite_task_and_init_state_name_the_valid_choices(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="unknown LIBERO suite 'nope'"):
        main(EvalArgs(checkpoint=checkpoint, suite="nope", out_dir=str(tmp_path), progress=False))
    with pytest.raises(ValueError, match="unknown task_id 12 for LiberoSpatial-v0: valid 0..9"):
        main(EvalArgs(checkpoint=checkpoint, task_ids=(12,), init_states=(0,), out_dir=str(tmp_path), progress=False))
    with pytest.raises(ValueError, match="unknown init_state_id 99 for task 0 of LiberoSpatial-v0: valid 0..49"):
        main(EvalArgs(checkpoint=checkpoint, task_ids=(0,), init_states=(99,), out_dir=str(tmp_path), progress=False))


def test_wilson_interval_matches_hand_computed_values():
    # 8/10, z = 1.96: center (0.8 + 0.19208) / 1.38416 = 0.71674, half 1.96 * sqrt(0.016 + 0.009604) / 1.38416 = 0.22658
    assert wilson_interval(8, 10) == pytest.approx((0.49016, 0.94332), abs=1e-4)
    # 0/10: center = half = 0.19208 / 1.38416, so the interval starts at 0 and is not empty
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27754), abs=1e-4)
    low, high = wilson_interval(20, 20)
    assert high == 1.0 and 0.8 < low < 0.85
    with pytest.raises(ValueError, match="n 0 must be an int >= 1"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="successes 11 must be in 0..10"):
        wilson_interval(11, 10)
