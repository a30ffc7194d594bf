"""The main job: demos -> SFT warm start -> GRPO with offline regularization, success measured before and after.

    python examples/train_grpo.py                      # defaults: 2 LIBERO-Spatial tasks, ~15 min on a 2-core CPU
    python examples/train_grpo.py --init-from runs/sft/final --total-timesteps 20000
    python examples/train_grpo.py --algo irevla --output-dir runs/irevla    # iRe-VLA on the same work
    tensorboard --logdir runs/grpo

Rerunning the same command after a crash (or a kill) resumes: the SFT warm start is reused, and GRPO
continues from its newest checkpoint in ``output_dir/checkpoints`` with its optimizer, RNG, step counter and
episode cache (``output_dir/cache``); ``--no-resume`` starts over.

1. Demonstrations: the scripted expert's successful episodes on ``task_ids`` from init states
   ``0 .. demo_init_state_end - 1``, state mode with LIBERO's privileged object poses ("object_state"), cached
   under ``data/`` (rerunning reuses the finished episodes; see :mod:`gym_libero_vla.demos.generate`).
2. SFT warm start: behaviour cloning of a fresh :class:`CompactVLA` on them (or ``--init-from`` a checkpoint).
3. Evaluate before: deterministic episodes on held-out init states (``eval_init_state_start ..``).
4. GRPO (:mod:`gym_libero_vla.algos.grpo`): groups of episodes from the demos' init states, group-relative
   advantages, clipped surrogate, plus the demos' NLL weighted by how often the rollouts fail (offline
   regularization); all-fail groups get a demo (Rollout Relabel's rescue) and successes are replayed with
   importance weights. Or iRe-VLA (:mod:`gym_libero_vla.algos.irevla`) with ``--algo irevla``.
   Checkpoints every ``checkpoint_freq`` env steps, TensorBoard under ``output_dir/tb``, optional periodic
   evaluation (``eval_freq``).
5. Evaluate after, on the same held-out init states; ``results.json`` holds both.

Why privileged object poses: a state-only policy that sees just the gripper (proprio) cannot know where the
bowl is, and hardly ever succeeds; with the object poses a small policy trained in minutes does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Annotated, Literal

import gymnasium as gym
import torch
import tyro

import gym_libero_vla  # noqa: F401  (registers the env ids)
from gym_libero_vla.algos.async_grpo import AsyncGRPO
from gym_libero_vla.algos.callbacks import LiberoEvalCallback, RolloutCheckpointCallback
from gym_libero_vla.algos.grpo import GRPO, latest_checkpoint
from gym_libero_vla.algos.irevla import IREVLA_CONFIG_FILENAME, IReVLA
from gym_libero_vla.algos.sft import SFT
from gym_libero_vla.demos import action_stats, load_episodes
from gym_libero_vla.evaluate import env_kwargs_for_policy, evaluate_policy, write_report
from gym_libero_vla.policies import CompactVLA, CompactVLAConfig, WordTokenizer, load_policy, resolve_device
from gym_libero_vla.suites import resolve_suite, suite_tasks
from gym_libero_vla.wrappers.action_tokenizer import ActionBins


@dataclasses.dataclass
class Args:
    env_id: str = "LiberoSpatial-v0"
    """LIBERO suite env to train and evaluate on."""
    task_ids: tuple[int, ...] = (0, 1)
    """Tasks of the suite: demos, GRPO groups and evaluation all use these."""
    seed: int = 0
    """Seed of torch, SFT batches, GRPO's draws and the evaluation resets."""
    torch_threads: int = 1
    """Torch CPU threads; more than the free cores slows small models down a lot."""
    output_dir: str = "runs/grpo"
    """Checkpoints (``sft/``, ``checkpoints/``, ``final/``), TensorBoard (``tb/``), episode cache (``cache/``),
    evaluations and results.json."""
    algo: Literal["grpo", "irevla"] = "grpo"
    """Online learner: "grpo" (GRPO with offline regularization) or "irevla" (iRe-VLA's RL/SL stages)."""
    resume: bool = True
    """Reuse the SFT warm start and continue from the newest checkpoint in output_dir when there is one."""
    async_: Annotated[bool, tyro.conf.arg(name="async")] = False
    """GRPO only: rollout worker processes keep filling an episode cache while the learner trains
    (:class:`AsyncGRPO`); --sync (or --no-async) collects, then updates, in one process."""
    num_workers: int = 2
    """--async: rollout worker processes (or Ray actors)."""
    backend: Literal["process", "ray"] = "process"
    """--async: run the workers as local processes, or as Ray actors (a local Ray instance unless ray.init was
    called with a cluster address)."""
    max_staleness: int = 2
    """--async: skip groups sampled more than this many policy versions ago (newer stale ones are IS-corrected)."""

    # --- demonstrations
    demos: str | None = None
    """Demo HDF5 file (default: ``data/<suite>_state_tasks<ids>_<n>ep.hdf5``, generated if missing, then reused)."""
    demo_episodes_per_task: int = 10
    """Successful expert episodes per task."""
    demo_init_state_end: int = 20
    """Demos (and GRPO groups) use init states 0 .. demo_init_state_end - 1; evaluation starts past them."""

    # --- SFT warm start
    init_from: str | None = None
    """Start from this policy checkpoint and skip SFT (it must read what the demos hold)."""
    sft_steps: int = 2000
    """Behaviour-cloning gradient steps of the warm start (300 leave the policy at 0 success; 2000 reach ~0.2)."""
    sft_batch_size: int = 64
    """Demo transitions per SFT step."""
    sft_learning_rate: float = 3e-4
    """AdamW step size of the warm start."""
    hidden_size: int = 128
    """CompactVLA transformer width."""
    num_layers: int = 2
    """CompactVLA transformer blocks."""
    num_heads: int = 4
    """CompactVLA attention heads."""

    # --- GRPO
    total_timesteps: int = 4000
    """GRPO env steps (whole rollouts: the last one may overshoot by up to num_groups * group_size episodes)."""
    num_groups: int = 2
    """(task, init state) pairs per GRPO rollout."""
    group_size: int = 4
    """Episodes per (task, init state): the G of GRPO."""
    learning_rate: float = 3e-5
    """GRPO's AdamW step size (small: the warm start is already good at some states)."""
    num_epochs: int = 2
    """Passes over each rollout."""
    minibatch_size: int = 128
    """Env steps per GRPO gradient step."""
    imitation_weight_max: float = 1.0
    """Weight of the demos' NLL when every rollout fails (it falls linearly to imitation_weight_min at all-success)."""
    imitation_weight_min: float = 0.1
    """Weight of the demos' NLL when every rollout succeeds."""
    kl_coef: float = 0.0
    """Weight of KL(pi || pi_ref) to the warm-started policy (0: no reference, DAPO's choice)."""
    temperature: float = 1.0
    """Rollout sampling temperature (GRPO's ratio, entropy and KL use the same tempered distribution)."""
    loss_aggregation: Literal["token-mean", "episode-mean"] = "token-mean"
    """Policy-gradient weighting: every token the same (token-mean), or every episode the same (episode-mean)."""
    rescue_failed_groups: bool = True
    """GRPO: put a demo into groups whose rollouts all failed, so they carry a learning signal."""
    max_sampling_rounds: int = 2
    """GRPO's dynamic sampling: draw up to this many rounds of num_groups groups while fewer carry signal."""
    success_replay_size: int = 500
    """GRPO: successful rollouts replayed beside the demos in the offline term (0: demos only)."""
    rl_updates_per_stage: int = 2
    """iRe-VLA: GRPO updates of the action head per RL stage."""
    sl_steps_per_stage: int = 100
    """iRe-VLA: supervised steps on demos + successes per SL stage."""
    sl_learning_rate: float = 1e-4
    """iRe-VLA: AdamW step size of the SL stages."""
    max_episode_steps: int | None = 160
    """Step limit of GRPO and evaluation episodes (the expert needs ~90-130 on Spatial; None: the suite's 220)."""
    checkpoint_freq: int = 1000
    """Save a checkpoint after the first rollout past every this many env steps (0: only the final one)."""
    eval_freq: int = 0
    """Also evaluate on the held-out init states every this many env steps, logged as eval/* (0: never)."""

    # --- evaluation
    eval_init_state_start: int = 20
    """First held-out evaluation init state (must be >= demo_init_state_end to be held out)."""
    eval_episodes_per_task: int = 5
    """Evaluation episodes per task (init states eval_init_state_start, +1, ...); deterministic decoding."""
    video_episodes: int = 1
    """Record this many evaluation episodes as mp4 (before and after)."""
    eval_num_envs: int = 4
    """Evaluation envs run side by side, the policy acting on all of them in one batched call (same episodes)."""
    device: str = "cpu"
    """Torch device of the policy (SFT, GRPO / iRe-VLA learner, evaluation): cpu, cuda, cuda:<index>, mps or auto.
    The simulators, and --async's rollout workers, stay on the CPU."""
    progress_bar: bool = True
    """Show progress bars."""


