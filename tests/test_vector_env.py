"""gym.make_vec over the real simulator: worker processes, task spreading, Gymnasium's autoreset."""

from __future__ import annotations

import os

import gymnasium as gym
import numpy as np
import pytest

from gym_libero_vla.suites import suite_tasks


@pytest.fixture(scope="module")
def vector_env():
    envs = gym.make_vec("LiberoSpatial-v0", num_envs=2, vectorization_mode="async", max_episode_steps=4)
    yield envs
    envs.close()


def test_async_vector_env_runs_one_simulator_per_process(vector_env):
    vector_env.reset(seed=0)
    worker_pids = vector_env.call("worker_pid")
    assert len(set(worker_pids)) == 2 and os.getpid() not in worker_pids


def test_consecutive_seeds_spread_tasks_over_workers(vector_env):
    obs, info = vector_env.reset(seed=4)
    assert obs["task_id"].tolist() == [4, 5]
    assert list(obs["instruction"]) == [task.instruction for task in suite_tasks("libero_spatial")[4:6]]
    assert obs["state"].shape == (2, 8)


def test_autoreset_after_truncation(vector_env):
    vector_env.reset(seed=0)
    truncations = []
    for _ in range(5):
        obs, reward, terminated, truncated, info = vector_env.step(np.zeros((2, 7), dtype=np.float32))
        truncations.append(truncated.tolist())
        assert reward.tolist() == [0.0, 0.0] and not terminated.any()
    # Step 4 hits the limit; Gymnasium's next-step autoreset then returns a fresh first observation.
    assert truncations[3] == [True, True] and truncations[4] == [False, False]
    assert info["init_state_id"].shape == (2,)


def test_instructions_follow_the_workers_after_every_step(vector_env):
    """Gymnasium decodes Text shared memory once; our InstructionText keeps it live (see instruction_space.py)."""
    tasks = suite_tasks("libero_spatial")
    for seed in (0, 7):
        obs, _ = vector_env.reset(seed=seed)
        expected = [tasks[(seed + i) % len(tasks)].instruction for i in range(2)]
        assert list(obs["instruction"]) == expected
        obs, *_ = vector_env.step(np.zeros((2, 7), dtype=np.float32))
        assert list(obs["instruction"]) == expected


def test_spawned_workers_agree_with_the_parent():
    envs = gym.make_vec(
        "LiberoSpatial-v0", num_envs=2, vectorization_mode="async", vector_kwargs={"context": "spawn"}, task_ids=[3]
    )
    try:
        obs, info = envs.reset(seed=0)
        assert list(obs["instruction"]) == [suite_tasks("libero_spatial")[3].instruction] * 2
        assert info["init_state_id"].tolist() == [0, 1]
    finally:
        envs.close()


@pytest.mark.filterwarnings("ignore:.*ERROR:UserWarning")  # Gymnasium reports the worker's (expected) error
def test_default_make_vec_renders_safely_after_the_parent_rendered():
    parent = gym.make("LiberoSpatial-v0", obs_mode="rgb", image_size=32, task_ids=[0])
    parent.reset(seed=0)  # this process now holds an OpenGL context
    envs = gym.make_vec("LiberoSpatial-v0", num_envs=1, obs_mode="rgb", image_size=32, task_ids=[0])
    try:
        obs, _ = envs.reset(seed=0)
        assert obs["agentview"].shape == (1, 32, 32, 3) and obs["agentview"].std() > 5
        # A forked worker would inherit the GL display and hang; ours refuses with an explanation instead.
        forked = gym.make_vec(
            "LiberoSpatial-v0", num_envs=1, vectorization_mode="async", obs_mode="rgb", image_size=32, task_ids=[0]
        )
        with pytest.raises(RuntimeError, match="forked from one that had already used OpenGL"):
            forked.reset(seed=0)
        forked.close(terminate=True)
    finally:
        envs.close()
        parent.close()


def test_bad_vector_arguments():
    from gym_libero_vla.vector import make_vector_env

    with pytest.raises(ValueError, match="unknown context 'threads': valid"):
        make_vector_env(2, context="threads")
    with pytest.raises(ValueError, match="num_envs 0"):
        make_vector_env(0)


def test_env_wrappers_wrap_every_worker_env():
    """``env_wrappers=`` is our entry point's ``wrappers=`` (Gymnasium refuses that one for a vector entry point)."""
    from wrappers.openvla_gripper import OpenVLAGripper

    envs = gym.make_vec("LiberoSpatial-v0", num_envs=2, env_wrappers=[OpenVLAGripper], task_ids=[0], max_episode_steps=3)
    try:
        envs.reset(seed=0)
        assert envs.call("class_name") == ("OpenVLAGripper", "OpenVLAGripper")  # wrapped in the workers
        assert len(set(envs.call("worker_pid"))) == 2
    finally:
        envs.close()
    with pytest.raises(TypeError, match="env_wrappers must be callables"):
        gym.make_vec("LiberoSpatial-v0", num_envs=1, env_wrappers=["OpenVLAGripper"])
