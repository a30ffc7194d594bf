"""Chunked env steps (``action_chunk=k``): k actions per step, early stop on success, the step limit in env steps,
cameras rendered once per chunk. Real simulator."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from gym_libero_vla.demos.generate import rollout_expert
from gym_libero_vla.demos.scripted_expert import ScriptedExpert
from gym_libero_vla.rollouts import Start

SEED = 3


@pytest.fixture(scope="module")
def expert_actions():
    """A successful scripted-expert episode of LIBERO-Spatial task 1, init state 4, one action per step."""
    env = gym.make("LiberoSpatial-v0", obs_mode="state", privileged_state=True, task_ids=[1])
    try:
        episode = rollout_expert(env, ScriptedExpert(env), Start(1, 4, SEED))
    finally:
        env.close()
    assert episode["success"]
    return episode["arrays"]["actions"].astype(np.float32)


def test_a_chunked_replay_stops_where_the_task_succeeds(expert_actions):
    steps = len(expert_actions)
    chunk = 8 if steps % 8 else 7  # a chunk size that leaves the success in the middle of the last chunk
    env = gym.make("LiberoSpatial-v0", obs_mode="state", task_ids=[1], action_chunk=chunk)
    try:
        assert env.action_space.shape == (chunk, 7)
        env.reset(seed=SEED, options={"task_id": 1, "init_state_id": 4})
        padded = np.concatenate([expert_actions, np.zeros((chunk, 7), np.float32)])
        executed, calls = [], 0
        while True:
            _, reward, terminated, truncated, info = env.step(padded[calls * chunk : (calls + 1) * chunk])
            executed.append(info["executed_actions"])
            calls += 1
            if terminated or truncated:
                break
    finally:
        env.close()
    assert terminated and not truncated and reward == 1.0 and info["is_success"]
    assert sum(executed) == steps and calls == -(-steps // chunk)
    assert executed[:-1] == [chunk] * (calls - 1) and executed[-1] == steps - chunk * (calls - 1) < chunk


def test_the_step_limit_counts_actions_and_cuts_a_chunk(tmp_path):
    env = gym.make("LiberoSpatial-v0", obs_mode="state", task_ids=[0], action_chunk=8, max_env_steps=20)
    default = gym.make("LiberoSpatial-v0", obs_mode="state", task_ids=[0], action_chunk=8)
    try:
        assert default.unwrapped.max_env_steps == 220  # the suite's limit, in env steps
        env.reset(seed=0)
        executed = []
        for _ in range(10):
            _, _, terminated, truncated, info = env.step(np.zeros((8, 7), np.float32))
            executed.append(info["executed_actions"])
            if terminated or truncated:
                break
        assert truncated and not terminated and executed == [8, 8, 4]
        with pytest.raises(ValueError, match=r"action has shape \(7,\): expected \(8, 7\) a chunk of 8"):
            env.step(np.zeros(7, np.float32))
    finally:
        env.close()
        default.close()
    with pytest.raises(ValueError, match="action_chunk 0 must be an int >= 1"):
        gym.make("LiberoSpatial-v0", action_chunk=0)
    with pytest.raises(ValueError, match="max_env_steps 0 must be an int >= 1 or None"):
        gym.make("LiberoSpatial-v0", max_env_steps=0)


def test_cameras_render_once_per_chunk_and_gripper_conventions_apply_to_each_action():
    chunked = gym.make("LiberoSpatial-v0", obs_mode="rgb", cameras=("agentview",), image_size=32, task_ids=[0],
                       action_chunk=4, gripper_convention="openvla")  # fmt: skip
    single = gym.make("LiberoSpatial-v0", obs_mode="rgb", cameras=("agentview",), image_size=32, task_ids=[0])
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_env(chunked.unwrapped, skip_render_check=True)
        assert [str(w.message) for w in caught if "gymnasium" in str(w.filename) or "gym_libero_vla" in str(w.filename)] == []
        openvla = np.zeros((4, 7), np.float32)
        openvla[:, 2], openvla[:, 6] = 0.5, [1, 0, 0, 1]  # OpenVLA: 1 open, 0 close
        libero = openvla.copy()
        libero[:, 6] = [-1, 1, 1, -1]  # LIBERO: -1 open, +1 close
        chunked.reset(seed=2, options={"task_id": 0, "init_state_id": 1})
        single.reset(seed=2, options={"task_id": 0, "init_state_id": 1})
        before = chunked.unwrapped.frames_rendered
        obs, *_ = chunked.step(openvla)
        assert chunked.unwrapped.frames_rendered - before == 1  # one camera, one frame for four actions
        for action in libero:
            expected, *_ = single.step(action)
        np.testing.assert_array_equal(obs["agentview"], expected["agentview"])  # same actions, same scene
    finally:
        chunked.close()
        single.close()


@pytest.mark.parametrize("mode", [{"vectorization_mode": "sync"}, {}])  # {}: our async vector env (forkserver workers)
def test_vector_envs_step_chunks(mode):
    envs = gym.make_vec("LiberoSpatial-v0", num_envs=2, obs_mode="state", task_ids=[0], action_chunk=5, max_env_steps=7,
                        **mode)  # fmt: skip
    try:
        assert envs.single_action_space.shape == (5, 7) and envs.action_space.shape == (2, 5, 7)
        envs.reset(seed=0)
        _, _, _, truncated, info = envs.step(np.zeros((2, 5, 7), np.float32))
        assert info["executed_actions"].tolist() == [5, 5] and not truncated.any()
        _, _, _, truncated, info = envs.step(np.zeros((2, 5, 7), np.float32))
        assert info["executed_actions"].tolist() == [2, 2] and truncated.all()
    finally:
        envs.close()