def demo_path(args: Args) -> str:
    suite = resolve_suite(args.env_id)
    tasks = "-".join(str(task_id) for task_id in args.task_ids)
    short = suite.libero_name.removeprefix("libero_")
    return f"data/{short}_state_tasks{tasks}_{args.demo_episodes_per_task}ep_init0-{args.demo_init_state_end - 1}.hdf5"


def make_demos(args: Args) -> str:
    """Generate (or resume / reuse) the expert demos; returns the HDF5 path."""
    from gym_libero_vla.demos.generate import GenerateArgs, generate

    path = args.demos or demo_path(args)
    generate(
        GenerateArgs(
            suite=args.env_id, out=path, task_ids=args.task_ids, episodes_per_task=args.demo_episodes_per_task,
            init_state_end=args.demo_init_state_end, object_state=True, progress=args.progress_bar,
        )
    )  # fmt: skip
    return path


def warm_start(args: Args, episodes, instructions: list[str]):
    """A CompactVLA behaviour-cloned on the demos (or the ``init_from`` checkpoint)."""
    if args.init_from is not None:
        print(f"warm start: {args.init_from} (SFT skipped)")
        return load_policy(args.init_from)
    sft_dir = os.path.join(args.output_dir, "sft")
    if args.resume and os.path.exists(os.path.join(sft_dir, "sft.json")):
        with open(os.path.join(sft_dir, "sft.json")) as file:
            done = int(json.load(file).get("num_timesteps", 0))
        if done >= args.sft_steps:
            print(f"warm start: reusing {sft_dir} ({done} SFT steps)")
            return load_policy(sft_dir)
    config = CompactVLAConfig(
        cameras=(), object_state_dim=episodes[0].observations["object_state"].shape[1],
        hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=args.num_heads,
    )  # fmt: skip
    bins = ActionBins.from_statistics(action_stats(episodes))  # q01..q99 of the demo actions, OpenVLA's bins
    policy = CompactVLA(config, bins, WordTokenizer.from_texts(instructions))
    model = SFT(
        policy, demos=episodes, learning_rate=args.sft_learning_rate, batch_size=args.sft_batch_size, seed=args.seed,
        tensorboard_log=os.path.join(args.output_dir, "tb"), device=resolve_device(args.device),
    )  # fmt: skip
    start = time.time()
    model.learn(args.sft_steps, progress_bar=args.progress_bar)
    print(f"SFT: {args.sft_steps} steps in {time.time() - start:.0f} s, {model.last_metrics}")
    model.save(os.path.join(args.output_dir, "sft"))
    return policy


