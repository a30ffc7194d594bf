"""benchmarks/learner_throughput.py runs the real SFT and GRPO updates end to end at toy sizes and writes its JSON; its
written-out instructions are LIBERO-Spatial's."""

from __future__ import annotations

import json

import learner_throughput
import pytest

from gym_libero_vla.algos import GRPOConfig, SFTConfig
from gym_libero_vla.policies import TorchThreads
from gym_libero_vla.suites import suite_tasks


def test_instructions_are_libero_spatials():
    assert learner_throughput.SPATIAL_INSTRUCTIONS == tuple(task.instruction for task in suite_tasks("libero_spatial"))


def test_rows_time_each_size_and_count_the_rollout(tmp_path, capsys):
    args = learner_throughput.Args(
        sizes=("recipe",), sft_steps=1, grpo_updates=1, act_queries=1, act_batch=2, rollout_queries=3, demo_steps=12,
        num_demos=2, image_size=64, threads=TorchThreads(1),
        sft=SFTConfig(batch_size=4, random_shift=4, ema_decay=0.99, seed=0),
        grpo=GRPOConfig(minibatch_size=8, imitation_batch_size=4, seed=0), json_out=str(tmp_path / "lt.json"),
    )  # fmt: skip
    learner_throughput.main(args)
    report = json.loads((tmp_path / "lt.json").read_text())
    (row,) = report["rows"]
    assert row["size"] == "recipe" and row["parameters"] > 100_000
    assert row["grpo_rollout_env_steps"] == 2 * 4 * 3 * 8  # groups x size x queries x actions per chunk
    for key in ("sft_step_s", "grpo_update_s", "act_batch1_s", "act_batch2_s"):
        assert row[key] > 0
    assert row["sft_transitions_per_s"] == pytest.approx(4 / row["sft_step_s"])
    assert report["device"] == "cpu" and "--sizes recipe" in report["command"]
    assert "| recipe | 128 x 2 | 64 |" in capsys.readouterr().out
    assert (tmp_path / "lt.md").read_text().startswith("# Learner throughput")


def test_phases_left_out_are_not_timed(tmp_path):
    args = learner_throughput.Args(
        sizes=("recipe",), phases=("act",), act_queries=1, act_batch=2, image_size=64, threads=TorchThreads(1),
        json_out=str(tmp_path / "lt.json"),
    )  # fmt: skip
    (row,) = learner_throughput.main(args)["rows"]
    assert row["act_batch2_s"] > 0 and "sft_step_s" not in row and "grpo_update_s" not in row
    assert "| recipe | 128 x 2 | 64 | 0.6 M |  |  |  |  | " in (tmp_path / "lt.md").read_text()


def test_bad_sizes_and_phases_name_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown size\(s\) \['huge'\]: valid \('recipe', 'large', 'xl'\)"):
        learner_throughput.main(learner_throughput.Args(sizes=("huge",)))
    with pytest.raises(ValueError, match=r"unknown phase\(s\) \['train'\]: valid \('sft', 'grpo', 'act'\)"):
        learner_throughput.main(learner_throughput.Args(phases=("train",)))
