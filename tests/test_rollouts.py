"""gym_libero_vla.rollouts: the one episode loop, on a single env, a list of envs and a vector env (real simulator)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from gym_libero_vla.policies import CompactVLA, CompactVLAConfig, WordTokenizer
from gym_libero_vla.rollouts import Start, draw_start, held_in_init_states, run_episodes, run_group
from gym_libero_vla.wrappers.action_tokenizer import ActionBins

INSTRUCTION = "pick up the black bowl between the plate and the ramekin and place it on the plate"


def make_policy(seed: int = 0) -> CompactVLA:
    torch.manual_seed(seed)
    bins = ActionBins.from_statistics({"q01": [-1.0] * 7, "q99": [1.0] * 7})
    config = CompactVLAConfig(cameras=(), hidden_size=16, num_layers=1, num_heads=2)
    return CompactVLA(config, bins, WordTokenizer.from_texts([INSTRUCTION]))


def make(max_episode_steps: int):
    kwargs = dict(obs_mode="state", task_ids=tuple(range(10)), max_cached_tasks=1, num_settle_steps=2)
    return lambda: gym.make("LiberoSpatial-v0", max_episode_steps=max_episode_steps, **kwargs)


def test_a_sub_env_that_finishes_first_waits_on_its_own_task():
    """With Gymnasium's autoreset, a sub-env whose episode ended would start a random task on the next step (a
    simulator build, and the eviction of a cached one) while the group's other episodes run on."""
    vector_env = gym.vector.SyncVectorEnv([make(4), make(8)])  # sub-env 0 finishes 4 steps before sub-env 1
    try:
        vector_env.reset(seed=0)
        rollouts = sorted(run_episodes(make_policy(), vector_env, [Start(0, 3)] * 2), key=lambda r: r.index)
        episodes = [rollout.episode for rollout in rollouts]
        assert [episode.num_steps for episode in episodes] == [4, 8]
        assert [(episode.task_id, episode.init_state_id) for episode in episodes] == [(0, 3), (0, 3)]
        assert all(episode.log_probs.shape == (episode.num_steps, 7) for episode in episodes)
        for sub_env in vector_env.envs:  # still (or again) on the group's start, not on a random task
            assert sub_env.unwrapped.current_task.task_id == 0 and sub_env.unwrapped._init_state_id == 3
            assert list(sub_env.unwrapped._simulators) == [0]  # its one cached simulator was kept, not evicted
    finally:
        vector_env.close()


def test_a_freed_sub_env_takes_the_next_start_at_once():
    """Three episodes on two sub-envs: the one that finishes first runs the third, so the batch takes 8 steps of the
    vector env (4 + 4 on sub-env 0 beside 8 on sub-env 1), not 4 + 8 waiting for stragglers."""
    vector_env = gym.vector.SyncVectorEnv([make(4), make(8)])
    batched_steps = []
    try:
        starts = [Start(0, 3), Start(0, 4), Start(0, 5)]
        rollouts = list(run_episodes(make_policy(), vector_env, starts, on_step=lambda n: batched_steps.append(n) or True))
    finally:
        vector_env.close()
    assert sorted(rollout.index for rollout in rollouts) == [0, 1, 2]
    by_start = {rollout.episode.init_state_id: rollout.episode.num_steps for rollout in rollouts}
    assert by_start == {3: 4, 4: 8, 5: 4}
    assert len(batched_steps) == 8 and sum(batched_steps) == 16  # every step of the three episodes counted once


def test_on_step_false_stops_and_drops_unfinished_episodes():
    env = make(6)()
    calls = []
    try:
        rollouts = list(
            run_episodes(make_policy(), env, [Start(0, 0)] * 3, on_step=lambda n: calls.append(n) or len(calls) < 9)
        )
    finally:
        env.close()
    assert [rollout.episode.num_steps for rollout in rollouts] == [6]  # the second episode was cut at its third step
    assert calls == [1] * 9


def test_a_group_is_tagged_whole_or_dropped():
    env = make(4)()
    try:
        episodes, relabelled = run_group(make_policy(), env, Start(1, 2, seed=5), 3, policy_version=7)
        again, _ = run_group(make_policy(), env, Start(1, 2, seed=5), 3)
        stopped = run_group(make_policy(), env, Start(1, 2), 3, on_step=lambda n: False)
    finally:
        env.close()
    assert len(episodes) == 3 and relabelled == []  # no RolloutRelabel wrapper: nothing relabelled
    assert {(e.task_id, e.init_state_id, e.policy_version, e.num_steps) for e in episodes} == {(1, 2, 7, 4)}
    assert len({e.group_id for e in episodes}) == 1 and episodes[0].group_id is not None
    assert again[0].group_id != episodes[0].group_id  # a new id for every group
    assert stopped is None  # stopped on its first step: no half group


