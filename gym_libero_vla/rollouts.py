"""The one place episodes are run: a policy acting in LIBERO envs, batched across envs, until each episode ends.

GRPO's groups, the asynchronous rollout workers, evaluation and the benchmarks all call :func:`run_episodes` (GRPO
and the workers through :func:`run_group`, which runs one group and tags its episodes with one ``group_id``):

    for rollout in run_episodes(policy, envs, starts, deterministic=True):
        rollout.episode.success, rollout.episode.num_steps, rollout.seconds

``starts`` are where episodes begin (:class:`Start`: task, init state, reset seed); ``env`` is one env, a list of
envs stepped one after another in this process, or a Gymnasium vector env whose sub-envs step in parallel. Every
env slot takes the next start as soon as its episode ends, and the policy acts on every slot in one batched call
per step: a small policy on a CPU costs about as much for 8 observations as for 1. A freed slot prefers a start of
the task it is on (no simulator rebuild), else the task with the most starts left per slot already on it, so the
slots spread over the tasks. A sub-env of a vector env is reset in place with Gymnasium's ``reset_mask`` (left to
Gymnasium's autoreset it would start a random task); when no start is left, it is reset to its last start and
stepped, unrecorded, until the others finish.

Each finished episode comes back as an :class:`~gym_libero_vla.episode.Episode` (observations the policy read,
actions, rewards, token log-probs, outcome) inside a :class:`Rollout` with its wall seconds, any frames, and any
hindsight-relabelled episodes a :class:`~gym_libero_vla.wrappers.rollout_relabel.RolloutRelabel` wrapper emitted.

Action chunks: a policy with ``chunk_size > 1`` acts in an env made with ``action_chunk=policy.execute_steps``: each
step sends the first ``execute_steps`` actions of the chunk it decoded, the env executes them (fewer when the
episode ends inside the chunk) and returns one observation. The episode keeps the whole chunk and its
``chunk_size * 7`` token log-probs per step, and ``executed``, how many of its actions ran, so that a learner can
mask the tokens of actions that never reached the env. ``on_step`` counts env steps (executed actions).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
import uuid
from collections.abc import Callable, Iterator, Sequence

import gymnasium as gym
import numpy as np
import torch

from gym_libero_vla.episode import SAMPLED_INIT_STATE, Episode
from gym_libero_vla.policies.base import stack_observations

INIT_STATES = ("suite", "sampled")
TRAINING_LAYOUT_SEEDS = 2**31
"""Training draws its new layouts' seeds below this (GRPO's groups, :func:`draw_start`); evaluations on new layouts
start at it (:data:`gym_libero_vla.evaluate.EVAL_LAYOUT_SEEDS_FROM`), so no training layout is an evaluation layout."""


def held_in_init_states(init_states: str, demo_init_state_end: int) -> tuple[int, ...] | None:
    """The init states a run trains on beside demos of init states ``0 .. demo_init_state_end - 1``: those same
    stored states (``init_states="suite"``; evaluation holds out the states past them), or None for new layouts
    (``"sampled"``: no stored state is trained on)."""
    if init_states not in INIT_STATES:
        raise ValueError(f"unknown init_states {init_states!r}: valid {INIT_STATES}")
    return tuple(range(demo_init_state_end)) if init_states == "suite" else None


@dataclasses.dataclass(frozen=True)
class Start:
    """Where an episode starts: ``env.reset(seed=seed, options={"task_id": ..., "init_state_id": ...})``, or from the
    new layout of ``layout_seed`` (``init_state_id`` is then ``SAMPLED_INIT_STATE``; see :class:`LiberoEnv`)."""

    task_id: int
    init_state_id: int
    seed: int | None = None
    layout_seed: int | None = None

    @property
    def options(self) -> dict[str, int]:
        if self.layout_seed is not None:
            return {"task_id": self.task_id, "layout_seed": self.layout_seed}
        return {"task_id": self.task_id, "init_state_id": self.init_state_id}


def draw_start(
    rng: np.random.Generator,
    task_ids: Sequence[int],
    init_state_ids: Sequence[int] | None,
    num_init_states: Callable,
    init_states: str = "suite",
    task_weights: Sequence[float] | None = None,
    state_weights: Callable[[int, list[int]], Sequence[float]] | None = None,
) -> Start:
    """A drawn task and start (GRPO's groups and the rollout workers draw their starts here). With
    ``init_states="suite"`` the start is one of the task's stored init states: of ``init_state_ids`` if given, else of
    all ``num_init_states(task)``; with ``"sampled"`` it is a new layout (a drawn ``layout_seed``). Uniformly, or in
    proportion to ``task_weights`` (one per task) and ``state_weights(task_id, init_state_ids)``
    (:class:`~gym_libero_vla.start_sampler.StartSampler`'s learnability)."""
    if init_states not in INIT_STATES:
        raise ValueError(f"unknown init_states {init_states!r}: valid {INIT_STATES}")
    task_id = int(task_ids[_draw_index(rng, len(task_ids), task_weights)])
    if init_states == "sampled":
        return Start(task_id, SAMPLED_INIT_STATE, layout_seed=int(rng.integers(TRAINING_LAYOUT_SEEDS)))
    if state_weights is None and init_state_ids is None:
        return Start(task_id, int(rng.integers(num_init_states(task_id))))
    candidates = list(init_state_ids) if init_state_ids is not None else list(range(num_init_states(task_id)))
    weights = None if state_weights is None else state_weights(task_id, candidates)
    return Start(task_id, int(candidates[_draw_index(rng, len(candidates), weights)]))


def _draw_index(rng: np.random.Generator, count: int, weights: Sequence[float] | None) -> int:
    """Uniform over ``range(count)``, or in proportion to ``weights``."""
    if weights is None:
        return int(rng.integers(count))
    weights = np.asarray(weights, dtype=float)
    return int(rng.choice(count, p=weights / weights.sum()))


@dataclasses.dataclass
class Rollout:
    """One finished episode of :func:`run_episodes`."""

    index: int
    """Its position in ``starts``."""
    episode: Episode
    seconds: float
    """Its share of the wall time: its own resets and env steps, plus its part of each batched policy call."""
    frames: list[np.ndarray] = dataclasses.field(default_factory=list)
    """``env.render()`` after the reset and after every step (``render=True`` only)."""
    relabelled: list[Episode] = dataclasses.field(default_factory=list)
    """Successful episodes of other tasks this one reached (an env wrapped in ``RolloutRelabel``)."""


class _Slots:
    """Env slots over one env, a list of envs (stepped in turn) or a vector env (stepped together)."""

    def __init__(self, env):
        self.vector = isinstance(env, gym.vector.VectorEnv)
        self.envs = list(env) if isinstance(env, (list, tuple)) else [env]
        if not self.envs:
            raise ValueError("no envs: give an env, a non-empty list of envs or a vector env")
        self.size = env.num_envs if self.vector else len(self.envs)
        spec = getattr(self.envs[0], "spec", None)
        self.env_id = spec.id if spec is not None else ""
        shape = (self.envs[0].single_action_space if self.vector else self.envs[0].action_space).shape
        self.action_chunk = shape[0] if len(shape) == 2 else 1

    def reset(self, resets: dict[int, Start]) -> dict[int, dict]:
        """Reset each slot of ``resets`` to its start; their first observations (single-env layout)."""
        if not self.vector:
            return {
                index: self.envs[index].reset(seed=start.seed, options=start.options)[0] for index, start in resets.items()
            }
        observations = {}
        by_options = collections.defaultdict(list)  # one reset call per distinct options, seeds per sub-env
        for index, start in resets.items():
            by_options[(start.task_id, start.init_state_id, start.layout_seed)].append(index)
        groups = sorted(by_options.values(), key=len, reverse=True)
        calls = [(indices, resets[indices[0]]) for indices in groups]
        if len(resets) == self.size:  # the first reset of a run: all sub-envs at once (one may never have been reset)
            calls[0] = (list(range(self.size)), calls[0][1])
        for indices, start in calls:
            seeds = [resets[index].seed if index in indices else None for index in range(self.size)]
            options = dict(start.options)
            if len(indices) < self.size:
                mask = np.zeros(self.size, dtype=bool)
                mask[indices] = True
                options["reset_mask"] = mask  # in a fresh dict: Gymnasium pops the mask
            obs, _ = self.envs[0].reset(seed=seeds, options=options)
            observations.update({index: {key: value[index] for key, value in obs.items()} for index in indices})
        return observations

    def step(self, indices: list[int], actions: np.ndarray) -> dict[int, tuple]:
        """Step the slots ``indices`` (all of them, for a vector env) with ``actions`` (one row each); per slot
        ``(obs, reward, terminated, truncated, actions executed, relabelled episodes)``."""
        if not self.vector:
            results = {}
            for row, index in enumerate(indices):
                obs, reward, terminated, truncated, info = self.envs[index].step(actions[row])
                executed = int(info.get("executed_actions", 1))
                results[index] = (obs, reward, terminated, truncated, executed, list(info.get("relabelled_episodes") or []))
            return results
        obs, rewards, terminated, truncated, info = self.envs[0].step(actions)
        mask = info.get("_relabelled_episodes")
        executed = info.get("executed_actions", np.ones(self.size, dtype=np.int64))
        results = {}
        for index in indices:
            relabelled = []
            if "relabelled_episodes" in info and (mask is None or mask[index]):
                relabelled = list(info["relabelled_episodes"][index] or [])
            sub_obs = {key: value[index] for key, value in obs.items()}
            results[index] = (sub_obs, rewards[index], terminated[index], truncated[index], int(executed[index]), relabelled)
        return results

    def render(self, index: int) -> np.ndarray:
        return self.envs[index].render()


@dataclasses.dataclass
class _Running:  # the episode a slot is in
    index: int
    start: Start
    obs: dict
    seconds: float
    observations: list[dict] = dataclasses.field(default_factory=list)
    actions: list[np.ndarray] = dataclasses.field(default_factory=list)
    log_probs: list[np.ndarray] = dataclasses.field(default_factory=list)
    rewards: list[float] = dataclasses.field(default_factory=list)
    executed: list[int] = dataclasses.field(default_factory=list)
    frames: list[np.ndarray] = dataclasses.field(default_factory=list)


class _Schedule:
    """Pending starts by task; a freed slot takes one of its own task, else of the task it helps most."""

    def __init__(self, starts: Sequence[Start]):
        self.pending: dict[int, collections.deque] = {}
        for index, start in enumerate(starts):
            self.pending.setdefault(start.task_id, collections.deque()).append((index, start))

    def next(self, current_task: int | None, tasks_in_progress: list[int]) -> tuple[int, Start] | None:
        if not self.pending:
            return None
        if current_task not in self.pending:
            on_task = collections.Counter(tasks_in_progress)
            current_task = max(self.pending, key=lambda task_id: len(self.pending[task_id]) / (1 + on_task[task_id]))
        item = self.pending[current_task].popleft()
        if not self.pending[current_task]:
            del self.pending[current_task]
        return item


def run_episodes(
    policy,
    env,
    starts: Sequence[Start],
    *,
    deterministic: bool = False,
    temperature: float = 1.0,
    record_observations: bool = True,
    policy_version: int = 0,
    render: bool = False,
    on_step: Callable[[int], bool] | None = None,
) -> Iterator[Rollout]:
    """One episode per start, ``env``'s slots at a time (see the module docstring), yielded as each ends.

    Args:
        policy: a :class:`~gym_libero_vla.policies.base.VLAPolicy`; its ``observation_keys`` are what it reads.
        env: an env, a list of envs, or a vector env (whose sub-envs are reset in place; ``render`` is not
            available there).
        starts: where the episodes begin, in order.
        deterministic: greedy action tokens (OpenVLA's decoding); otherwise sampled from
            ``softmax(logits / temperature)`` with torch's global RNG (sampled episodes then depend on which
            episodes share a batch).
        record_observations: keep the observations the policy read in each episode (False: only the
            instruction; evaluation needs no more and saves the memory of camera frames).
        policy_version: recorded in the episodes (the learner update that produced them).
        render: keep ``env.render()`` frames (videos).
        on_step: called after every batched step with the number of env steps (actions executed) it took; False stops
            at once (episodes not finished are dropped).
    """
    runner = _Runner(policy, _Slots(env), starts, record_observations, policy_version, render)
    try:
        runner.begin(list(range(runner.slots.size)))
        while runner.running:
            num_steps, ended = runner.step(deterministic, temperature)
            if on_step is not None and not on_step(num_steps):
                return
            for _, rollout in ended:
                yield rollout
            if ended:
                runner.begin([index for index, _ in ended])
    finally:
        runner.close()


def run_group(
    policy,
    env,
    start: Start,
    group_size: int,
    *,
    temperature: float = 1.0,
    policy_version: int = 0,
    on_step: Callable[[int], bool] | None = None,
) -> tuple[list[Episode], list[Episode]] | None:
    """One GRPO group: ``group_size`` sampled episodes from ``start`` (in order) and the episodes hindsight-relabelled
    from them, all tagged with one new ``group_id`` (an episode store's :meth:`groups` reads them back whole); None
    if ``on_step`` stopped it on the way (the group is dropped). GRPO's own rollouts and the asynchronous rollout
    workers both sample their groups here."""
    rollouts = sorted(
        run_episodes(policy, env, [start] * group_size, temperature=temperature, policy_version=policy_version,
                     on_step=on_step),
        key=lambda rollout: rollout.index,
    )  # fmt: skip
    if len(rollouts) < group_size:
        return None
    episodes = [rollout.episode for rollout in rollouts]
    relabelled = [episode for rollout in rollouts for episode in rollout.relabelled]
    group_id = uuid.uuid4().hex
    for episode in episodes + relabelled:
        episode.group_id = group_id
    return episodes, relabelled


class _Runner:
    """The state of :func:`run_episodes`: which slot runs which episode, and what it recorded so far."""

    def __init__(self, policy, slots: _Slots, starts, record_observations: bool, policy_version: int, render: bool):
        if render and slots.vector:
            raise ValueError("render=True needs single envs (a vector env's sub-envs render in their own processes)")
        if slots.action_chunk != policy.execute_steps:
            raise ValueError(
                f"the env executes {slots.action_chunk} action(s) per step but the policy executes {policy.execute_steps} "
                f"of each chunk of {policy.chunk_size}: make the env with action_chunk={policy.execute_steps}"
            )
        self.policy, self.slots, self.policy_version, self.render = policy, slots, policy_version, render
        self.keys = tuple(policy.observation_keys)
        self.recorded = self.keys if record_observations else ("instruction",)
        self.schedule = _Schedule(starts)
        self.running: dict[int, _Running] = {}
        self.idle: dict[int, dict] = {}  # vector-env sub-envs with no start left: stepped, not recorded
        self.last_start: dict[int, Start] = {}
        # Videos of chunked episodes get a frame after every executed action, not one per chunk.
        self.action_frames: dict[int, list[np.ndarray]] = {}
        self.hooks: list[tuple[list, Callable]] = []
        if render and slots.action_chunk > 1:
            for index, env in enumerate(slots.envs):
                self.action_frames[index] = frames = []
                hook = functools.partial(lambda env, frames: frames.append(env.render()), env, frames)
                env.unwrapped.action_hooks.append(hook)
                self.hooks.append((env.unwrapped.action_hooks, hook))

    def close(self) -> None:
        for hooks, hook in self.hooks:
            hooks.remove(hook)
        self.hooks = []

    def begin(self, indices: list[int]) -> None:
        """Give each slot of ``indices`` the next start (or, in a vector env, its last one to idle on)."""
        chosen: dict[int, tuple[int | None, Start]] = {}
        for index in indices:
            previous = self.last_start.get(index)
            in_progress = [run.start.task_id for run in self.running.values()]
            item = self.schedule.next(previous.task_id if previous else None, in_progress)
            if item is not None:
                chosen[index] = item
            elif self.slots.vector and previous is not None:
                chosen[index] = (None, previous)
        if not chosen:
            return
        clock = time.perf_counter()
        observations = self.slots.reset({index: start for index, (_, start) in chosen.items()})
        share = (time.perf_counter() - clock) / len(chosen)
        for index, (position, start) in chosen.items():
            self.last_start[index] = start
            if position is None:
                self.idle[index] = observations[index]
                continue
            self.idle.pop(index, None)
            self.running[index] = _Running(position, start, observations[index], share)
            if self.render:
                self.running[index].frames.append(self.slots.render(index))
                self.action_frames.get(index, []).clear()

    def step(self, deterministic: bool, temperature: float) -> tuple[int, list[tuple[int, Rollout]]]:
        """One batched policy call and env step; the env steps taken (actions executed) and the episodes that ended."""
        running, slots = self.running, self.slots
        stepping = list(range(slots.size)) if slots.vector else sorted(running)
        active = [index for index in stepping if index in running]
        clock = time.perf_counter()
        observations = [running[i].obs if i in running else self.idle[i] for i in stepping]
        batch = stack_observations([{key: obs[key] for key in self.keys} for obs in observations])
        with torch.no_grad():
            actions, _, log_probs = self.policy.act(batch, deterministic=deterministic, temperature=temperature)
        actions, log_probs = actions.cpu().numpy(), log_probs.cpu().numpy()
        policy_share = (time.perf_counter() - clock) / len(active)
        clock = time.perf_counter()
        chunked = self.policy.chunk_size > 1
        results = slots.step(stepping, actions[:, : self.policy.execute_steps] if chunked else actions)
        step_share = (time.perf_counter() - clock) / len(stepping)
        ended: list[tuple[int, Rollout]] = []
        env_steps = 0
        for row, index in enumerate(stepping):
            obs, reward, terminated, truncated, executed, relabelled = results[index]
            if index not in running:
                self.idle[index] = obs
                continue
            run = running[index]
            run.observations.append({key: run.obs[key] for key in self.recorded})
            run.actions.append(actions[row])
            run.log_probs.append(log_probs[row])
            run.rewards.append(float(reward))
            run.executed.append(executed)
            env_steps += executed
            run.seconds += policy_share + step_share
            run.obs = obs
            if self.render and index in self.action_frames:  # one frame per executed action of the chunk
                run.frames.extend(self.action_frames[index])
                self.action_frames[index].clear()
            elif self.render:
                run.frames.append(slots.render(index))
            if terminated or truncated:
                episode = _episode(run, self.recorded, self.policy_version, slots.env_id)
                ended.append((index, Rollout(run.index, episode, run.seconds, run.frames, relabelled)))
                del running[index]
        return env_steps, ended


def _episode(run: _Running, keys: Sequence[str], policy_version: int, env_id: str) -> Episode:
    first = run.observations[0]
    observations = {key: first[key] if key == "instruction" else np.stack([obs[key] for obs in run.observations])
                    for key in keys}  # fmt: skip
    rewards = np.array(run.rewards, dtype=np.float32)
    actions = np.stack(run.actions)  # (T, 7), or (T, chunk_size, 7) chunks
    return Episode(
        observations=observations, actions=actions, rewards=rewards, success=bool(rewards.sum() > 0),
        task_id=run.start.task_id, init_state_id=run.start.init_state_id, policy_version=policy_version,
        source="online", log_probs=np.stack(run.log_probs), env_id=env_id, seed=run.start.seed,
        executed=np.array(run.executed) if actions.ndim == 3 else None,
    )  # fmt: skip