def make_learner(args: Args, policy, env, episodes):
    """GRPO with offline regularization, or iRe-VLA, on the same env, demos and group settings."""
    common = dict(
        tensorboard_log=os.path.join(args.output_dir, "tb"), num_groups=args.num_groups, group_size=args.group_size,
        learning_rate=args.learning_rate, num_epochs=args.num_epochs, minibatch_size=args.minibatch_size,
        kl_coef=args.kl_coef, temperature=args.temperature, max_sampling_rounds=args.max_sampling_rounds,
        loss_aggregation=args.loss_aggregation,
        task_ids=args.task_ids,
        init_state_ids=tuple(range(args.demo_init_state_end)), seed=args.seed,
    )  # fmt: skip
    if args.algo == "irevla":
        if args.async_:
            raise ValueError("--async runs GRPO's learner with rollout workers: use it with --algo grpo, not irevla")
        return IReVLA(
            policy, env, demos=episodes, rl_updates_per_stage=args.rl_updates_per_stage,
            sl_steps_per_stage=args.sl_steps_per_stage, sl_batch_size=args.sft_batch_size,
            sl_learning_rate=args.sl_learning_rate, success_store=os.path.join(args.output_dir, "successes"), **common,
        )  # fmt: skip
    learner_class, pipeline = GRPO, {}
    if args.async_:
        learner_class = AsyncGRPO
        pipeline = dict(
            pipeline_dir=os.path.join(args.output_dir, "pipeline"), num_workers=args.num_workers, backend=args.backend,
            max_staleness=args.max_staleness,
        )  # fmt: skip
    return learner_class(
        policy, env, demos=episodes, **pipeline, imitation_weight_min=args.imitation_weight_min,
        imitation_weight_max=args.imitation_weight_max, rescue_failed_groups=args.rescue_failed_groups,
        success_replay_size=args.success_replay_size, cache_dir=os.path.join(args.output_dir, "cache"), **common,
    )  # fmt: skip


