"""Evaluate a saved VLA policy on a LIBERO suite: per-task success over fixed init states, videos, a plot.

    python -m gym_libero_vla.evaluate runs/grpo/final --suite spatial --task-ids 0 1 \\
        --init-state-start 20 --num-init-states 10 --video-episodes 2 --out-dir runs/eval

Every (task, init state, seed) triple is one deterministic episode (greedy action tokens, OpenVLA's
decoding) from the env's ``reset(seed=seed, options={"task_id", "init_state_id"})``, so two evaluations of
the same checkpoint on the same triples agree. The env is made to give exactly what the policy reads
(``policy.observation_keys``): cameras and image size for a vision policy, ``privileged_state=True`` for
one that reads "object_state". Writes ``success.md`` (the Markdown table, also printed), ``success.json``
(per-task and per-episode results), ``success.png`` (a bar plot) and ``videos/*.mp4`` (the first
``video_episodes`` episodes, agentview, upright).

:func:`evaluate_policy` is the same loop for training scripts.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from typing import Annotated

import gymnasium as gym
import numpy as np
import torch
import tyro

import gym_libero_vla  # noqa: F401  (registers the env ids)
from gym_libero_vla.policies.base import VLAPolicy, batch_observation, load_policy, stack_observations
from gym_libero_vla.suites import resolve_suite, suite_tasks

CAMERA_KEYS = ("agentview", "wrist")
VIDEO_FPS = 20


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
    """Explicit init state ids (overrides init_state_start / num_init_states)."""
    init_state_start: int = 20
    """First init state id; demos generated from init states 0..19 leave 20.. held out."""
    num_init_states: int = 10
    """Init states per task: init_state_start .. init_state_start + num_init_states - 1."""
    seeds: tuple[int, ...] = (0,)
    """Reset seeds; each (task, init state) is run once per seed."""
    max_episode_steps: int | None = None
    """Step limit per episode (default: the suite's, OpenVLA's evaluation limits)."""
    deterministic: bool = True
    """Greedy action tokens (OpenVLA's decoding); False samples them."""
    video_episodes: int = 2
    """Record this many episodes (the first ones) as mp4; 0 records none."""
    out_dir: str = "runs/eval"
    """success.md, success.json, success.png and videos/ go here."""
    num_envs: int = 4
    """Envs run side by side in this process, the policy acting on all of them in one batched call (each
    holds one simulator, ~0.3 GB); 1 runs the episodes one after another."""
    torch_threads: int = 1
    """Torch CPU threads; more than the free cores slows small models down a lot."""
    progress: bool = True
    """Show a tqdm progress bar over episodes."""


def env_kwargs_for_policy(policy: VLAPolicy) -> dict:
    """``gym.make`` options that give exactly the observation entries ``policy.observation_keys`` names (and the
    policy's gripper convention, when it is not LIBERO's)."""
    keys = tuple(policy.observation_keys)
    cameras = tuple(key for key in keys if key in CAMERA_KEYS)
    kwargs: dict = {"obs_mode": "rgb+state" if cameras else "state"}
    if cameras:
        kwargs["cameras"] = cameras
        kwargs["image_size"] = int(getattr(getattr(policy, "config", None), "image_size", 128))
    if "object_state" in keys:
        kwargs["privileged_state"] = True
    if getattr(policy, "gripper_convention", "libero") != "libero":  # e.g. a raw OpenVLA checkpoint
        kwargs["gripper_convention"] = policy.gripper_convention
    return kwargs


def check_init_states(env: gym.Env, task_ids: Sequence[int], init_state_ids: Sequence[int]) -> None:
    """A clear error for an init state id that ``env`` does not have for one of ``task_ids``."""
    for task_id in task_ids:
        num_init_states = env.unwrapped.num_init_states(task_id)
        bad = [i for i in init_state_ids if not 0 <= i < num_init_states]
        if bad:
            raise ValueError(
                f"unknown init_state_id {bad[0]} for task {task_id} of {env.spec.id if env.spec else env}: "
                f"valid 0..{num_init_states - 1}"
            )


def evaluate_policy(
    policy: VLAPolicy,
    env_id: str,
    task_ids: Sequence[int] | None,
    init_state_ids: Sequence[int],
    seeds: Sequence[int] = (0,),
    max_episode_steps: int | None = None,
    deterministic: bool = True,
    video_episodes: int = 0,
    video_dir: str | None = None,
    progress: bool = True,
    num_envs: int = 1,
) -> dict:
    """Success of ``policy`` on every (task, init state, seed) of ``env_id``; one episode each, ``num_envs`` at a
    time with one batched policy call per step (:func:`run_episodes_batched`).

    Returns ``{"env_id", "task_ids", "init_state_ids", "seeds", "max_episode_steps", "success_rate" (over all
    episodes), "per_task": {task_id: {"instruction", "successes", "episodes", "success_rate"}}, "episodes":
    [{"task_id", "init_state_id", "seed", "success", "length"}], "videos": [paths], "seconds"}``.
    """
    suite = resolve_suite(env_id)
    tasks = suite_tasks(suite.libero_name)
    task_ids = tuple(range(len(tasks))) if task_ids is None else tuple(int(task_id) for task_id in task_ids)
    init_state_ids, seeds = tuple(int(i) for i in init_state_ids), tuple(int(seed) for seed in seeds)
    if not init_state_ids:
        raise ValueError("init_state_ids is empty: give at least one init state")
    if not seeds:
        raise ValueError("seeds is empty: give at least one seed")
    if video_episodes > 0 and video_dir is None:
        raise ValueError(f"video_episodes {video_episodes} needs a video_dir")
    env_kwargs = env_kwargs_for_policy(policy)
    if max_episode_steps is not None:
        env_kwargs["max_episode_steps"] = int(max_episode_steps)
    # The env validates task_ids and names the valid range. Videos come from an env of their own (a renderer
    # costs ~0.7 GB per env), the rest from num_envs envs side by side.
    batched_runs = len(task_ids) * len(init_state_ids) * len(seeds) - video_episodes
    envs = make_eval_envs(suite.env_id, num_envs, task_ids, num_runs=batched_runs, **env_kwargs)
    try:
        check_init_states(envs[0], task_ids, init_state_ids)
        runs = [(task_id, init_state_id, seed) for task_id in task_ids for init_state_id in init_state_ids for seed in seeds]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(runs), desc=f"evaluate {suite.env_id}", unit="episode")
        was_training = policy.training
        policy.eval()
        outcomes, videos = {}, []
        start = time.time()

        def done(run: tuple[int, int, int], success: bool, length: int) -> None:
            outcomes[run] = {"task_id": run[0], "init_state_id": run[1], "seed": run[2], "success": success,
                             "length": length}  # fmt: skip
            if bar is not None:
                bar.update(1)
                bar.set_postfix(success_rate=f"{np.mean([row['success'] for row in outcomes.values()]):.2f}")

        if video_episodes > 0:
            video_env = gym.make(suite.env_id, task_ids=task_ids, render_mode="rgb_array", **env_kwargs)
            try:
                for run in runs[:video_episodes]:
                    success, length, frames = run_episode(policy, video_env, *run, deterministic, True)
                    videos.append(_write_video(frames, video_dir, *run, success))
                    done(run, success, length)
            finally:
                video_env.close()
        for result in run_episodes_batched(policy, envs, runs[video_episodes:], deterministic):
            done((result.task_id, result.init_state_id, result.seed), result.success, result.length)
        episodes = [outcomes[run] for run in runs]  # in the order of runs, however the envs finished them
        if bar is not None:
            bar.close()
        policy.train(was_training)
    finally:
        for env in envs:
            env.close()

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
        "seeds": list(seeds),
        "max_episode_steps": max_episode_steps or suite.max_episode_steps,
        "deterministic": deterministic,
        "success_rate": float(np.mean([episode["success"] for episode in episodes])),
        "per_task": per_task,
        "episodes": episodes,
        "videos": videos,
        "seconds": time.time() - start,
    }


