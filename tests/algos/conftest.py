"""Fixtures the learner tests share: a state-mode env of LIBERO-Spatial task 0 whose episodes end after the test
module's ``MAX_EPISODE_STEPS`` steps (a random tiny policy never succeeds that early), and that task's instruction."""

from __future__ import annotations

import gymnasium as gym
import pytest


@pytest.fixture(scope="module")
def env(request):
    env = gym.make(
        "LiberoSpatial-v0", obs_mode="state", task_ids=(0,), max_episode_steps=request.module.MAX_EPISODE_STEPS,
        num_settle_steps=2,
    )  # fmt: skip
    yield env
    env.close()


@pytest.fixture(scope="module")
def instruction(env) -> str:
    return env.unwrapped.tasks[0].instruction
