"""Asynchronous vs synchronous GRPO: the same configuration, the same number of learner updates, in one run.

    python benchmarks/async_vs_sync.py                                  # tiny fresh policy, ~5 min on 2 cores
    python benchmarks/async_vs_sync.py --init-from runs/grpo/sft --max-episode-steps 160 --num-updates 8 \\
        --grpo.learning-rate 3e-5 --pipeline.num-workers 2

Sync is plain :class:`~gym_libero_vla.algos.grpo.GRPO` in one process (collect ``num_groups`` groups, then
update); async is :class:`~gym_libero_vla.algos.async_grpo.AsyncGRPO` with ``num_workers`` rollout workers
feeding the trajectory cache while the learner updates. Both start from the same policy with the same seed
and env settings (one env per process, or ``envs_per_worker`` sub-envs: the sync learner's env has as many),
and both stop after ``num_updates`` updates (``learn(..., max_updates=num_updates)``). Wall times include starting
up (simulators, worker processes).

Printed and written as JSON: wall time, env steps/s, the learner's idle fraction (sync: the share of time spent
collecting; async: waiting for groups), the workers' idle fraction (sync: the share not spent collecting;
async: waiting), the speed-up, where the async workers' time goes (env steps, resets, weight loads,
stragglers), and per-update success rates (the learning curves at equal updates), compared over all updates:
each run's rollout success with its Wilson 95% interval, and async minus sync with Newcombe's.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import tyro
from reporting import machine_info  # benchmarks/reporting.py

import gym_libero_vla  # noqa: F401  (registers the env ids)
from gym_libero_vla.algos import GRPO, AsyncGRPO, GRPOConfig
from gym_libero_vla.algos.async_grpo import PipelineConfig
from gym_libero_vla.evaluate import difference_interval, env_kwargs_for_policy, wilson_interval
from gym_libero_vla.policies import CompactVLA, CompactVLAConfig, WordTokenizer, load_policy
from gym_libero_vla.suites import resolve_suite, suite_tasks
from gym_libero_vla.wrappers.action_tokenizer import ActionBins


@dataclasses.dataclass
class Args:
    env_id: str = "LiberoSpatial-v0"
    """LIBERO suite env (state mode)."""
    task_ids: tuple[int, ...] = (0,)
    """Tasks groups are drawn from."""
    init_from: str | None = None
    """Start from this policy checkpoint (e.g. an SFT warm start, whose successes give the curves a signal);
    default: a fresh tiny CompactVLA (it never succeeds: the curves stay at 0, the timings are what counts)."""
    hidden_size: int = 32
    """Width of the fresh CompactVLA."""
    max_episode_steps: int = 40
    """Episode step limit."""
    num_settle_steps: int = 10
    """No-op steps after each reset."""
    num_updates: int = 8
    """Learner updates each way."""
    grpo: GRPOConfig = dataclasses.field(
        default_factory=lambda: GRPOConfig(learning_rate=1e-4, num_epochs=1, max_sampling_rounds=1, seed=0)
    )
    """Both runs' GRPO settings (one sampling round: every update takes num_groups groups, both ways)."""
    pipeline: PipelineConfig = dataclasses.field(default_factory=PipelineConfig)
    """The async run's workers (the sync learner's env has envs_per_worker sub-envs too)."""
    out: Path = Path("benchmarks/results/async_vs_sync.json")
    """Where to write the JSON results."""


def timed(algorithm: type[GRPO]) -> type[GRPO]:
    """``algorithm`` that times its collection and updates."""

    class Timed(algorithm):
        def collect_rollouts(self, callback=None):
            start = time.perf_counter()
            rollout = super().collect_rollouts(callback)
            self.collect_s += time.perf_counter() - start
            return rollout

        def train(self, rollout):
            start = time.perf_counter()
            metrics = super().train(rollout)
            self.train_s += time.perf_counter() - start
            self.curve.append({"update": self.policy_version, "seconds": time.perf_counter() - self.bench_start, **metrics})
            return metrics

    Timed.__name__ = f"Timed{algorithm.__name__}"
    return Timed


