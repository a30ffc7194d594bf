"""Shared fixtures. Tests run the real LIBERO simulator; state mode keeps them fast."""

from __future__ import annotations

import gymnasium as gym
import pytest

import gym_libero_vla  # noqa: F401  (registers the env ids)


@pytest.fixture(scope="module")
def spatial_env():
    """One state-mode LiberoSpatial env shared by a module (building a simulator takes seconds)."""
    env = gym.make("LiberoSpatial-v0", obs_mode="state", max_cached_tasks=4)
    yield env
    env.close()