def test_sampled_episodes_record_what_the_policy_read_and_did():
    env = make(5)()
    policy = make_policy()
    try:
        torch.manual_seed(0)
        (rollout,) = run_episodes(policy, env, [Start(2, 7, seed=11)], temperature=0.5, policy_version=3)
        (greedy,) = run_episodes(policy, env, [Start(2, 7, seed=11)], deterministic=True, record_observations=False)
    finally:
        env.close()
    episode = rollout.episode
    assert (episode.task_id, episode.init_state_id, episode.seed, episode.policy_version) == (2, 7, 11, 3)
    assert episode.source == "online" and episode.env_id == "LiberoSpatial-v0" and not episode.success
    assert set(episode.observations) == {"instruction", "state"} and episode.observations["state"].shape == (5, 8)
    # the recorded log-probs are those of the tempered distribution the actions were sampled from
    tokens = policy.action_bins.encode(episode.actions)
    obs = {"instruction": [episode.instruction] * 5, "state": episode.observations["state"]}
    np.testing.assert_allclose(policy.log_prob(obs, tokens, temperature=0.5)[0].detach().numpy(), episode.log_probs, atol=1e-5)
    assert set(greedy.episode.observations) == {"instruction"} and greedy.seconds > 0


def test_draw_start_is_seeded_and_keeps_to_the_given_init_states():
    def draws(seed, init_state_ids):
        rng = np.random.default_rng(seed)
        return [draw_start(rng, (1, 4), init_state_ids, lambda task_id: 50) for _ in range(20)]

    assert draws(0, None) == draws(0, None) != draws(1, None)
    assert {start.task_id for start in draws(0, None)} == {1, 4}
    assert {start.init_state_id for start in draws(0, (2, 9))} == {2, 9}
    assert max(start.init_state_id for start in draws(0, None)) < 50


def test_held_in_init_states_are_the_demos_or_none_for_new_layouts():
    assert held_in_init_states("suite", 20) == tuple(range(20))
    assert held_in_init_states("sampled", 20) is None
    with pytest.raises(ValueError, match=r"unknown init_states 'stored': valid \('suite', 'sampled'\)"):
        held_in_init_states("stored", 20)


def test_render_needs_single_envs():
    vector_env = gym.vector.SyncVectorEnv([make(4)])
    try:
        with pytest.raises(ValueError, match="render=True needs single envs"):
            next(run_episodes(make_policy(), vector_env, [Start(0, 0)], render=True))
    finally:
        vector_env.close()


def test_chunked_episodes_count_env_steps_and_videos_get_a_frame_per_action():
    torch.manual_seed(0)
    bins = ActionBins.from_statistics({"q01": [-1.0] * 7, "q99": [1.0] * 7})
    config = CompactVLAConfig(cameras=(), hidden_size=16, num_layers=1, num_heads=2, chunk_size=3)
    policy = CompactVLA(config, bins, WordTokenizer.from_texts([INSTRUCTION]))
    env = gym.make("LiberoSpatial-v0", obs_mode="state", task_ids=(0,), num_settle_steps=2, action_chunk=3,
                   max_env_steps=7, render_mode="rgb_array", render_size=32)  # fmt: skip
    counted = []
    try:
        (rollout,) = run_episodes(policy, env, [Start(0, 0)], render=True, on_step=lambda n: counted.append(n) or True)
        assert counted == [3, 3, 1]  # env steps: the step limit cuts the third chunk after one action
        episode = rollout.episode
        assert episode.actions.shape == (3, 3, 7) and episode.executed.tolist() == [3, 3, 1]
        assert episode.num_env_steps == 7 and episode.log_probs.shape == (3, 21)
        assert len(rollout.frames) == 1 + 7 and rollout.frames[0].shape == (32, 32, 3)  # reset, then every action
        assert env.unwrapped.action_hooks == []  # the video hooks are gone with the episodes
    finally:
        env.close()
    single = make(4)()
    try:
        with pytest.raises(ValueError, match="the env executes 1 action.*make the env with action_chunk=3"):
            next(run_episodes(policy, single, [Start(0, 0)]))
    finally:
        single.close()
