"""One episode type from demonstrations to the episode store to the learners.

A scripted or human demonstration read from an HDF5 file, a rollout sampled by a policy, a hindsight-relabelled
success and an episode loaded back from an :class:`~gym_libero_vla.episode_store.EpisodeStore` are all an
:class:`Episode`: the observations the policy read, the actions it took, the rewards, the outcome, where it
started, and who produced it (``source`` and, for rollouts, the behaviour policy's token log-probs and version).
Fields only a recorded demonstration has (the MuJoCo states to replay it from, the reset seed) are optional.

Anything the learners accept as demonstrations -- episodes, dicts ``{"observations": ..., "actions": ...}`` --
is turned into an :class:`Episode` once, by :func:`as_episode`, at the door.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

SOURCES = ("online", "offline", "relabelled")
SAMPLED_INIT_STATE = -2
"""``Episode.init_state_id`` of an episode that started from a newly sampled layout
(:meth:`~gym_libero_vla.libero_env.LiberoEnv.sample_init_state`), not from one of the suite's stored init states."""


@dataclasses.dataclass
class Episode:
    """One finished episode of ``T`` steps.

    ``observations`` maps each key to an array whose leading dimension is ``T`` (the observation before each
    action) or ``T + 1`` (plus the final one); a text entry that stays the same through the episode, like the
    ``"instruction"``, is a plain ``str``. ``log_probs`` are the behaviour policy's log-probabilities of the actions
    (``(T, 7)``, one per action token), if known. ``group_id`` ties the episodes of one GRPO group together.
    ``episode_id`` and ``created_at`` are set by the store.
    """

    observations: dict[str, np.ndarray | str]
    actions: np.ndarray
    """(T, 7) float32: LIBERO's delta end-effector command; ``(T, k, 7)`` for a chunking policy (one chunk per step)."""
    rewards: np.ndarray
    """(T,) float32."""
    success: bool
    task_id: int
    """Task index in its suite, or -1 when unknown."""
    init_state_id: int = -1
    """Index of the suite's init state the episode started from, -1 when unknown, or :data:`SAMPLED_INIT_STATE` for a
    start drawn anew by LIBERO's placement sampler (none of the suite's stored states)."""
    policy_version: int = 0
    """The learner update that produced a rollout (0 for demos)."""
    source: str = "online"
    """"online" (a policy's rollout), "offline" (a demonstration) or "relabelled" (hindsight relabelling)."""
    log_probs: np.ndarray | None = None
    executed: np.ndarray | None = None
    """``(T,)`` int: actions of each step's chunk the env executed (the last chunk stops where the episode ended);
    None: every action (one-action steps, or whole chunks)."""
    env_id: str = ""
    episode_id: int | None = None
    created_at: float = dataclasses.field(default_factory=time.time)
    group_id: str | None = None
    # -- recorded demonstrations (HDF5 files) only
    name: str = ""
    """The demo's key in its file (``demo_N``)."""
    states: np.ndarray | None = None
    """(T, S) flattened MuJoCo states, ``states[t]`` before ``actions[t]``; replay starts from ``states[0]``."""
    replay_state: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    """Simulator state outside the MuJoCo state at ``states[0]`` (our files only): the gripper's integrated command
    ("gripper_current_action") and the solver warm start ("qacc_warmstart"); DART demos add the perturbed actions the
    env executed ("executed_actions", ``(T, 7)``), where ``actions`` holds the expert's clean labels."""
    seed: int | None = None
    """Seed of the env reset that produced the episode: LIBERO re-samples fixture placements at reset and MuJoCo
    states do not hold them, so exact replay and re-rendering reset with this seed."""

    def __post_init__(self):
        self.actions = np.asarray(self.actions)
        self.rewards = np.asarray(self.rewards, dtype=np.float32)
        if self.log_probs is not None:
            self.log_probs = np.asarray(self.log_probs)
        self.observations = {
            key: value if isinstance(value, str) else np.asarray(value) for key, value in self.observations.items()
        }
        self.success, self.task_id, self.init_state_id = bool(self.success), int(self.task_id), int(self.init_state_id)
        self.policy_version = int(self.policy_version)
        self.group_id = None if self.group_id is None else str(self.group_id)
        if self.source not in SOURCES:
            raise ValueError(f"unknown episode source {self.source!r}: valid {SOURCES}")
        num_steps = len(self.actions) if self.actions.ndim else 0
        if num_steps < 1:
            raise ValueError(f"an episode needs at least one step: actions have shape {self.actions.shape}")
        if self.rewards.shape != (num_steps,):
            raise ValueError(f"rewards have shape {self.rewards.shape}: expected ({num_steps},) for {num_steps} actions")
        if self.log_probs is not None and (self.log_probs.ndim == 0 or len(self.log_probs) != num_steps):
            raise ValueError(f"log_probs have shape {self.log_probs.shape}: expected leading dimension {num_steps}")
        if self.executed is not None:
            self.executed = np.asarray(self.executed, dtype=np.int64)
            chunk = self.actions.shape[1] if self.actions.ndim == 3 else 1
            if self.executed.shape != (num_steps,) or self.executed.min() < 1 or self.executed.max() > chunk:
                raise ValueError(f"executed must be ({num_steps},) counts in 1..{chunk}: got {self.executed.tolist()}")
        for key, value in self.observations.items():
            if isinstance(value, str):
                continue
            if value.dtype == object:
                raise ValueError(f"observation {key!r} has dtype object: store numbers, fixed strings or a str")
            if value.ndim == 0 or len(value) not in (num_steps, num_steps + 1):
                raise ValueError(
                    f"observation {key!r} has shape {value.shape}: expected leading dimension {num_steps + 1} or {num_steps}"
                )

    @property
    def num_steps(self) -> int:
        return len(self.actions)

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def num_env_steps(self) -> int:
        """Actions the env executed: ``num_steps``, or the executed actions of each chunk summed."""
        if self.executed is not None:
            return int(self.executed.sum())
        return self.num_steps * (self.actions.shape[1] if self.actions.ndim == 3 else 1)

    @property
    def total_reward(self) -> float:
        return float(self.rewards.sum())

    @property
    def instruction(self) -> str:
        return str(self.observations.get("instruction", ""))

    def observation(self, t: int) -> dict:
        """The observation before action ``t``, as a ``LiberoEnv`` observation dict."""
        obs: dict[str, Any] = {"task_id": np.int64(self.task_id)}
        obs.update({key: value if isinstance(value, str) else value[t] for key, value in self.observations.items()})
        return obs

    def select(self, keep: np.ndarray) -> Episode:
        """A copy with only the time steps where ``keep`` (``(T,)`` bool) is True; a final observation is dropped."""
        keep = np.asarray(keep, dtype=bool)

        def take(values):
            return None if values is None else values[: self.num_steps][keep]

        observations = {key: value if isinstance(value, str) else take(value) for key, value in self.observations.items()}
        return dataclasses.replace(
            self, observations=observations, actions=self.actions[keep], rewards=self.rewards[keep],
            log_probs=take(self.log_probs), states=take(self.states), executed=take(self.executed),
        )  # fmt: skip

    def with_observations(self, keys) -> Episode:
        """A copy holding only the observation entries ``keys`` (and the instruction); a clear error names a missing one."""
        missing = [key for key in keys if key not in self.observations]
        if missing:
            raise ValueError(
                f"episode {self.name or self.episode_id or ''} has no observation {missing[0]!r}, which the policy reads: "
                f"it has {sorted(self.observations)} (record episodes in a matching obs_mode, or build the policy without "
                "that input)"
            )
        kept = {key: self.observations[key] for key in ("instruction", *keys) if key in self.observations}
        return dataclasses.replace(self, observations=kept)


