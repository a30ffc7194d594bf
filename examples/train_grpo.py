"""The main job: demos -> SFT warm start -> GRPO with offline regularization, success measured before and after.

    python examples/train_grpo.py                      # defaults: 2 LIBERO-Spatial tasks, ~6 min on a 2-core CPU
    python examples/train_grpo.py --obs-mode rgb       # the same from pixels (the vision recipe's defaults)
    python examples/train_grpo.py --grpo.learning-rate 1e-4 --total-timesteps 20000 --init-from runs/sft/final
    python examples/train_grpo.py --algo irevla --output-dir runs/irevla    # iRe-VLA on the same work
    python examples/train_grpo.py --async --pipeline.num-workers 2          # rollout workers in their own processes
    tensorboard --logdir runs/grpo

The learners' settings are their library configs, nested: ``--sft.*`` is :class:`SFTConfig`, ``--grpo.*``
:class:`GRPOConfig`, ``--irevla.*`` :class:`IReVLAConfig`, ``--pipeline.*`` :class:`PipelineConfig` (``--async``),
``--policy.*`` :class:`CompactVLAConfig`; ``--help`` lists every field with its default.

Rerunning the same command after a crash (or a kill) resumes: the SFT warm start is reused, and the learner
continues from its newest checkpoint in ``output_dir/checkpoints`` with its optimizer, RNG, step counter and
episode cache (``output_dir/cache``); ``--no-resume`` starts over.

1. Demonstrations: the scripted expert's successful episodes on ``task_ids`` from init states
   ``0 .. demo_init_state_end - 1``, state mode with LIBERO's privileged object poses ("object_state"), cached
   under ``data/`` (rerunning reuses the finished episodes; see :mod:`gym_libero_vla.demos.generate`).
2. SFT warm start: behaviour cloning of a fresh :class:`CompactVLA` on them (or ``--init-from`` a checkpoint).
3. Evaluate before: deterministic episodes on held-out init states (``--eval-init-state-start ..``).
4. GRPO (:mod:`gym_libero_vla.algos.grpo`): groups of episodes from the demos' init states, group-relative
   advantages, clipped surrogate, plus the demos' NLL weighted by how often the rollouts fail (offline
   regularization); all-fail groups get a demo (Rollout Relabel's rescue) and successes are replayed with
   importance weights. Or iRe-VLA (:mod:`gym_libero_vla.algos.irevla`) with ``--algo irevla``.
   Checkpoints every ``checkpoint_freq`` env steps, TensorBoard under ``output_dir/tb``, optional periodic
   evaluation (``eval_freq``).
5. Evaluate after, on the same held-out init states; ``results.json`` holds both.

Why privileged object poses by default: a state-only policy that sees just the gripper (proprio) cannot know where
the bowl is, and hardly ever succeeds; with the object poses a small policy trained in minutes does. ``--obs-mode
rgb`` is the real thing, a policy that sees: the demos carry both cameras' frames and the policy reads them, the
proprio and the instruction, no privileged state. The flag switches every default to the vision recipe
(:func:`default_args`): both cameras rendered at 128 px and encoded at 64, action chunks of 8 (one frame pair per
chunk), random-shift augmentation in SFT, more SFT steps; any flag given with it still overrides them.
"""

from __future__ import annotations

import argparse
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
from gym_libero_vla.algos import GRPO, SFT, AsyncGRPO, GRPOConfig, IReVLA, IReVLAConfig, SFTConfig
from gym_libero_vla.algos.async_grpo import PipelineConfig
from gym_libero_vla.algos.base import latest_checkpoint, resume_or_create
from gym_libero_vla.algos.callbacks import LiberoEvalCallback, RolloutCheckpointCallback
from gym_libero_vla.demos.generate import DemoConfig, GenerateArgs
from gym_libero_vla.evaluate import CAMERA_KEYS, EvalRange, env_kwargs_for_policy, evaluate_policy, write_report
from gym_libero_vla.policies import CompactVLA, CompactVLAConfig, ThreadConfig, load_policy, resolve_device, torch_threads
from gym_libero_vla.rollouts import held_in_init_states
from gym_libero_vla.suites import resolve_suite, suite_tasks

LEARNERS = {"grpo": GRPO, "irevla": IReVLA}
OBS_MODES = ("state", "rgb")