def resume_learner(args: Args, checkpoint: str, env, episodes):
    """The learner saved in ``checkpoint``, with its optimizer, RNG and step counter."""
    learner_class = IReVLA if args.algo == "irevla" else AsyncGRPO if args.async_ else GRPO
    saved_algo = "irevla" if os.path.exists(os.path.join(checkpoint, IREVLA_CONFIG_FILENAME)) else "grpo"
    if saved_algo != args.algo:
        raise ValueError(
            f"{checkpoint} is a checkpoint of --algo {saved_algo}, but this run has --algo {args.algo}: rerun with "
            f"--algo {saved_algo} to resume it, or choose another --output-dir (or --no-resume) to start a new run"
        )
    model = learner_class.load(
        checkpoint, env=env, demos=episodes, device=resolve_device(args.device),
        tensorboard_log=os.path.join(args.output_dir, "tb"),
    )  # fmt: skip
    print(f"resuming {args.algo} from {checkpoint} at {model.num_timesteps} env steps")
    return model


def main(args: Args) -> dict:
    if args.eval_init_state_start < args.demo_init_state_end:
        print(f"warning: evaluation init states start at {args.eval_init_state_start}, inside the demos' and GRPO's "
              f"0..{args.demo_init_state_end - 1}: they are not held out")  # fmt: skip
    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)  # a clear error for a device this machine lacks, before any work
    if args.eval_num_envs < 1:
        raise ValueError(f"eval_num_envs {args.eval_num_envs} must be >= 1")
    suite = resolve_suite(args.env_id)
    tasks = suite_tasks(suite.libero_name)
    start = time.time()
    timings: dict[str, float] = {}

    # 1. Demonstrations (privileged object poses: see the module docstring).
    demos = make_demos(args)
    episodes = load_episodes(demos, filter_noops=True, load_images=False)
    if not episodes:
        raise ValueError(f"{demos} holds no successful demonstrations")
    print(f"{len(episodes)} demos, {sum(len(episode) for episode in episodes)} transitions from {demos}")
    timings["demos"] = time.time() - start

    # 2. SFT warm start (when resuming, the newest checkpoint's policy instead).
    checkpoint = latest_checkpoint(os.path.join(args.output_dir, "checkpoints")) if args.resume else None
    if checkpoint is not None:
        policy = load_policy(checkpoint)
    else:
        policy = warm_start(args, episodes, [tasks[task_id].instruction for task_id in range(len(tasks))])
    policy = policy.to(device)
    timings["sft"] = time.time() - start - sum(timings.values())

    # 3. Evaluate before, on held-out init states (reused when resuming).
    eval_init_states = tuple(range(args.eval_init_state_start, args.eval_init_state_start + args.eval_episodes_per_task))

    def evaluate(stage: str, evaluated_policy) -> dict:
        results = evaluate_policy(
            evaluated_policy, suite.env_id, args.task_ids, eval_init_states, seeds=(args.seed,),
            max_episode_steps=args.max_episode_steps, video_episodes=args.video_episodes,
            video_dir=os.path.join(args.output_dir, f"eval_{stage}", "videos"), progress=args.progress_bar,
            num_envs=args.eval_num_envs,
        )  # fmt: skip
        print(
            f"\n{stage} {args.algo}:\n"
            + write_report(results, os.path.join(args.output_dir, f"eval_{stage}"), f"{stage} {args.algo}")
        )
        return results

    before_path = os.path.join(args.output_dir, "eval_before", "success.json")
    if checkpoint is not None and os.path.exists(before_path):
        with open(before_path) as file:
            before = json.load(file)
        before["per_task"] = {int(task_id): task for task_id, task in before["per_task"].items()}
    else:
        before = evaluate("before", policy)
    timings["eval_before"] = time.time() - start - sum(timings.values())

    # 4. GRPO with the demos as offline regularization (or iRe-VLA), on the demos' init states (evaluation's stay held out).
    env_kwargs = env_kwargs_for_policy(policy)
    env = gym.make(suite.env_id, task_ids=args.task_ids, max_episode_steps=args.max_episode_steps, **env_kwargs)
    model = resume_learner(args, checkpoint, env, episodes) if checkpoint else make_learner(args, policy, env, episodes)
    callbacks = []
    if args.checkpoint_freq > 0:
        callbacks.append(
            RolloutCheckpointCallback(
                args.checkpoint_freq, os.path.join(args.output_dir, "checkpoints"), args.algo, keep_last=2
            )
        )
    if args.eval_freq > 0:
        callbacks.append(
            LiberoEvalCallback(
                suite.env_id, args.task_ids, eval_init_states, args.eval_freq, seeds=(args.seed,),
                max_episode_steps=args.max_episode_steps, log_path=os.path.join(args.output_dir, "eval_periodic"),
                num_envs=args.eval_num_envs,
            )
        )  # fmt: skip
    remaining = args.total_timesteps - model.num_timesteps
    if remaining > 0:
        model.learn(remaining, callback=callbacks, progress_bar=args.progress_bar, reset_num_timesteps=checkpoint is None)
    env.close()
    model.save(os.path.join(args.output_dir, "final"))
    print(f"{args.algo}: {model.num_timesteps} env steps, last update {getattr(model, 'last_metrics', {})}")
    timings["grpo"] = time.time() - start - sum(timings.values())

    # 5. Evaluate after, on the same held-out init states.
    after = evaluate("after", model.policy)
    timings["eval_after"] = time.time() - start - sum(timings.values())
    timings["total"] = time.time() - start

    results = {
        "args": dataclasses.asdict(args),
        "demos": demos,
        "eval_init_state_ids": list(eval_init_states),
        "success_rate_before": before["success_rate"],
        "success_rate_after": after["success_rate"],
        "per_task_before": {str(t): task["success_rate"] for t, task in before["per_task"].items()},
        "per_task_after": {str(t): task["success_rate"] for t, task in after["per_task"].items()},
        "grpo_timesteps": model.num_timesteps,
        "grpo_last_metrics": getattr(model, "last_metrics", {}),
        "algo": args.algo,
        "checkpoint": os.path.join(args.output_dir, "final"),
        "seconds": timings,
    }
    with open(os.path.join(args.output_dir, "results.json"), "w") as file:
        json.dump(results, file, indent=2)
    print(f"success on held-out init states {eval_init_states[0]}..{eval_init_states[-1]}: "
          f"before {args.algo} {before['success_rate']:.2f}, after {args.algo} {after['success_rate']:.2f} "
          f"({timings['total']:.0f} s; {args.output_dir}/results.json)")  # fmt: skip
    return results


if __name__ == "__main__":
    # --sync is the spelling of --no-async that reads as the switch's other position (--async/--sync).
    main(tyro.cli(Args, args=["--no-async" if arg == "--sync" else arg for arg in sys.argv[1:]]))