def run_episode(
    policy: VLAPolicy, env, task_id: int, init_state_id: int, seed: int, deterministic: bool, record: bool
) -> tuple[bool, int, list[np.ndarray]]:
    """One episode to termination (success) or truncation: ``(success, length, frames)``; frames only if ``record``."""
    obs, _ = env.reset(seed=seed, options={"task_id": task_id, "init_state_id": init_state_id})
    frames = [env.render()] if record else []
    length = 0
    while True:
        with torch.no_grad():
            actions, _, _ = policy.act(batch_observation(obs), deterministic=deterministic)
        obs, _, terminated, truncated, _ = env.step(actions[0].cpu().numpy())
        length += 1
        if record:
            frames.append(env.render())
        if terminated or truncated:
            return bool(terminated), length, frames


@dataclasses.dataclass
class EpisodeResult:
    """One finished episode of :func:`run_episodes_batched`. ``seconds`` is the episode's share of the wall time:
    its own resets and env steps, plus its part of each batched policy call (the call's time over the envs in it)."""

    task_id: int
    init_state_id: int
    seed: int
    success: bool
    length: int
    seconds: float


@dataclasses.dataclass
class _Slot:  # an env of run_episodes_batched and the episode it is in
    run: tuple[int, int, int]
    obs: dict
    length: int
    seconds: float


def make_eval_envs(
    env_id: str, num_envs: int, task_ids: Sequence[int] | None = None, *, num_runs: int | None = None, **env_kwargs
) -> list[gym.Env]:
    """``num_envs`` envs of ``env_id`` in this process for :func:`run_episodes_batched`. With several, each keeps
    one task's simulator (``max_cached_tasks=1``): the batched runner keeps an env on one task as long as it can.
    ``num_runs``, the episodes they are for, caps the count (envs beyond it would sit idle); at least one is made."""
    if not (isinstance(num_envs, (int, np.integer)) and num_envs >= 1):
        raise ValueError(f"num_envs {num_envs!r} must be an int >= 1")
    if num_runs is not None:
        num_envs = max(1, min(int(num_envs), int(num_runs)))
    if num_envs > 1:
        env_kwargs.setdefault("max_cached_tasks", 1)
    envs: list[gym.Env] = []
    try:
        for _ in range(num_envs):
            envs.append(gym.make(env_id, task_ids=task_ids, **env_kwargs))
    except BaseException:
        for env in envs:
            env.close()
        raise
    return envs


