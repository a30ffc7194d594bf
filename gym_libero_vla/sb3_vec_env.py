"""A stable-baselines3 ``DummyVecEnv`` that carries the instruction string, so SB3's tools run on our envs.

SB3's ``DummyVecEnv`` keeps observations in numpy buffers shaped by each space's ``shape``; a
``gymnasium.spaces.Text`` has none, so wrapping a LIBERO env with its instruction fails inside SB3. Here
text entries live in ``(num_envs,)`` object arrays of ``str``, which our learners' ``predict`` reads, so
``stable_baselines3.common.evaluation.evaluate_policy`` and ``EvalCallback`` work with GRPO, SFT and
iRe-VLA::

    eval_env = TextDummyVecEnv([lambda: gym.make("LiberoSpatial-v0", obs_mode="state", task_ids=(0,))])
    model.learn(10_000, callback=EvalCallback(eval_env, eval_freq=2_000, n_eval_episodes=5))

(SB3's own algorithms, PPO or SAC, need numbers only: use ``wrappers.language_embedding`` for them.)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import gymnasium as gym
import numpy as np
from stable_baselines3.common.env_util import is_wrapped
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv
from stable_baselines3.common.vec_env.patch_gym import _patch_env


class TextDummyVecEnv(DummyVecEnv):
    """``DummyVecEnv`` for Dict observation spaces with ``Text`` entries (kept as object arrays of str). Each
    env gets SB3's ``Monitor`` (episode returns and lengths, as ``make_vec_env`` adds) unless it has one."""

    def __init__(self, env_fns: list[Callable[[], gym.Env]]):
        envs = [_patch_env(fn()) for fn in env_fns]
        self.envs = [env if is_wrapped(env, Monitor) else Monitor(env) for env in envs]
        if len({id(env.unwrapped) for env in self.envs}) != len(self.envs):
            raise ValueError("the env functions returned the same env instance: each must build a new env (gym.make)")
        env = self.envs[0]
        space = env.observation_space
        if not isinstance(space, gym.spaces.Dict):
            raise ValueError(f"TextDummyVecEnv is for Dict observation spaces: got {space} (use SB3's DummyVecEnv)")
        VecEnv.__init__(self, len(env_fns), space, env.action_space)
        self.keys = list(space.spaces)
        self.buf_obs = OrderedDict(
            (key, np.empty(self.num_envs, dtype=object) if isinstance(sub, gym.spaces.Text)
             else np.zeros((self.num_envs, *sub.shape), dtype=sub.dtype))
            for key, sub in space.spaces.items()
        )  # fmt: skip
        self.buf_dones = np.zeros((self.num_envs,), dtype=bool)
        self.buf_rews = np.zeros((self.num_envs,), dtype=np.float32)
        self.buf_infos = [{} for _ in range(self.num_envs)]
        self.metadata = env.metadata
