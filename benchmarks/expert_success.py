"""Scripted-expert success rate, episode length and generation time per LIBERO task.

For each suite and task, the expert runs from init states ``0..num_init_states-1`` in state mode;
success is the env's ``terminated`` (LIBERO's BDDL goal check), never the expert's own opinion. A few
episodes are also generated in "rgb+state" mode (agentview + wrist frames, as ``generate`` stores them)
to time image recording. Also counted per task: episodes whose wrist joint reached its limit (where the arm stalls)
and which way the hand turned the wrist (a choice the start pose's noise must not decide). Prints a Markdown table
and writes JSON.

    python benchmarks/expert_success.py --suites spatial object --num-init-states 20 --rgb-episodes 2
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time

import gymnasium as gym
import numpy as np
import tyro

import gym_libero_vla  # noqa: F401
from gym_libero_vla import suites
from gym_libero_vla.demos.generate import episode_seed, rollout_expert
from gym_libero_vla.demos.scripted_expert import ScriptedExpert
from gym_libero_vla.rollouts import Start


@dataclasses.dataclass
class Args:
    suites: tuple[str, ...] = ("spatial", "object")
    """Suites to measure (short names, LIBERO names or env ids)."""
    num_init_states: int = 20
    """Init states per task (0..N-1) in state mode."""
    task_ids: tuple[int, ...] | None = None
    """Restrict to these tasks (default: all tasks of each suite)."""
    rgb_episodes: int = 2
    """Episodes per suite generated in rgb+state mode for timing (first tasks, init state 0); 0 skips."""
    image_size: int = 128
    """Camera frame side in rgb+state mode."""
    seed: int = 0
    """Base seed (scene fixture placement)."""
    json_out: str = "benchmarks/results/expert_success.json"
    """Where to write the JSON results."""


WRIST_LIMIT_MARGIN = 0.05  # radians: a wrist this close to its joint limit is at it (the arm stalls there)
WRIST_TURN = 1.0  # radians: a wrist turned this far from its start turned the hand one way or the other


def run_episodes(env, expert, task_id: int, init_state_ids, seed: int) -> list[dict]:
    """The expert's episodes from ``init_state_ids``: success, length, seconds, and how its wrist joint moved (at its
    limit, turned up or down from its start by more than :data:`WRIST_TURN`)."""
    results = []
    for init_state_id in init_state_ids:
        start = time.perf_counter()
        try:
            episode = rollout_expert(env, expert, Start(task_id, init_state_id, episode_seed(seed, task_id, init_state_id)))
        except NotImplementedError as error:  # a goal the expert has no script for
            return [{"error": str(error)}]
        seconds = time.perf_counter() - start
        domain = env.unwrapped.libero_env.env
        wrist_joint = domain.sim.model.joint_name2id(domain.robots[0].robot_joints[-1])
        low, high = domain.sim.model.jnt_range[wrist_joint]
        wrist = episode["arrays"]["obs/joint_states"][:, -1]
        results.append(
            {
                "success": episode["success"],
                "num_steps": episode["num_steps"],
                "seconds": seconds,
                "wrist_at_limit": bool(wrist.min() < low + WRIST_LIMIT_MARGIN or wrist.max() > high - WRIST_LIMIT_MARGIN),
                "wrist_turn": int(wrist.max() - wrist[0] > WRIST_TURN) - int(wrist[0] - wrist.min() > WRIST_TURN),
            }
        )
    return results


def main(args: Args) -> dict:
    report = {"args": dataclasses.asdict(args), "platform": platform.platform(), "suites": {}}
    try:
        import mujoco

        report["mujoco_version"] = mujoco.__version__
    except ImportError:
        pass
    rows = []
    for suite in args.suites:
        spec = suites.resolve_suite(suite)
        tasks = suites.suite_tasks(spec.libero_name)
        task_ids = suites.resolve_task_ids(spec.env_id, args.task_ids)
        env = gym.make(spec.env_id, obs_mode="state", max_cached_tasks=1)
        expert = ScriptedExpert(env)
        suite_report = {"tasks": {}}
        for task_id in task_ids:
            results = run_episodes(env, expert, task_id, range(args.num_init_states), args.seed)
            if "error" in results[0]:
                entry = {"instruction": tasks[task_id].instruction, "error": results[0]["error"]}
            else:
                entry = {
                    "instruction": tasks[task_id].instruction,
                    "episodes": len(results),
                    "success_rate": float(np.mean([r["success"] for r in results])),
                    "mean_length": float(np.mean([r["num_steps"] for r in results])),
                    "mean_success_length": (  # JSON null, not NaN, when no episode succeeded
                        float(np.mean([r["num_steps"] for r in results if r["success"]]))
                        if any(r["success"] for r in results)
                        else None
                    ),
                    "seconds_per_episode_state": float(np.mean([r["seconds"] for r in results])),
                    "failed_init_states": [i for i, r in enumerate(results) if not r["success"]],
                    # Episodes whose wrist joint reached its limit; whose hand turned the wrist up / down (> 1 rad).
                    "wrist_at_limit": sum(r["wrist_at_limit"] for r in results),
                    "wrist_up": sum(r["wrist_turn"] > 0 for r in results),
                    "wrist_down": sum(r["wrist_turn"] < 0 for r in results),
                }
            suite_report["tasks"][task_id] = entry
            rows.append((spec.env_id, task_id, entry))
            print(spec.env_id, task_id, json.dumps(entry), flush=True)
        env.close()
        if args.rgb_episodes > 0:
            env = gym.make(spec.env_id, obs_mode="rgb+state", image_size=args.image_size, max_cached_tasks=1)
            expert = ScriptedExpert(env)
            scripted = [t for t in task_ids if "error" not in suite_report["tasks"][t]] or list(task_ids)
            timings = []
            for index in range(args.rgb_episodes):
                timings += run_episodes(env, expert, scripted[index % len(scripted)], [0], args.seed)
            env.close()
            timings = [t for t in timings if "error" not in t]
            if timings:
                suite_report["rgb"] = {
                    "episodes": len(timings),
                    "image_size": args.image_size,
                    "seconds_per_episode": float(np.mean([t["seconds"] for t in timings])),
                    "seconds_per_step": float(sum(t["seconds"] for t in timings) / sum(t["num_steps"] for t in timings)),
                }
        report["suites"][spec.env_id] = suite_report

    print()
    print("| suite | task | success | mean length (successes) | wrist at its limit | wrist turned up / down "
          "| s/episode state | instruction |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for env_id, task_id, entry in rows:
        if "error" in entry:
            print(f"| {env_id} | {task_id} | no script | - | - | - | - | {entry['instruction']} |")
            continue
        print(
            f"| {env_id} | {task_id} | {entry['success_rate']:.0%} ({entry['episodes']}) | {entry['mean_length']:.0f} "
            f"({'-' if entry['mean_success_length'] is None else format(entry['mean_success_length'], '.0f')}) | "
            f"{entry['wrist_at_limit']} | {entry['wrist_up']} / {entry['wrist_down']} | "
            f"{entry['seconds_per_episode_state']:.1f} | {entry['instruction']} |"
        )
    print()
    print("| suite | success (all tasks) | s/episode state | s/episode rgb+state | s/step rgb+state |")
    print("|---|---|---|---|---|")
    for env_id, suite_report in report["suites"].items():
        entries = [e for e in suite_report["tasks"].values() if "error" not in e]
        rate = np.mean([e["success_rate"] for e in entries]) if entries else float("nan")
        state_s = np.mean([e["seconds_per_episode_state"] for e in entries]) if entries else float("nan")
        rgb = suite_report.get("rgb")  # absent with --rgb-episodes 0
        rgb_cells = f"{rgb['seconds_per_episode']:.1f} | {rgb['seconds_per_step']:.3f}" if rgb else "- | -"
        print(
            f"| {env_id} | {rate:.1%} ({len(entries)}/{len(suite_report['tasks'])} tasks scripted) | {state_s:.1f} | "
            f"{rgb_cells} |"
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
    with open(args.json_out, "w") as f:
        json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
