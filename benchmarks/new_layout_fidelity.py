"""Do new layouts start like LIBERO's stored init states? Robot and objects, after reset, on both kinds of start.

A new layout (reset option ``layout_seed``: LIBERO's placement sampler, as ``evaluate --layouts``, ``generate
--init-states sampled`` and ``GRPO(init_states="sampled")`` use it) is meant to be another draw from the distribution
LIBERO drew its 50 stored init states per task from. For every task of the chosen suites this resets the env on stored
init states ``0..N-1`` and on ``N`` new layouts (the evaluation's layout seeds, from 2^31), settle steps included, as
every episode starts, and compares what a policy sees:

- the robot: the spread of its joint angles (mrad) and of its end-effector position (mm) over the starts;
- every object: the distance between its mean position on stored starts and on new layouts (mm, with the z of that
  shift against its standard error), and the ratio of its horizontal spread (new / stored).

Prints a per-task table and writes JSON and Markdown (default ``benchmarks/results/new_layout_fidelity.json``).

    python benchmarks/new_layout_fidelity.py                                  # Spatial and Object, 30 starts of each
    python benchmarks/new_layout_fidelity.py --suites object --task-ids 1 --num-starts 10

Tasks run in ``--num-workers`` processes (state mode: no renderer), one simulator each.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import tyro
from reporting import chosen_tasks, command_line, machine_info, publish, run_per_task  # benchmarks/reporting.py

from gym_libero_vla.evaluate import EVAL_LAYOUT_SEEDS_FROM
from gym_libero_vla.libero_env import ROBOT_INIT_NOISE
from gym_libero_vla.suites import resolve_suite, task_init_states


@dataclasses.dataclass
class Args:
    suites: tuple[str, ...] = ("spatial", "object")
    """Suites to check (short names, LIBERO names or env ids)."""
    task_ids: tuple[int, ...] | None = None
    """Only these tasks of each suite (default: all of them)."""
    num_starts: int = 30
    """Starts of each kind per task: stored init states 0..N-1 and N new layouts (LIBERO stores 50 per task)."""
    num_workers: int = 2
    """Processes checking tasks side by side."""
    json_out: str | None = "benchmarks/results/new_layout_fidelity.json"
    """Report JSON, Markdown next to it (none: print only)."""


def measure_task(libero_name: str, task_id: int, num_starts: int) -> dict:
    """Reset one task on stored init states and on new layouts; the robot's and the objects' poses after each
    (runs in a worker process)."""
    import gymnasium as gym

    env = gym.make(resolve_suite(libero_name).env_id, obs_mode="state", task_ids=[task_id], max_cached_tasks=1)
    start = time.perf_counter()
    poses: dict[str, dict[str, list]] = {}
    try:
        for kind in ("stored", "new"):
            rows = poses[kind] = {"joints": [], "eef": [], "objects": []}
            for index in range(num_starts):
                option = {"init_state_id": index} if kind == "stored" else {"layout_seed": EVAL_LAYOUT_SEEDS_FROM + index}
                obs, _ = env.reset(seed=0, options={"task_id": task_id, **option})
                domain = env.unwrapped.libero_env.env
                robot = domain.robots[0]
                rows["joints"].append(domain.sim.data.qpos[robot._ref_joint_pos_indexes].tolist())
                rows["eef"].append(obs["state"][:3].tolist())
                rows["objects"].append({name: domain.sim.data.body_xpos[domain.obj_body_id[name]].tolist()
                                        for name in domain.objects_dict})  # fmt: skip
    finally:
        env.close()
    return {"task_id": task_id, "poses": poses, "seconds": time.perf_counter() - start}


def summarize_task(task: dict, name: str) -> dict:
    """The robot's spread on each kind of start; per object the shift of its mean and the ratio of its spread."""
    stored, new = task["poses"]["stored"], task["poses"]["new"]

    def spread(rows: list) -> float:  # mean over axes of the standard deviation over starts
        return float(np.mean(np.std(np.asarray(rows), axis=0)))

    objects = {}
    for obj in stored["objects"][0]:
        a = np.array([row[obj] for row in stored["objects"]])
        b = np.array([row[obj] for row in new["objects"]])
        shift = b.mean(0) - a.mean(0)
        standard_error = np.sqrt(a.var(0, ddof=1) / len(a) + b.var(0, ddof=1) / len(b))
        z = np.abs(shift) / np.maximum(standard_error, 1e-6)  # 1 um: an object that never moves has no spread
        xy_stored, xy_new = np.std(a[:, :2], axis=0).mean(), np.std(b[:, :2], axis=0).mean()
        objects[obj] = {
            "mean_shift_mm": round(1000 * float(np.linalg.norm(shift)), 2),
            "max_axis_z": round(float(z.max()), 2),
            "xy_spread_mm": [round(1000 * float(xy_stored), 2), round(1000 * float(xy_new), 2)],
            "xy_spread_ratio": round(float(xy_new / xy_stored), 2) if xy_stored > 1e-4 else None,
        }
    return {
        "task_id": task["task_id"], "name": name, "num_starts": len(stored["eef"]),
        "joint_spread_mrad": [round(1000 * spread(stored["joints"]), 1), round(1000 * spread(new["joints"]), 1)],
        "eef_spread_mm": [round(1000 * spread(stored["eef"]), 1), round(1000 * spread(new["eef"]), 1)],
        "objects": objects, "seconds": round(task["seconds"], 1),
    }  # fmt: skip


