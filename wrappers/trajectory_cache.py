"""Records every finished episode of an env into a persistent :class:`~gym_libero_vla.episode_store.EpisodeStore`.

The rollout side of an asynchronous RL pipeline (RLinf-USER's persistent trajectory cache): wrap each
rollout env, and a learner in another process samples the stored episodes by task, source and policy
version while rollouts continue. An episode is written when it ends (``terminated`` or ``truncated``);
one abandoned by an early ``reset`` is dropped, because a learner cannot tell its outcome.

The behaviour policy's version and its action log-probabilities (needed for importance ratios, e.g.
PPO/GRPO on stale episodes) are not part of Gymnasium's ``step``; set them on the wrapper::

    env = TrajectoryCache(gym.make("LiberoSpatial-v0"), "runs/cache", policy_version=0)
    env.policy_version = 3              # after each policy update
    env.next_log_probs = log_probs      # before a step: stored with that step's action

In a vector env, ``envs.set_attr("next_log_probs", per_env_log_probs)`` sets one value per env.

On a chunked env (``action_chunk=k``) each step's action is a ``(k, 7)`` chunk; the episode also keeps how many of
its actions the env executed (``info["executed_actions"]``: fewer in the chunk where the episode ended), which a
learner needs to leave the rest out of its loss.
"""

from __future__ import annotations

import os
from typing import Any

import gymnasium as gym
import numpy as np

from gym_libero_vla.episode_store import SOURCES, Episode, EpisodeStore


class TrajectoryCache(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Appends each finished episode (observations, actions, rewards, success, log-probs) to an episode store.

    Args:
        env: the env to record; ``info`` may carry ``is_success``, ``task_id`` and ``init_state_id`` (as
            LIBERO envs do), else success is ``terminated`` with a positive reward and the ids default to
            the observation's ``task_id`` and -1.
        store: an :class:`EpisodeStore`, or the directory of one (opened, or created, with no bounds).
        policy_version: version of the policy producing the actions; update ``self.policy_version`` as it
            changes (an episode keeps the version it started with).
        source: the episodes' source, one of ``("online", "offline", "relabelled")``.
        observation_keys: Dict observation entries to store (default: all); e.g. ``("instruction", "state")``
            keeps camera frames out of the store.

    After an episode is stored, ``self.last_episode_id`` holds its store id.
    """

    def __init__(
        self,
        env: gym.Env,
        store: EpisodeStore | str | os.PathLike,
        policy_version: int = 0,
        source: str = "online",
        observation_keys: tuple[str, ...] | list[str] | None = None,
    ):
        gym.utils.RecordConstructorArgs.__init__(
            self, store=store, policy_version=policy_version, source=source, observation_keys=observation_keys
        )
        gym.Wrapper.__init__(self, env)
        if source not in SOURCES:
            raise ValueError(f"unknown episode source {source!r}: valid {SOURCES}")
        if observation_keys is not None:
            if not isinstance(env.observation_space, gym.spaces.Dict):
                raise ValueError(f"observation_keys needs a Dict observation space: got {env.observation_space}")
            unknown = [key for key in observation_keys if key not in env.observation_space.spaces]
            if unknown:
                raise ValueError(f"unknown observation key(s) {unknown}: valid {list(env.observation_space.spaces)}")
        self.store = store if isinstance(store, EpisodeStore) else None
        self.store_path = os.fspath(store.path if isinstance(store, EpisodeStore) else store)
        self.policy_version = int(policy_version)
        self.source = source
        self.observation_keys = None if observation_keys is None else tuple(observation_keys)
        self.next_log_probs: np.ndarray | None = None
        self.last_episode_id: int | None = None
        self._episode: dict[str, Any] | None = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        self.next_log_probs = None
        self._episode = {
            "observations": [self._recorded(obs)],
            "actions": [],
            "rewards": [],
            "log_probs": [],
            "executed": [],
            "task_id": info.get("task_id", obs.get("task_id", -1) if isinstance(obs, dict) else -1),
            "init_state_id": info.get("init_state_id", -1),
            "policy_version": self.policy_version,
        }
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self._episode is not None:
            self._episode["observations"].append(self._recorded(obs))
            self._episode["actions"].append(np.array(action))
            self._episode["rewards"].append(float(reward))
            self._episode["executed"].append(int(info.get("executed_actions", 1)))
            self._episode["log_probs"].append(None if self.next_log_probs is None else np.array(self.next_log_probs))
            self.next_log_probs = None
            if terminated or truncated:
                success = bool(info.get("is_success", terminated and reward > 0))
                self.last_episode_id = self._store().append(self._finished_episode(success))
                self._episode = None
        return obs, reward, terminated, truncated, info

    def close(self):
        if self.store is not None:
            self.store.close()
        super().close()

    def _store(self) -> EpisodeStore:
        if self.store is None:  # opened on first use, so that __init__ does no I/O
            self.store = EpisodeStore(self.store_path)
        return self.store

    def _recorded(self, obs) -> dict:
        if not isinstance(obs, dict):
            return {"observation": obs}
        return {key: obs[key] for key in (self.observation_keys or obs)}

    def _finished_episode(self, success: bool) -> Episode:
        steps = self._episode
        observations: dict[str, np.ndarray | str] = {}
        for key, first in steps["observations"][0].items():
            values = [obs[key] for obs in steps["observations"]]
            if isinstance(first, str) and all(value == first for value in values):
                observations[key] = first  # e.g. the instruction: stored once
            else:
                observations[key] = np.stack([np.asarray(value) for value in values])
        log_probs = steps["log_probs"]
        # Log-probs are kept only when every step has them: a partial record cannot give importance ratios.
        log_probs = np.stack(log_probs) if all(lp is not None for lp in log_probs) else None
        actions = np.stack(steps["actions"])
        return Episode(
            observations=observations,
            actions=actions,
            rewards=np.asarray(steps["rewards"], dtype=np.float32),
            success=success,
            task_id=steps["task_id"],
            init_state_id=steps["init_state_id"],
            policy_version=steps["policy_version"],
            source=self.source,
            log_probs=log_probs,
            executed=np.array(steps["executed"]) if actions.ndim == 3 else None,  # (T, k, 7) chunks
            env_id=self.env.spec.id if self.env.spec is not None else "",
        )
