"""GRPO on the real simulator (state mode, 10-step episodes) with a tiny CompactVLA: rollouts in groups,
updates in the direction of the advantage, the offline term, SB3 surface, logging, checkpoints."""

from __future__ import annotations

import dataclasses
import glob
import os

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3.common.callbacks import BaseCallback

from gym_libero_vla.algos.base import latest_checkpoint
from gym_libero_vla.algos.grpo import GRPO, GroupRollout
from gym_libero_vla.episode import SAMPLED_INIT_STATE, Episode
from gym_libero_vla.policies import CompactVLA, CompactVLAConfig, WordTokenizer
from gym_libero_vla.wrappers.action_tokenizer import ActionBins

MAX_EPISODE_STEPS = 10


# The hand computations below assume one pass over each rollout, no dynamic-sampling refill, one minibatch and a pure
# imitation weight at full success (the library's defaults are the main job's: 2 epochs, 2 rounds, 128 steps, 0.1).
ONE_PASS = dict(num_epochs=1, max_sampling_rounds=1, minibatch_size=256, imitation_weight_min=0.0)


def make_grpo(policy, env=None, **kwargs) -> GRPO:
    return GRPO(policy, env, **{**ONE_PASS, **kwargs})


def make_policy(instruction: str, seed: int = 0) -> CompactVLA:
    torch.manual_seed(seed)
    bins = ActionBins.from_statistics({"q01": [-1.0] * 7, "q99": [1.0] * 7})
    config = CompactVLAConfig(cameras=(), hidden_size=32, num_layers=1, num_heads=2)
    return CompactVLA(config, bins, WordTokenizer.from_texts([instruction]))


def demo(instruction: str, log_probs=None) -> Episode:
    rng = np.random.default_rng(0)
    return Episode(
        observations={"instruction": instruction, "state": rng.normal(size=(6, 8)).astype(np.float32)},
        actions=rng.uniform(-1, 1, (5, 7)).astype(np.float32),
        rewards=np.zeros(5),
        success=True,
        task_id=0,
        source="offline",
        log_probs=log_probs,
    )


def rollout_log_probs(policy, rollout, indices) -> float:
    with torch.no_grad():
        return policy.log_prob(rollout.batch(indices), rollout.action_tokens[indices])[0].sum(-1).mean().item()


def test_learn_collects_groups_updates_the_policy_and_logs(env, instruction, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    policy = make_policy(instruction)
    before = [p.detach().clone() for p in policy.parameters()]
    model = make_grpo(
        policy, env, demos=[demo(instruction)], group_size=2, num_groups=1, imitation_batch_size=8, kl_coef=0.1,
        seed=0, tensorboard_log=str(tmp_path),
    )  # fmt: skip
    model.learn(2 * 2 * MAX_EPISODE_STEPS, progress_bar=True)
    assert model.num_timesteps == 2 * 2 * MAX_EPISODE_STEPS  # 2 iterations of one group of 2 ten-step episodes
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    metrics = model.last_metrics
    assert metrics["rollout/success_rate"] == 0.0 and metrics["train/imitation_weight"] == 1.0  # random policy: imitate fully
    assert metrics["rollout/frac_groups_zero_std"] == 1.0 and "train/pg_loss" not in metrics  # all-fail group left out
    assert (
        np.isfinite(metrics["train/imitation_loss"]) and metrics["train/is_weight_mean"] == 1.0
    )  # demos without mu: plain BC
    (run,) = glob.glob(str(tmp_path / "GRPO_*"))
    events = EventAccumulator(run)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"rollout/success_rate", "rollout/frac_groups_zero_std", "train/imitation_loss", "train/imitation_weight"} <= tags
    assert [event.step for event in events.Scalars("rollout/success_rate")] == [20, 40]