def run_episodes_batched(
    policy: VLAPolicy,
    envs: Sequence[gym.Env],
    runs: Sequence[tuple[int, int, int]],
    deterministic: bool = True,
    temperature: float = 1.0,
) -> Iterator[EpisodeResult]:
    """One episode per (task, init state, seed) of ``runs``, ``len(envs)`` at a time, yielded as each ends.

    The envs step one after another in this process, but the policy acts on all of them in one batched call:
    a small policy on a CPU costs about as much for 8 observations as for 1, so the policy's share of an
    evaluation shrinks ``len(envs)``-fold. Each episode is the same as :func:`run_episode`'s for its triple
    (reset with its seed and options, then actions until termination or truncation), so results do not depend
    on how many envs run them, up to float rounding in batched matmuls. A freed env takes the next run of its
    own task (no simulator rebuild) and otherwise of the task with the most runs left per env already on it, so
    the envs spread over the tasks. Without ``deterministic``, actions are sampled at ``temperature`` (torch's
    global RNG; sampled episodes do depend on how many envs share a batch).
    """
    if not envs:
        raise ValueError("envs is empty: give at least one env")
    pending: dict[int, collections.deque] = {}
    for run in runs:
        pending.setdefault(int(run[0]), collections.deque()).append(tuple(int(value) for value in run))
    slots: list[_Slot | None] = [None] * len(envs)

    def start(index: int, current_task: int | None) -> None:
        slots[index] = None
        if not pending:
            return
        if current_task not in pending:
            on_task = collections.Counter(slot.run[0] for slot in slots if slot is not None)
            current_task = max(pending, key=lambda task_id: len(pending[task_id]) / (1 + on_task[task_id]))
        run = pending[current_task].popleft()
        if not pending[current_task]:
            del pending[current_task]
        begin = time.perf_counter()
        task_id, init_state_id, seed = run
        obs, _ = envs[index].reset(seed=seed, options={"task_id": task_id, "init_state_id": init_state_id})
        slots[index] = _Slot(run, obs, 0, time.perf_counter() - begin)

    for index in range(len(envs)):
        start(index, None)
    while True:
        active = [index for index, slot in enumerate(slots) if slot is not None]
        if not active:
            return
        begin = time.perf_counter()
        with torch.no_grad():
            batch = stack_observations([slots[index].obs for index in active])
            actions, _, _ = policy.act(batch, deterministic, temperature)
        actions = actions.cpu().numpy()
        share = (time.perf_counter() - begin) / len(active)
        for row, index in enumerate(active):
            slot = slots[index]
            begin = time.perf_counter()
            slot.obs, _, terminated, truncated, _ = envs[index].step(actions[row])
            slot.length += 1
            slot.seconds += share + time.perf_counter() - begin
            if terminated or truncated:
                yield EpisodeResult(*slot.run, bool(terminated), slot.length, slot.seconds)
                start(index, slot.run[0])


def _write_video(frames, video_dir: str, task_id: int, init_state_id: int, seed: int, success: bool) -> str:
    import imageio.v2 as imageio

    os.makedirs(video_dir, exist_ok=True)
    outcome = "success" if success else "failure"
    path = os.path.join(video_dir, f"task{task_id:02d}_init{init_state_id:03d}_seed{seed}_{outcome}.mp4")
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
    lines = [
        f"Success on {results['env_id']}: init states {_id_ranges(results['init_state_ids'])}, seeds "
        f"{_id_ranges(results['seeds'])}, at most {results['max_episode_steps']} steps per episode",
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
    torch.set_num_threads(args.torch_threads)
    suite = resolve_suite(args.suite)  # a clear error for an unknown suite, before loading anything
    if args.init_states is not None:
        init_state_ids = args.init_states
    else:
        if args.num_init_states < 1 or args.init_state_start < 0:
            raise ValueError(
                f"init_state_start {args.init_state_start} / num_init_states {args.num_init_states}: need >= 0 / >= 1"
            )
        init_state_ids = tuple(range(args.init_state_start, args.init_state_start + args.num_init_states))
    policy = load_policy(args.checkpoint)
    results = evaluate_policy(
        policy, suite.env_id, args.task_ids, init_state_ids, seeds=args.seeds,
        max_episode_steps=args.max_episode_steps, deterministic=args.deterministic,
        video_episodes=args.video_episodes, video_dir=os.path.join(args.out_dir, "videos"), progress=args.progress,
        num_envs=args.num_envs,
    )  # fmt: skip
    results["checkpoint"] = os.fspath(args.checkpoint)
    title = f"{os.path.basename(os.path.normpath(args.checkpoint))} on {suite.env_id}"
    print(write_report(results, args.out_dir, title))
    print(f"wrote {args.out_dir}/success.md, success.json, success.png" + (", videos/" if results["videos"] else ""))
    return results


if __name__ == "__main__":
    main(tyro.cli(EvalArgs))
