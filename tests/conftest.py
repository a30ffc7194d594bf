"""Shared fixtures. Tests run the real LIBERO simulator; state mode keeps them fast."""

from __future__ import annotations

import os
import shutil

import gymnasium as gym
import pytest
import torch

import gym_libero_vla  # noqa: F401  (registers the env ids)
from gym_libero_vla.demos.generate import GenerateArgs, generate
from gym_libero_vla.policies import torch_threads


def pytest_configure(config):
    """Under pytest-xdist (``scripts/test.sh`` runs two workers) each worker is pinned to a core of its own, with every
    process it starts (vector envs' workers, CLI runs): two workers whose tests start simulator processes share the
    cores instead of oversubscribing them, and "every core" (SFT's threads, ``every_core``) is the worker's one."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ...
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker and workers > 1 and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[int(worker.removeprefix("gw")) % len(cores)]})
        # Torch sized its thread pool for every core at import: two threads on one core wait on each other (a module
        # fixture's 300 SFT steps took 282 s instead of 15), so module and session fixtures get one as tests do.
        torch.set_num_threads(1)


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


@pytest.fixture(scope="session")
def expert_demos_file(tmp_path_factory) -> str:
    """Two scripted-expert demos of LIBERO-Spatial task 0 (init states 0 and 1), state mode with the object poses,
    generated once a session (~7 s): what the tiny training runs train on. Tests use a copy (``expert_demos``)."""
    path = tmp_path_factory.mktemp("expert_demos") / "demos.hdf5"
    generate(GenerateArgs(suite="spatial", out=str(path), task_ids=(0,), episodes_per_task=2, init_state_end=2,
                          object_state=True, progress=False))  # fmt: skip
    return str(path)


@pytest.fixture
def expert_demos(expert_demos_file, tmp_path) -> str:
    """A copy of ``expert_demos_file`` at ``tmp_path/demos.hdf5``, where the tiny runs look for their demos: a demo
    file that exists is used as it is (the tests that check generation let their run make its own)."""
    path = tmp_path / "demos.hdf5"
    shutil.copyfile(expert_demos_file, path)
    return str(path)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run far faster on one thread than on two contended ones (2 shared cores here)."""
    with torch_threads(1):
        yield