@pytest.mark.parametrize("loss_aggregation", ["token-mean", "episode-mean"])
def test_positive_advantage_raises_the_log_prob_of_its_tokens(env, instruction, loss_aggregation):
    policy = make_policy(instruction)
    model = make_grpo(
        policy, env, group_size=2, num_groups=1, learning_rate=1e-3, num_epochs=4, minibatch_size=64, seed=0,
        loss_aggregation=loss_aggregation,
    )  # fmt: skip
    rollout = model.collect_rollouts()
    assert rollout.action_tokens.shape == (2 * MAX_EPISODE_STEPS, 7) and rollout.behaviour_log_probs.shape == (20, 7)
    assert rollout.episode_index.tolist() == [0] * 10 + [1] * 10
    rollout.episode_rewards = np.array([1.0, 0.0], dtype=np.float32)  # pretend episode 0 succeeded
    winner, loser = np.arange(10), np.arange(10, 20)
    winner_before, loser_before = rollout_log_probs(policy, rollout, winner), rollout_log_probs(policy, rollout, loser)
    metrics = model.train(rollout)
    assert (
        metrics["train/n_updates"] == 4
        and metrics["rollout/frac_groups_zero_std"] == 0.0
        and metrics["rollout/success_rate"] == 0.5
    )
    assert rollout_log_probs(policy, rollout, winner) > winner_before + 0.1
    assert rollout_log_probs(policy, rollout, loser) < loser_before - 0.1
    assert 0.0 <= metrics["train/clip_fraction"] <= 1.0 and metrics["train/approx_kl"] >= 0.0