@dataclasses.dataclass
class Args:
    env_id: str = "LiberoSpatial-v0"
    """LIBERO suite env to train and evaluate on."""
    obs_mode: Literal["state", "rgb"] = "state"
    """What the policy sees. "state": proprio + LIBERO's privileged object poses; "rgb": camera frames
    (--policy.cameras, --policy.image-size) + proprio, no privileged state. On the command line --obs-mode rgb also
    switches the defaults to the vision recipe (see the module docstring)."""
    task_ids: tuple[int, ...] = (0, 1)
    """Tasks of the suite: demos, GRPO groups and evaluation all use these."""
    seed: int = 0
    """Seed of torch, SFT batches, GRPO's draws and the evaluation resets."""
    threads: Annotated[ThreadConfig, tyro.conf.OmitArgPrefixes] = dataclasses.field(default_factory=ThreadConfig)
    """--torch-threads while simulators run (GRPO / iRe-VLA, evaluation), --sft-torch-threads for the SFT warm start
    (default: every core)."""
    output_dir: str = "runs/grpo"
    """Checkpoints (``sft/``, ``checkpoints/``, ``final/``), TensorBoard (``tb/``), episode cache (``cache/``),
    evaluations and results.json."""
    algo: Literal["grpo", "irevla"] = "grpo"
    """Online learner: "grpo" (GRPO with offline regularization) or "irevla" (iRe-VLA's RL/SL stages)."""
    resume: bool = True
    """Reuse the SFT warm start and continue from the newest checkpoint in output_dir when there is one."""
    async_: Annotated[bool, tyro.conf.arg(name="async")] = False
    """GRPO only: rollout worker processes keep filling an episode cache while the learner trains
    (:class:`AsyncGRPO`, settings under --pipeline.*); --sync (or --no-async) collects, then updates, in one process."""

    # --- demonstrations
    demo: Annotated[DemoConfig, tyro.conf.OmitArgPrefixes] = dataclasses.field(
        default_factory=lambda: DemoConfig(episodes_per_task=10)
    )
    """The expert demos: --demos (default ``data/<suite>_<state|rgb<size>>_tasks<ids>_<n>ep_init0-<m>.hdf5``,
    generated if missing, then reused), --extra-demos, --episodes-per-task, --demo-init-state-end (demos and GRPO
    groups use init states 0 .. demo_init_state_end - 1; evaluation starts past them)."""

    # --- SFT warm start
    init_from: str | None = None
    """Start from this policy checkpoint and skip SFT (it must read what the demos hold)."""
    sft_steps: int = 2000
    """Behaviour-cloning gradient steps of the warm start (300 leave the policy at 0 success; 2000 reach ~0.2)."""
    sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)
    """The warm start's SFT settings (its seed is --seed unless given)."""
    policy: CompactVLAConfig = dataclasses.field(default_factory=lambda: CompactVLAConfig(cameras=()))
    """The fresh CompactVLA's sizes; its frame and object-state sizes are read from the demos."""

    # --- online learning
    total_timesteps: int = 4000
    """Env steps of GRPO / iRe-VLA (whole rollouts: the last one may overshoot by up to a rollout)."""
    grpo: GRPOConfig = dataclasses.field(default_factory=lambda: GRPOConfig(rescue_failed_groups=True))
    """GRPO's settings (iRe-VLA's RL stage too). Its task_ids, init_state_ids (0 .. demo_init_state_end - 1), seed and
    cache_dir (output_dir/cache) follow the fields above unless given."""
    irevla: IReVLAConfig = dataclasses.field(default_factory=IReVLAConfig)
    """--algo irevla: the SL stage's settings and the RL/SL alternation."""
    pipeline: PipelineConfig = dataclasses.field(default_factory=PipelineConfig)
    """--async: the rollout workers (pipeline_dir defaults to output_dir/pipeline)."""
    max_episode_steps: int | None = 160
    """Step limit of GRPO and evaluation episodes (the expert needs ~90-130 on Spatial; None: the suite's 220)."""
    checkpoint_freq: int = 1000
    """Save a checkpoint after the first rollout past every this many env steps (0: only the final one)."""
    eval_freq: int = 0
    """Also evaluate on the held-out init states every this many env steps, logged as eval/* (0: never)."""

    # --- evaluation
    eval: Annotated[EvalRange, tyro.conf.OmitArgPrefixes] = dataclasses.field(
        default_factory=lambda: EvalRange(eval_num_init_states=5)
    )
    """The held-out init states of every task, one greedy episode each (--eval-init-state-start, >= demo_init_state_end
    to be held out; --eval-num-init-states)."""
    video_episodes: int = 1
    """Record this many evaluation episodes as mp4 (before and after)."""
    num_envs: int = 2
    """Simulators that GRPO's rollouts (a group's episodes) and the evaluations run side by side, the policy acting
    on all of them in one batched call (and, with "async", the processes generating missing demos); GRPO's
    group_size must be a multiple of it. The evaluations' episodes and the demos do not depend on it."""
    vectorization_mode: Literal["sync", "async"] = "async"
    """"async": each simulator in a worker process (gym.make_vec), stepping at the same time: one per core keeps
    both cores of a 2-core machine busy; "sync": all in this process, stepped in turn."""
    device: str = "cpu"
    """Torch device of the policy (SFT, GRPO / iRe-VLA learner, evaluation): cpu, cuda, cuda:<index>, mps or auto.
    The simulators, and --async's rollout workers, stay on the CPU."""
    progress_bar: bool = True
    """Show progress bars."""


