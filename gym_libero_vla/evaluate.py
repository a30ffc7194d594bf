"""Evaluate a saved VLA policy on a LIBERO suite: per-task success over fixed init states, videos, a plot.

    python -m gym_libero_vla.evaluate runs/grpo/final --suite spatial --task-ids 0 1 \\
        --eval-init-state-start 20 --eval-num-init-states 10 --video-episodes 2 --out-dir runs/eval

Every (task, init state, seed) triple is one deterministic episode (greedy action tokens, OpenVLA's
decoding) from the env's ``reset(seed=seed, options={"task_id", "init_state_id"})``, so two evaluations of
the same checkpoint on the same triples agree. ``--layouts N`` starts from N new layouts per task instead (LIBERO's
own placement sampler, reset option ``layout_seed``; :data:`EVAL_LAYOUT_SEEDS_FROM`): how a policy does beyond the 50
scenes LIBERO stores per task. The env is made to give exactly what the policy reads
(``policy.observation_keys``): cameras and image size for a vision policy, ``privileged_state=True`` for
one that reads "object_state". Writes ``success.md`` (the Markdown table, also printed), ``success.json``
(per-task and per-episode results), ``success.png`` (a bar plot) and ``videos/*.mp4`` (the first
``video_episodes`` episodes, agentview, upright).

:func:`evaluate_policy` is the same loop for training scripts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from typing import Annotated, Literal

import gymnasium as gym
import numpy as np
import tyro
from tqdm import tqdm

import gym_libero_vla  # noqa: F401  (registers the env ids)
from gym_libero_vla.episode import SAMPLED_INIT_STATE
from gym_libero_vla.libero_env import LAYOUT_VERSION
from gym_libero_vla.policies.base import TorchThreads, VLAPolicy, load_policy, weights_fingerprint
from gym_libero_vla.rollouts import TRAINING_LAYOUT_SEEDS, Rollout, Start, run_episodes
from gym_libero_vla.run_lock import exclusive
from gym_libero_vla.suites import resolve_init_state_ids, resolve_suite, resolve_task_ids, suite_tasks

CAMERA_KEYS = ("agentview", "wrist")
VECTORIZATION_MODES = ("sync", "async")
VIDEO_FPS = 20
EVAL_LAYOUT_SEEDS_FROM = TRAINING_LAYOUT_SEEDS
"""New-layout evaluations start from layout seeds 2^31, 2^31 + 1, ...: GRPO draws its groups' new layouts below it
(:data:`gym_libero_vla.rollouts.TRAINING_LAYOUT_SEEDS`) and demos derive theirs from ``--seed`` * 1,000,003 + task *
1000 + index, so no training layout is an evaluation layout."""


@dataclasses.dataclass
class EvalRange:
    """Which init states of every task an evaluation starts from, one greedy episode each (per seed): the same two
    flags, ``--eval-init-state-start`` and ``--eval-num-init-states``, on every CLI that evaluates."""

    eval_init_state_start: int = 20
    """First evaluation init state; demos and GRPO groups from init states 0..19 leave 20.. held out."""
    eval_num_init_states: int = 10
    """Evaluation init states per task: eval_init_state_start .. eval_init_state_start + eval_num_init_states - 1
    (train_sft.py: 0 skips its evaluation)."""

    def init_state_ids(self, env_id: str, task_ids: Sequence[int] | None = None) -> tuple[int, ...]:
        """The range as init state ids, checked against every task of ``task_ids`` (default: all) of ``env_id``."""
        for name, minimum in (("eval_init_state_start", 0), ("eval_num_init_states", 1)):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
                raise ValueError(f"{name} {value!r} must be an int >= {minimum}")
        start = self.eval_init_state_start
        return resolve_init_state_ids(env_id, task_ids, range(start, start + self.eval_num_init_states))

    def held_out(self, demo_init_state_end: int) -> bool:
        """Whether the range lies past the training init states 0 .. ``demo_init_state_end`` - 1."""
        return self.eval_init_state_start >= demo_init_state_end

    def check_held_out(self, demo_init_state_end: int) -> None:
        """Refuse a range that overlaps the training init states 0 .. ``demo_init_state_end`` - 1."""
        if not self.held_out(demo_init_state_end):
            raise ValueError(
                f"eval_init_state_start {self.eval_init_state_start} lies inside the training init states "
                f"0..{demo_init_state_end - 1} (demos and GRPO groups): give >= {demo_init_state_end}"
            )


@dataclasses.dataclass
class EvalArgs:
    """Roll out a policy checkpoint deterministically and write a per-task success table, plot and videos."""

    checkpoint: Annotated[str, tyro.conf.Positional]
    """Policy checkpoint directory (``save_pretrained`` / ``SFT.save`` / ``GRPO.save``)."""
    suite: str = "spatial"
    """LIBERO suite: short name (spatial, object, goal, 10, 90), LIBERO name or env id."""
    task_ids: tuple[int, ...] | None = None
    """Tasks to evaluate (default: every task of the suite)."""
    init_states: tuple[int, ...] | None = None
    """Explicit init state ids (overrides --eval-init-state-start / --eval-num-init-states)."""
    layouts: int = 0
    """Start from this many new layouts per task instead of stored init states (LIBERO's placement sampler; layout
    seeds from 2^31, which no demo or GRPO group uses); 0: the stored init states."""
    eval: Annotated[EvalRange, tyro.conf.OmitArgPrefixes] = dataclasses.field(default_factory=EvalRange)
    """The init states of every task: --eval-init-state-start, --eval-num-init-states."""
    seeds: tuple[int, ...] = (0,)
    """Reset seeds; each (task, init state) is run once per seed."""
    max_episode_steps: int | None = None
    """Step limit per episode (default: the suite's, OpenVLA's evaluation limits)."""
    deterministic: bool = True
    """Greedy action tokens (OpenVLA's decoding); False samples them."""
    execute_steps: int | None = None
    """A chunking policy's receding horizon: actions of each chunk executed before it is queried again (1 ..
    chunk size; default: the checkpoint's). Fewer re-plan from fresh frames more often, at a frame per query."""
    video_episodes: int = 2
    """Record this many episodes (the first ones) as mp4; 0 records none."""
    out_dir: str = "runs/eval"
    """success.md, success.json, success.png and videos/ go here."""
    num_envs: int = 4
    """Envs run side by side, the policy acting on all of them in one batched call (each holds one simulator,
    ~0.3 GB, ~1 GB with cameras); 1 runs the episodes one after another."""
    vectorization_mode: Literal["sync", "async"] = "sync"
    """"sync": the envs live in this process and step in turn; "async": each in a worker process (gym.make_vec),
    all stepping at once: one per core keeps every core simulating and rendering."""
    threads: Annotated[TorchThreads, tyro.conf.OmitArgPrefixes] = dataclasses.field(default_factory=TorchThreads)
    """Torch CPU threads: --torch-threads (default 1; more than the free cores slows small models down a lot)."""
    progress: bool = True
    """Show a tqdm progress bar over episodes."""
    resume: bool = False
    """Append every finished episode to ``<out_dir>/episodes.jsonl`` and skip those already there for the same weights,
    horizon and step limit: a killed evaluation continues where it stopped (greedy decoding only)."""


def env_kwargs_for_policy(policy: VLAPolicy, max_episode_steps: int | None = None) -> dict:
    """``gym.make`` options that give exactly the observation entries ``policy.observation_keys`` names (frames of its
    size, rendered with or without reflections as it was trained), its gripper
    convention when it is not LIBERO's, and, for a chunking policy, ``action_chunk=policy.execute_steps``. With
    ``max_episode_steps``, the episode step limit in env steps (actions): Gymnasium's ``TimeLimit`` counts ``step``
    calls, which are chunks for a chunking policy, so the env's own ``max_env_steps`` is set too."""
    keys = tuple(policy.observation_keys)
    cameras = tuple(key for key in keys if key in CAMERA_KEYS)
    kwargs: dict = {"obs_mode": "rgb+state" if cameras else "state"}
    if cameras:
        config = getattr(policy, "config", None)
        kwargs["cameras"] = cameras
        kwargs["image_size"] = int(getattr(config, "image_size", 128))
        kwargs["reflections"] = bool(getattr(config, "reflections", True))  # rendered as the policy was trained
    if "object_state" in keys:
        kwargs["privileged_state"] = True
    if getattr(policy, "gripper_convention", "libero") != "libero":  # e.g. a raw OpenVLA checkpoint
        kwargs["gripper_convention"] = policy.gripper_convention
    if policy.execute_steps > 1:
        kwargs["action_chunk"] = policy.execute_steps
    if max_episode_steps is not None:
        kwargs["max_episode_steps"] = int(max_episode_steps)
        if policy.execute_steps > 1:
            kwargs["max_env_steps"] = int(max_episode_steps)
    return kwargs


def check_reflections(policy: VLAPolicy, reflections: bool, source: str) -> None:
    """A pixel policy must see frames rendered as it was trained (with or without reflections, its config's
    ``reflections``; policies without the field saw LIBERO's, with them): else a ValueError naming the flag to pass."""
    cameras = [key for key in policy.observation_keys if key in CAMERA_KEYS]
    trained = bool(getattr(getattr(policy, "config", None), "reflections", True))
    if cameras and trained != reflections:
        flag = "--policy.reflections" if trained else "--policy.no-reflections"
        raise ValueError(f"{source} was trained on frames {'with' if trained else 'without'} reflections: pass {flag}")


def evaluate_policy(
    policy: VLAPolicy,
    env_id: str,
    task_ids: Sequence[int] | None = None,
    init_state_ids: Sequence[int] = tuple(range(20, 30)),
    seeds: Sequence[int] = (0,),
    max_episode_steps: int | None = None,
    deterministic: bool = True,
    temperature: float = 1.0,
    video_episodes: int = 0,
    video_dir: str | None = None,
    progress: bool = True,
    num_envs: int = 1,
    starts: Sequence[Start] | None = None,
    episodes_path: str | None = None,
    vectorization_mode: str = "sync",
    layouts: int = 0,
) -> dict:
    """Success of ``policy`` on every (task, init state, seed) of ``env_id`` (on every (task, new layout, seed) with
    ``layouts`` > 0: :func:`layout_starts`; or on ``starts``, when given); one
    episode each, ``num_envs`` envs side by side with one batched policy call per step
    (:func:`gym_libero_vla.rollouts.run_episodes`): in this process (``vectorization_mode="sync"``) or each in a
    worker process of ``gym.make_vec`` (``"async"``: the simulators step at the same time, one core each). The
    outcomes do not depend on either (each episode is seeded by its start; greedy decoding is per row).

    With ``episodes_path`` the evaluation resumes: every finished episode is appended to that JSON-lines file at
    once (with a fingerprint of the policy's weights and receding horizon, :func:`behaviour_fingerprint`, and the
    step limit), and episodes already there for the same weights, horizon, step limit and decoding are not run
    again, also those another process evaluating into the same file wrote while this one waited for it (the file is
    locked while in use).

    Returns ``{"env_id", "task_ids", "init_state_ids", "seeds", "max_episode_steps", "deterministic", "success_rate"
    (over all episodes), "per_task": {task_id: {"instruction", "successes", "episodes", "success_rate"}}, "episodes":
    [{"task_id", "init_state_id", "seed", "success", "length", "seconds"}] in the order of the starts, "videos":
    [paths], "run_now" (episodes run by this call), "seconds"}``; with new layouts also "layout_seeds" and
    "layout_version" (:data:`~gym_libero_vla.libero_env.LAYOUT_VERSION`), and each of
    their episodes has its "layout_seed" (its "init_state_id" is ``SAMPLED_INIT_STATE``).
    """
    suite = resolve_suite(env_id)
    tasks = suite_tasks(suite.libero_name)
    if starts is None:
        task_ids = resolve_task_ids(suite.env_id, task_ids)
        seeds = tuple(int(seed) for seed in seeds)
        if not seeds:
            raise ValueError("seeds is empty: give at least one seed")
        if layouts:
            starts = layout_starts(task_ids, layouts, seeds)
        else:
            init_state_ids = resolve_init_state_ids(suite.env_id, task_ids, init_state_ids)
            starts = [Start(t, i, s) for t in task_ids for i in init_state_ids for s in seeds]
    elif layouts:
        raise ValueError(f"layouts {layouts!r} and starts exclude each other: give the new layouts' starts in starts")
    if not starts:
        raise ValueError("starts is empty: give at least one start")
    starts = [Start(int(s.task_id), int(s.init_state_id), None if s.seed is None else int(s.seed),
                    None if s.layout_seed is None else int(s.layout_seed)) for s in starts]  # fmt: skip
    task_ids = tuple(dict.fromkeys(start.task_id for start in starts))
    init_state_ids = tuple(sorted({start.init_state_id for start in starts}))
    seeds = tuple(sorted({start.seed for start in starts if start.seed is not None}))
    layout_seeds = tuple(dict.fromkeys(start.layout_seed for start in starts if start.layout_seed is not None))
    if video_episodes > 0 and video_dir is None:
        raise ValueError(f"video_episodes {video_episodes} needs a video_dir")
    if vectorization_mode not in VECTORIZATION_MODES:
        raise ValueError(f"unknown vectorization_mode {vectorization_mode!r}: valid {VECTORIZATION_MODES}")
    if episodes_path is not None and not deterministic:
        raise ValueError("episodes_path resumes deterministic evaluations only: sampled episodes are not repeatable")
    env_kwargs = env_kwargs_for_policy(policy, max_episode_steps)
    max_steps = max_episode_steps or suite.max_episode_steps
    lock = (
        exclusive(episodes_path + ".lock", f"evaluation into {episodes_path}") if episodes_path else contextlib.nullcontext()
    )
    was_training = policy.training
    policy.eval()
    start_time = time.time()
    with lock:
        fingerprint = behaviour_fingerprint(policy) if episodes_path else None
        done = recorded_episodes(episodes_path, fingerprint, max_steps) if episodes_path else {}
        todo = [start for start in starts if start_key(start) not in done]
        rows, videos = _run(policy, suite.env_id, task_ids, todo, env_kwargs, num_envs, deterministic, temperature,
                            video_episodes, video_dir, progress, episodes_path, fingerprint, max_steps,
                            vectorization_mode)  # fmt: skip
    policy.train(was_training)
    done.update({row_key(row): row for row in rows})
    episodes = [done[start_key(start)] for start in starts]
    per_task = {}
    for task_id in task_ids:
        outcomes = [episode["success"] for episode in episodes if episode["task_id"] == task_id]
        per_task[task_id] = {
            "instruction": tasks[task_id].instruction,
            "successes": int(sum(outcomes)),
            "episodes": len(outcomes),
            "success_rate": float(np.mean(outcomes)),
        }
    return {
        "env_id": suite.env_id,
        "task_ids": list(task_ids),
        "init_state_ids": list(init_state_ids),
        **({"layout_seeds": list(layout_seeds), "layout_version": LAYOUT_VERSION} if layout_seeds else {}),
        "seeds": list(seeds),
        "max_episode_steps": max_steps,
        "deterministic": deterministic,
        "success_rate": float(np.mean([episode["success"] for episode in episodes])),
        "per_task": per_task,
        "episodes": episodes,
        "videos": videos,
        "run_now": len(rows),
        "seconds": time.time() - start_time,
    }


def _run(policy, env_id, task_ids, starts, env_kwargs, num_envs, deterministic, temperature, video_episodes, video_dir,
         progress, episodes_path, fingerprint, max_steps, vectorization_mode) -> tuple[list[dict], list[str]]:  # fmt: skip
    """Run ``starts`` (the first ``video_episodes`` in an env of their own that renders), appending each finished
    episode to ``episodes_path`` when given; the rows and the video paths."""
    rows: list[dict] = []
    videos: list[str] = []
    if not starts:
        return rows, videos
    bar = tqdm(total=len(starts), desc=f"evaluate {env_id}", unit="episode", disable=not progress)
    file = _open_episodes_file(episodes_path) if episodes_path else None

    def finish(start: Start, rollout: Rollout, envs_used: int) -> None:
        episode = rollout.episode
        row = {"task_id": start.task_id, "init_state_id": start.init_state_id, "seed": start.seed,
               **({"layout_seed": start.layout_seed} if start.layout_seed is not None else {}),
               "success": episode.success, "length": episode.num_env_steps, "seconds": rollout.seconds}  # fmt: skip
        rows.append(row)
        if file is not None:
            record = {**row, "policy_sha": fingerprint, "max_episode_steps": max_steps, "num_envs": envs_used,
                      **({"layout_version": LAYOUT_VERSION} if start.layout_seed is not None else {})}  # fmt: skip
            file.write(json.dumps(record) + "\n")
            file.flush()
            os.fsync(file.fileno())
        bar.update(1)
        bar.set_postfix(success_rate=f"{np.mean([r['success'] for r in rows]):.2f}")

    video_starts, batched_starts = starts[:video_episodes], starts[video_episodes:]
    try:
        if video_starts:
            # Videos come from an env of their own (a renderer costs ~0.7 GB per env).
            video_env = gym.make(env_id, task_ids=task_ids, render_mode="rgb_array", **env_kwargs)
            try:
                for rollout in run_episodes(policy, video_env, video_starts, deterministic=deterministic,
                                            temperature=temperature, record_observations=False, render=True):  # fmt: skip
                    start = video_starts[rollout.index]
                    videos.append(_write_video(rollout.frames, video_dir, start, rollout.episode.success))
                    finish(start, rollout, 1)
            finally:
                video_env.close()
        if batched_starts:
            envs = make_eval_envs(env_id, num_envs, task_ids, num_runs=len(batched_starts),
                                  vectorization_mode=vectorization_mode, **env_kwargs)  # fmt: skip
            vector = isinstance(envs, gym.vector.VectorEnv)
            try:
                _check_object_state(policy, envs.single_observation_space if vector else envs[0].observation_space, env_id)
                for rollout in run_episodes(policy, envs, batched_starts, deterministic=deterministic,
                                            temperature=temperature, record_observations=False):  # fmt: skip
                    finish(batched_starts[rollout.index], rollout, envs.num_envs if vector else len(envs))
            finally:
                for env in [envs] if vector else envs:
                    env.close()
    finally:
        bar.close()
        if file is not None:
            file.close()
    return rows, videos


def _check_object_state(policy: VLAPolicy, observation_space: gym.spaces.Dict, env_id: str) -> None:
    if "object_state" not in policy.observation_keys:
        return
    env_dim = observation_space["object_state"].shape[0]
    policy_dim = getattr(getattr(policy, "config", None), "object_state_dim", env_dim)
    if env_dim != policy_dim:
        raise ValueError(f"the policy reads {policy_dim} object_state numbers but {env_id} gives {env_dim}")


def behaviour_fingerprint(policy: VLAPolicy) -> str:
    """What a recorded evaluation episode is keyed by: the weights' fingerprint, and the receding horizon when the
    policy executes fewer actions than a chunk (the same weights then act differently)."""
    fingerprint = weights_fingerprint(policy)
    return fingerprint if policy.execute_steps == policy.chunk_size else f"{fingerprint}-execute{policy.execute_steps}"


def read_episode_rows(path: str) -> list[dict]:
    """The lines of an ``episodes_path`` file; a line cut short by a kill is skipped."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as file:
        for line in file:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def drop_rows_after(path: str, num_timesteps: int) -> int:
    """Remove the rows of a training log (JSON lines with "num_timesteps", such as ``evaluations.jsonl``) past
    ``num_timesteps``: a run that resumes from a checkpoint redoes the training after it, so what was logged then
    describes weights that no longer exist. The file is rewritten atomically; returns how many rows went."""
    rows = read_episode_rows(path)
    kept = [row for row in rows if row.get("num_timesteps", 0) <= num_timesteps]
    if len(kept) < len(rows):
        with open(path + ".tmp", "w") as file:
            file.writelines(json.dumps(row) + "\n" for row in kept)
        os.replace(path + ".tmp", path)
    return len(rows) - len(kept)


def layout_starts(task_ids: Sequence[int], num_layouts: int, seeds: Sequence[int] = (0,)) -> list[Start]:
    """``num_layouts`` new layouts of every task (layout seeds :data:`EVAL_LAYOUT_SEEDS_FROM` + 0, 1, ...: the same
    seeds for every task, whose scenes differ), each run once per seed."""
    if not (isinstance(num_layouts, (int, np.integer)) and not isinstance(num_layouts, bool) and num_layouts >= 1):
        raise ValueError(f"layouts {num_layouts!r} must be an int >= 1 (new layouts per task)")
    return [Start(int(task_id), SAMPLED_INIT_STATE, int(seed), layout_seed=EVAL_LAYOUT_SEEDS_FROM + index)
            for task_id in task_ids for index in range(num_layouts) for seed in seeds]  # fmt: skip


def start_key(start: Start) -> tuple:
    """What identifies an evaluation episode: (task, init state, seed, layout seed or None)."""
    return (start.task_id, start.init_state_id, start.seed, start.layout_seed)


def row_key(row: dict) -> tuple:
    """:func:`start_key` of an episode row (rows of stored init states carry no "layout_seed")."""
    return (row["task_id"], row["init_state_id"], row["seed"], row.get("layout_seed"))


def recorded_episodes(path: str, fingerprint: str, max_steps: int) -> dict[tuple, dict]:
    """The rows of ``path`` run by the weights of ``fingerprint`` with this step limit, by :func:`row_key`."""
    keep = ("task_id", "init_state_id", "seed", "layout_seed", "success", "length", "seconds")
    return {
        row_key(row): {key: row[key] for key in keep if key in row}
        for row in read_episode_rows(path)
        if row.get("policy_sha") == fingerprint
        and row.get("max_episode_steps") == max_steps
        # A new layout drawn another way (LAYOUT_VERSION; rows written before it carry none: version 1) started
        # elsewhere: it is run again.
        and ("layout_seed" not in row or row.get("layout_version", 1) == LAYOUT_VERSION)
    }


def _open_episodes_file(path: str):
    """``path`` for appending; a last line a kill cut short is ended first, so the next one stays readable."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    cut_short = False
    if os.path.exists(path) and os.path.getsize(path):
        with open(path, "rb") as file:
            file.seek(-1, os.SEEK_END)
            cut_short = file.read(1) != b"\n"
    file = open(path, "a")  # noqa: SIM115  (closed by the caller)
    if cut_short:
        file.write("\n")
    return file


def make_eval_envs(
    env_id: str,
    num_envs: int,
    task_ids: Sequence[int] | None = None,
    *,
    num_runs: int | None = None,
    vectorization_mode: str = "sync",
    **env_kwargs,
) -> list[gym.Env] | gym.vector.VectorEnv:
    """``num_envs`` envs of ``env_id`` for :func:`~gym_libero_vla.rollouts.run_episodes`: a list of envs in this
    process (``vectorization_mode="sync"``) or a vector env of as many worker processes (``"async"``, our
    ``gym.make_vec`` entry point). With several, each keeps one task's simulator (``max_cached_tasks=1``): a freed
    env takes a start of its own task when there is one. ``num_runs``, the episodes they are for, caps the count
    (envs beyond it would sit idle); at least one is made."""
    if not (isinstance(num_envs, (int, np.integer)) and num_envs >= 1):
        raise ValueError(f"num_envs {num_envs!r} must be an int >= 1")
    if vectorization_mode not in VECTORIZATION_MODES:
        raise ValueError(f"unknown vectorization_mode {vectorization_mode!r}: valid {VECTORIZATION_MODES}")
    if num_runs is not None:
        num_envs = max(1, min(int(num_envs), int(num_runs)))
    if num_envs > 1:
        env_kwargs.setdefault("max_cached_tasks", 1)
    if vectorization_mode == "async":
        return gym.make_vec(env_id, num_envs=int(num_envs), task_ids=task_ids, **env_kwargs)
    envs: list[gym.Env] = []
    try:
        for _ in range(num_envs):
            envs.append(gym.make(env_id, task_ids=task_ids, **env_kwargs))
    except BaseException:
        for env in envs:
            env.close()
        raise
    return envs


def _write_video(frames, video_dir: str, start: Start, success: bool) -> str:
    import imageio.v2 as imageio

    os.makedirs(video_dir, exist_ok=True)
    outcome = "success" if success else "failure"
    where = f"init{start.init_state_id:03d}" if start.layout_seed is None else f"layout{start.layout_seed}"
    name = f"task{start.task_id:02d}_{where}_seed{start.seed}_{outcome}.mp4"
    path = os.path.join(video_dir, name)
    # macro_block_size=1: keep the frame size as is (256 is a multiple of 16 anyway, smaller test frames may not be).
    imageio.mimwrite(path, [np.asarray(frame) for frame in frames], fps=VIDEO_FPS, macro_block_size=1)
    return path


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a success rate of ``successes`` out of ``n`` episodes (z=1.96: 95%).

    Unlike the normal approximation ``p +- z sqrt(p (1 - p) / n)`` it stays inside [0, 1] and is not empty at
    0/n or n/n, which matters for the 20 episodes per task of a LIBERO evaluation (Wilson, 1927)::

        center = (p + z^2 / 2n) / (1 + z^2 / n),  half = z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n)
    """
    if not (isinstance(n, (int, np.integer)) and n >= 1):
        raise ValueError(f"n {n!r} must be an int >= 1 (episodes)")
    if not 0 <= successes <= n:
        raise ValueError(f"successes {successes!r} must be in 0..{n}")
    p = successes / n
    denominator = 1.0 + z**2 / n
    center = (p + z**2 / (2 * n)) / denominator
    half = z * np.sqrt(p * (1.0 - p) / n + z**2 / (4 * n**2)) / denominator
    return max(0.0, float(center - half)), min(1.0, float(center + half))


def difference_interval(successes_a: int, n_a: int, successes_b: int, n_b: int) -> tuple[float, float]:
    """95% interval of ``p_a - p_b`` from the two Wilson intervals (Newcombe, 1998, method 10). It treats the two
    samples as independent; for two policies evaluated on the same init states (paired samples) it is
    conservative."""
    p_a, p_b = successes_a / n_a, successes_b / n_b
    (low_a, high_a), (low_b, high_b) = wilson_interval(successes_a, n_a), wilson_interval(successes_b, n_b)
    delta = p_a - p_b
    return delta - math.hypot(p_a - low_a, high_b - p_b), delta + math.hypot(high_a - p_a, p_b - low_b)


def paired_difference_interval(
    differences, strata=None, num_resamples: int = 10_000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """Bootstrap percentile interval of the mean of paired ``differences``: one per evaluation start (task, init
    state), policy A's success there minus policy B's (each averaged over the seeds both have).

    Starts are resampled with replacement, within each stratum (e.g. task) when ``strata`` is given, so every
    stratum keeps its count. Unlike :func:`difference_interval` it uses the pairing (two policies tend to succeed
    and fail on the same starts, which narrows the interval), and it does not count the same start evaluated
    under several seeds as independent episodes (a greedy policy repeats its episode when the seed changes
    little in the scene, which makes pooled-episode intervals too narrow). Seeded, so a report is reproducible.
    """
    values = np.asarray(differences, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"differences must be a non-empty 1-D sequence, got shape {values.shape}")
    if not (isinstance(num_resamples, (int, np.integer)) and num_resamples >= 1):
        raise ValueError(f"num_resamples {num_resamples!r} must be an int >= 1")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence {confidence!r} must lie in (0, 1)")
    labels = np.zeros(len(values), dtype=np.int64) if strata is None else np.asarray(strata)
    if labels.shape != values.shape:
        raise ValueError(f"strata has shape {labels.shape}, differences {values.shape}: give one label per start")
    rng = np.random.default_rng(seed)
    totals = np.zeros(num_resamples)
    for label in np.unique(labels):
        group = values[labels == label]
        totals += group[rng.integers(len(group), size=(num_resamples, len(group)))].sum(axis=1)
    low, high = np.quantile(totals / len(values), [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0])
    return float(low), float(high)


def success_table(results: dict) -> str:
    """The per-task results as a Markdown table, with an "all" row."""
    if results.get("layout_seeds"):
        layouts = results["layout_seeds"]
        version = results.get("layout_version", 1)
        where = f"{len(layouts)} new layouts per task (layout version {version}, layout seeds {_id_ranges(layouts)})"
    else:
        where = f"init states {_id_ranges(results['init_state_ids'])}"
    lines = [
        f"Success on {results['env_id']}: {where}, seeds {_id_ranges(results['seeds'])}, at most "
        f"{results['max_episode_steps']} steps per episode",
        "",
        "| task | instruction | successes | success rate |",
        "|---:|:---|---:|---:|",
    ]
    total_successes = total_episodes = 0
    for task_id, task in results["per_task"].items():
        lines.append(
            f"| {task_id} | {task['instruction']} | {task['successes']}/{task['episodes']} | {task['success_rate']:.2f} |"
        )
        total_successes += task["successes"]
        total_episodes += task["episodes"]
    lines.append(f"| all | | {total_successes}/{total_episodes} | {results['success_rate']:.2f} |")
    return "\n".join(lines) + "\n"


def _id_ranges(ids: Sequence[int]) -> str:
    ids = list(ids)
    if len(ids) > 2 and ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}..{ids[-1]}"
    return ", ".join(str(i) for i in ids)


def plot_success(results: dict, path: str, title: str | None = None) -> None:
    """A bar per task (success rate), the mean as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task_ids = list(results["per_task"])
    rates = [results["per_task"][task_id]["success_rate"] for task_id in task_ids]
    figure, axes = plt.subplots(figsize=(max(4.0, 0.6 * len(task_ids) + 2.0), 3.2))
    axes.bar([str(task_id) for task_id in task_ids], rates, color="tab:blue")
    axes.axhline(results["success_rate"], color="tab:red", linestyle="--", label=f"mean {results['success_rate']:.2f}")
    axes.set_ylim(0.0, 1.0)
    axes.set_xlabel("task id")
    axes.set_ylabel("success rate")
    axes.set_title(title or f"{results['env_id']} ({len(results['episodes'])} episodes)")
    axes.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(results: dict, out_dir: str, title: str | None = None) -> str:
    """Write success.md, success.json and success.png into ``out_dir``; return the Markdown table."""
    os.makedirs(out_dir, exist_ok=True)
    table = success_table(results)
    with open(os.path.join(out_dir, "success.md"), "w") as file:
        file.write(table)
    with open(os.path.join(out_dir, "success.json"), "w") as file:
        json.dump(results, file, indent=2)
    plot_success(results, os.path.join(out_dir, "success.png"), title)
    return table