def test_accumulated_minibatches_make_the_step_of_their_union(env, instruction):
    """20 steps, 2 epochs: 4 minibatches of 5 accumulated into one optimizer step move the weights as one minibatch
    of 20 does (equal minibatches: the mean of their token means is the union's), 2 steps in all; without
    accumulation the same minibatches make 8 steps, elsewhere."""
    rollout = make_grpo(make_policy(instruction), env, group_size=2, num_groups=1, seed=0).collect_rollouts()
    rollout.episode_rewards = np.array([1.0, 0.0], dtype=np.float32)
    settings = {
        "union": dict(minibatch_size=20),
        "accumulated": dict(minibatch_size=5, gradient_accumulation_steps=4),
        "separate": dict(minibatch_size=5),
        "uneven": dict(minibatch_size=5, gradient_accumulation_steps=3),
    }
    steps, weights = {}, {}
    for name, kwargs in settings.items():  # each from the policy that sampled the rollout: on-policy, ratio 1
        model = make_grpo(make_policy(instruction), env, group_size=2, num_groups=1, learning_rate=1e-2, num_epochs=2,
                          seed=0, **kwargs)  # fmt: skip
        steps[name] = model.train(rollout)["train/n_updates"]
        weights[name] = torch.cat([parameter.detach().reshape(-1) for parameter in model.policy.parameters()])
    assert steps == {"union": 2, "accumulated": 2, "separate": 8, "uneven": 4}  # 3 + 1 minibatches an epoch
    # The same step up to float32 summation order, which Adam's normalisation magnifies for a weight whose gradient is
    # near its eps (seen: 1.5e-6 on one of 29k weights on one machine): 1e-5 is a thousandth of the 1e-2 a step moves.
    torch.testing.assert_close(weights["accumulated"], weights["union"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(weights["separate"], weights["union"], atol=1e-4)
    with pytest.raises(ValueError, match="gradient_accumulation_steps 0 must be an int >= 1"):
        make_grpo(make_policy(instruction), env, gradient_accumulation_steps=0)


def test_step_size_warms_up_linearly_and_a_resumed_run_continues_the_count(env, instruction, tmp_path):
    """warmup_steps=4: the k-th optimizer step uses k/4 of the step size. Adam's first step moves every weight with a
    gradient by about the step size whatever the gradient's scale, so the first step moves the policy by lr/4, not
    lr; a checkpoint carries the count, and a resumed run takes the third step at 3/4."""
    rollout = make_grpo(make_policy(instruction), env, group_size=2, num_groups=1, seed=0).collect_rollouts()
    rollout.episode_rewards = np.array([1.0, 0.0], dtype=np.float32)
    lr, moves = 1e-2, {}
    for warmup_steps in (0, 4):
        model = make_grpo(make_policy(instruction), env, group_size=2, num_groups=1, learning_rate=lr, num_epochs=1,
                          minibatch_size=64, max_grad_norm=None, warmup_steps=warmup_steps, seed=0)  # fmt: skip
        start = [p.detach().clone() for p in model.policy.parameters()]
        metrics = model.train(rollout)  # one optimizer step
        assert metrics["train/n_updates"] == 1 and model.num_optimizer_steps == 1
        assert metrics["train/learning_rate"] == pytest.approx(lr / 4 if warmup_steps else lr)
        moves[warmup_steps] = max((p.detach() - s).abs().max().item() for p, s in zip(model.policy.parameters(), start))
    assert moves[0] == pytest.approx(lr, rel=0.05) and moves[4] == pytest.approx(lr / 4, rel=0.05)
    assert model.train(rollout)["train/learning_rate"] == pytest.approx(lr / 2)
    model.save(tmp_path / "warm")
    resumed = GRPO.load(tmp_path / "warm", env=env)
    assert resumed.num_optimizer_steps == 2 and resumed.config.warmup_steps == 4
    assert [resumed.train(rollout)["train/learning_rate"] for _ in range(3)] == pytest.approx([3 * lr / 4, lr, lr])
    with pytest.raises(ValueError, match="warmup_steps -1 must be an int >= 0"):
        make_grpo(make_policy(instruction), env, warmup_steps=-1)


@pytest.mark.parametrize("loss_aggregation, expected_pg_loss", [("token-mean", 5 / 15 / 2**0.5), ("episode-mean", 0.0)])
def test_loss_aggregation_weighs_tokens_or_episodes(env, instruction, loss_aggregation, expected_pg_loss):
    """A 5-step success and a 10-step failure in one group (A = +-1/sqrt(2)). On-policy the ratio is 1, so the first
    minibatch's pg_loss is -mean(A) over its tokens: token-mean gives the failure twice the success's weight,
    -(5 - 10) / 15 / sqrt(2); episode-mean scales each episode's A by 7.5 / length, so the two cancel."""
    policy = make_policy(instruction)
    model = make_grpo(
        policy, env, group_size=2, num_groups=1, learning_rate=1e-3, num_epochs=1, minibatch_size=64, seed=0,
        loss_aggregation=loss_aggregation,
    )  # fmt: skip
    first, second = model.collect_rollouts().episodes
    short = dataclasses.replace(
        first, success=True, actions=first.actions[:5], rewards=first.rewards[:5], log_probs=first.log_probs[:5],
        observations={k: v if isinstance(v, str) else v[:6] for k, v in first.observations.items()},
    )  # fmt: skip
    rollout = GroupRollout.from_episodes([short, second], policy.action_bins, policy.observation_keys)
    assert rollout.episode_lengths.tolist() == [5, 10] and rollout.episode_rewards.tolist() == [1.0, 0.0]
    metrics = model.train(rollout)
    assert metrics["train/n_updates"] == 1
    assert metrics["train/pg_loss"] == pytest.approx(expected_pg_loss, abs=1e-4)


def test_kl_to_the_base_model_under_lora(env, instruction, tmp_path):
    make_policy(instruction).save_pretrained(tmp_path / "base")
    policy = CompactVLA.from_pretrained(tmp_path / "base").add_lora(rank=2, alpha=4)
    model = make_grpo(policy, env, group_size=2, num_groups=1, learning_rate=1e-2, num_epochs=3, kl_coef=1.0, seed=0)
    assert model.reference_policy is None  # the base model is the adapter-free policy itself
    rollout = model.collect_rollouts()
    rollout.episode_rewards = np.array([0.0, 1.0], dtype=np.float32)
    metrics = model.train(rollout)
    assert metrics["train/kl"] >= 0.0 and model.train(rollout)["train/kl"] > 0.0  # the adapter moved away from the base


def test_offline_tokens_are_weighted_by_truncated_importance_ratios(instruction):
    policy = make_policy(instruction)
    likely = make_grpo(policy, demos=[demo(instruction, log_probs=np.zeros((5, 7)))], imitation_batch_size=16, is_clip=2.0)
    _, weight_mean = likely._imitation_loss()
    assert 0.0 < weight_mean < 0.1  # mu gave these tokens probability 1; pi gives them ~1/256 each
    unlikely = make_grpo(policy, demos=[demo(instruction, log_probs=np.full((5, 7), -50.0))], imitation_batch_size=16)
    loss, weight_mean = unlikely._imitation_loss()
    assert weight_mean == pytest.approx(2.0) and loss.requires_grad  # pi / mu is huge: truncated at is_clip


def test_predict_save_load_round_trip(env, instruction, tmp_path):
    policy = make_policy(instruction)
    model = make_grpo(policy, env, demos=[demo(instruction)], group_size=2, num_groups=1, clip_high=0.3, seed=3).learn(20)
    obs, _ = env.reset(options={"task_id": 0, "init_state_id": 1})
    action, state = model.predict(obs, deterministic=True)
    assert action.shape == (7,) and action.dtype == np.float32 and state is None
    model.save(tmp_path / "grpo")
    loaded = GRPO.load(tmp_path / "grpo", env=env)
    assert loaded.num_timesteps == 20 and loaded.config == model.config
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], action)
    assert loaded.optimizer.state_dict()["state"]  # Adam moments restored (the demos gave an update)


