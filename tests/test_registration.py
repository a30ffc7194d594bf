import gymnasium as gym
import numpy as np
import pytest

import gym_libero_vla
from gym_libero_vla.suites import SUITES, resolve_init_state_ids, resolve_suite, resolve_task_ids

EXPECTED_LIMITS = {
    "LiberoSpatial-v0": 220,
    "LiberoObject-v0": 280,
    "LiberoGoal-v0": 300,
    "Libero10-v0": 520,
    "Libero90-v0": 400,
}


@pytest.mark.parametrize("env_id", sorted(EXPECTED_LIMITS))
def test_every_suite_is_registered_with_its_step_limit(env_id):
    spec = gym.spec(env_id)
    assert spec.max_episode_steps == EXPECTED_LIMITS[env_id]
    assert spec.entry_point == "gym_libero_vla.libero_env:LiberoEnv"
    assert spec.kwargs["suite"] == SUITES[env_id].libero_name


def test_make_with_unknown_id_names_the_valid_ids():
    with pytest.raises(ValueError, match="LiberoSpatial-v0"):
        gym_libero_vla.make("LiberoSpatal-v0")


def test_gym_make_with_unknown_id_suggests_the_close_name():
    with pytest.raises(gym.error.NameNotFound, match="LiberoSpatial"):
        gym.make("LiberoSpatal-v0")


@pytest.mark.parametrize("name", ["LiberoGoal-v0", "libero_goal", "goal"])
def test_suite_names_resolve(name):
    assert resolve_suite(name).libero_name == "libero_goal"


def test_unknown_suite_lists_choices():
    with pytest.raises(ValueError, match="libero_spatial"):
        resolve_suite("libero_spatiall")


def test_task_ids_resolve_in_one_place():
    """Every CLI, the env and evaluation check task ids with resolve_task_ids: None is every task, others are checked."""
    assert resolve_task_ids("spatial") == tuple(range(10))
    assert resolve_task_ids("LiberoObject-v0", [np.int64(3), 1]) == (3, 1)
    for bad, named in (([12], "12"), ([0, -1], "-1"), ((), r"\(\)")):
        with pytest.raises(ValueError, match=f"unknown task_id {named} for LiberoSpatial-v0: valid 0..9"):
            resolve_task_ids("spatial", bad)


def test_init_state_ids_resolve_in_one_place():
    """The env, evaluation and the CLIs check stored init state ids with resolve_init_state_ids, against every task."""
    assert resolve_init_state_ids("spatial", None, range(20, 50)) == tuple(range(20, 50))
    assert resolve_init_state_ids("LiberoObject-v0", [3], [np.int64(49), 0]) == (49, 0)
    for bad, named in (([50], "50"), ([0, -1], "-1"), ([1.0], "1.0"), ([True], "True")):
        with pytest.raises(ValueError, match=f"unknown init_state_id {named} for task 0 of LiberoSpatial-v0: valid 0..49"):
            resolve_init_state_ids("spatial", None, bad)
    with pytest.raises(ValueError, match="init_state_ids is empty: give at least one init state of LiberoGoal-v0"):
        resolve_init_state_ids("goal", [0], ())
    with pytest.raises(ValueError, match="unknown task_id 10"):
        resolve_init_state_ids("spatial", [10], [0])


def test_registration_imports_nothing_heavy():
    import subprocess
    import sys

    code = "import sys, gym_libero_vla; print(any(m.startswith(('libero', 'robosuite', 'mujoco')) for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