def markdown(report: dict) -> str:
    n = report["num_starts"]
    lines = [
        "# New layouts against LIBERO's stored init states",
        "",
        f"Command: `{report['command']}`. Each task reset (settle steps included) on stored init states 0..{n - 1} "
        f"and on {n} new layouts (layout seeds from 2^31, the evaluation's), new layouts starting the robot's joints "
        f"with {report['robot_init_noise']} rad of noise (`ROBOT_INIT_NOISE`). Robot: the spread (standard deviation "
        "over starts, mean over joints / axes) on stored / new starts. Objects: the largest distance between an "
        "object's mean position on the two kinds of start (and the z of that object's largest per-axis shift "
        "against its standard error), and the median over objects of the ratio of horizontal spreads, new / stored.",
        "",
    ]
    for suite, entry in report["suites"].items():
        lines += [
            f"## {suite}",
            "",
            "| task | joints, mrad (stored / new) | end effector, mm (stored / new) | largest object mean shift, mm (z) "
            "| object spread, new / stored (median) |",
            "|---|---|---|---|---|",
        ]
        for task in entry["tasks"]:
            worst = max(task["objects"].items(), key=lambda item: item[1]["mean_shift_mm"])
            ratios = [o["xy_spread_ratio"] for o in task["objects"].values() if o["xy_spread_ratio"] is not None]
            median = f"{np.median(ratios):.2f}" if ratios else "-"
            joints, eef = task["joint_spread_mrad"], task["eef_spread_mm"]
            lines.append(
                f"| {task['task_id']} {task['name']} | {joints[0]:.1f} / {joints[1]:.1f} | {eef[0]:.1f} / {eef[1]:.1f} "
                f"| {worst[1]['mean_shift_mm']:.1f} ({worst[0]}, z {worst[1]['max_axis_z']:.1f}) | {median} |"
            )
        lines.append("")
    lines.append(f"Wall time {report['wall_seconds']:.0f} s with {report['num_workers']} workers; "
                 f"{report['machine']['cpu_model']}, MuJoCo {report['machine'].get('mujoco')}.")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(args: Args) -> dict:
    if args.num_starts < 2 or args.num_workers < 1:
        raise ValueError(f"num_starts {args.num_starts} must be >= 2 and num_workers {args.num_workers} >= 1")
    tasks = chosen_tasks(args.suites, args.task_ids)
    for name in tasks:
        stored = min(len(task_init_states(name, task.task_id)) for task in tasks[name])
        if args.num_starts > stored:
            raise ValueError(f"num_starts {args.num_starts} for {name}: its tasks store {stored} init states")
    start = time.perf_counter()
    results = run_per_task(measure_task, tasks, args.num_workers, args.num_starts)
    report = {
        "command": command_line(args, "benchmarks/new_layout_fidelity.py"),
        "num_starts": args.num_starts,
        "robot_init_noise": ROBOT_INIT_NOISE,
        "num_workers": args.num_workers,
        "wall_seconds": time.perf_counter() - start,
        "suites": {
            name: {"tasks": [summarize_task(results[name][task.task_id], task.name) for task in tasks[name]]} for name in tasks
        },
        "machine": machine_info(),
    }
    return publish(report, markdown(report), args.json_out)


if __name__ == "__main__":
    main(tyro.cli(Args))