def test_callback_stops_collection(env, instruction):
    class StopAfter(BaseCallback):
        def _on_step(self) -> bool:
            return self.n_calls < 5

    model = make_grpo(make_policy(instruction), env, group_size=2, num_groups=1)
    model.learn(1000, callback=[StopAfter()])
    assert model.num_timesteps == 5 and model.last_metrics == {}


def test_groups_on_a_sync_vector_env(instruction):
    vector_env = gym.make_vec(
        "LiberoSpatial-v0", num_envs=2, vectorization_mode="sync", obs_mode="state", task_ids=(0,),
        max_episode_steps=MAX_EPISODE_STEPS, num_settle_steps=2,
    )  # fmt: skip
    try:
        with pytest.raises(ValueError, match="group_size 3 must be a multiple of the vector env's num_envs 2"):
            GRPO(make_policy(instruction), vector_env, group_size=3)
        model = make_grpo(make_policy(instruction), vector_env, group_size=4, num_groups=1, seed=0)
        rollout = model.collect_rollouts()
        assert rollout.episode_lengths.tolist() == [MAX_EPISODE_STEPS] * 4 and model.num_timesteps == 40
        assert set(rollout.observations["instruction"]) == {instruction}
    finally:
        vector_env.close()


def test_bad_arguments_are_named(env, instruction):
    policy = make_policy(instruction)
    with pytest.raises(ValueError, match=r"unknown GRPO hyperparameter\(s\) \['clip_range'\]"):
        GRPO(policy, env, clip_range=0.2)
    with pytest.raises(ValueError, match="group_size 1"):
        GRPO(policy, env, group_size=1)
    with pytest.raises(ValueError, match="GRPO has no env"):
        GRPO(policy).learn(10)
    with pytest.raises(ValueError, match="total_timesteps 0"):
        GRPO(policy, env).learn(0)
    rgb_env = gym.make("LiberoSpatial-v0", obs_mode="rgb", cameras=("agentview",))  # built lazily: no simulator yet
    with pytest.raises(ValueError, match=r"lack \['state'\]"):
        GRPO(policy, rgb_env)


def test_groups_start_only_from_the_given_init_states(env, instruction):
    class RecordResetOptions(gym.Wrapper):
        def __init__(self, env):
            super().__init__(env)
            self.reset_options = []

        def reset(self, *, seed=None, options=None):
            self.reset_options.append(options)
            return super().reset(seed=seed, options=options)

    recording_env = RecordResetOptions(env)
    model = make_grpo(make_policy(instruction), recording_env, group_size=2, num_groups=3, init_state_ids=(3, 7), seed=0)
    model.collect_rollouts()
    assert len(recording_env.reset_options) == 6
    assert {options["init_state_id"] for options in recording_env.reset_options} <= {3, 7}
    with pytest.raises(ValueError, match="init_state_ids"):
        GRPO(make_policy(instruction), env, init_state_ids=())