def default_args(obs_mode: str = "state") -> Args:
    """The defaults of ``--obs-mode``: "state" is :class:`Args` as declared (~6 min on 2 cores); "rgb" the vision
    recipe of issue #25 on the same tasks (both cameras at 128 px encoded at 64, rendered without reflections,
    proprio, chunks of 8, random shift 8, 1500 SFT steps; ~13 min on 2 cores), into its own output dir."""
    if obs_mode == "state":
        return Args()
    if obs_mode == "rgb":
        return Args(
            obs_mode="rgb", output_dir="runs/grpo_rgb", sft_steps=1500, sft=SFTConfig(random_shift=8),
            policy=CompactVLAConfig(cameras=("agentview", "wrist"), image_size=128, encoder_size=64, chunk_size=8,
                                    reflections=False),
        )  # fmt: skip
    raise ValueError(f"unknown obs_mode {obs_mode!r}: valid {OBS_MODES}")


def check_obs_mode(args: Args) -> None:
    """A clear error for a policy config that does not read what ``obs_mode`` means."""
    if args.obs_mode not in OBS_MODES:
        raise ValueError(f"unknown obs_mode {args.obs_mode!r}: valid {OBS_MODES}")
    if args.obs_mode == "rgb" and not args.policy.cameras:
        raise ValueError("obs_mode 'rgb' needs a policy that reads cameras: pass --policy.cameras agentview wrist "
                         "(or build the Args with default_args('rgb'))")  # fmt: skip
    if args.obs_mode == "state" and args.policy.cameras:
        raise ValueError(f"obs_mode 'state' renders no frames, but --policy.cameras is {args.policy.cameras}: "
                         "pass --obs-mode rgb, or --policy.cameras with no value")  # fmt: skip


def demo_path(args: Args) -> str:
    suite = resolve_suite(args.env_id)
    tasks = "-".join(str(task_id) for task_id in args.task_ids)
    short = suite.libero_name.removeprefix("libero_")
    inputs = "state" if args.obs_mode == "state" else f"rgb{args.policy.image_size}"
    inputs += "" if args.obs_mode == "state" or args.policy.reflections else "_norefl"
    demo = args.demo
    return f"data/{short}_{inputs}_tasks{tasks}_{demo.episodes_per_task}ep_init0-{demo.demo_init_state_end - 1}.hdf5"


def demo_args(args: Args) -> GenerateArgs:
    """The expert demos this run trains on (generated when the file is missing, then reused): state mode with the
    privileged object poses, or rgb with both cameras' frames (and no object poses)."""
    return args.demo.generate_args(
        demo_path(args), suite=args.env_id, task_ids=args.task_ids,
        obs_mode="state" if args.obs_mode == "state" else "rgb+state", image_size=args.policy.image_size,
        reflections=args.policy.reflections,
        object_state=args.obs_mode == "state", progress=args.progress_bar,
        workers=args.num_envs if args.vectorization_mode == "async" else 1,
    )  # fmt: skip


