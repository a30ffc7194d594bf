"""Shared fixtures. Tests run the real LIBERO simulator; state mode keeps them fast."""

from __future__ import annotations

import gymnasium as gym
import pytest

import gym_libero_vla  # noqa: F401  (registers the env ids)
from gym_libero_vla.policies import torch_threads


@pytest.fixture(scope="module")
def spatial_env():
    """One state-mode LiberoSpatial env shared by a module (building a simulator takes seconds)."""
    env = gym.make("LiberoSpatial-v0", obs_mode="state", max_cached_tasks=4)
    yield env
    env.close()


@pytest.fixture(scope="module")
def chunked_env():
    """A state-mode LiberoSpatial env taking chunks of 2 actions, 5 env steps an episode (chunks 2, 2, 1)."""
    env = gym.make("LiberoSpatial-v0", obs_mode="state", task_ids=(0,), action_chunk=2, max_env_steps=5)
    yield env
    env.close()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run far faster on one thread than on two contended ones (2 shared cores here)."""
    with torch_threads(1):
        yield