def test_sampled_starts_give_each_group_one_new_layout(env, instruction):
    """init_states="sampled": every group starts its episodes from one new layout of its own (the same scene for the
    whole group, so its advantages compare like with like), none of them a stored init state; all-fail groups are
    still rescued with a demo of their task."""
    starts = []

    class RecordStarts(gym.Wrapper):
        def reset(self, *, seed=None, options=None):
            obs, info = super().reset(seed=seed, options=options)
            starts.append((dict(options), self.unwrapped.libero_env.get_sim_state().copy(), info["init_state_id"]))
            return obs, info

    demos = [dataclasses.replace(demo(instruction), init_state_id=SAMPLED_INIT_STATE)]
    model = make_grpo(make_policy(instruction), RecordStarts(env), demos=demos, group_size=2, num_groups=3,
                      init_states="sampled", rescue_failed_groups=True, seed=0)  # fmt: skip
    rollout = model.collect_rollouts()
    assert len(starts) == 6 and all(info_id == SAMPLED_INIT_STATE for _, _, info_id in starts)
    assert all(set(options) == {"task_id", "layout_seed"} for options, _, _ in starts)
    for first, second in zip(starts[::2], starts[1::2]):  # a group: one layout seed, one scene
        assert first[0] == second[0]
        np.testing.assert_allclose(first[1], second[1], atol=1e-9)  # the solver's warm start differs by 1e-16
    assert len({options["layout_seed"] for options, _, _ in starts}) == 3  # groups: three different layouts
    assert np.abs(starts[0][1] - starts[2][1]).max() > 1e-3
    online = [episode for episode in rollout.episodes if episode.source == "online"]
    assert {episode.init_state_id for episode in online} == {SAMPLED_INIT_STATE}
    assert rollout.stats["rollout/groups_rescued"] == 3  # a tiny random policy fails; each group takes the demo
    with pytest.raises(ValueError, match="init_state_ids picks stored init states: leave it None"):
        GRPO(make_policy(instruction), env, init_states="sampled", init_state_ids=(0,))
    with pytest.raises(ValueError, match=r"unknown init_states 'random': valid \('suite', 'sampled'\)"):
        GRPO(make_policy(instruction), env, init_states="random")
    with pytest.raises(ValueError, match=r"unknown start_sampling 'hard': valid \('uniform', 'learnability'\)"):
        GRPO(make_policy(instruction), env, start_sampling="hard")


# ---------------------------------------------------------------------- dynamic sampling, rescue, replay, staleness
def test_dynamic_sampling_refills_until_groups_carry_signal(env, instruction):
    # A random tiny policy fails every 10-step episode: no group carries signal, so every round is drawn.
    model = make_grpo(make_policy(instruction), env, group_size=2, num_groups=1, max_sampling_rounds=3, seed=0)
    rollout = model.collect_rollouts()
    assert rollout.stats["rollout/groups_sampled"] == 3 and rollout.stats["rollout/groups_informative"] == 0
    assert len(rollout.episodes) == 6 and model.num_timesteps == 6 * MAX_EPISODE_STEPS
    metrics = model.train(rollout)
    assert (
        metrics["rollout/frac_groups_zero_std"] == 1.0
        and metrics["rollout/groups_sampled"] == 3.0
        and metrics["train/n_updates"] == 0
    )
    assert metrics["train/entropy"] > 0.0  # still reported when no online minibatch ran
    filter_only = make_grpo(
        make_policy(instruction), env, group_size=2, num_groups=1, dynamic_sampling=False, max_sampling_rounds=3
    )
    assert filter_only.collect_rollouts().stats["rollout/groups_sampled"] == 1  # refill belongs to dynamic sampling


def test_all_fail_groups_are_rescued_with_a_demo_that_the_update_moves_towards(env, instruction):
    model = make_grpo(
        make_policy(instruction), env, demos=[demo(instruction)], group_size=2, num_groups=1, rescue_failed_groups=True,
        max_sampling_rounds=3, learning_rate=1e-3, num_epochs=4, imitation_weight_max=0.0, seed=0,
    )  # fmt: skip
    rollout = model.collect_rollouts()
    assert rollout.stats["rollout/groups_rescued"] == 1 and rollout.stats["rollout/groups_sampled"] == 1  # informative at once
    assert [episode.source for episode in rollout.episodes] == ["online", "offline"]
    assert rollout.episode_rewards.tolist() == [0.0, 1.0] and rollout.episode_online.tolist() == [True, False]
    assert np.isnan(rollout.behaviour_log_probs[rollout.episode_index == 1]).all()  # the demo's mu is unknown
    demo_steps = np.flatnonzero(rollout.episode_index == 1)
    before = rollout_log_probs(model.policy, rollout, demo_steps)
    metrics = model.train(rollout)
    assert metrics["rollout/success_rate"] == 0.0  # the demo does not count as an online success
    assert metrics["train/off_policy_fraction"] == pytest.approx(5 / 15)  # 5 demo steps of 15
    assert rollout_log_probs(model.policy, rollout, demo_steps) > before + 0.1
    with pytest.raises(ValueError, match="rescue_failed_groups needs demos"):
        GRPO(make_policy(instruction), env, rescue_failed_groups=True).learn(10)