def warm_start(args: Args, episodes, instructions: list[str]):
    """A CompactVLA behaviour-cloned on the demos (or the ``init_from`` checkpoint); SFT resumes from output_dir/sft."""
    if args.init_from is not None:
        print(f"warm start: {args.init_from} (SFT skipped)")
        policy = load_policy(args.init_from)
        cameras = tuple(key for key in policy.observation_keys if key in CAMERA_KEYS)
        if bool(cameras) != (args.obs_mode == "rgb"):
            raise ValueError(f"--init-from {args.init_from} reads cameras {cameras}, but --obs-mode is "
                             f"{args.obs_mode!r}: pass --obs-mode {'rgb' if cameras else 'state'}")  # fmt: skip
        return policy
    sft_dir = os.path.join(args.output_dir, "sft")
    sft_config = dataclasses.replace(args.sft, seed=args.seed if args.sft.seed is None else args.sft.seed)

    def create() -> SFT:
        policy = CompactVLA.from_demos(episodes, args.policy, instructions=instructions)
        return SFT(policy, demos=episodes, tensorboard_log=os.path.join(args.output_dir, "tb"),
                   device=resolve_device(args.device), **dataclasses.asdict(sft_config))  # fmt: skip

    if args.resume:
        model, resumed = resume_or_create(SFT, sft_dir, create, demos=episodes, device=resolve_device(args.device))
    else:
        model, resumed = create(), False
    if model.num_timesteps >= args.sft_steps:
        print(f"warm start: reusing {sft_dir} ({model.num_timesteps} SFT steps)")
        return model.policy
    start = time.time()
    model.learn(args.sft_steps - model.num_timesteps, reset_num_timesteps=not resumed, progress_bar=args.progress_bar)
    print(f"SFT: {model.num_timesteps} steps in {time.time() - start:.0f} s, {model.last_metrics}")
    model.save(sft_dir)
    return model.policy


def learner_settings(args: Args) -> tuple[type, dict]:
    """The online learner's class and hyperparameters: the nested configs, with what the run fills in."""
    grpo = args.grpo
    grpo = dataclasses.replace(
        grpo,
        task_ids=grpo.task_ids or args.task_ids,
        init_state_ids=grpo.init_state_ids or held_in_init_states(grpo.init_states, args.demo.demo_init_state_end),
        seed=args.seed if grpo.seed is None else grpo.seed,
        cache_dir=grpo.cache_dir or os.path.join(args.output_dir, "cache"),
    )
    if args.algo == "irevla":
        if args.async_:
            raise ValueError("--async runs GRPO's learner with rollout workers: use it with --algo grpo, not irevla")
        # iRe-VLA's RL stage is pure RL on the head: no rescue, no success replay (its successes go to the SL stage).
        rl = dataclasses.replace(grpo, rescue_failed_groups=False, success_replay_size=0, cache_dir=None)
        store = args.irevla.success_store or os.path.join(args.output_dir, "successes")
        return IReVLA, {**dataclasses.asdict(rl), **dataclasses.asdict(dataclasses.replace(args.irevla, success_store=store))}
    if args.async_:
        pipeline_dir = args.pipeline.pipeline_dir or os.path.join(args.output_dir, "pipeline")
        pipeline = dataclasses.replace(args.pipeline, pipeline_dir=pipeline_dir)
        return AsyncGRPO, {**dataclasses.asdict(grpo), **dataclasses.asdict(pipeline)}
    return GRPO, dataclasses.asdict(grpo)


def make_rollout_env(args: Args, env_id: str, env_kwargs: dict):
    """GRPO's (and iRe-VLA's) env: ``num_envs`` simulators in worker processes (``--vectorization-mode async``) or in
    this process. ``--async``'s rollout workers make their own, so it gets a single env (read for its spaces)."""
    if args.async_ or args.num_envs == 1:
        return gym.make(env_id, task_ids=args.task_ids, **env_kwargs)
    return gym.make_vec(env_id, num_envs=args.num_envs, vectorization_mode=None if args.vectorization_mode == "async"
                        else "sync", task_ids=args.task_ids, **env_kwargs)  # fmt: skip


def check_resumable(args: Args, checkpoints: str, learner_class: type) -> None:
    """A clear error for resuming a run of another learner in this output dir."""
    newest = latest_checkpoint(checkpoints)
    if newest is None or latest_checkpoint(checkpoints, learner_class) is not None:
        return
    other = next((name for name, cls in LEARNERS.items() if latest_checkpoint(checkpoints, cls)), "another learner")
    raise ValueError(
        f"{newest} is a checkpoint of --algo {other}, but this run has --algo {args.algo}: rerun with --algo {other} "
        "to resume it, or choose another --output-dir (or --no-resume) to start a new run"
    )


