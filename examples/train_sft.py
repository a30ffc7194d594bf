"""Behaviour cloning (SFT) of a VLA policy on LIBERO demonstrations, then a per-task success table.

    python -m gym_libero_vla.demos generate --suite spatial --episodes-per-task 20 --out data/spatial.hdf5
    python examples/train_sft.py --demos data/spatial.hdf5 --total-steps 2000

With privileged object poses (demos generated with ``--object-state``), evaluated on held-out init states::

    python -m gym_libero_vla.demos generate --suite spatial --init-state-end 20 --object-state --out data/spatial_state.hdf5
    python examples/train_sft.py --demos data/spatial_state.hdf5 --object-state --eval-init-state-start 20
    tensorboard --logdir runs/sft

Trains a fresh :class:`CompactVLA` (or fine-tunes a saved policy, optionally with LoRA) with
:class:`gym_libero_vla.algos.sft.SFT`, saves it, and rolls it out in the env on every task of the demos.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import tyro

import gym_libero_vla  # noqa: F401  (registers the env ids)
from gym_libero_vla.algos.sft import SFT
from gym_libero_vla.demos import action_stats, load_episodes
from gym_libero_vla.policies import CompactVLA, CompactVLAConfig, WordTokenizer, batch_observation, load_policy
from gym_libero_vla.suites import resolve_suite, suite_tasks
from gym_libero_vla.wrappers.action_tokenizer import ActionBins


@dataclasses.dataclass
class Args:
    demos: str = "data/spatial.hdf5"
    """HDF5 demonstration file (written by ``python -m gym_libero_vla.demos generate`` or LIBERO's own)."""
    env_id: str = "LiberoSpatial-v0"
    """Env the demos come from, used for evaluation."""
    obs_mode: Literal["state", "rgb+state"] = "state"
    """"state": a state-only policy; "rgb+state": agentview frames too (the demos must hold images)."""
    image_size: int = 128
    """Side of the camera frames (rgb+state only); must match the demos'."""
    object_state: bool = False
    """Also give the policy LIBERO's privileged object poses ("object_state"): the demos must hold them
    (``generate --object-state``) and evaluation makes the env with ``privileged_state=True``."""
    init_from: str | None = None
    """Start from this policy checkpoint instead of a fresh CompactVLA (its action bins are kept)."""
    lora_rank: int = 0
    """> 0: fine-tune ``init_from`` with a LoRA adapter of this rank (only the adapter is saved)."""
    hidden_size: int = 128
    """CompactVLA transformer width."""
    num_layers: int = 2
    """CompactVLA transformer blocks."""
    num_heads: int = 4
    """CompactVLA attention heads."""
    total_steps: int = 2000
    """Gradient steps."""
    batch_size: int = 64
    """Transitions per gradient step."""
    learning_rate: float = 3e-4
    """AdamW step size."""
    seed: int = 0
    """Seed of torch, the batch order and the evaluation resets."""
    torch_threads: int = 1
    """Torch CPU threads; more than the free cores slows small models down a lot."""
    filter_noops: bool = True
    """Drop no-op steps from the demos, as OpenVLA's processed LIBERO data."""
    eval_episodes_per_task: int = 5
    """Evaluation episodes per task (init states eval_init_state_start, +1, ...); 0 skips evaluation."""
    eval_init_state_start: int = 0
    """First evaluation init state; set it past the demos' init states to evaluate on held-out ones."""
    max_eval_steps: int | None = None
    """Cap on policy steps per evaluation episode (default: the suite's step limit)."""
    deterministic_eval: bool = True
    """Greedy action tokens in evaluation (OpenVLA's decoding)."""
    output_dir: str = "runs/sft"
    """Checkpoint (``final/``), TensorBoard runs and ``eval.json`` go here."""
    progress_bar: bool = True
    """Show a progress bar while training."""


def evaluate(
    policy, env, task_ids, episodes_per_task: int, max_steps: int | None, deterministic: bool, init_state_start: int = 0
) -> dict[int, float]:
    """Success rate per task: roll out from init states init_state_start .. +episodes_per_task-1 of each task."""
    success_rates = {}
    for task_id in task_ids:
        successes = 0
        for init_state_id in range(init_state_start, init_state_start + episodes_per_task):
            obs, _ = env.reset(options={"task_id": task_id, "init_state_id": init_state_id})
            for _ in range(max_steps or 10**9):
                actions, _, _ = policy.act(batch_observation(obs), deterministic=deterministic)
                obs, _, terminated, truncated, _ = env.step(actions[0].cpu().numpy())
                if terminated or truncated:
                    break
            successes += int(terminated)
        success_rates[task_id] = successes / episodes_per_task
    return success_rates


def print_table(success_rates: dict[int, float], instructions: dict[int, str], episodes_per_task: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"success rate ({episodes_per_task} episodes per task)")
    for column in ("task", "instruction", "success"):
        table.add_column(column)
    for task_id, rate in success_rates.items():
        table.add_row(str(task_id), instructions[task_id], f"{rate:.2f}")
    table.add_row("all", "", f"{np.mean(list(success_rates.values())):.2f}")
    Console().print(table)


def main(args: Args) -> dict:
    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(args.seed)
    suite = resolve_suite(args.env_id)
    instructions = {task.task_id: task.instruction for task in suite_tasks(suite.libero_name)}
    cameras = ("agentview",) if args.obs_mode == "rgb+state" else ()

    # Demonstrations and the action bins they define (q01..q99 of their actions).
    episodes = load_episodes(args.demos, filter_noops=args.filter_noops, load_images=bool(cameras))
    if not episodes:
        raise ValueError(f"{args.demos} holds no successful demonstrations")
    object_state_dim = 0
    if args.object_state:
        if "object_state" not in episodes[0].observations:
            raise ValueError(f"{args.demos} has no obs/object_state: generate it with --object-state, or drop --object-state")
        object_state_dim = episodes[0].observations["object_state"].shape[1]
    if args.init_from is not None:
        policy = load_policy(args.init_from)
        if args.lora_rank > 0:
            policy.add_lora(rank=args.lora_rank, alpha=2.0 * args.lora_rank)
    else:
        if args.lora_rank > 0:
            raise ValueError("lora_rank > 0 adapts a pretrained policy: give --init-from")
        bins = ActionBins.from_statistics(action_stats(episodes))
        config = CompactVLAConfig(
            cameras=cameras, image_size=args.image_size, object_state_dim=object_state_dim,
            hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=args.num_heads,
        )  # fmt: skip
        policy = CompactVLA(config, bins, WordTokenizer.from_texts(instructions.values()))
    print(f"{len(episodes)} demos, {sum(len(e) for e in episodes)} transitions; "
          f"{sum(p.numel() for p in policy.parameters() if p.requires_grad):,} trainable parameters")  # fmt: skip

    model = SFT(
        policy, demos=episodes, learning_rate=args.learning_rate, batch_size=args.batch_size, seed=args.seed,
        tensorboard_log=os.path.join(args.output_dir, "tb"),
    )  # fmt: skip
    start = time.time()
    model.learn(args.total_steps, progress_bar=args.progress_bar)
    train_seconds = time.time() - start
    print(f"trained {model.num_timesteps} steps in {train_seconds:.0f} s: {model.last_metrics}")
    model.save(os.path.join(args.output_dir, "final"))

    results = {
        "args": dataclasses.asdict(args),
        "num_demos": len(episodes),
        "num_transitions": int(sum(len(e) for e in episodes)),
        "train": model.last_metrics,
        "train_seconds": train_seconds,
        "success_rate": {},
    }
    if args.eval_episodes_per_task > 0:
        task_ids = sorted({episode.task_id for episode in episodes if episode.task_id >= 0}) or sorted(instructions)
        env_kwargs = {"obs_mode": args.obs_mode}
        if cameras:
            env_kwargs.update(cameras=cameras, image_size=args.image_size)
        if object_state_dim:
            env_kwargs.update(privileged_state=True)
        env = gym.make(args.env_id, **env_kwargs)
        if object_state_dim and env.observation_space["object_state"].shape != (object_state_dim,):
            raise ValueError(
                f"the demos' object_state has {object_state_dim} numbers but {args.env_id}'s has "
                f"{env.observation_space['object_state'].shape[0]}: generate the demos for every task of the suite"
            )
        policy.eval()
        start = time.time()
        success_rates = evaluate(
            policy, env, task_ids, args.eval_episodes_per_task, args.max_eval_steps, args.deterministic_eval,
            args.eval_init_state_start,
        )  # fmt: skip
        results["eval_seconds"] = time.time() - start
        first_init_state = args.eval_init_state_start
        results["eval_init_state_ids"] = list(range(first_init_state, first_init_state + args.eval_episodes_per_task))
        env.close()
        print_table(success_rates, instructions, args.eval_episodes_per_task)
        results["success_rate"] = {str(task_id): rate for task_id, rate in success_rates.items()}
    with open(os.path.join(args.output_dir, "eval.json"), "w") as file:
        json.dump(results, file, indent=2)
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
