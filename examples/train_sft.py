"""Behaviour cloning (SFT) of a VLA policy on LIBERO demonstrations, then a per-task success table.

    python examples/train_sft.py --total-steps 2000

generates LIBERO-Spatial's scripted-expert demos when their file is missing (``data/spatial_state.hdf5``, 20 per task
from init states 0-19, shared with the benchmarks), trains on them and evaluates on held-out init states 20-24. The
demos are :class:`DemoConfig`'s flags, as in the other training CLIs: ``--demos`` (ours or LIBERO's own file),
``--extra-demos``, ``--filter-stalls``... From pixels, on demos with both cameras::

    python -m gym_libero_vla.demos generate --suite spatial --obs-mode rgb+state --image-size 128 --no-reflections \
        --init-state-end 20 --workers 2 --out data/spatial_rgb128_norefl.hdf5
    python examples/train_sft.py --obs-mode rgb+state --demos data/spatial_rgb128_norefl.hdf5 \
        --policy.cameras agentview wrist --policy.chunk-size 8 --filter-stalls
    tensorboard --logdir runs/sft

Trains a fresh :class:`CompactVLA` (``--policy.*``: :class:`CompactVLAConfig`), or fine-tunes a saved policy,
optionally with LoRA, with :class:`gym_libero_vla.algos.sft.SFT` (``--sft.*``: :class:`SFTConfig`), saves it, and
evaluates it on every task of the demos (:func:`gym_libero_vla.evaluate.evaluate_policy`: ``success.md``, ``.json``,
``.png`` in the output dir).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Annotated, Literal

import torch
import tyro

import gym_libero_vla  # noqa: F401  (registers the env ids)
from gym_libero_vla.algos import SFT, SFTConfig
from gym_libero_vla.demos import LiberoHDF5
from gym_libero_vla.demos.generate import DemoConfig, GenerateArgs, default_demo_path
from gym_libero_vla.evaluate import EvalRange, evaluate_policy, write_report
from gym_libero_vla.policies import CompactVLA, CompactVLAConfig, ThreadConfig, load_policy, torch_threads
from gym_libero_vla.suites import resolve_suite, suite_tasks


@dataclasses.dataclass
class Args:
    demo: Annotated[DemoConfig, tyro.conf.OmitArgPrefixes] = dataclasses.field(default_factory=DemoConfig)
    """The demos: --demos (ours or LIBERO's own file, whose demos' tasks are found by their instruction; default the
    benchmarks' data/<suite>_state.hdf5, or data/<suite>_rgb<size>[_norefl].hdf5 in rgb+state mode, generated with
    the scripted expert when missing), --extra-demos, --filter-noops, --filter-stalls."""
    env_id: str = "LiberoSpatial-v0"
    """Env the demos come from, used for evaluation."""
    obs_mode: Literal["state", "rgb+state"] = "state"
    """"state": a state-only policy; "rgb+state": camera frames too (--policy.cameras; the demos must hold them)."""
    task_ids: tuple[int, ...] | None = None
    """Tasks to train on and evaluate (default: every task of the suite); the demo file must hold them (one of
    LIBERO's own files holds one task: give its id)."""
    object_state: bool = False
    """Also give the policy LIBERO's privileged object poses ("object_state"): the demos must hold them
    (``generate --object-state``) and evaluation makes the env with ``privileged_state=True``."""
    init_from: str | None = None
    """Start from this policy checkpoint instead of a fresh CompactVLA (its action bins are kept)."""
    lora_rank: int = 0
    """> 0: fine-tune ``init_from`` with a LoRA adapter of this rank (only the adapter is saved)."""
    policy: CompactVLAConfig = dataclasses.field(default_factory=CompactVLAConfig)
    """The fresh CompactVLA's sizes. Its cameras (--policy.cameras; OpenVLA-OFT reads agentview and wrist) in
    rgb+state mode, none in state mode. The frame size and whether frames have reflections come from the demo file
    when it exists (--policy.image-size and --policy.reflections say how to generate a missing one)."""
    total_steps: int = 2000
    """Gradient steps."""
    sft: SFTConfig = dataclasses.field(default_factory=lambda: SFTConfig(seed=0))
    """SFT's settings."""
    threads: Annotated[ThreadConfig, tyro.conf.OmitArgPrefixes] = dataclasses.field(default_factory=ThreadConfig)
    """--sft-torch-threads for training (default: every core), --torch-threads for the evaluation, while simulators
    run."""
    eval: Annotated[EvalRange, tyro.conf.OmitArgPrefixes] = dataclasses.field(
        default_factory=lambda: EvalRange(eval_num_init_states=5)
    )
    """The evaluation's init states of every task of the demos (default 20-24, held out from demos of init states
    0..19): --eval-init-state-start, --eval-num-init-states (0 skips the evaluation)."""
    max_eval_steps: int | None = None
    """Cap on policy steps per evaluation episode (default: the suite's step limit)."""
    eval_num_envs: int = 4
    """Evaluation envs side by side, the policy acting on all of them in one batched call."""
    output_dir: str = "runs/sft"
    """Checkpoint (``final/``), TensorBoard runs, ``eval.json`` and the success table go here."""
    progress_bar: bool = True
    """Show a progress bar while training."""


def demo_args(args: Args) -> GenerateArgs:
    """The demo file of this run, with the frames it holds (its own size and reflections when it exists), and how to
    generate it when it is missing."""
    image_size, reflections = args.policy.image_size, args.policy.reflections
    path = args.demo.demos
    if args.obs_mode == "rgb+state" and path is not None and os.path.exists(path):
        with LiberoHDF5(path) as demos:  # evaluated on frames rendered as the demos' were
            reflections = demos.reflections
            frames = demos[0].observations.get("agentview") if len(demos) else None
        image_size = image_size if frames is None else frames.shape[1]  # no frames: refused by name when loading
    return args.demo.generate_args(
        default_demo_path(args.env_id, args.obs_mode, image_size, reflections), suite=args.env_id,
        task_ids=args.task_ids, obs_mode=args.obs_mode, image_size=image_size, reflections=reflections,
        object_state=args.object_state, seed=args.sft.seed or 0, progress=args.progress_bar,
    )  # fmt: skip


def make_policy(args: Args, episodes, instructions, generate: GenerateArgs):
    if args.init_from is not None:
        policy = load_policy(args.init_from)
        if args.lora_rank > 0:
            policy.add_lora(rank=args.lora_rank, alpha=2.0 * args.lora_rank)
        return policy
    if args.lora_rank > 0:
        raise ValueError("lora_rank > 0 adapts a pretrained policy: give --init-from")
    cameras = tuple(args.policy.cameras) if args.obs_mode == "rgb+state" else ()
    config = dataclasses.replace(args.policy, cameras=cameras, reflections=generate.reflections)
    return CompactVLA.from_demos(episodes, config, instructions=instructions, object_state=args.object_state)


def main(args: Args) -> dict:
    args.threads.apply()
    torch.manual_seed(args.sft.seed or 0)
    suite = resolve_suite(args.env_id)
    instructions = {task.task_id: task.instruction for task in suite_tasks(suite.libero_name)}
    generate = demo_args(args)
    episodes, generated = args.demo.load(generate)  # refuses a file lacking a task, the frames or the object poses asked for
    task_ids = sorted({episode.task_id for episode in episodes})
    init_state_ids = args.eval.init_state_ids(suite.env_id, task_ids) if args.eval.eval_num_init_states != 0 else ()
    policy = make_policy(args, episodes, instructions.values(), generate)
    print(f"{len(episodes)} demos, {sum(len(e) for e in episodes)} transitions; "
          f"{sum(p.numel() for p in policy.parameters() if p.requires_grad):,} trainable parameters")  # fmt: skip

    model = SFT(policy, demos=episodes, tensorboard_log=os.path.join(args.output_dir, "tb"), **dataclasses.asdict(args.sft))
    start = time.time()
    with torch_threads(args.threads.sft_torch_threads):
        model.learn(args.total_steps, progress_bar=args.progress_bar)
    train_seconds = time.time() - start
    print(f"trained {model.num_timesteps} steps in {train_seconds:.0f} s: {model.last_metrics}")
    model.save(os.path.join(args.output_dir, "final"))

    results = {
        "args": dataclasses.asdict(args),
        "demos": args.demo.summary(generate, episodes, generated),
        "train": model.last_metrics,
        "train_seconds": train_seconds,
        "success_rate": {},
    }
    if init_state_ids:  # none with --eval-num-init-states 0
        evaluation = evaluate_policy(
            policy, suite.env_id, task_ids, init_state_ids, max_episode_steps=args.max_eval_steps,
            progress=args.progress_bar, num_envs=args.eval_num_envs,
        )  # fmt: skip
        print(write_report(evaluation, args.output_dir, f"SFT on {suite.env_id}"))
        results.update(
            eval_seconds=evaluation["seconds"],
            eval_init_state_ids=list(init_state_ids),
            success_rate={str(task_id): task["success_rate"] for task_id, task in evaluation["per_task"].items()},
        )
    with open(os.path.join(args.output_dir, "eval.json"), "w") as file:
        json.dump(results, file, indent=2)
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
