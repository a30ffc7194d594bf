"""TrajectoryCache records real LIBERO episodes into an EpisodeStore that another process can read."""

from __future__ import annotations

import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest

from gym_libero_vla.episode_store import EpisodeStore  # importing the package registers the env ids
from gym_libero_vla.wrappers.trajectory_cache import TrajectoryCache

MAX_STEPS = 20


@pytest.fixture(scope="module")
def short_env():
    env = gym.make("LiberoSpatial-v0", obs_mode="state", max_episode_steps=MAX_STEPS)
    yield env
    env.close()


def rollout(env, task_id, init_state_id, seed, log_probs=False):
    """One episode of random actions; returns what the env returned, for comparison with the store."""
    rng = np.random.default_rng(seed)
    obs, info = env.reset(options={"task_id": task_id, "init_state_id": init_state_id})
    states, rewards, actions = [obs["state"]], [], []
    while True:
        action = rng.uniform(-1, 1, size=7).astype(np.float32)
        if log_probs:
            env.next_log_probs = np.full(7, -float(len(actions)), dtype=np.float32)
        obs, reward, terminated, truncated, info = env.step(action)
        states.append(obs["state"])
        rewards.append(reward)
        actions.append(action)
        if terminated or truncated:
            return np.stack(states), np.array(rewards), np.stack(actions), info


def test_records_finished_episodes_of_the_real_env(short_env, tmp_path):
    env = TrajectoryCache(short_env, tmp_path / "cache", policy_version=2)
    states, rewards, actions, info = rollout(env, task_id=1, init_state_id=3, seed=0, log_probs=True)
    env.policy_version = 3
    rollout(env, task_id=4, init_state_id=0, seed=1)
    store = EpisodeStore(tmp_path / "cache")
    assert len(store) == 2
    first = store.load(env.last_episode_id - 1)
    assert first.num_steps == MAX_STEPS and first.source == "online"
    assert (first.task_id, first.init_state_id, first.policy_version) == (1, 3, 2)
    assert first.env_id == "LiberoSpatial-v0"
    np.testing.assert_array_equal(first.observations["state"], states)
    np.testing.assert_array_equal(first.actions, actions)
    np.testing.assert_array_equal(first.rewards, rewards.astype(np.float32))
    assert first.success == info["is_success"] and first.success == (rewards.sum() > 0)
    task = short_env.unwrapped.tasks[1]
    assert first.observations["instruction"] == task.instruction
    np.testing.assert_array_equal(first.observations["task_id"], np.full(MAX_STEPS + 1, 1))
    np.testing.assert_array_equal(first.log_probs[:, 0], -np.arange(MAX_STEPS, dtype=np.float32))
    second = store.load(env.last_episode_id)
    assert (second.task_id, second.policy_version) == (4, 3)
    assert second.log_probs is None  # no log-probs were given
    assert [e.task_id for e in store.sample(5, task_id=4)] == [4]
    assert [e.task_id for e in store.sample(5, min_policy_version=3)] == [4]


def test_records_a_successful_episode(short_env, tmp_path):
    # A real success without a policy: start task 0 ("... place it on the plate") with the bowl already
    # resting on the plate; LIBERO's goal check fires on the first step.
    env = TrajectoryCache(short_env, tmp_path / "cache")
    short_env.reset(options={"task_id": 0, "init_state_id": 0})
    sim = short_env.unwrapped.libero_env.sim
    bowl = sim.data.get_joint_qpos("akita_black_bowl_1_joint0").copy()
    bowl[:3] = sim.data.get_joint_qpos("plate_1_joint0")[:3] + np.array([0.0, 0.0, 0.02])
    sim.data.set_joint_qpos("akita_black_bowl_1_joint0", bowl)
    sim.forward()
    init_state = short_env.unwrapped.libero_env.get_sim_state().copy()
    env.reset(options={"task_id": 0, "init_state": init_state})
    _, reward, terminated, _, info = env.step(np.zeros(7, dtype=np.float32))
    assert terminated and reward == 1.0 and info["is_success"]
    episode = EpisodeStore(tmp_path / "cache").load(env.last_episode_id)
    assert episode.success and episode.num_steps == 1 and episode.init_state_id == -1
    np.testing.assert_array_equal(episode.rewards, [1.0])
    assert [e.episode_id for e in EpisodeStore(tmp_path / "cache").sample(3, success=True)] == [env.last_episode_id]


def test_abandoned_episode_is_not_recorded_and_keys_can_be_chosen(short_env, tmp_path):
    store = EpisodeStore(tmp_path / "cache", max_episodes=10)
    env = TrajectoryCache(short_env, store, source="relabelled", observation_keys=("instruction", "state"))
    env.reset(options={"task_id": 0, "init_state_id": 0})
    for _ in range(3):
        env.step(np.zeros(7, dtype=np.float32))
    env.reset(options={"task_id": 0, "init_state_id": 1})  # abandons the first episode
    assert len(store) == 0
    for _ in range(MAX_STEPS):
        _, _, terminated, truncated, _ = env.step(np.zeros(7, dtype=np.float32))
    assert truncated and not terminated
    (episode,) = store.sample(1)
    assert set(episode.observations) == {"instruction", "state"}
    assert episode.source == "relabelled" and episode.init_state_id == 1 and not episode.success
    assert episode.rewards.shape == (MAX_STEPS,) and episode.rewards.sum() == 0.0


def test_another_process_reads_what_the_wrapper_wrote(short_env, tmp_path):
    env = TrajectoryCache(short_env, tmp_path / "cache")
    rollout(env, task_id=2, init_state_id=5, seed=3)
    code = (
        "import sys; from gym_libero_vla.episode_store import EpisodeStore; "
        "e = EpisodeStore(sys.argv[1]).sample(1)[0]; print(e.task_id, e.init_state_id, e.num_steps)"
    )
    output = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cache")], capture_output=True, text=True, check=True)
    assert output.stdout.split() == ["2", "5", str(MAX_STEPS)]


def test_bad_arguments_name_the_valid_choices(short_env, tmp_path):
    with pytest.raises(ValueError, match=r"unknown episode source 'demo': valid \('online', 'offline', 'relabelled'\)"):
        TrajectoryCache(short_env, tmp_path, source="demo")
    with pytest.raises(
        ValueError, match=r"unknown observation key\(s\) \['agentview'\]: valid \['instruction', 'state', 'task_id'\]"
    ):
        TrajectoryCache(short_env, tmp_path, observation_keys=("agentview",))
    assert not (tmp_path / "store.json").exists()  # __init__ does no I/O


def test_chunked_episodes_keep_their_chunks_and_what_ran(chunked_env, tmp_path):
    env = TrajectoryCache(chunked_env, EpisodeStore(tmp_path / "store"))
    rng = np.random.default_rng(0)
    env.reset(options={"task_id": 0, "init_state_id": 0})
    chunks = []
    while True:
        chunks.append(rng.uniform(-1, 1, (2, 7)).astype(np.float32))
        env.next_log_probs = np.zeros(14, np.float32)
        *_, terminated, truncated, info = env.step(chunks[-1])
        if terminated or truncated:
            break
    (record,) = env.store.records()
    assert record["num_steps"] == 5  # env steps: chunks of 2, 2 and the last cut to 1 by the step limit
    episode = env.store.load(record["episode_id"])
    np.testing.assert_array_equal(episode.actions, np.stack(chunks))
    assert episode.executed.tolist() == [2, 2, 1] and episode.log_probs.shape == (3, 14)
    env.close()
