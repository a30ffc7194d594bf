"""OpenVLA's gripper convention (OpenVLAGripper and gym.make(..., gripper_convention="openvla")) on the real
LIBERO simulator: OpenVLA's 0 closes the Panda gripper, 1 opens it, as in OpenVLA's LIBERO evaluation."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from gym_libero_vla.wrappers.openvla_gripper import OpenVLAGripper, openvla_gripper_to_libero

RESET = {"seed": 0, "options": {"task_id": 0, "init_state_id": 0}}


def finger_gap(obs) -> float:
    """Distance between the two finger joints (the last two entries of the proprio state)."""
    return float(obs["state"][6] - obs["state"][7])


def test_conversion_matches_openvla_normalize_then_invert():
    actions = np.zeros((5, 7))
    actions[:, -1] = [0.0, 1.0, 0.2, 0.9, 0.5]
    converted = openvla_gripper_to_libero(actions)
    np.testing.assert_array_equal(converted[:, -1], [1.0, -1.0, 1.0, -1.0, 0.0])  # 0 = close -> +1, 1 = open -> -1
    np.testing.assert_array_equal(converted[:, :6], actions[:, :6])
    assert actions[0, -1] == 0.0, "the input must not be modified"
    np.testing.assert_allclose(openvla_gripper_to_libero(actions, binarize=False)[:, -1], [1.0, -1.0, 0.6, -0.8, 0.0])


def test_wrapper_closes_on_zero_and_opens_on_one(spatial_env):
    env = OpenVLAGripper(spatial_env)
    obs, _ = env.reset(**RESET)
    open_gap = finger_gap(obs)
    for _ in range(15):
        obs, *_ = env.step(np.array([0, 0, 0, 0, 0, 0, 0.0]))  # OpenVLA: 0 = close
    closed_gap = finger_gap(obs)
    assert closed_gap < open_gap - 0.02, (open_gap, closed_gap)
    for _ in range(15):
        obs, *_ = env.step(np.array([0, 0, 0, 0, 0, 0, 1.0]))  # OpenVLA: 1 = open
    assert finger_gap(obs) > closed_gap + 0.02

    # reverse_action maps LIBERO's gripper back: action(reverse_action(a)) == a for LIBERO's -1 / +1.
    libero_actions = np.array([[0.1, 0, 0, 0, 0, 0, -1.0], [0, 0.2, 0, 0, 0, 0, 1.0]])
    for libero_action in libero_actions:
        np.testing.assert_allclose(env.action(env.reverse_action(libero_action)), libero_action)
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        env.step(np.zeros(6))


def test_env_option_equals_the_wrapper(spatial_env):
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, size=(10, 7)).astype(np.float32)
    actions[:, -1] = rng.uniform(0, 1, size=10)
    wrapped = OpenVLAGripper(spatial_env)
    wrapped.reset(**RESET)
    through_wrapper = [wrapped.step(action)[0] for action in actions]

    env = gym.make("LiberoSpatial-v0", obs_mode="state", task_ids=(0,), gripper_convention="openvla")
    try:
        env.reset(**RESET)
        through_option = [env.step(action)[0] for action in actions]
    finally:
        env.close()
    for first, second in zip(through_wrapper, through_option):
        np.testing.assert_allclose(first["state"], second["state"], atol=1e-6)


def test_unknown_convention_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown gripper_convention 'openVLA': valid \['libero', 'openvla'\]"):
        gym.make("LiberoSpatial-v0", gripper_convention="openVLA")
    with pytest.raises(ValueError, match=r"needs a Box action space of shape \(7,\) or, on a chunked env, \(k, 7\)"):
        OpenVLAGripper(gym.make("CartPole-v1"))


def test_every_action_of_a_chunk_is_converted(chunked_env):
    env = OpenVLAGripper(chunked_env)
    chunk = np.zeros((2, 7))
    chunk[:, -1] = [1.0, 0.0]  # OpenVLA: open, then close
    np.testing.assert_array_equal(env.action(chunk)[:, -1], [-1.0, 1.0])
    np.testing.assert_allclose(env.action(env.reverse_action(env.action(chunk))), env.action(chunk))
    env.reset(**RESET)
    *_, info = env.step(chunk)
    assert info["executed_actions"] == 2
    with pytest.raises(ValueError, match=r"shape \(7,\), expected \(2, 7\)"):
        env.step(np.zeros(7))