def main(args: Args) -> dict:
    if not args.eval.held_out(args.demo.demo_init_state_end):
        print(f"warning: evaluation init states start at {args.eval.eval_init_state_start}, inside the demos' and GRPO's "
              f"0..{args.demo.demo_init_state_end - 1}: they are not held out")  # fmt: skip
    args.threads.apply()
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)  # a clear error for a device this machine lacks, before any work
    if args.num_envs < 1:
        raise ValueError(f"num_envs {args.num_envs} must be >= 1")
    check_obs_mode(args)
    learner_class, hyperparameters = learner_settings(args)  # bad settings fail here, before any work
    suite = resolve_suite(args.env_id)
    tasks = suite_tasks(suite.libero_name)
    eval_init_states = args.eval.init_state_ids(suite.env_id, args.task_ids)
    checkpoints = os.path.join(args.output_dir, "checkpoints")
    if args.resume:
        check_resumable(args, checkpoints, learner_class)
    start = time.time()
    timings: dict[str, float] = {}

    # 1. Demonstrations (state mode: privileged object poses, see the module docstring; rgb mode: camera frames).
    generate = demo_args(args)
    demos = generate.out
    episodes, _ = args.demo.load(generate)
    extra = "".join(f" + {path}" for path in args.demo.extra_demos)
    print(f"{len(episodes)} demos, {sum(len(episode) for episode in episodes)} transitions from {demos}{extra}")
    timings["demos"] = time.time() - start

    # 2. SFT warm start (when resuming, the newest checkpoint's policy instead).
    checkpoint = latest_checkpoint(checkpoints, learner_class) if args.resume else None
    if checkpoint is not None:
        policy = load_policy(checkpoint)
    else:
        with torch_threads(args.threads.sft_torch_threads):
            policy = warm_start(args, episodes, [tasks[task_id].instruction for task_id in range(len(tasks))])
    policy = policy.to(device)
    timings["sft"] = time.time() - start - sum(timings.values())

    # 3. Evaluate before, on held-out init states (reused when resuming).
    def evaluate(stage: str, evaluated_policy) -> dict:
        results = evaluate_policy(
            evaluated_policy, suite.env_id, args.task_ids, eval_init_states, seeds=(args.seed,),
            max_episode_steps=args.max_episode_steps, video_episodes=args.video_episodes,
            video_dir=os.path.join(args.output_dir, f"eval_{stage}", "videos"), progress=args.progress_bar,
            num_envs=args.num_envs, vectorization_mode=args.vectorization_mode,
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
    env = make_rollout_env(args, suite.env_id, env_kwargs_for_policy(policy, args.max_episode_steps))
    tensorboard_log = os.path.join(args.output_dir, "tb")

    def create():
        return learner_class(policy, env, demos=episodes, tensorboard_log=tensorboard_log, **hyperparameters)

    if checkpoint is not None:
        model = learner_class.load(checkpoint, env=env, demos=episodes, device=device, tensorboard_log=tensorboard_log)
        print(f"resuming {args.algo} from {checkpoint} at {model.num_timesteps} env steps")
    else:
        model = create()
    callbacks = []
    if args.checkpoint_freq > 0:
        callbacks.append(RolloutCheckpointCallback(args.checkpoint_freq, checkpoints, args.algo, keep_last=2))
    if args.eval_freq > 0:
        callbacks.append(
            LiberoEvalCallback(
                suite.env_id, args.task_ids, eval_init_states, args.eval_freq, seeds=(args.seed,),
                max_episode_steps=args.max_episode_steps, log_path=os.path.join(args.output_dir, "eval_periodic"),
                num_envs=args.num_envs, vectorization_mode=args.vectorization_mode,
            )
        )  # fmt: skip
    remaining = args.total_timesteps - model.num_timesteps
    if remaining > 0:
        model.learn(remaining, callback=callbacks, progress_bar=args.progress_bar, reset_num_timesteps=checkpoint is None)
    env.close()
    model.save(os.path.join(args.output_dir, "final"))
    print(f"{args.algo}: {model.num_timesteps} env steps, last update {model.last_metrics}")
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
        "grpo_last_metrics": model.last_metrics,
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
    argv = ["--no-async" if arg == "--sync" else arg for arg in sys.argv[1:]]
    # --obs-mode picks the defaults that the other flags then override (tyro reads --obs-mode itself too, and names
    # the valid choices for a bad one).
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--obs-mode", default="state")
    mode = peek.parse_known_args(argv)[0].obs_mode
    main(tyro.cli(Args, default=default_args(mode) if mode in OBS_MODES else Args(), args=argv))