def test_tempered_rollouts_are_trained_on_the_distribution_that_sampled_them(env, instruction):
    """temperature=3: the episodes' behaviour log-probs are the tempered policy's, and the update's ratio uses the
    same temperature, so the first (and only) minibatch of a fresh rollout has ratio 1: no clipping, KL 0."""
    policy = make_policy(instruction)
    model = make_grpo(policy, env, group_size=2, num_groups=1, num_epochs=1, minibatch_size=64, temperature=3.0, seed=0)
    rollout = model.collect_rollouts()
    everything = np.arange(len(rollout.action_tokens))
    with torch.no_grad():
        tempered, tempered_entropy = policy.log_prob(rollout.batch(everything), rollout.action_tokens, 3.0)
        plain, plain_entropy = policy.log_prob(rollout.batch(everything), rollout.action_tokens)
    np.testing.assert_allclose(rollout.behaviour_log_probs, tempered.numpy(), atol=1e-5)
    assert np.abs(rollout.behaviour_log_probs - plain.numpy()).max() > 0.1
    assert tempered_entropy.mean() > plain_entropy.mean()
    rollout.episode_rewards = np.array([1.0, 0.0], dtype=np.float32)
    metrics = model.train(rollout)
    assert metrics["train/n_updates"] == 1 and metrics["train/clip_fraction"] == 0.0 and abs(metrics["train/approx_kl"]) < 1e-6
    assert metrics["train/entropy"] == pytest.approx(tempered_entropy.mean().item(), rel=1e-4)
    with pytest.raises(ValueError, match="temperature 0 must be a finite number > 0"):
        GRPO(make_policy(instruction), env, temperature=0)


def test_pg_coef_zero_leaves_only_the_offline_term(env, instruction):
    """The offline-only ablation: an informative rollout alone moves nothing; with demos, only imitation does."""
    policy = make_policy(instruction)
    model = make_grpo(policy, env, group_size=2, num_groups=1, learning_rate=1e-2, pg_coef=0.0, seed=0)
    rollout = model.collect_rollouts()
    rollout.episode_rewards = np.array([1.0, 0.0], dtype=np.float32)
    before = [p.detach().clone() for p in policy.parameters()]
    metrics = model.train(rollout)
    assert metrics["train/n_updates"] >= 1 and metrics["train/pg_loss"] != 0.0  # computed and logged, weighted by 0
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    with_demos = make_grpo(policy, env, demos=[demo(instruction)], group_size=2, num_groups=1, imitation_batch_size=4,
                      learning_rate=1e-2, pg_coef=0.0, seed=0)  # fmt: skip
    with_demos.train(rollout)
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    with pytest.raises(ValueError, match="pg_coef -1.0 must be a finite number >= 0"):
        GRPO(make_policy(instruction), env, pg_coef=-1.0)


def test_stale_rollouts_get_proximal_ratios_and_truncated_importance_weights(env, instruction):
    model = make_grpo(make_policy(instruction), env, group_size=2, num_groups=1, learning_rate=1e-2, is_clip=1.5, seed=0)
    rollout = model.collect_rollouts()
    rollout.episode_rewards = np.array([1.0, 0.0], dtype=np.float32)
    fresh = model.train(rollout)
    assert fresh["train/off_policy_fraction"] == 0.0 and fresh["train/pg_is_weight_mean"] == 1.0 and model.policy_version == 1
    stale = model.train(rollout)  # the same episodes, now one policy version old
    assert stale["train/off_policy_fraction"] == 1.0
    assert stale["train/pg_is_weight_mean"] != 1.0 and 0.0 < stale["train/pg_is_weight_mean"] <= 1.5