def make_policy(args: Args, instructions: list[str]):
    if args.init_from is not None:
        return load_policy(args.init_from)
    torch.manual_seed(args.grpo.seed or 0)
    config = CompactVLAConfig(cameras=(), hidden_size=args.hidden_size, num_layers=1, num_heads=2)
    return CompactVLA(config, ActionBins.from_statistics({"q01": [-1.0] * 7, "q99": [1.0] * 7}),
                      WordTokenizer.from_texts(instructions))  # fmt: skip


def run(mode: str, args: Args, policy, workdir: str) -> dict:
    torch.manual_seed(args.grpo.seed or 0)
    start, cpu_start = time.perf_counter(), time.process_time()
    env_kwargs = dict(task_ids=args.task_ids, num_settle_steps=args.num_settle_steps,
                      **env_kwargs_for_policy(policy, args.max_episode_steps))  # fmt: skip
    grpo = dataclasses.asdict(dataclasses.replace(args.grpo, cache_dir=os.path.join(workdir, mode, "cache")))
    envs_per_worker = args.pipeline.envs_per_worker
    if mode == "sync":
        if envs_per_worker > 1:
            env = gym.make_vec(args.env_id, num_envs=envs_per_worker, vectorization_mode="sync", **env_kwargs)
        else:
            env = gym.make(args.env_id, **env_kwargs)
        model = timed(GRPO)(policy, env, **grpo)
    else:
        env = gym.make(args.env_id, **env_kwargs)
        pipeline = dataclasses.replace(args.pipeline, pipeline_dir=os.path.join(workdir, mode))
        model = timed(AsyncGRPO)(policy, env, **grpo, **dataclasses.asdict(pipeline))
    model.bench_start, model.collect_s, model.train_s, model.curve = start, 0.0, 0.0, []
    model.learn(10**9, max_updates=args.num_updates)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    env.close()
    curve = model.curve
    steady = curve[-1]["seconds"] - curve[0]["seconds"]  # update 1 .. N: no start-up
    result = {
        "updates": model.policy_version,
        "wall_s": wall,
        "steady_s_per_update": steady / max(len(curve) - 1, 1),
        "env_steps_trained": model.num_timesteps,
        "env_steps_per_s": model.num_timesteps / wall,
        "success_rate_per_update": [point["rollout/success_rate"] for point in curve],
        "episodes_per_update": [int(point["rollout/groups_sampled"]) * args.grpo.group_size for point in curve],
        "seconds_per_update": [point["seconds"] for point in curve],
        "learner_process_cores_used": cpu / wall,
    }
    if mode == "sync":
        result.update(
            learner_idle_fraction=1.0 - model.train_s / wall,  # the learner waits while the envs step
            worker_idle_fraction=1.0 - model.collect_s / wall,  # the envs wait while the learner updates
            learner_update_fraction=model.train_s / wall,
            cores_used=cpu / wall,  # CPU seconds per second: the share of the machine this run got
        )
    else:
        last = curve[-1]
        result.update({name.removeprefix("async/"): value for name, value in last.items() if name.startswith("async/")})
        result["env_steps_produced_per_s"] = result.pop("env_steps_per_second")
        result["staleness_mean_per_update"] = [point["async/staleness_mean"] for point in curve]
        result["off_policy_fraction_per_update"] = [point["train/off_policy_fraction"] for point in curve]
        result["weight_transfer_seconds_mean"] = float(np.mean([point["async/weight_transfer_seconds"] for point in curve]))
        result["cores_used"] = (cpu + result.pop("worker_cpu_seconds")) / wall  # learner + workers
    return result


def curve_parity(sync: dict, asynchronous: dict) -> dict:
    """Rollout success over every update of each run (Wilson 95%) and async minus sync (Newcombe 95%): the
    learning curves compared at equal updates."""
    totals = {}
    for mode, result in (("sync", sync), ("async", asynchronous)):
        per_update = result["episodes_per_update"]
        successes = int(sum(round(rate * n) for rate, n in zip(result["success_rate_per_update"], per_update)))
        episodes = int(sum(per_update))
        totals[mode] = {"successes": successes, "episodes": episodes, "rate": successes / episodes,
                        "ci95": list(wilson_interval(successes, episodes))}  # fmt: skip
    low, high = difference_interval(totals["async"]["successes"], totals["async"]["episodes"],
                                    totals["sync"]["successes"], totals["sync"]["episodes"])  # fmt: skip
    return {**totals, "difference": totals["async"]["rate"] - totals["sync"]["rate"], "difference_ci95": [low, high]}


