"""How often does a policy's *sampled* rollout succeed, against its greedy one, at each sampling temperature?

GRPO learns only from groups whose episodes disagree. Its rollouts are sampled, while LIBERO's evaluation
(and OpenVLA's) decodes greedily; when a behaviour-cloned policy's samples succeed far less often than its
greedy episodes, most groups are all-fail and carry no signal. This measures that gap on the init states GRPO
trains on: for every (task, init state), ``episodes_per_start`` sampled episodes at each temperature, and the
greedy episode. Wilson 95% intervals, and the fraction of starts whose sampled episodes disagree (each start's
episodes form one GRPO group: the groups that carry a policy-gradient signal). Prints a Markdown table and
writes JSON.

    python benchmarks/rollout_temperature.py --checkpoint runs/sft_baseline/spatial_state/sft \\
        --task-ids 0 1 2 3 --init-state-ids 0 1 2 3 4 --temperatures 1.0 0.7 0.5 0.3
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Annotated

import numpy as np
import torch
import tyro

import gym_libero_vla  # noqa: F401  (registers the env ids)
from gym_libero_vla.evaluate import evaluate_policy, wilson_interval
from gym_libero_vla.policies import TorchThreads, load_policy
from gym_libero_vla.policies.base import check_temperature
from gym_libero_vla.rollouts import Start
from gym_libero_vla.suites import resolve_suite


@dataclasses.dataclass
class Args:
    checkpoint: str
    """Policy checkpoint directory (``save_pretrained`` / ``SFT.save`` / ``GRPO.save``)."""
    suite: str = "spatial"
    """LIBERO suite: short name, LIBERO name or env id."""
    task_ids: tuple[int, ...] = (0, 1, 2, 3)
    """Tasks to roll out."""
    init_state_ids: tuple[int, ...] = (0, 1, 2, 3, 4)
    """Init states (GRPO's training ones, by default those of the demos: 0..19)."""
    temperatures: tuple[float, ...] = (1.0, 0.7, 0.5, 0.3)
    """Sampling temperatures to compare."""
    episodes_per_start: int = 4
    """Sampled episodes per (task, init state) and temperature: one GRPO group (the default group size)."""
    max_episode_steps: int | None = None
    """Step limit (default: the suite's)."""
    num_envs: int = 8
    """Envs side by side in this process, one batched policy call per step."""
    seed: int = 0
    """Seeds torch's sampling and the resets."""
    threads: Annotated[TorchThreads, tyro.conf.OmitArgPrefixes] = dataclasses.field(default_factory=TorchThreads)
    """Torch CPU threads: --torch-threads (default 1)."""
    json_out: str = "benchmarks/results/rollout_temperature.json"
    """Where to write the JSON (the Markdown table goes next to it as .md)."""


def summarize(rows: list[dict], starts) -> dict:
    """Success with its Wilson interval, and the share of starts whose episodes disagree (a mixed group)."""
    successes = sum(row["success"] for row in rows)
    outcomes = [{row["success"] for row in rows if (row["task_id"], row["init_state_id"]) == start} for start in starts]
    return {
        "successes": int(successes), "episodes": len(rows), "success_rate": successes / len(rows),
        "ci95": list(wilson_interval(int(successes), len(rows))),
        "mixed_group_fraction": float(np.mean([len(outcome) > 1 for outcome in outcomes])),
        "mean_length": float(np.mean([row["length"] for row in rows])),
    }  # fmt: skip


def main(args: Args) -> dict:
    args.threads.apply()
    suite = resolve_suite(args.suite)
    for temperature in args.temperatures:
        check_temperature(temperature)
    if args.episodes_per_start < 2:
        raise ValueError(f"episodes_per_start {args.episodes_per_start} must be >= 2 (a group of one never disagrees)")
    policy = load_policy(args.checkpoint).eval()
    max_steps = args.max_episode_steps or suite.max_episode_steps
    starts = [(task_id, init_state_id) for task_id in args.task_ids for init_state_id in args.init_state_ids]

    def run(deterministic: bool, temperature: float, episodes_per_start: int) -> dict:
        torch.manual_seed(args.seed)
        runs = [Start(task_id, init_state_id, args.seed + k) for task_id, init_state_id in starts
                for k in range(episodes_per_start)]  # fmt: skip
        results = evaluate_policy(policy, suite.env_id, starts=runs, max_episode_steps=max_steps, deterministic=deterministic,
                                  temperature=temperature, progress=False, num_envs=args.num_envs)  # fmt: skip
        return {**summarize(results["episodes"], starts), "seconds": results["seconds"]}

    rows: dict[str, dict] = {"greedy": run(True, 1.0, 1)}
    print(f"greedy: {rows['greedy']['success_rate']:.3f}", flush=True)
    for temperature in args.temperatures:
        rows[f"T={temperature:g}"] = run(False, temperature, args.episodes_per_start)
        print(f"T={temperature:g}: {rows[f'T={temperature:g}']['success_rate']:.3f}", flush=True)

    report = {"args": dataclasses.asdict(args), "env_id": suite.env_id, "max_episode_steps": max_steps, "rows": rows}
    lines = [
        f"## Sampled vs greedy rollouts: {os.path.normpath(args.checkpoint)} on {suite.env_id}",
        "",
        f"Tasks {list(args.task_ids)}, init states {list(args.init_state_ids)}; {args.episodes_per_start} sampled "
        f"episodes per start and temperature, one greedy; at most {max_steps} steps.",
        "",
        "| decoding | success [Wilson 95%] | episodes | starts whose episodes disagree | mean length | seconds |",
        "|:---|:---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        low, high = row["ci95"]
        mixed = "-" if name == "greedy" else f"{row['mixed_group_fraction']:.2f}"
        lines.append(
            f"| {name} | {row['success_rate']:.3f} [{low:.3f}, {high:.3f}] | {row['episodes']} | {mixed} | "
            f"{row['mean_length']:.0f} | {row['seconds']:.0f} |"
        )
    table = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
    with open(args.json_out, "w") as file:
        json.dump(report, file, indent=2)
    with open(os.path.splitext(args.json_out)[0] + ".md", "w") as file:
        file.write(table)
    print(table)
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
