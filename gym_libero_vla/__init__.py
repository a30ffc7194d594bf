"""gym-libero-vla: LIBERO suites as Gymnasium envs, and RL fine-tuning of VLA policies on them.

Importing the package registers one env id per LIBERO suite (see :data:`gym_libero_vla.suites.SUITES`)::

    import gymnasium as gym
    import gym_libero_vla  # noqa: F401

    env = gym.make("LiberoSpatial-v0", obs_mode="state")
    envs = gym.make_vec("LiberoSpatial-v0", num_envs=2)  # worker processes, see gym_libero_vla/vector.py

Registration uses string entry points, so nothing heavy (LIBERO, robosuite, MuJoCo) is imported here.
Importing warns once when the installed MuJoCo is not the pinned one (:mod:`gym_libero_vla.fidelity`).
"""

from __future__ import annotations

import gymnasium as gym

from gym_libero_vla.fidelity import check_mujoco_version
from gym_libero_vla.suites import SUITES, resolve_suite

__version__ = "0.1.0"
__all__ = ["SUITES", "make", "register_envs", "resolve_suite", "__version__"]


def register_envs() -> None:
    for spec in SUITES.values():
        if spec.env_id not in gym.registry:
            gym.register(
                id=spec.env_id,
                entry_point="gym_libero_vla.libero_env:LiberoEnv",
                vector_entry_point="gym_libero_vla.vector:make_vector_env",
                max_episode_steps=spec.max_episode_steps,
                kwargs={"suite": spec.libero_name},
            )


def make(env_id: str, **kwargs) -> gym.Env:
    """``gym.make`` for our ids, with a ``ValueError`` that lists the valid ids for an unknown one."""
    if env_id not in SUITES:
        raise ValueError(f"unknown env id {env_id!r}: valid {sorted(SUITES)}")
    return gym.make(env_id, **kwargs)


register_envs()
check_mujoco_version(strict=False)  # a warning here; making an env is where strict_mujoco makes it an error