def test_successes_join_the_offline_term_and_persist_in_the_cache(env, instruction, tmp_path):
    model = make_grpo(make_policy(instruction), env, group_size=2, num_groups=1, cache_dir=str(tmp_path / "cache"), seed=0)
    rollout = model.collect_rollouts()
    assert len(model.cache) == 2 and model.demos is None  # every rollout episode is cached; none succeeded
    (group,) = model.cache.groups()  # stored as one group, as the asynchronous workers store theirs
    first = rollout.episodes[0]
    assert (group["num_online"], group["task_id"], group["init_state_id"]) == (2, first.task_id, first.init_state_id)
    assert {episode.group_id for episode in rollout.episodes} == {group["group_id"]}
    success = rollout.episodes[0]
    success.success, success.rewards[-1] = True, 1.0
    model.replay.add([success])
    model._rebuild_offline()
    model.cache.append(success)
    assert len(model.demos) == success.num_steps and model.demos.behaviour_log_probs is not None  # replayed, with its mu
    reopened = make_grpo(make_policy(instruction), env, group_size=2, cache_dir=str(tmp_path / "cache"))
    assert len(reopened.replay.episodes) == 1 and len(reopened.demos) == success.num_steps
    no_replay = make_grpo(make_policy(instruction), env, success_replay_size=0, cache_dir=str(tmp_path / "cache"))
    assert no_replay.demos is None


def test_resume_restores_steps_optimizer_and_rng(env, instruction, tmp_path):
    model = make_grpo(make_policy(instruction), env, demos=[demo(instruction)], group_size=2, num_groups=1, seed=5,
                      start_sampling="learnability")  # fmt: skip
    model.learn(2 * MAX_EPISODE_STEPS)
    outcomes = model.starts.state_dict()
    assert sum(len(history) for history in outcomes["tasks"].values()) == 2  # the group's two failures, recorded
    model.save(tmp_path / "ckpt")
    model.save(tmp_path / "ckpt")  # overwriting a checkpoint goes through a temporary directory
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    resumed = GRPO.load(tmp_path / "ckpt", env=env, demos=[demo(instruction)])
    assert (resumed.num_timesteps, resumed.policy_version) == (2 * MAX_EPISODE_STEPS, 1)
    assert resumed._rng.integers(1 << 30) == model._rng.integers(1 << 30)  # the same draws continue
    assert resumed.config.start_sampling == "learnability" and resumed.starts.state_dict() == outcomes
    assert torch.equal(torch.get_rng_state(), torch.get_rng_state())
    saved_state, loaded_state = model.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(saved_state[k]["exp_avg"], loaded_state[k]["exp_avg"]) for k in saved_state)
    resumed.learn(2 * MAX_EPISODE_STEPS, reset_num_timesteps=False)
    assert resumed.num_timesteps == 4 * MAX_EPISODE_STEPS and resumed.policy_version == 2
    assert latest_checkpoint(tmp_path) == str(tmp_path / "ckpt")
    os.makedirs(tmp_path / ".ckpt.tmp-123")  # an interrupted save is not a checkpoint
    assert latest_checkpoint(tmp_path) == str(tmp_path / "ckpt") and latest_checkpoint(tmp_path / "none") is None


class OpenMiddleDrawerAtStep3(gym.Wrapper):
    """Opens LIBERO-Goal's middle drawer in the simulator before the 4th step: the goal of task 0 is reached."""

    def reset(self, **kwargs):
        self.steps = 0
        return super().reset(**kwargs)

    def step(self, action):
        self.steps += 1
        if self.steps == 4:
            domain = self.env.unwrapped.libero_env.env
            domain.sim.data.set_joint_qpos("wooden_cabinet_1_middle_level", -0.15)
            domain.sim.forward()
        return super().step(action)


