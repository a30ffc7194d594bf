"""Env throughput: raw LIBERO vs our env vs our async vector env, in state and rgb mode; action chunks; a policy
in the loop. All in one run, so that the ratios compare numbers measured side by side.

    python benchmarks/env_throughput.py                 # full tables (~10 minutes on 2 cores)
    python benchmarks/env_throughput.py --steps 50      # quicker

Prints Markdown tables and writes JSON. Targets: our env within 5% of raw LIBERO and 2 async workers >= 1.7x one
worker on a 2-core machine (issue #2); with chunks of 8 actions, rgb env steps/s >= 5x one action per step
(issue #24: the cameras render once per chunk). Steps are timed after a warm-up reset, with random actions, on one
task (``task_ids=[0]``) so that no simulator is rebuilt inside the timed loop; vector numbers count every sub-env
step and include Gymnasium's autoresets at the step limit; chunked numbers count executed actions (env steps).

The policy-in-the-loop rows run :func:`gym_libero_vla.rollouts.run_episodes` with a freshly initialised CompactVLA of
the default size (state: privileged object poses, as the SFT baseline; rgb: both cameras at 128 px): env steps/s
including the policy's forward passes, one per step at ``k = 1`` and one per chunk at ``k = 8``.

The chunked rgb rows are also timed without reflections (``LiberoEnv(reflections=False)``: MuJoCo skips its reflection
pass, which is ~40% of a frame on a CPU renderer), beside how much the frames differ (mean absolute difference of the
first frame, 0-255, and the share of pixels that change).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Annotated

import gymnasium as gym
import numpy as np
import tyro
from reporting import command_line, machine_info

import gym_libero_vla  # noqa: F401
from gym_libero_vla import rendering
from gym_libero_vla.libero_env import CAMERAS
from gym_libero_vla.policies import TorchThreads
from gym_libero_vla.suites import libero_modules, quiet, suite_tasks, task_init_states


@dataclasses.dataclass
class Args:
    env_id: str = "LiberoSpatial-v0"
    """Suite to measure (task 0 of it)."""
    steps: int = 300
    """Timed steps per measurement in state mode (per sub-env for vector envs)."""
    rgb_steps: int = 40
    """Timed steps per measurement in rgb mode (rendering costs ~90 ms a frame on CPU)."""
    image_size: int = 128
    """Camera frame side in rgb mode (our env's default)."""
    workers: tuple[int, ...] = ()
    """Vector-env worker counts; default (1, 2, os.cpu_count())."""
    modes: tuple[str, ...] = ("state", "rgb")
    """Observation modes to measure."""
    chunks: tuple[int, ...] = (1, 8)
    """Action-chunk sizes of the chunked rows (rgb, both cameras) and of the policy-in-the-loop rows; () skips both."""
    chunk_rgb_steps: int = 160
    """Timed env steps (actions) per chunked rgb measurement."""
    reflections: bool = True
    """Also time the chunked rgb rows with frames rendered without reflections (``--no-reflections`` skips them)."""
    policy_steps: int = 160
    """Env steps per policy-in-the-loop measurement (episodes of this many steps)."""
    threads: Annotated[TorchThreads, tyro.conf.OmitArgPrefixes] = dataclasses.field(default_factory=TorchThreads)
    """Torch CPU threads of the policy-in-the-loop rows: --torch-threads (default 1, the rollouts' setting)."""
    out: Path = Path("benchmarks/results/env_throughput.json")
    """Where to write the JSON results."""
    seed: int = 0


def time_steps(step, num_steps: int, action_dim: int = 7, batch: int | None = None, seed: int = 0) -> float:
    """Steps per second of ``step(action)`` over ``num_steps`` calls (times ``batch`` sub-envs)."""
    rng = np.random.default_rng(seed)
    shape = (batch, action_dim) if batch else (action_dim,)
    actions = rng.uniform(-1, 1, size=(num_steps, *shape)).astype(np.float32)
    start = time.perf_counter()
    for action in actions:
        step(action)
    return num_steps * (batch or 1) / (time.perf_counter() - start)


def raw_libero(suite: str, mode: str, args: Args) -> float:
    """LIBERO's own OffScreenRenderEnv as its evaluation scripts use it (renders its cameras every step)."""
    _, _, env_wrapper = libero_modules()
    task = suite_tasks(suite)[0]
    cameras = list(CAMERAS.values()) if mode == "rgb" else []
    with quiet():
        env = env_wrapper.OffScreenRenderEnv(
            bddl_file_name=task.bddl_file,
            use_camera_obs=mode == "rgb",
            camera_names=cameras,
            camera_heights=args.image_size,
            camera_widths=args.image_size,
        )
    env.reset()
    env.set_init_state(task_init_states(suite, 0)[0])
    steps = args.steps if mode == "state" else args.rgb_steps
    rate = time_steps(env.step, steps, seed=args.seed)
    env.close()
    return rate


def ours(mode: str, args: Args) -> float:
    env = gym.make(args.env_id, obs_mode=mode, image_size=args.image_size, task_ids=[0], max_episode_steps=10**6)
    env.reset(seed=args.seed)
    steps = args.steps if mode == "state" else args.rgb_steps
    rate = time_steps(env.step, steps, seed=args.seed)
    env.close()
    return rate


def ours_vector(mode: str, num_envs: int, args: Args) -> float:
    envs = gym.make_vec(args.env_id, num_envs=num_envs, obs_mode=mode, image_size=args.image_size, task_ids=[0])
    envs.reset(seed=args.seed)
    steps = args.steps if mode == "state" else args.rgb_steps
    rate = time_steps(envs.step, steps, batch=num_envs, seed=args.seed)
    envs.close()
    return rate


def ours_chunked(chunk: int, args: Args, reflections: bool = True) -> tuple[float, float]:
    """rgb (both cameras) env steps/s with chunks of ``chunk`` actions, and camera frames rendered per env step."""
    env = gym.make(args.env_id, obs_mode="rgb", image_size=args.image_size, task_ids=[0], action_chunk=chunk,
                   max_env_steps=10**6, max_episode_steps=10**6, reflections=reflections)  # fmt: skip
    env.reset(seed=args.seed)
    base = env.unwrapped
    frames_before = base.frames_rendered
    calls = max(1, args.chunk_rgb_steps // chunk)
    batch = {"batch": chunk} if chunk > 1 else {}
    rate = time_steps(env.step, calls, seed=args.seed, **batch)
    frames_per_step = (base.frames_rendered - frames_before) / (calls * chunk)
    env.close()
    return rate, frames_per_step


def frame_difference(args: Args) -> dict:
    """How much the first frame of each camera changes without reflections: mean |difference| (0-255), share of
    pixels that change."""
    frames = {}
    for reflections in (True, False):
        env = gym.make(args.env_id, obs_mode="rgb", image_size=args.image_size, task_ids=[0], reflections=reflections)
        frames[reflections], _ = env.reset(seed=args.seed)
        env.close()
    result = {}
    for camera in CAMERAS:
        difference = np.abs(frames[True][camera].astype(int) - frames[False][camera].astype(int))
        result[camera] = {"mean_abs": float(difference.mean()), "changed": float((difference.max(axis=-1) > 0).mean())}
    return result


def policy_in_the_loop(mode: str, chunk: int, args: Args, reflections: bool = True) -> float:
    """Env steps/s of a CompactVLA acting through ``run_episodes`` (one forward pass per query)."""
    import torch

    args.threads.apply()
    from gym_libero_vla.evaluate import env_kwargs_for_policy
    from gym_libero_vla.policies import CompactVLA, CompactVLAConfig, WordTokenizer
    from gym_libero_vla.rollouts import Start, run_episodes
    from gym_libero_vla.wrappers.action_tokenizer import ActionBins

    torch.manual_seed(args.seed)
    suite = gym.spec(args.env_id).kwargs["suite"]
    tokenizer = WordTokenizer.from_texts(task.instruction for task in suite_tasks(suite))
    bins = ActionBins.from_statistics({"q01": [-0.5] * 6 + [-1.0], "q99": [0.5] * 6 + [1.0]})
    probe = gym.make(args.env_id, obs_mode="state", privileged_state=True, task_ids=[0])
    object_state_dim = probe.observation_space["object_state"].shape[0]
    probe.close()
    config = (CompactVLAConfig(cameras=(), object_state_dim=object_state_dim, chunk_size=chunk) if mode == "state" else
              CompactVLAConfig(cameras=("agentview", "wrist"), image_size=args.image_size, chunk_size=chunk,
                               reflections=reflections))  # fmt: skip
    policy = CompactVLA(config, bins, tokenizer).eval()
    env = gym.make(args.env_id, task_ids=[0], **env_kwargs_for_policy(policy, args.policy_steps))
    env_steps = 0

    def count(num_steps: int) -> bool:
        nonlocal env_steps
        env_steps += num_steps
        return True

    start = time.perf_counter()
    with torch.no_grad():
        for _ in run_episodes(policy, env, [Start(0, 0, args.seed)], record_observations=False, on_step=count):
            pass
    rate = env_steps / (time.perf_counter() - start)
    env.close()
    return rate


def print_reflection_rows(results: dict, chunks: tuple[int, ...]) -> None:
    """The chunked rgb rows without reflections against with them (the ratios go into ``results`` too)."""
    print("\nWithout reflections (`LiberoEnv(reflections=False)`), env steps/s and ratio to with them, same k\n")
    print("| k | rgb env | policy + rgb env |")
    print("|---|---|---|")
    for chunk in chunks:
        row = results["chunks"][str(chunk)]
        row["no_reflections_vs_reflections"] = {
            "rgb_env": row["rgb_no_reflections_env_steps_per_s"] / row["rgb_env_steps_per_s"],
            "policy_rgb": row["policy_rgb_no_reflections_env_steps_per_s"] / row["policy_rgb_env_steps_per_s"],
        }
        versus = row["no_reflections_vs_reflections"]
        print(
            f"| {chunk} | {row['rgb_no_reflections_env_steps_per_s']:.1f} ({versus['rgb_env']:.2f}x) | "
            f"{row['policy_rgb_no_reflections_env_steps_per_s']:.1f} ({versus['policy_rgb']:.2f}x) |"
        )
    changes = results["no_reflections_frame_difference"]
    print("\nFirst frame without reflections: " + "; ".join(
        f"{camera} mean |difference| {change['mean_abs']:.2f} of 255, {100 * change['changed']:.1f}% of pixels"
        for camera, change in changes.items()))  # fmt: skip


def main(args: Args) -> dict:
    suite = gym.spec(args.env_id).kwargs["suite"]
    workers = args.workers or tuple(sorted({1, 2, os.cpu_count() or 1}))
    results: dict = {
        "env_id": args.env_id,
        "command": command_line(args, "benchmarks/env_throughput.py"),
        "mujoco_gl": rendering.select_backend(),
        "image_size": args.image_size,
        "modes": {},
    }
    rows = []
    for mode in args.modes:
        row = {"raw_libero": raw_libero(suite, mode, args), "ours": ours(mode, args)}
        for num_envs in workers:
            row[f"vector_{num_envs}"] = ours_vector(mode, num_envs, args)
        row["ours_vs_raw"] = row["ours"] / row["raw_libero"]
        if "vector_1" in row and "vector_2" in row:
            row["vector_2_vs_1"] = row["vector_2"] / row["vector_1"]
        results["modes"][mode] = row
        rows.append((mode, row))

    if args.chunks:
        chunked = {}
        for chunk in args.chunks:
            rate, frames = ours_chunked(chunk, args)
            chunked[chunk] = {"rgb_env_steps_per_s": rate, "frames_per_env_step": frames}
            for mode in ("state", "rgb"):
                chunked[chunk][f"policy_{mode}_env_steps_per_s"] = policy_in_the_loop(mode, chunk, args)
            if args.reflections:
                chunked[chunk]["rgb_no_reflections_env_steps_per_s"] = ours_chunked(chunk, args, reflections=False)[0]
                chunked[chunk]["policy_rgb_no_reflections_env_steps_per_s"] = policy_in_the_loop(
                    "rgb", chunk, args, reflections=False
                )
        results["chunks"] = {str(chunk): row for chunk, row in chunked.items()}
        if args.reflections:
            results["no_reflections_frame_difference"] = frame_difference(args)
        if "rgb" in results["modes"]:
            results["raw_libero_rgb"] = results["modes"]["rgb"]["raw_libero"]

    import mujoco

    results["mujoco_version"] = mujoco.__version__
    results["machine"] = machine_info(args.threads.torch_threads if args.chunks else None)
    header = ["mode", "raw LIBERO", "ours", *[f"async x{n}" for n in workers], "ours/raw", "async x2 / x1"]
    print(f"\n{args.env_id}, env steps/s ({os.cpu_count()} CPUs, MUJOCO_GL={results['mujoco_gl']}, {args.image_size}px)\n")
    if rows:  # none with --modes and no value (the chunked rows only)
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
    for mode, row in rows:
        cells = [mode, f"{row['raw_libero']:.1f}", f"{row['ours']:.1f}", *[f"{row[f'vector_{n}']:.1f}" for n in workers]]
        cells += [f"{row['ours_vs_raw']:.2f}", f"{row.get('vector_2_vs_1', float('nan')):.2f}"]
        print("| " + " | ".join(cells) + " |")
    if args.chunks:
        first = results["chunks"][str(args.chunks[0])]
        raw = results.get("raw_libero_rgb")
        print(f"\nAction chunks (rgb: both cameras at {args.image_size}px; policy: CompactVLA through run_episodes), "
              f"env steps/s, ratio to k = {args.chunks[0]}\n")  # fmt: skip
        print("| k | rgb env | frames / env step | rgb env vs raw LIBERO | policy + state env | policy + rgb env |")
        print("|---|---|---|---|---|---|")
        for chunk in args.chunks:
            row = results["chunks"][str(chunk)]
            ratio = {key: row[key] / first[key] for key in row if key.endswith("per_s")}
            row["vs_first_chunk"] = ratio
            versus_raw = f"{row['rgb_env_steps_per_s'] / raw:.2f}x" if raw else "-"
            print(f"| {chunk} | {row['rgb_env_steps_per_s']:.1f} ({ratio['rgb_env_steps_per_s']:.2f}x) | "
                  f"{row['frames_per_env_step']:.3f} | {versus_raw} | "
                  f"{row['policy_state_env_steps_per_s']:.1f} ({ratio['policy_state_env_steps_per_s']:.2f}x) | "
                  f"{row['policy_rgb_env_steps_per_s']:.1f} ({ratio['policy_rgb_env_steps_per_s']:.2f}x) |")  # fmt: skip
        if args.reflections:
            print_reflection_rows(results, args.chunks)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nJSON written to {args.out}")
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
