"""Learning signal from failed rollouts: hindsight relabelling with LIBERO's BDDL goals; demo rescue of all-fail GRPO groups.

Hindsight relabelling (Andrychowicz et al., Hindsight Experience Replay, 2017), with goals that are
LIBERO's own: several tasks of a suite share one scene (all ten LIBERO-Goal tasks; the 3 to 7 tasks of
each LIBERO-90 scene) and differ only in their BDDL goal. While a rollout for task A runs,
:class:`RolloutRelabel` evaluates the goal predicates of the scene's other tasks with the simulator's own
``_eval_predicate``; when the rollout fails, each other task B whose goal became true at step ``t`` yields
a successful episode for B: the first ``t`` steps, B's instruction and task id, reward 1 at step ``t``.

Two tasks share a scene when their parsed BDDL problems are identical except for the goal and the
instruction: same problem, objects, fixtures, regions and initial-state predicates. The initial state
matters: the ten LIBERO-Spatial tasks have the same objects and the same goal predicate, but the bowl
the instruction names ("the bowl between the plate and the ramekin") is ``akita_black_bowl_1`` only in
its own layout, so no Spatial task relabels another. A goal counts as reached only when it becomes
true during the rollout (it did not hold at the previous check, nor at reset): a goal that the
initial state already satisfies teaches nothing.

Goals are checked after every executed action, also inside an action chunk (``action_chunk=k``: the env calls
the wrapper back through ``LiberoEnv.action_hooks``), so a goal reached in the middle of a chunk and undone by
its remaining actions still counts. The relabelled episode then ends with that chunk cut where the goal held:
``Episode.executed`` of its last step says how many of the chunk's actions belong to it.

Rescue of all-fail groups (GRPO): a group of rollouts of one (task, init state) that all failed has
zero reward variance, hence zero group-relative advantage and no gradient. :func:`rescue_failed_group`
substitutes an offline demonstration of the task for failed rollouts, so the group has a success to
move towards; :class:`FailedGroupRescue` draws the demos from an :class:`EpisodeStore` and counts.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from gym_libero_vla.episode_store import Episode, EpisodeStore
from gym_libero_vla.suites import libero_modules, suite_tasks

MULTIPLE_GOALS = ("all", "first")
RESCUE_MODES = ("replace", "append")
# Parsed BDDL fields that define the task, not the scene.
TASK_FIELDS = ("goal_state", "language_instruction", "obj_of_interest")


@functools.cache
def _suite_problems(libero_name: str) -> tuple[tuple[str, tuple], ...]:
    """For each task of the suite: (scene key, goal predicates), from the BDDL files."""
    libero_modules()  # libero is importable only after the GL backend is chosen
    from libero.libero.envs import bddl_utils

    problems = []
    for task in suite_tasks(libero_name):
        problem = bddl_utils.robosuite_parse_problem(task.bddl_file)
        scene = {key: value for key, value in problem.items() if key not in TASK_FIELDS}
        scene["initial_state"] = sorted(scene["initial_state"])
        goal = tuple(tuple(predicate) for predicate in problem["goal_state"])
        problems.append((json.dumps(scene, sort_keys=True, default=str), goal))
    return tuple(problems)


def scene_goals(libero_name: str, task_id: int) -> tuple[tuple[int, tuple], ...]:
    """``(task_id, goal predicates)`` of the suite's other tasks set in the same scene as ``task_id``."""
    problems = _suite_problems(libero_name)
    scene = problems[task_id][0]
    return tuple((other, goal) for other, (key, goal) in enumerate(problems) if other != task_id and key == scene)