def test_hindsight_relabelled_episodes_are_replayed():
    from gym_libero_vla.wrappers.rollout_relabel import RolloutRelabel

    goal_env = gym.make("LiberoGoal-v0", obs_mode="state", max_episode_steps=MAX_EPISODE_STEPS, num_settle_steps=2)
    env = OpenMiddleDrawerAtStep3(RolloutRelabel(goal_env))
    try:
        instructions = [task.instruction for task in goal_env.unwrapped.tasks]
        torch.manual_seed(0)
        policy = CompactVLA(
            CompactVLAConfig(cameras=(), hidden_size=32, num_layers=1, num_heads=2),
            ActionBins.from_statistics({"q01": [-1.0] * 7, "q99": [1.0] * 7}),
            WordTokenizer.from_texts(instructions),
        )
        model = make_grpo(policy, env, group_size=2, num_groups=1, task_ids=(9,), seed=0)  # wine bottle: fails
        rollout = model.collect_rollouts()
        assert rollout.stats["rollout/relabelled_episodes"] == 2  # each failed episode opened the middle drawer
        assert [episode.task_id for episode in model.replay.episodes] == [0, 0]
        assert {episode.observations["instruction"] for episode in model.replay.episodes} == {instructions[0]}
        assert len(model.demos) == 2 * 4  # 4 steps each, in the offline term
        assert model.train(rollout)["rollout/relabelled_episodes"] == 2.0
    finally:
        env.close()


def test_ema_starts_at_the_policy_while_rollouts_sample_the_training_weights(env, instruction, tmp_path):
    """With ema_decay, the average starts at the policy GRPO fine-tunes (no warm-up) and moves once per gradient step;
    rollouts and updates use the training weights, while predict, save and load see the average."""
    decay, at_rollout_start, after_update = 0.5, [], []

    def weights(model):
        return [p.detach().clone() for p in model.policy.parameters()]

    class Record(BaseCallback):
        def _on_rollout_start(self) -> None:
            at_rollout_start.append(weights(self.model))

        def _on_rollout_end(self) -> None:
            after_update.append(weights(self.model))

        def _on_step(self) -> bool:
            return True

    # One gradient step per update: one pass, one minibatch (the all-fail groups leave the demo batch alone).
    model = make_grpo(make_policy(instruction), env, demos=[demo(instruction)], group_size=2, num_groups=1, seed=0,
                      learning_rate=1e-2, ema_decay=decay)  # fmt: skip
    start = weights(model)
    model.learn(2 * 2 * MAX_EPISODE_STEPS, callback=Record())
    assert model.ema.num_updates == 2 and model.ema.holds_averaged
    expected = start
    for trained in after_update:
        expected = [decay * a + (1 - decay) * w for a, w in zip(expected, trained)]
    for parameter, averaged in zip(model.policy.parameters(), expected):
        torch.testing.assert_close(parameter.detach(), averaged)
    # The second rollout sampled the weights the first update trained, not their average with the start.
    assert all(torch.equal(a, b) for a, b in zip(at_rollout_start[1], after_update[0]))
    assert not all(torch.equal(a, b) for a, b in zip(after_update[-1], expected))

    model.save(tmp_path / "ema")
    resumed = GRPO.load(tmp_path / "ema", env=env, demos=[demo(instruction)])
    assert resumed.config.ema_decay == decay and resumed.ema.holds_averaged and resumed.ema.num_updates == 2
    for loaded, averaged in zip(resumed.policy.parameters(), expected):
        torch.testing.assert_close(loaded.detach(), averaged)
    for loaded, trained in zip(resumed.ema.training_weights(), after_update[-1]):
        torch.testing.assert_close(loaded, trained)
    obs, _ = env.reset(options={"task_id": 0, "init_state_id": 0})
    np.testing.assert_array_equal(model.predict(obs, deterministic=True)[0], resumed.predict(obs, deterministic=True)[0])
    resumed.learn(2 * MAX_EPISODE_STEPS, callback=Record(), reset_num_timesteps=False)
    assert all(torch.equal(a, b) for a, b in zip(at_rollout_start[-1], after_update[1]))  # continues the training weights
    assert resumed.ema.num_updates == 3
    with pytest.raises(ValueError, match=r"ema_decay 1.0 must be in \[0, 1\)"):
        GRPO(make_policy(instruction), env, ema_decay=1.0)
