"""The vector env behind ``gym.make_vec("Libero...-v0", num_envs=N)``: N simulator processes, started safely.

Gymnasium's ``vectorization_mode="async"`` forks its workers by default. A process that has already
rendered (an rgb env, raw LIBERO, a video recorder) holds an OpenGL display whose driver threads do not
survive ``fork``; a forked worker that then renders hangs forever inside MuJoCo. This entry point
(used by ``make_vec`` when no mode is given, or with ``vectorization_mode="vector_entry_point"``)
starts workers from a clean ``forkserver`` process instead, so each one creates its own simulator and
GL context, and Mesa's software rasterizer threads (``LP_NUM_THREADS``, unless set) are shared out
among the workers instead of each worker starting one per core. Tasks are spread over workers by the
seed (see :class:`LiberoEnv`), and Gymnasium's autoreset applies as usual.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import gymnasium as gym
from gymnasium.vector import AsyncVectorEnv

from gym_libero_vla.suites import resolve_suite

START_METHODS = ("forkserver", "spawn", "fork")


def _make_env(
    env_id: str, max_episode_steps: int | None, rasterizer_threads: int, env_wrappers: tuple, env_kwargs: dict
) -> gym.Env:
    # Runs in the worker, before any GL context exists: Mesa's software rasterizer (llvmpipe) starts one
    # thread per core in every process; N workers would oversubscribe the cores N-fold. Share them out.
    os.environ.setdefault("LP_NUM_THREADS", str(rasterizer_threads))
    env = gym.make(env_id, max_episode_steps=max_episode_steps, **env_kwargs)
    for wrapper in env_wrappers:
        env = wrapper(env)
    return env


def make_vector_env(
    num_envs: int = 1,
    *,
    suite: str = "libero_spatial",
    max_episode_steps: int | None = None,
    context: str = "forkserver",
    shared_memory: bool = True,
    env_wrappers: Sequence[Callable[[gym.Env], gym.Env]] = (),
    **env_kwargs,
) -> AsyncVectorEnv:
    """``num_envs`` LiberoEnv processes in an ``AsyncVectorEnv``; ``env_kwargs`` go to every ``LiberoEnv``.

    ``env_wrappers`` wrap each worker's env in order, as ``gym.make_vec``'s ``wrappers=`` does for its own modes
    (which Gymnasium refuses for a vector entry point): ``gym.make_vec("LiberoSpatial-v0", num_envs=2,
    env_wrappers=[RolloutRelabel])``. They travel to the workers pickled (classes, ``functools.partial``; no lambdas).
    """
    if not (isinstance(num_envs, int) and num_envs >= 1):
        raise ValueError(f"num_envs {num_envs!r} must be a positive int")
    if context not in START_METHODS:
        raise ValueError(f"unknown context {context!r}: valid {START_METHODS}")
    env_wrappers = tuple(env_wrappers or ())
    for wrapper in env_wrappers:
        if not callable(wrapper):
            raise TypeError(f"env_wrappers must be callables env -> wrapped env, got {wrapper!r}")
    env_id = resolve_suite(suite).env_id
    rasterizer_threads = max(1, (os.cpu_count() or 1) // num_envs)
    env_fn = functools.partial(_make_env, env_id, max_episode_steps, rasterizer_threads, env_wrappers, env_kwargs)
    return AsyncVectorEnv([env_fn] * num_envs, context=context, shared_memory=shared_memory)