class RolloutRelabel(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Turns failed LIBERO rollouts into successful episodes of the other tasks whose goals they reached.

    Args:
        env: a LIBERO env (``gym.make("LiberoGoal-v0", ...)``), possibly wrapped; wrap it before any wrapper
            that replaces the instruction string (e.g. ``LanguageEmbedding``), so the relabelled episodes can
            carry the other task's instruction.
        store: an :class:`EpisodeStore` (or its directory) to append relabelled episodes to; None keeps them
            in ``info`` only.
        multiple_goals: when a failed rollout reached several other goals, "all" emits one episode per goal,
            "first" only the goal reached first (lowest task id on a tie).
        check_every: evaluate the other goals every ``check_every`` env steps (executed actions, and on the last
            one). Checking all nine other LIBERO-Goal goals costs ~0.8 ms against ~27 ms a physics step (2-core
            CPU), so 1 is the default; with n > 1 a relabelled episode ends at the first checked step the goal
            held.
        target_task_ids: tasks that relabelled episodes may be for (default: every task of the suite).
        observation_keys: Dict observation entries kept in relabelled episodes (default: all; e.g.
            ``("instruction", "state", "object_state")`` keeps camera frames out of memory).
        policy_version: stored with relabelled episodes; update ``self.policy_version`` as the policy changes.

    At the end of every episode (``terminated`` or ``truncated``), ``info["relabelled_episodes"]`` is the
    list of :class:`Episode` emitted (empty after a success, or when no other goal was reached), with
    ``source="relabelled"``, ``success=True``, ``init_state_id=-1`` (the start state is one of A's init
    states, not one of B's) and no ``log_probs`` (the actions' probabilities were conditioned on A's
    instruction). ``info["relabel"]`` holds this episode's counts: ``goals_reached``,
    ``episodes_relabelled``, ``goal_check_seconds``. Running totals are attributes (``num_episodes``,
    ``num_failed_episodes``, ``num_goals_reached``, ``num_episodes_relabelled``, ``goal_check_seconds``);
    :meth:`stats` returns them under stable names for a logger.
    """

    def __init__(
        self,
        env: gym.Env,
        store: EpisodeStore | str | os.PathLike | None = None,
        multiple_goals: str = "all",
        check_every: int = 1,
        target_task_ids: Sequence[int] | None = None,
        observation_keys: Sequence[str] | None = None,
        policy_version: int = 0,
    ):
        gym.utils.RecordConstructorArgs.__init__(
            self, store=store, multiple_goals=multiple_goals, check_every=check_every, target_task_ids=target_task_ids,
            observation_keys=observation_keys, policy_version=policy_version,
        )  # fmt: skip
        gym.Wrapper.__init__(self, env)
        base = env.unwrapped
        if not (hasattr(base, "tasks") and hasattr(base, "suite") and hasattr(type(base), "libero_env")):
            raise ValueError(f"RolloutRelabel needs a LIBERO env (gym_libero_vla.libero_env.LiberoEnv): got {base}")
        if multiple_goals not in MULTIPLE_GOALS:
            raise ValueError(f"unknown multiple_goals {multiple_goals!r}: valid {MULTIPLE_GOALS}")
        if not (isinstance(check_every, (int, np.integer)) and check_every >= 1):
            raise ValueError(f"check_every {check_every!r} must be a positive int")
        all_ids = range(len(base.tasks))
        target_task_ids = tuple(all_ids) if target_task_ids is None else tuple(target_task_ids)
        bad = [t for t in target_task_ids if t not in all_ids]
        if bad or not target_task_ids:
            raise ValueError(f"unknown target task id {bad[0] if bad else target_task_ids}: valid 0..{len(all_ids) - 1}")
        space = env.observation_space
        if not isinstance(space, gym.spaces.Dict):
            raise ValueError(f"RolloutRelabel needs a Dict observation space: got {space}")
        if "instruction" in space.spaces and not isinstance(space["instruction"], gym.spaces.Text):
            raise ValueError(
                f"observation 'instruction' is {space['instruction']}, not the instruction string: "
                "wrap RolloutRelabel inside wrappers that embed the instruction"
            )
        if observation_keys is not None:
            unknown = [key for key in observation_keys if key not in space.spaces]
            if unknown:
                raise ValueError(f"unknown observation key(s) {unknown}: valid {list(space.spaces)}")

        self.store = store if isinstance(store, EpisodeStore) else None
        self.store_path = None if store is None else os.fspath(store.path if isinstance(store, EpisodeStore) else store)
        self.multiple_goals = multiple_goals
        self.check_every = int(check_every)
        self.target_task_ids = frozenset(int(t) for t in target_task_ids)
        self.observation_keys = None if observation_keys is None else tuple(observation_keys)
        self.policy_version = int(policy_version)
        self.num_episodes = self.num_failed_episodes = self.num_goals_reached = self.num_episodes_relabelled = 0
        self.goal_check_seconds = 0.0
        self._episode: dict[str, Any] | None = None

    def stats(self) -> dict[str, float]:
        """Running totals, named for TensorBoard (``relabel/...``)."""
        return {
            "relabel/episodes": self.num_episodes,
            "relabel/failed_episodes": self.num_failed_episodes,
            "relabel/goals_reached": self.num_goals_reached,
            "relabel/episodes_relabelled": self.num_episodes_relabelled,
            "relabel/goal_check_seconds": self.goal_check_seconds,
        }

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        task_id = int(info["task_id"])
        candidates = [(t, goal) for t, goal in scene_goals(self.env.unwrapped.suite, task_id) if t in self.target_task_ids]
        self._episode = {
            "observations": [self._recorded(obs)],
            "actions": [],
            "executed": [],  # actions of each step the env executed (a chunk's, or 1)
            "env_steps": 0,
            "last_check": 0,
            "candidates": candidates,
            "held": set(),  # goals that held at the last check: reaching one needs a rising edge
            "reached": {},  # task id -> first step its goal held
            "check_seconds": 0.0,
            "policy_version": self.policy_version,
        }
        self._check_goals(step=0)
        hooks = self.env.unwrapped.action_hooks
        if self._after_action not in hooks:
            hooks.append(self._after_action)  # goal checks after every action, inside chunks too
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        episode = self._episode
        if episode is None:
            return obs, reward, terminated, truncated, info
        episode["observations"].append(self._recorded(obs))
        episode["actions"].append(np.array(action))
        episode["executed"].append(int(info.get("executed_actions", 1)))
        done = terminated or truncated
        success = bool(info.get("is_success", terminated and reward > 0))
        if done and not success and episode["last_check"] != episode["env_steps"]:
            self._check_goals(episode["env_steps"])  # the last state is always checked
        if done:
            info = dict(info)
            relabelled = [] if success else self._relabelled_episodes()
            if relabelled and self.store_path is not None:
                if self.store is None:  # opened on first use, so that __init__ does no I/O
                    self.store = EpisodeStore(self.store_path)
                for new_episode in relabelled:
                    self.store.append(new_episode)
            self.num_episodes += 1
            self.num_failed_episodes += not success
            self.num_goals_reached += len(episode["reached"])
            self.num_episodes_relabelled += len(relabelled)
            self.goal_check_seconds += episode["check_seconds"]
            info["relabelled_episodes"] = relabelled
            info["relabel"] = {
                "goals_reached": len(episode["reached"]),
                "episodes_relabelled": len(relabelled),
                "goal_check_seconds": episode["check_seconds"],
            }
            self._episode = None
            self._remove_hook()
        return obs, reward, terminated, truncated, info

    def close(self):
        self._remove_hook()
        if self.store is not None:
            self.store.close()
        super().close()

    # ------------------------------------------------------------------ helpers
    def _remove_hook(self) -> None:
        hooks = self.env.unwrapped.action_hooks
        if self._after_action in hooks:
            hooks.remove(self._after_action)

    def _after_action(self) -> None:
        episode = self._episode
        if episode is None:
            return
        episode["env_steps"] += 1
        if episode["env_steps"] % self.check_every == 0:
            self._check_goals(episode["env_steps"])

    def _recorded(self, obs: dict) -> dict:
        return {key: obs[key] for key in (self.observation_keys or obs)}

    def _check_goals(self, step: int) -> None:
        """Evaluate the candidate goals after ``step`` env steps (executed actions)."""
        episode, start = self._episode, time.perf_counter()
        episode["last_check"] = step
        domain = self.env.unwrapped.libero_env.env
        for task_id, goal in episode["candidates"]:
            if task_id in episode["reached"]:
                continue
            holds = all(domain._eval_predicate(list(predicate)) for predicate in goal)
            if holds and task_id not in episode["held"] and step > 0:
                episode["reached"][task_id] = step
            if holds:
                episode["held"].add(task_id)
            else:
                episode["held"].discard(task_id)
        episode["check_seconds"] += time.perf_counter() - start

    def _relabelled_episodes(self) -> list[Episode]:
        reached = sorted(self._episode["reached"].items(), key=lambda item: (item[1], item[0]))
        if self.multiple_goals == "first":
            reached = reached[:1]
        return [self._truncated_episode(task_id, step) for task_id, step in reached]

    def _truncated_episode(self, task_id: int, env_step: int) -> Episode:
        """The rollout up to env step ``env_step`` (its goal held after that many actions) as a success of task
        ``task_id``: the steps up to the one holding that action, the last chunk cut after it."""
        steps, task = self._episode, self.env.unwrapped.tasks[task_id]
        ends = np.cumsum(steps["executed"])  # env steps done at the end of each step
        last = int(np.searchsorted(ends, env_step))  # the step (chunk) in which the goal came to hold
        num_steps = last + 1
        executed = list(steps["executed"][:last]) + [env_step - (int(ends[last - 1]) if last else 0)]
        # The observation after the last step exists only if the goal held at that step's (chunk's) end.
        num_observations = num_steps + 1 if executed[-1] == steps["executed"][last] else num_steps
        observations: dict[str, np.ndarray | str] = {}
        for key, first in steps["observations"][0].items():
            if key == "instruction":
                observations[key] = task.instruction
            elif key == "task_id":
                observations[key] = np.full(num_observations, task_id, dtype=np.asarray(first).dtype)
            elif isinstance(first, str):
                observations[key] = first
            else:
                observations[key] = np.stack([np.asarray(obs[key]) for obs in steps["observations"][:num_observations]])
        rewards = np.zeros(num_steps, dtype=np.float32)
        rewards[-1] = 1.0  # LIBERO's sparse reward: 1 on the step the goal holds
        actions = np.stack(steps["actions"][:num_steps])
        return Episode(
            observations=observations,
            actions=actions,
            rewards=rewards,
            success=True,
            task_id=task_id,
            init_state_id=-1,
            policy_version=steps["policy_version"],
            source="relabelled",
            executed=np.array(executed) if actions.ndim == 3 else None,  # (T, k, 7) chunks
            env_id=self.env.spec.id if self.env.spec is not None else "",
        )


# ---------------------------------------------------------------------- GRPO groups where every rollout failed
def rescue_failed_group(
    group: Sequence[Episode], demos: Sequence[Episode], mode: str = "replace"
) -> tuple[list[Episode], bool]:
    """Substitute demonstrations for failed rollouts in a group where every rollout failed.

    A GRPO group of one (task, init state) whose rollouts all failed has rewards of zero variance, so its
    group-relative advantages ``(r - mean(r)) / (std(r) + eps)`` are all zero: no gradient. With a
    demonstration of the task in the group, the demo gets a positive advantage and the rollouts a negative
    one. ``mode="replace"`` replaces the last ``len(demos)`` rollouts (the group size stays fixed, as a
    ``rewards.view(-1, group_size)`` learner needs; at least one rollout must remain), ``"append"`` adds the
    demos after the rollouts. Demos carry ``source="offline"`` and usually no ``log_probs``: the learner
    must treat them as off-policy (e.g. an imitation term, or log-probs recomputed under the current policy).

    Returns ``(new_group, substituted)``; a group with any success, or no demos, comes back unchanged.
    """
    if mode not in RESCUE_MODES:
        raise ValueError(f"unknown rescue mode {mode!r}: valid {RESCUE_MODES}")
    group = list(group)
    if not group:
        raise ValueError("an empty group has nothing to rescue: a group needs at least one episode")
    keys = {(episode.task_id, episode.init_state_id) for episode in group}
    if len(keys) != 1:
        raise ValueError(f"a group holds episodes of one (task_id, init_state_id): got {sorted(keys)}")
    task_id = group[0].task_id
    wrong = [demo.task_id for demo in demos if demo.task_id != task_id or not demo.success]
    if wrong:
        raise ValueError(f"demos must be successful episodes of the group's task {task_id}: got task(s) {wrong}")
    if mode == "replace" and len(demos) >= len(group):
        raise ValueError(f"{len(demos)} demos would replace the whole group of {len(group)}: at most {len(group) - 1}")
    if any(episode.success for episode in group) or not demos:
        return group, False
    if mode == "replace":
        return group[: len(group) - len(demos)] + list(demos), True
    return group + list(demos), True


def same_start_first(candidates: Sequence[Any], init_state_id: int, start_of=lambda demo: demo.init_state_id) -> list:
    """The ``candidates`` (demos of a group's task) that started from the group's init state, or all of them when none
    did. Only a stored init state (``init_state_id >= 0``) is shared: an unknown start (-1) and a newly sampled layout
    (-2, each its own) match no demo. ``start_of`` reads a candidate's init state id (an episode's by default)."""
    same_start = [candidate for candidate in candidates if init_state_id >= 0 and start_of(candidate) == init_state_id]
    return same_start or list(candidates)


class FailedGroupRescue:
    """Rescues all-fail GRPO groups with offline demos of the same task drawn from an :class:`EpisodeStore`.

    Args:
        demos: the store holding the demonstrations (episodes with ``source="offline"`` and ``success``).
        mode: "replace" (fixed group size) or "append"; see :func:`rescue_failed_group`.
        num_demos: demos substituted into a rescued group (fewer if the store has fewer for the task).
        match_init_state: prefer demos that start from the group's ``init_state_id``, else any of the task.
        seed: seeds the draw of demos.

    ``new_group, rescued = rescue(group)``. Counters for a logger: ``num_groups``, ``num_all_failed``,
    ``num_rescued``, ``num_without_demo`` (all-fail groups left unchanged because the store had no demo
    of their task), also as :meth:`stats`.
    """

    def __init__(
        self,
        demos: EpisodeStore,
        mode: str = "replace",
        num_demos: int = 1,
        match_init_state: bool = True,
        seed: int | None = None,
    ):
        if not isinstance(demos, EpisodeStore):
            raise TypeError(f"demos must be an EpisodeStore: got {type(demos).__name__}")
        if mode not in RESCUE_MODES:
            raise ValueError(f"unknown rescue mode {mode!r}: valid {RESCUE_MODES}")
        if not (isinstance(num_demos, (int, np.integer)) and num_demos >= 1):
            raise ValueError(f"num_demos {num_demos!r} must be a positive int")
        self.demos, self.mode, self.num_demos = demos, mode, int(num_demos)
        self.match_init_state = bool(match_init_state)
        self.rng = np.random.default_rng(seed)
        self.num_groups = self.num_all_failed = self.num_rescued = self.num_without_demo = 0

    def stats(self) -> dict[str, float]:
        return {
            "relabel/groups": self.num_groups,
            "relabel/groups_all_failed": self.num_all_failed,
            "relabel/groups_rescued": self.num_rescued,
            "relabel/groups_without_demo": self.num_without_demo,
        }

    def __call__(self, group: Sequence[Episode]) -> tuple[list[Episode], bool]:
        group, _ = rescue_failed_group(group, [], self.mode)  # validates the group; substitutes nothing
        self.num_groups += 1
        if any(episode.success for episode in group):
            return group, False
        self.num_all_failed += 1
        new_group, rescued = rescue_failed_group(group, self._draw_demos(group), self.mode)
        self.num_rescued += rescued
        self.num_without_demo += not rescued
        return new_group, rescued

    def _draw_demos(self, group: list[Episode]) -> list[Episode]:
        records = self.demos.records(task_id=group[0].task_id, source="offline", success=True)
        if self.match_init_state:
            records = same_start_first(records, group[0].init_state_id, start_of=lambda record: record["init_state_id"])
        # "replace" keeps at least one rollout: a group of demos only has zero variance again.
        wanted = min(self.num_demos, len(records), len(group) - 1 if self.mode == "replace" else self.num_demos)
        picks = self.rng.choice(len(records), size=wanted, replace=False) if wanted > 0 else []
        demos = []
        for pick in sorted(picks):
            try:
                demos.append(self.demos.load(records[pick]["episode_id"]))
            except KeyError:  # evicted or corrupt since the query: draw fewer
                continue
        return demos
