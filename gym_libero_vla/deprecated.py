"""Names that moved in the restructure of 2026-12 (one episode loop, one learner base), kept working for a while.

Each old name still resolves, with a ``DeprecationWarning`` naming its replacement; the episode loops keep their old
signatures as thin adapters over :func:`gym_libero_vla.rollouts.run_episodes`. Remove after the next release.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterator

# old module -> old name -> (replacement module, replacement name)
MOVED = {
    "gym_libero_vla.algos.grpo": {
        "latest_checkpoint": ("gym_libero_vla.algos.base", "latest_checkpoint"),
        "run_episodes": ("gym_libero_vla.deprecated", "grpo_run_episodes"),
    },
    "gym_libero_vla.algos.sft": {
        "load_demonstrations": ("gym_libero_vla.deprecated", "load_demonstrations"),
    },
    "gym_libero_vla.evaluate": {
        "run_episodes_batched": ("gym_libero_vla.deprecated", "run_episodes_batched"),
    },
}
REPLACEMENTS = {
    "grpo_run_episodes": "gym_libero_vla.rollouts.run_episodes",
    "load_demonstrations": "gym_libero_vla.algos.sft.Transitions.from_episodes",
    "run_episodes_batched": "gym_libero_vla.rollouts.run_episodes",
}


def moved(module: str, name: str):
    """The replacement of ``module.name``, with a warning; AttributeError for a name that never was there."""
    if name not in MOVED.get(module, {}):
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    target_module, target = MOVED[module][name]
    replacement = REPLACEMENTS.get(target, f"{target_module}.{target}")
    warnings.warn(f"{module}.{name} is deprecated: use {replacement}", DeprecationWarning, stacklevel=3)
    return getattr(importlib.import_module(target_module), target)


def grpo_run_episodes(policy, env, options: dict, num_episodes: int, on_step, policy_version: int = 0,
                      temperature: float = 1.0):  # fmt: skip
    """The old ``algos.grpo.run_episodes``: ``(episodes, relabelled)`` of ``num_episodes`` sampled episodes from one
    start; two empty lists when ``on_step`` stopped them."""
    from gym_libero_vla.rollouts import Start, run_episodes

    start = Start(int(options["task_id"]), int(options["init_state_id"]))
    stopped = []

    def keep_going(num_steps: int) -> bool:
        if not on_step(num_steps):
            stopped.append(True)
            return False
        return True

    rollouts = sorted(run_episodes(policy, env, [start] * num_episodes, temperature=temperature,
                                   policy_version=policy_version, on_step=keep_going), key=lambda r: r.index)  # fmt: skip
    if stopped:
        return [], []
    return [r.episode for r in rollouts], [episode for r in rollouts for episode in r.relabelled]


def load_demonstrations(demos, observation_keys, action_dim: int):
    """The old ``algos.sft.load_demonstrations``."""
    from gym_libero_vla.algos.sft import Transitions

    return Transitions.from_episodes(demos, observation_keys, action_dim)


def run_episodes_batched(policy, envs, runs, deterministic: bool = True, temperature: float = 1.0) -> Iterator:
    """The old ``evaluate.run_episodes_batched``: results with ``task_id``, ``init_state_id``, ``seed``, ``success``,
    ``length``, ``seconds``, yielded as the episodes end."""
    from types import SimpleNamespace

    from gym_libero_vla.rollouts import Start, run_episodes

    starts = [Start(*(int(value) for value in run)) for run in runs]
    for rollout in run_episodes(policy, list(envs), starts, deterministic=deterministic, temperature=temperature,
                                record_observations=False):  # fmt: skip
        start, episode = starts[rollout.index], rollout.episode
        yield SimpleNamespace(task_id=start.task_id, init_state_id=start.init_state_id, seed=start.seed,
                              success=episode.success, length=episode.num_steps, seconds=rollout.seconds)  # fmt: skip