def main(args: EvalArgs) -> dict:
    args.threads.apply()
    suite = resolve_suite(args.suite)  # a clear error for an unknown suite, before loading anything
    if args.layouts and args.init_states is not None:
        raise ValueError("--layouts starts from new layouts, --init-states from stored ones: give one of them")
    if args.layouts < 0:
        raise ValueError(f"layouts {args.layouts} must be >= 0: N new layouts per task, or 0 for the stored init states")
    if args.layouts:
        init_state_ids = ()
    elif args.init_states is not None:
        init_state_ids = args.init_states
    else:
        init_state_ids = args.eval.init_state_ids(suite.env_id, args.task_ids)
    if args.resume and not args.deterministic:
        raise ValueError("--resume continues greedy evaluations only (sampled episodes do not repeat): drop one of "
                         "--resume and --no-deterministic")  # fmt: skip
    policy = load_policy(args.checkpoint)
    if args.execute_steps is not None:
        policy.set_execute_steps(args.execute_steps)
    results = evaluate_policy(
        policy, suite.env_id, args.task_ids, init_state_ids, seeds=args.seeds,
        max_episode_steps=args.max_episode_steps, deterministic=args.deterministic,
        video_episodes=args.video_episodes, video_dir=os.path.join(args.out_dir, "videos"), progress=args.progress,
        num_envs=args.num_envs, vectorization_mode=args.vectorization_mode,
        episodes_path=os.path.join(args.out_dir, "episodes.jsonl") if args.resume else None, layouts=args.layouts,
    )  # fmt: skip
    results["checkpoint"] = os.fspath(args.checkpoint)
    results["execute_steps"] = policy.execute_steps
    title = f"{os.path.basename(os.path.normpath(args.checkpoint))} on {suite.env_id}"
    print(write_report(results, args.out_dir, title))
    print(f"wrote {args.out_dir}/success.md, success.json, success.png" + (", videos/" if results["videos"] else ""))
    return results


def __getattr__(name: str):  # names that moved in the restructure: gym_libero_vla/deprecated.py
    from gym_libero_vla.deprecated import moved

    return moved(__name__, name)


if __name__ == "__main__":
    main(tyro.cli(EvalArgs))
