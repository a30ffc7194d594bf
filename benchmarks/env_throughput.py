"""Env throughput: raw LIBERO vs our env vs our async vector env, in state and rgb mode, in one run.

    python benchmarks/env_throughput.py                 # full table (a few minutes on 2 cores)
    python benchmarks/env_throughput.py --steps 50      # quicker

Prints a Markdown table and writes JSON. Targets (issue #2): our env within 5% of raw LIBERO;
2 async workers >= 1.7x one worker on a 2-core machine. Steps are timed after a warm-up reset, with
random actions, on one task (``task_ids=[0]``) so that no simulator is rebuilt inside the timed loop;
vector numbers count every sub-env step and include Gymnasium's autoresets at the step limit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import tyro

import gym_libero_vla  # noqa: F401
from gym_libero_vla import rendering
from gym_libero_vla.libero_env import CAMERAS
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


def main(args: Args) -> dict:
    suite = gym.spec(args.env_id).kwargs["suite"]
    workers = args.workers or tuple(sorted({1, 2, os.cpu_count() or 1}))
    results: dict = {
        "env_id": args.env_id,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
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

    import mujoco

    results["mujoco_version"] = mujoco.__version__
    header = ["mode", "raw LIBERO", "ours", *[f"async x{n}" for n in workers], "ours/raw", "async x2 / x1"]
    print(f"\n{args.env_id}, env steps/s ({os.cpu_count()} CPUs, MUJOCO_GL={results['mujoco_gl']}, {args.image_size}px)\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for mode, row in rows:
        cells = [mode, f"{row['raw_libero']:.1f}", f"{row['ours']:.1f}", *[f"{row[f'vector_{n}']:.1f}" for n in workers]]
        cells += [f"{row['ours_vs_raw']:.2f}", f"{row.get('vector_2_vs_1', float('nan')):.2f}"]
        print("| " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nJSON written to {args.out}")
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