def as_episode(value: Any) -> Episode:
    """An :class:`Episode` from an episode, or from a dict ``{"observations": {...}, "actions": (T, 7), ...}`` (or one
    whose non-``actions`` entries are the observations). A dict episode counts as a successful demonstration
    (``source="offline"``, reward 1 on its last step) unless it says otherwise."""
    if isinstance(value, Episode):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"an episode must be an Episode or a dict with 'actions': got {type(value).__name__}")
    if "actions" not in value:
        raise ValueError(f"a demonstration dict needs 'actions': got keys {sorted(value)}")
    fields = {field.name for field in dataclasses.fields(Episode)}
    extra = {key: item for key, item in value.items() if key in fields and key not in ("observations", "task_id")}
    if "observations" in value:
        observations = dict(value["observations"])
    else:
        observations = {key: item for key, item in value.items() if key not in fields}
    actions = np.asarray(extra.pop("actions"), dtype=np.float32)
    success = bool(extra.pop("success", True))
    if "rewards" not in extra:
        rewards = np.zeros(len(actions), dtype=np.float32)
        rewards[-1:] = float(success)
        extra["rewards"] = rewards
    task_id = value.get("task_id", observations.pop("task_id", -1))
    task_id = int(np.asarray(task_id).ravel()[0]) if np.size(task_id) else -1
    extra.setdefault("source", "offline")
    return Episode(observations=observations, actions=actions, success=success, task_id=task_id, **extra)