def fmt(interval) -> str:
    return f"[{interval[0]:.3f}, {interval[1]:.3f}]"


def main(args: Args) -> dict:
    torch.set_num_threads(1)
    suite = resolve_suite(args.env_id)
    instructions = [task.instruction for task in suite_tasks(suite.libero_name)]
    policy = make_policy(args, instructions)
    workdir = tempfile.mkdtemp(prefix="async_vs_sync_")
    try:
        results = {mode: run(mode, args, copy.deepcopy(policy), workdir) for mode in ("sync", "async")}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    sync, asynchronous = results["sync"], results["async"]
    half = args.num_updates // 2
    report = {
        "args": {key: str(value) if isinstance(value, Path) else value for key, value in dataclasses.asdict(args).items()},
        "machine": machine_info(torch_threads=1),
        "sync": sync,
        "async": asynchronous,
        "speedup_wall": sync["wall_s"] / asynchronous["wall_s"],
        "speedup_steady": sync["steady_s_per_update"] / asynchronous["steady_s_per_update"],
        "success_rate_second_half": {
            mode: float(np.mean(results[mode]["success_rate_per_update"][half:])) for mode in ("sync", "async")
        },
        "learning_curve_parity": curve_parity(sync, asynchronous),
    }
    rows = [
        ("wall time (s)", "wall_s"), ("s per update after the first", "steady_s_per_update"),
        ("env steps trained / s", "env_steps_per_s"), ("learner idle fraction", "learner_idle_fraction"),
        ("worker idle fraction", "worker_idle_fraction"), ("learner update fraction", "learner_update_fraction"),
        ("CPU cores used (CPU s / wall s)", "cores_used"),
    ]  # fmt: skip
    grpo, pipeline = args.grpo, args.pipeline
    print(f"\n{args.num_updates} GRPO updates of {grpo.num_groups} x {grpo.group_size} episodes "
          f"({args.max_episode_steps}-step limit), {pipeline.num_workers} async {pipeline.backend} workers\n")  # fmt: skip
    print("| | sync | async |\n|---|---|---|")
    for label, key in rows:
        print(f"| {label} | {sync[key]:.3f} | {asynchronous[key]:.3f} |")
    print(f"| success rate, updates {half + 1}..{args.num_updates} | {report['success_rate_second_half']['sync']:.3f} | "
          f"{report['success_rate_second_half']['async']:.3f} |")  # fmt: skip
    parity = report["learning_curve_parity"]
    print(f"| rollout success, all updates [Wilson 95%] | {parity['sync']['rate']:.3f} {fmt(parity['sync']['ci95'])} | "
          f"{parity['async']['rate']:.3f} {fmt(parity['async']['ci95'])} |")  # fmt: skip
    print(f"\nlearning curves at equal updates: async - sync = {parity['difference']:+.3f} "
          f"[Newcombe 95% {parity['difference_ci95'][0]:+.3f}, {parity['difference_ci95'][1]:+.3f}] over "
          f"{parity['async']['episodes']} vs {parity['sync']['episodes']} rollout episodes")  # fmt: skip
    print(f"speed-up: {report['speedup_wall']:.2f}x wall, {report['speedup_steady']:.2f}x per update after the first")
    print("async workers' time: "
          + ", ".join(f"{name} {asynchronous[key]:.2f}" for name, key in (
              ("env steps", "worker_env_step_fraction"), ("resets", "worker_reset_fraction"),
              ("weight loads", "worker_weight_load_fraction"), ("idle", "worker_idle_fraction"))))  # fmt: skip
    print(
        f"stragglers: {asynchronous['straggler_fraction']:.2f} of sub-env steps; weight publish "
        f"{asynchronous['weight_transfer_seconds_mean'] * 1000:.1f} ms per update; staleness mean "
        f"{np.mean(asynchronous['staleness_mean_per_update']):.2f}, skipped {asynchronous['groups_skipped_stale']:.0f}"
    )
    for mode in ("sync", "async"):
        print(f"success per update ({mode}): {[round(rate, 2) for rate in results[mode]['success_rate_per_update']]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
