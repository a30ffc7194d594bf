"""SB3's callbacks and ours on GRPO, on the real simulator (state mode, 10-step episodes) with a tiny policy."""

from __future__ import annotations

import json
import os

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3.common.callbacks import CheckpointCallback, EvalCallback
from stable_baselines3.common.evaluation import evaluate_policy

from gym_libero_vla.algos.base import latest_checkpoint
from gym_libero_vla.algos.callbacks import LiberoEvalCallback, RolloutCheckpointCallback
from gym_libero_vla.algos.grpo import GRPO
from gym_libero_vla.policies import CompactVLA, CompactVLAConfig, WordTokenizer
from gym_libero_vla.sb3_vec_env import TextDummyVecEnv
from gym_libero_vla.wrappers.action_tokenizer import ActionBins

STEPS = 10


def make_env():
    return gym.make("LiberoSpatial-v0", obs_mode="state", task_ids=(0,), max_episode_steps=STEPS, num_settle_steps=2)


@pytest.fixture(scope="module")
def env():
    env = make_env()
    yield env
    env.close()


@pytest.fixture(scope="module")
def policy_factory(env):
    instruction = env.reset(options={"task_id": 0, "init_state_id": 0})[0]["instruction"]

    def make_policy(seed: int = 0) -> CompactVLA:
        torch.manual_seed(seed)
        bins = ActionBins.from_statistics({"q01": [-1.0] * 7, "q99": [1.0] * 7})
        config = CompactVLAConfig(cameras=(), hidden_size=32, num_layers=1, num_heads=2)
        return CompactVLA(config, bins, WordTokenizer.from_texts([instruction]))

    return make_policy


def test_sb3_evaluate_policy_eval_and_checkpoint_callbacks_run_on_grpo(env, policy_factory, tmp_path):
    eval_env = TextDummyVecEnv([make_env, make_env])
    try:
        model = GRPO(policy_factory(), env, group_size=2, num_groups=1, max_sampling_rounds=1, seed=0)
        rewards, lengths = evaluate_policy(model, eval_env, n_eval_episodes=2, return_episode_rewards=True)
        assert lengths == [STEPS, STEPS] and rewards == [0.0, 0.0]  # a random policy fails its 10 steps
        evaluation = EvalCallback(
            eval_env, eval_freq=2 * STEPS, n_eval_episodes=2, log_path=str(tmp_path / "eval"),
            best_model_save_path=str(tmp_path / "best"),
        )  # fmt: skip
        checkpoint = CheckpointCallback(save_freq=2 * STEPS, save_path=str(tmp_path / "sb3_ckpt"))
        with pytest.warns(UserWarning, match="not of the same type"):  # GRPO trains on the plain env: SB3 says so
            model.learn(4 * STEPS, callback=[evaluation, checkpoint])
        assert len(evaluation.evaluations_timesteps) == 2 and evaluation.best_mean_reward == 0.0
        assert os.path.isfile(tmp_path / "best" / "best_model" / "grpo.json")
        np.testing.assert_array_equal(np.load(tmp_path / "eval" / "evaluations.npz")["results"], np.zeros((2, 2)))
        assert latest_checkpoint(tmp_path / "sb3_ckpt").endswith(f"rl_model_{4 * STEPS}_steps.zip")
    finally:
        eval_env.close()
    with pytest.raises(ValueError, match="Dict observation spaces"):
        TextDummyVecEnv([lambda: gym.make("CartPole-v1")])


def test_rollout_checkpoints_keep_the_newest_and_resume(env, policy_factory, tmp_path):
    model = GRPO(policy_factory(), env, group_size=2, num_groups=1, max_sampling_rounds=1, seed=0)
    callback = RolloutCheckpointCallback(save_freq=2 * STEPS, save_path=str(tmp_path), name_prefix="grpo", keep_last=2)
    model.learn(6 * STEPS, callback=callback)  # 3 rollouts of 2 episodes: a checkpoint after each
    assert sorted(os.listdir(tmp_path)) == ["grpo_40_steps", "grpo_60_steps"]
    resumed = GRPO.load(latest_checkpoint(tmp_path), env=env)
    assert resumed.num_timesteps == 6 * STEPS and resumed.policy_version == 3
    # A resumed run prunes the checkpoints it found as well, not those of a later step or of another prefix.
    os.makedirs(tmp_path / "grpo_1000_steps")
    os.makedirs(tmp_path / "sft_20_steps")
    again = RolloutCheckpointCallback(save_freq=2 * STEPS, save_path=str(tmp_path), name_prefix="grpo", keep_last=2)
    resumed.learn(2 * STEPS, callback=again, reset_num_timesteps=False)
    assert sorted(os.listdir(tmp_path)) == ["grpo_1000_steps", "grpo_60_steps", "grpo_80_steps", "sft_20_steps"]
    with pytest.raises(ValueError, match="save_freq 0"):
        RolloutCheckpointCallback(save_freq=0, save_path=str(tmp_path))


def test_libero_eval_callback_logs_success_on_held_out_init_states(env, policy_factory, tmp_path):
    model = GRPO(policy_factory(), env, group_size=2, num_groups=1, max_sampling_rounds=1, seed=0)
    callback = LiberoEvalCallback(
        "LiberoSpatial-v0", task_ids=(0,), init_state_ids=(40, 41), eval_freq=2 * STEPS, max_episode_steps=STEPS,
        log_path=str(tmp_path), best_model_save_path=str(tmp_path / "best"),
    )  # fmt: skip
    model.learn(2 * STEPS, callback=callback)
    assert callback.last_success_rate == 0.0 and callback.best_success_rate == 0.0
    (line,) = (tmp_path / "evaluations.jsonl").read_text().splitlines()
    row = json.loads(line)
    assert row.pop("seconds") > 0
    assert row == {"num_timesteps": 2 * STEPS, "success_rate": 0.0, "successes": 0, "episodes": 2, "per_task": {"0": 0.0}}
    assert os.path.isfile(tmp_path / "best" / "best_model" / "grpo.json")
    with pytest.raises(ValueError, match="init_state_ids is empty"):
        LiberoEvalCallback("LiberoSpatial-v0", (0,), (), eval_freq=10)


def test_libero_eval_callback_evaluates_exactly_the_starts_given(env, policy_factory, tmp_path):
    """A cheap learning curve: one (task, init state, seed) per task instead of the product."""
    from gym_libero_vla.rollouts import Start

    model = GRPO(policy_factory(), env, group_size=2, num_groups=1, max_sampling_rounds=1, seed=0)
    starts = [Start(0, 45, 3)]
    callback = LiberoEvalCallback("LiberoSpatial-v0", None, (), eval_freq=STEPS, max_episode_steps=STEPS,
                                  log_path=str(tmp_path), starts=starts)  # fmt: skip
    model.learn(2 * STEPS, callback=callback)
    rows = [json.loads(line) for line in (tmp_path / "evaluations.jsonl").read_text().splitlines()]
    assert rows and all(row["episodes"] == 1 and set(row["per_task"]) == {"0"} for row in rows)
