"""SFT vs GRPO (issue #7): does GRPO with offline regularization beat behaviour cloning on LIBERO?

One command, several policies on the same suite, the same held-out init states and the same env-step budget:

- ``sft``: behaviour cloning on the scripted expert's demos; every other variant starts from this checkpoint.
- ``grpo``: (a) plain GRPO -- group-relative clipped surrogate on binary success, no demos (imitation weight 0,
  no success replay, no rescue of all-fail groups).
- ``grpo_offline``: (b) GRPO with offline regularization -- the demos' NLL weighted by how often the rollouts
  fail (``imitation_weight_max`` at all-fail down to ``imitation_weight_min`` at all-success), plus replayed
  successes.
- ``grpo_offline_relabel``: (c) (b) plus Rollout Relabel -- all-fail groups get a demo (group rescue) and the env
  is wrapped in :class:`RolloutRelabel` (hindsight relabelling with LIBERO's BDDL goals; it needs tasks that share
  a scene, as in LIBERO-Goal and LIBERO-90).
- ``irevla``: (d) iRe-VLA -- head-only GRPO stages alternating with supervised stages on demos + successes.
- ``offline_only``: (e) an ablation to ask for -- (b) without its policy-gradient term.

Every fine-tuned policy is trained once per ``--seeds`` entry (its own SFT checkpoint too) on the demos' init states
(0 .. demo_init_state_end - 1), then evaluated greedily on every task and every held-out init state (20..39 by
default) with that seed as the reset seed. The report gives per-task success with Wilson 95% intervals, the mean,
the difference to SFT with a 95% interval from a paired bootstrap over the evaluation starts, the per-seed rates,
the entropy of each learner's policy at the start and end of training (the collapse check), the wall time of every
stage, and a plot of held-out success (a small subset, every ``--curve-every`` env steps) and entropy against env
steps. The learners' settings are the library's configs, nested: ``--sft.*``, ``--policy.*``, ``--grpo.*``,
``--irevla.*`` (``--help`` lists them).

    python benchmarks/sft_vs_grpo.py --suite spatial                     # 3 seeds of every variant
    python benchmarks/sft_vs_grpo.py --variants sft grpo_offline --seeds 0 --task-ids 0 1 --total-timesteps 10000
    python benchmarks/sft_vs_grpo.py --suite spatial --report-only       # the report from what has finished

Every stage resumes after a kill, so running the same command again only does what is left and rewrites the report
(also rewritten after every fine-tuning run): demos from ``<demos>.parts/``; SFT from ``<output-dir>/sft_seed<s>/sft``;
fine-tuning from the newest checkpoint in ``<output-dir>/<variant>_seed<s>/checkpoints`` (``final/`` once done),
with its updates in ``updates.jsonl`` and its learning curve in ``evaluations.jsonl``; evaluation from each
directory's ``episodes.jsonl``. Writes ``benchmarks/results/sft_vs_grpo_<suite>.{json,md,png}``. Commands sharing an
``--output-dir`` (one per variant, to use more cores) can run side by side: each stage locks its files
(:mod:`gym_libero_vla.run_lock`), so a second command waits for the first and then reuses its work.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time
import warnings
from typing import Annotated, Literal

import gymnasium as gym
import numpy as np
import torch
import tyro
from reporting import (
    command_line,
    delta_vs,
    demo_files_text,
    held_out_note,
    id_ranges,
    machine_info,
    machine_text,
    policy_cameras,
    runs_summary,
    write_report_files,
)
from stable_baselines3.common.callbacks import BaseCallback

import gym_libero_vla  # noqa: F401  (registers the env ids)
from gym_libero_vla import suites
from gym_libero_vla.algos import GRPO, SFT, GRPOConfig, IReVLA, IReVLAConfig, SFTConfig
from gym_libero_vla.algos.base import check_ema_decay, latest_checkpoint
from gym_libero_vla.algos.callbacks import LiberoEvalCallback, RolloutCheckpointCallback
from gym_libero_vla.algos.sft import continue_sft
from gym_libero_vla.demos.generate import DemoConfig, default_demo_path
from gym_libero_vla.evaluate import (
    CAMERA_KEYS,
    EvalRange,
    behaviour_fingerprint,
    check_reflections,
    drop_rows_after,
    env_kwargs_for_policy,
    evaluate_policy,
    read_episode_rows,
    recorded_episodes,
    row_key,
    start_key,
)
from gym_libero_vla.policies import CompactVLA, CompactVLAConfig, ThreadConfig, load_policy, resolve_device, torch_threads
from gym_libero_vla.rollouts import Start, held_in_init_states
from gym_libero_vla.run_lock import exclusive
from gym_libero_vla.wrappers.rollout_relabel import RolloutRelabel, scene_goals

VARIANTS = ("sft", "grpo", "grpo_offline", "grpo_offline_relabel", "irevla", "offline_only")
ISSUE_VARIANTS = VARIANTS[:5]
"""The ones issue #7 names, run by default; ``offline_only`` is an ablation to ask for."""
FINE_TUNED = VARIANTS[1:]
PAIRED_COMPARISONS = (
    ("grpo_offline", "offline_only", "Ablation (e)",
     "what the policy-gradient term adds to imitating the same demos and replayed successes"),
    ("grpo_offline", "grpo", "(b) vs (a)", "what the offline regularization adds to plain GRPO"),
)  # fmt: skip
"""Pairs compared head to head (besides each against SFT) when both are in a report: ``results[variant]
["delta_vs_<baseline>"]``."""
DESCRIPTIONS = {
    "sft": "behaviour cloning on the demos; the start of every other variant",
    "grpo": "(a) plain GRPO: clipped group-relative surrogate only (no demos, no success replay, no rescue)",
    "grpo_offline": "(b) GRPO + offline regularization: adaptive demo NLL and success replay",
    "grpo_offline_relabel": "(c) (b) + Rollout Relabel: all-fail groups rescued with a demo, hindsight relabelling",
    "irevla": "(d) iRe-VLA: head-only GRPO stages alternating with SL stages on demos + successes (its moving "
    "average of the weights, over both stages, is --irevla-ema-decay's, not --grpo.ema-decay's)",
    "offline_only": "(e) ablation: (b) without its policy-gradient term (pg_coef 0), the same rollouts feeding only "
    "the success replay and the imitation weight; (b) minus (e) is what RL adds over more imitation",
}
BENCHMARK = "SFT vs GRPO with offline regularization (issue #7)"
TARGET_DELTA = 0.05
"""Issue #7: (b) should beat SFT by at least this much mean success."""
STRONG_TARGET_DELTA, STRONG_TARGET_RATE = 0.10, 0.85
"""Issue #25 (pixel policies near the literature's regime): (b) beats SFT by this much and reaches this success."""
COLLAPSE_RATIO = 0.5
"""Entropy "collapses" when its end-of-training value falls below this fraction of its start-of-training value."""
UPDATE_METRICS = ("train/entropy", "rollout/success_rate", "train/imitation_weight", "rollout/frac_groups_zero_std",
                  "rollout/groups_rescued", "rollout/relabelled_episodes")  # fmt: skip


@dataclasses.dataclass
class Args:
    suite: str = "spatial"
    """LIBERO suite: short name (spatial, object, goal, 10, 90), LIBERO name or env id."""
    task_ids: tuple[int, ...] | None = None
    """Tasks to train on and evaluate (default: every task of the suite)."""
    obs_mode: Literal["state", "rgb+state"] = "state"
    """"state": proprio (+ object poses); "rgb+state": agentview frames too (e.g. an OpenVLA checkpoint given as
    --sft-checkpoint, on a GPU with --device cuda)."""
    image_size: int = 64
    """Side of the agentview frames (rgb+state only); the demos' frames and the policy's must have it."""
    object_state: bool = True
    """Give the policies LIBERO's privileged object poses (without them a small state-mode policy sees only the
    gripper and hardly ever succeeds)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Training seeds: SFT and each variant are trained once per seed and evaluated with it as the reset seed."""
    variants: tuple[str, ...] = ISSUE_VARIANTS
    """Which of sft, grpo, grpo_offline, grpo_offline_relabel, irevla (the default) and offline_only to run."""
    output_dir: str | None = None
    """Checkpoints, curves and episodes, one subdirectory per variant and seed (default runs/sft_vs_grpo/<suite>)."""
    json_out: str | None = None
    """Report JSON; the Markdown and the plot go next to it (default benchmarks/results/sft_vs_grpo_<suite>.json)."""
    demo: Annotated[DemoConfig, tyro.conf.OmitArgPrefixes] = dataclasses.field(default_factory=DemoConfig)
    """The demos of SFT, the offline terms, the rescues and iRe-VLA's SL stages: --demos (default
    data/<suite>_state.hdf5, or data/<suite>_rgb<image_size>.hdf5; shared with sft_baseline.py), --extra-demos, and
    how a missing file is generated; GRPO's groups use the same init states 0 .. demo_init_state_end - 1."""
    sft_checkpoint: str | None = None
    """Start every seed's fine-tuning from this policy checkpoint instead of training SFT per seed."""
    sft_steps: int = 15000
    """SFT gradient steps per seed (a checkpoint with fewer is continued)."""
    sft_save_every: int = 1000
    """Save the SFT checkpoint every this many steps, so that a kill loses at most that many."""
    sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)
    """SFT's settings (its seed is the run's)."""
    policy: CompactVLAConfig = dataclasses.field(default_factory=lambda: CompactVLAConfig(cameras=()))
    """The fresh CompactVLA's sizes (frame and object-state sizes come from the demos)."""
    total_timesteps: int = 40000
    """Env-step budget of each fine-tuning run (whole rollouts: the last one may overshoot)."""
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
    """GRPO's settings, shared by every variant (each sets its own demos, replay, rescue and pg_coef; task_ids,
    init_state_ids, seed and cache_dir follow the run)."""
    irevla: IReVLAConfig = dataclasses.field(default_factory=IReVLAConfig)
    """(d): iRe-VLA's SL stages and alternation."""
    irevla_ema_decay: float = 0.0
    """(d)'s moving average of the weights over both stages' steps (its ``ema_decay``; 0: none, the paper's form).
    Kept apart from ``--grpo.ema-decay``, which the GRPO variants' average is: iRe-VLA's ~100 steps a stage call
    for another decay."""
    rollout_max_episode_steps: int | None = None
    """Step limit of training rollouts (default: max_episode_steps)."""
    rollout_num_envs: int = 4
    """Envs a group's episodes run in side by side; divides the group size. Each keeps two tasks' simulators (~0.3 GB
    each, ~1 GB with a renderer)."""
    vectorization_mode: Literal["sync", "async"] = "async"
    """Where the rollout and evaluation envs run: "async", each in a worker process (the simulators and renderers
    keep every core busy while the policy acts in this process; the same episodes as "sync"), or "sync", all in this
    process."""
    checkpoint_every: int = 2000
    """Save a fine-tuning checkpoint after the first rollout past every this many env steps."""
    eval: Annotated[EvalRange, tyro.conf.OmitArgPrefixes] = dataclasses.field(
        default_factory=lambda: EvalRange(eval_num_init_states=20)
    )
    """The held-out starts of every task (--eval-init-state-start >= demo_init_state_end, --eval-num-init-states)."""
    max_episode_steps: int | None = None
    """Step limit of evaluation episodes (default: the suite's, OpenVLA's evaluation limits)."""
    curve_every: int = 10000
    """Learning curve: evaluate on the curve subset every this many env steps (0: only at the start and the end)."""
    curve_num_init_states: int = 1
    """Curve subset: the first this many evaluation init states of every task, greedy, the run's seed."""
    device: str = "cpu"
    """Torch device of the policies: cpu, cuda, cuda:<index>, mps or auto. The simulators stay on the CPU."""
    eval_num_envs: int | None = None
    """Evaluation envs side by side in one process (default: 8 in state mode, 2 in rgb+state mode)."""
    threads: Annotated[ThreadConfig, tyro.conf.OmitArgPrefixes] = dataclasses.field(default_factory=ThreadConfig)
    """--sft-torch-threads for SFT (default: every core), --torch-threads while simulators run."""
    videos: bool = True
    """Record a successful and a failed held-out episode of each policy of the first seed as mp4 (the first of each
    in its evaluation, run again greedily: the same episode), copied next to the report (``<report>_videos/``)."""
    progress: bool = True
    """Show progress bars."""
    report_only: bool = False
    """Train and evaluate nothing: write the report from the runs already finished, listing the others as missing."""


def check_args(args: Args) -> tuple[suites.SuiteSpec, tuple[int, ...], tuple[int, ...]]:
    """Fail before any work on input that cannot run; returns (suite, task_ids, evaluation init state ids)."""
    unknown = [variant for variant in args.variants if variant not in VARIANTS]
    if unknown or not args.variants or len(set(args.variants)) != len(args.variants):
        raise ValueError(f"unknown variant(s) {unknown or args.variants}: valid {VARIANTS}, each once")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"seeds {args.seeds} must be distinct and at least one")
    for name, minimum in (("total_timesteps", 1), ("checkpoint_every", 1), ("curve_every", 0), ("curve_num_init_states", 1),
                          ("sft_steps", 1)):  # fmt: skip
        if not (isinstance(getattr(args, name), int) and getattr(args, name) >= minimum):
            raise ValueError(f"{name} {getattr(args, name)!r} must be an int >= {minimum}")
    check_ema_decay(args, "irevla_ema_decay")
    if args.curve_num_init_states > args.eval.eval_num_init_states:
        raise ValueError(f"curve_num_init_states {args.curve_num_init_states} must be <= eval_num_init_states")
    args.eval.check_held_out(args.demo.demo_init_state_end)
    if (
        not (isinstance(args.rollout_num_envs, int) and args.rollout_num_envs >= 1)
        or args.grpo.group_size % args.rollout_num_envs
    ):
        raise ValueError(
            f"rollout_num_envs {args.rollout_num_envs!r} must be an int >= 1 that divides group_size {args.grpo.group_size}"
        )
    resolve_device(args.device)
    suite = suites.resolve_suite(args.suite)
    task_ids = suites.resolve_task_ids(suite.env_id, args.task_ids)
    init_state_ids = args.eval.init_state_ids(suite.env_id, task_ids)
    if args.sft_checkpoint is not None:
        policy = load_policy(args.sft_checkpoint)
        cameras = tuple(key for key in policy.observation_keys if key in CAMERA_KEYS)
        if bool(cameras) != (args.obs_mode != "state"):  # pixels in rgb+state mode (any cameras), none in state mode
            wanted = policy_cameras(args.obs_mode, args.policy.cameras)
            raise ValueError(f"sft_checkpoint reads cameras {cameras}, but --obs-mode {args.obs_mode} means {wanted}")
        check_reflections(policy, args.policy.reflections, "sft_checkpoint")  # its demos must look as its SFT's did
    return suite, task_ids, init_state_ids


# ---------------------------------------------------------------------------------------------- training
def prepare_sft(args: Args, seed: int, episodes, instructions, output_dir: str, train: bool) -> dict | None:
    """The SFT checkpoint of ``seed``: ``--sft-checkpoint`` as it is, or ``<output_dir>/sft_seed<seed>/sft`` trained
    (or continued) to ``sft_steps``; without ``train`` only a finished one (else None)."""
    if args.sft_checkpoint is not None:
        return {"path": args.sft_checkpoint, "steps": 0, "seconds": None, "steps_this_run": 0}
    path = os.path.join(output_dir, f"sft_seed{seed}", "sft")
    if not train:
        if latest_checkpoint(path, SFT) is None:
            return None
        model = SFT.load(path)
        done = model.num_timesteps >= args.sft_steps
        return (
            {"path": path, "steps": model.num_timesteps, "seconds": model.train_seconds, "steps_this_run": 0} if done else None
        )
    device = resolve_device(args.device)

    def create() -> SFT:
        torch.manual_seed(seed)
        config = dataclasses.replace(args.policy, cameras=policy_cameras(args.obs_mode, args.policy.cameras))
        policy = CompactVLA.from_demos(episodes, config, instructions=instructions, object_state=args.object_state)
        return SFT(policy, demos=episodes, device=device, **dataclasses.asdict(dataclasses.replace(args.sft, seed=seed)))

    # another process training it: wait, then continue from it
    with exclusive(path + ".lock", f"SFT seed {seed}"), torch_threads(args.threads.sft_torch_threads):
        model, steps = continue_sft(path, create, args.sft_steps, args.sft_save_every, args.progress, demos=episodes,
                                    device=device)  # fmt: skip
    return {"path": path, "steps": model.num_timesteps, "seconds": model.train_seconds, "steps_this_run": steps}


def train_starts_text(setup: dict) -> str:
    """Where the fine-tuning groups started, for the report."""
    if setup.get("train_init_states", "suite") == "sampled":
        return "training starts: a new layout per group (LIBERO's placement sampler)"
    return f"training init states {id_ranges(setup['train_init_state_ids'])}"


def variant_hyperparameters(variant: str, args: Args, task_ids, seed: int, run_dir: str) -> dict:
    """The GRPO config every variant shares, with what makes the variant (see the module docstring)."""
    train_starts = held_in_init_states(args.grpo.init_states, args.demo.demo_init_state_end)
    grpo = dataclasses.replace(args.grpo, task_ids=task_ids, init_state_ids=train_starts, seed=seed,
                               cache_dir=os.path.join(run_dir, "cache"))  # fmt: skip
    if variant == "grpo":  # (a): the policy-gradient term alone
        grpo = dataclasses.replace(grpo, imitation_weight_max=0.0, imitation_weight_min=0.0, success_replay_size=0,
                                   rescue_failed_groups=False, cache_dir=None)  # fmt: skip
    elif variant == "irevla":  # (d): GRPO is its RL stage on the head
        grpo = dataclasses.replace(grpo, rescue_failed_groups=False, success_replay_size=0, cache_dir=None,
                                   ema_decay=args.irevla_ema_decay)  # fmt: skip
        irevla = dataclasses.replace(args.irevla, success_store=os.path.join(run_dir, "successes"))
        return {**dataclasses.asdict(grpo), **dataclasses.asdict(irevla)}
    else:  # (b), (c), (e)
        grpo = dataclasses.replace(grpo, rescue_failed_groups=variant == "grpo_offline_relabel",
                                   pg_coef=0.0 if variant == "offline_only" else args.grpo.pg_coef)  # fmt: skip
    return dataclasses.asdict(grpo)


class UpdateLog(BaseCallback):
    """After every update, append the learner's entropy, rollout success and offline-term scalars to ``path`` (rows
    past the step count training starts from are removed first: a resumed run redoes those updates)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def _init_callback(self) -> None:
        drop_rows_after(self.path, self.model.num_timesteps)

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        metrics = self.model.last_metrics
        row = {"num_timesteps": self.model.num_timesteps, **{name: metrics.get(name) for name in UPDATE_METRICS}}
        with open(self.path, "a") as file:
            file.write(json.dumps(row) + "\n")


def rows_until(path: str, steps: int) -> list[dict]:
    """The rows of a JSON-lines log up to ``steps`` env steps, the last one per step count."""
    rows = {row["num_timesteps"]: row for row in read_episode_rows(path) if row["num_timesteps"] <= steps}
    return [rows[steps] for steps in sorted(rows)]


def fine_tune(variant: str, args: Args, seed: int, sft: dict, episodes, run_dir: str, suite, task_ids, curve_starts,
              max_episode_steps: int, train: bool) -> dict | None:  # fmt: skip
    """Train ``variant`` from the SFT checkpoint to ``total_timesteps`` env steps into ``<run_dir>/checkpoints/final``,
    resuming from the newest checkpoint there; a finished run is not touched (without ``train``: None unless finished).
    One process at a time on ``run_dir``. Returns its final checkpoint, steps, updates and curve."""
    final = os.path.join(run_dir, "checkpoints", "final")
    learner_class = IReVLA if variant == "irevla" else GRPO

    def finished():
        model = learner_class.load(final) if latest_checkpoint(final, learner_class) else None
        return model if model is not None and model.num_timesteps >= args.total_timesteps else None

    if not train:
        done = finished()
        if done is None:
            return None
        done.steps_this_run = 0
    else:
        with exclusive(os.path.join(run_dir, "run.lock"), f"{variant} seed {seed}"):
            done = finished()
            if done is None:
                done = train_variant(variant, args, seed, sft, episodes, run_dir, suite, task_ids, curve_starts,
                                     max_episode_steps, learner_class)  # fmt: skip
            else:
                done.steps_this_run = 0
                print(f"{variant} seed {seed}: {final} has {done.num_timesteps} env steps: not training", flush=True)
    steps = done.num_timesteps
    return {"checkpoint": final, "steps": steps, "steps_this_run": done.steps_this_run, "train_seconds": done.train_seconds,
            "updates": rows_until(os.path.join(run_dir, "updates.jsonl"), steps),
            "curve": rows_until(os.path.join(run_dir, "evaluations.jsonl"), steps)}  # fmt: skip


def train_variant(variant, args, seed, sft, episodes, run_dir, suite, task_ids, curve_starts, max_episode_steps,
                  learner_class):  # fmt: skip
    checkpoints = os.path.join(run_dir, "checkpoints")
    device = resolve_device(args.device)
    policy = load_policy(sft["path"]).to(device)
    kwargs = dict(task_ids=task_ids, **env_kwargs_for_policy(policy, args.rollout_max_episode_steps or max_episode_steps))
    wrappers = None
    if variant == "grpo_offline_relabel":
        wrappers = [functools.partial(RolloutRelabel, target_task_ids=task_ids, observation_keys=policy.observation_keys)]
    if args.vectorization_mode == "sync":
        vectorization = dict(vectorization_mode="sync", wrappers=wrappers)
    else:  # our entry point (gym_libero_vla.vector): worker processes, wrapped there
        vectorization = dict(env_wrappers=wrappers)
    env = gym.make_vec(suite.env_id, num_envs=args.rollout_num_envs, max_cached_tasks=2, **vectorization, **kwargs)
    demos = None if variant == "grpo" else episodes
    tensorboard_log = os.path.join(run_dir, "tb")
    resume_from = latest_checkpoint(checkpoints, learner_class)
    if resume_from is not None:
        model = learner_class.load(resume_from, env=env, demos=demos, device=device, tensorboard_log=tensorboard_log)
        print(f"{variant} seed {seed}: resuming from {resume_from} at {model.num_timesteps} env steps", flush=True)
    else:
        hyperparameters = variant_hyperparameters(variant, args, task_ids, seed, run_dir)
        model = learner_class(policy, env, demos=demos, tensorboard_log=tensorboard_log, **hyperparameters)
    steps_before = model.num_timesteps
    curve = LiberoEvalCallback(suite.env_id, None, (), args.curve_every or 10**12, max_episode_steps=max_episode_steps,
                               log_path=run_dir, num_envs=eval_num_envs(args), starts=curve_starts,
                               vectorization_mode=args.vectorization_mode)  # fmt: skip
    callbacks = [UpdateLog(os.path.join(run_dir, "updates.jsonl")), curve,
                 RolloutCheckpointCallback(args.checkpoint_every, checkpoints, variant, keep_last=2)]  # fmt: skip
    try:
        if args.total_timesteps > steps_before:
            print(f"{variant} seed {seed}: {steps_before} -> {args.total_timesteps} env steps", flush=True)
            model.learn(args.total_timesteps - steps_before, callback=callbacks, tb_log_name=variant,
                        reset_num_timesteps=False, progress_bar=args.progress)  # fmt: skip
        elif variant == "irevla":  # killed after the checkpoint of its last RL update: the SL stage after it is owed
            model.train_sl_stage()
    finally:
        env.close()
    model.save(os.path.join(checkpoints, "final"))
    model.steps_this_run = model.num_timesteps - steps_before
    return model


def eval_num_envs(args: Args) -> int:
    return args.eval_num_envs or (8 if args.obs_mode == "state" else 2)


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate(path: str, suite, starts, max_episode_steps: int, directory: str, args: Args, run: bool):
    """One greedy episode per start for the policy of ``path``, resumable in ``<directory>/episodes.jsonl``; without
    ``run``, only what is recorded there (None unless every start is). Returns (rows, episodes run now)."""
    policy = load_policy(path).to(resolve_device(args.device))
    episodes_path = os.path.join(directory, "episodes.jsonl")
    if not run:
        done = recorded_episodes(episodes_path, behaviour_fingerprint(policy), max_episode_steps)
        keys = [start_key(start) for start in starts]
        return ([done[key] for key in keys], 0) if all(key in done for key in keys) else (None, 0)
    results = evaluate_policy(policy, suite.env_id, starts=starts, max_episode_steps=max_episode_steps, progress=args.progress,
                              num_envs=eval_num_envs(args), episodes_path=episodes_path,
                              vectorization_mode=args.vectorization_mode)  # fmt: skip
    return results["episodes"], results["run_now"]


def record_videos(path: str, name: str, rows: list[dict], suite, max_episode_steps: int, directory: str, json_out: str,
                  args: Args, run: bool) -> list[str]:  # fmt: skip
    """A successful and a failed episode of the policy at ``path`` as mp4: the first of each among its evaluation
    ``rows``, run again greedily (the same episode) into ``<directory>/videos`` and copied next to the report as
    ``<report>_videos/<name>_{success,failure}.mp4``. Kept once there; without ``run`` only those are listed.
    Returns the report-relative paths."""
    target = os.path.splitext(json_out)[0] + "_videos"
    chosen = {}
    for outcome in ("success", "failure"):
        row = next((row for row in rows if bool(row["success"]) == (outcome == "success")), None)
        if row is not None:
            chosen[outcome] = row
    copies = {outcome: os.path.join(target, f"{name}_{outcome}.mp4") for outcome in chosen}
    missing = [outcome for outcome in chosen if not os.path.exists(copies[outcome])]
    if missing and run:
        policy = load_policy(path).to(resolve_device(args.device))
        starts = [Start(chosen[o]["task_id"], chosen[o]["init_state_id"], chosen[o]["seed"]) for o in missing]
        results = evaluate_policy(policy, suite.env_id, starts=starts, max_episode_steps=max_episode_steps,
                                  video_episodes=len(starts), video_dir=os.path.join(directory, "videos"), num_envs=1,
                                  progress=False)  # fmt: skip
        os.makedirs(target, exist_ok=True)
        for outcome, episode, video in zip(missing, results["episodes"], results["videos"]):
            if bool(episode["success"]) != (outcome == "success"):  # greedy episodes repeat; say so if one did not
                print(f"{name}: the episode of {video} ended otherwise than in its evaluation", flush=True)
            shutil.copyfile(video, copies[outcome] + ".tmp")
            os.replace(copies[outcome] + ".tmp", copies[outcome])
    report_dir = os.path.dirname(os.path.abspath(json_out))
    return [os.path.relpath(copies[o], report_dir) for o in chosen if os.path.exists(copies[o])]


def success_on(rows: list[dict], starts) -> float:
    wanted = {start_key(start) for start in starts}
    return float(np.mean([row["success"] for row in rows if row_key(row) in wanted]))


def run_record(variant: str, seed: int, trained: dict, rows: list[dict], run_now: int, curve_starts, sft_curve_rate: float):
    """What the report keeps of one fine-tuning run: its curve (from the SFT start to the final evaluation), the
    entropy at the start and end of training (each the mean of the first / last tenth of its updates), counts."""
    updates, evals = trained["updates"], trained["curve"]
    entropies = [row["train/entropy"] for row in updates if row["train/entropy"] is not None]
    tenth = max(1, math.ceil(len(entropies) / 10))
    curve_seconds = float(sum(row["seconds"] for row in evals))
    return {
        "variant": variant, "seed": seed, "checkpoint": trained["checkpoint"], "steps": trained["steps"],
        "steps_this_run": trained["steps_this_run"], "rows": rows, "episodes_this_run": run_now,
        "success_rate": float(np.mean([row["success"] for row in rows])),
        "train_seconds": trained["train_seconds"] - curve_seconds, "curve_eval_seconds": curve_seconds,
        "eval_seconds": float(sum(row["seconds"] for row in rows)),
        "entropy_start": float(np.mean(entropies[:tenth])) if entropies else None,
        "entropy_end": float(np.mean(entropies[-tenth:])) if entropies else None,
        "updates": len(updates),
        "groups_rescued": int(sum(row["rollout/groups_rescued"] or 0 for row in updates)),
        "relabelled_episodes": int(sum(row["rollout/relabelled_episodes"] or 0 for row in updates)),
        "curve": {
            "success": [[0, sft_curve_rate]] + [[row["num_timesteps"], row["success_rate"]] for row in evals]
            + [[trained["steps"], success_on(rows, curve_starts)]],
            "entropy": [[row["num_timesteps"], row["train/entropy"]] for row in updates if row["train/entropy"] is not None],
            "rollout_success": [[row["num_timesteps"], row["rollout/success_rate"]] for row in updates],
        },
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- report
def check_targets(results: dict) -> dict:
    """The targets, measured: issue #7's, (b) beats SFT by >= 5 points and its entropy holds up better than (a)'s;
    issue #25's, (b) beats SFT by >= 10 points and reaches >= 85% mean success."""
    targets = {}
    if "sft" in results and "grpo_offline" in results:
        delta = results["grpo_offline"]["delta_vs_sft"]["overall"]
        targets["grpo_offline_beats_sft"] = {
            "wanted": f"grpo_offline mean success >= sft + {TARGET_DELTA:.2f} (issue #7)", "delta": delta["delta"],
            "ci95": delta["ci95"], "met": delta["delta"] >= TARGET_DELTA,
            "significant": delta["ci95"][0] > 0,  # the 95% interval of the difference excludes 0
        }  # fmt: skip
        mean = results["grpo_offline"]["overall"]["success_rate"]
        targets["grpo_offline_ten_points_and_85"] = {
            "wanted": f"grpo_offline mean success >= sft + {STRONG_TARGET_DELTA:.2f} and >= {STRONG_TARGET_RATE:.2f} "
            "(issue #25)", "delta": delta["delta"], "ci95": delta["ci95"], "success_rate": mean,
            "met": delta["delta"] >= STRONG_TARGET_DELTA and mean >= STRONG_TARGET_RATE,
            "significant": delta["ci95"][0] > 0,
        }  # fmt: skip
    if "grpo" in results and "grpo_offline" in results:
        plain, offline = results["grpo"]["entropy"]["end_over_start"], results["grpo_offline"]["entropy"]["end_over_start"]
        if plain is not None and offline is not None:
            targets["grpo_offline_entropy_holds"] = {
                "wanted": f"grpo_offline's entropy does not collapse (end >= {COLLAPSE_RATIO} x start)",
                "grpo_offline_end_over_start": offline, "grpo_end_over_start": plain,
                "grpo_collapsed": plain < COLLAPSE_RATIO, "met": offline >= COLLAPSE_RATIO,
            }  # fmt: skip
    return targets


def _rounded(value):
    if isinstance(value, float):
        return f"{value:+.3f}"
    return "[" + ", ".join(_rounded(item) for item in value) + "]" if isinstance(value, list) else str(value)


def _cell(entry: dict) -> str:
    low, high = entry["ci95"]
    return f"{entry['success_rate']:.2f} [{low:.2f}, {high:.2f}]"


def paired_lines(results: dict) -> list[str]:
    """One line per head-to-head comparison of :data:`PAIRED_COMPARISONS` in ``results``."""
    lines = []
    for variant, baseline, label, meaning in PAIRED_COMPARISONS:
        paired = results.get(variant, {}).get(f"delta_vs_{baseline}")
        if paired:
            overall = paired["overall"]
            lines.append(f"{label}: {variant} − {baseline} = {overall['delta']:+.2f} [paired 95% {overall['ci95'][0]:+.2f}, "
                         f"{overall['ci95'][1]:+.2f}] over {overall['starts']} starts: {meaning}.")  # fmt: skip
    return lines


def markdown(report: dict) -> str:
    """The report as Markdown: the success table (variants as columns), targets, setup, wall times."""
    results, evaluation, setup = report["results"], report["eval"], report["setup"]
    names = [variant for variant in VARIANTS if variant in results]
    mode = report.get("obs_mode", "state")
    cameras = " + ".join(report.get("cameras") or ["agentview"])
    inputs = ("state" if mode == "state" else f"{cameras} {report.get('image_size')} px + state") + (
        " + object_state" if report["object_state"] else ""
    )
    lines = [
        f"## SFT vs GRPO: {report['env_id']}, {inputs}",
        "",
        f"Success on held-out init states {id_ranges(evaluation['init_state_ids'])} of every task, seeds "
        f"{', '.join(map(str, report['seeds']))} (one greedy episode per task, init state and seed, at most "
        f"{evaluation['max_episode_steps']} steps); [Wilson 95% interval] over all seeds' episodes, each counted as "
        "independent, so with several seeds too narrow (a start's episodes under different reset seeds are alike; "
        "SFT's are mostly the same). Δ: the difference to SFT on the same seeds, [95% interval] from a paired "
        "bootstrap over the starts (task, init state), seeds averaged per start; the per-seed row shows how much "
        "training seeds differ.",
        "",
        "| task | " + " | ".join(names) + " |",
        "|---:|" + ":---:|" * len(names),
    ]
    for task_id in report["task_ids"]:
        lines.append(f"| {task_id} | " + " | ".join(_cell(results[name]["per_task"][str(task_id)]) for name in names) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{_cell(results[name]['overall'])}**" for name in names) + " |")

    def row(title, cell):
        lines.append(f"| {title} | " + " | ".join(cell(name, results[name]) for name in names) + " |")

    def delta_cell(name, result):
        if "delta_vs_sft" not in result:
            return "-"
        delta = result["delta_vs_sft"]["overall"]
        return f"{delta['delta']:+.2f} [{delta['ci95'][0]:+.2f}, {delta['ci95'][1]:+.2f}]"

    def entropy_cell(name, result):
        entropy = result["entropy"]
        return "-" if entropy["start"] is None else f"{entropy['start']:.2f} -> {entropy['end']:.2f}"

    row("Δ vs sft [paired 95%]", delta_cell)
    row("per seed", lambda name, result: " / ".join(f"{rate:.2f}" for rate in result["overall"]["seed_rates"]))
    row("entropy start -> end", entropy_cell)
    row("env steps", lambda name, result: "-" if name == "sft" else " / ".join(str(steps) for steps in result["steps"]))
    per_task = results[names[0]]["per_task"]
    lines += ["", "Tasks: " + "; ".join(f"{t} = {per_task[str(t)]['instruction']}" for t in report["task_ids"])]

    if report.get("missing_runs"):
        lines += ["", f"**Partial report** (written as runs finish): not done yet: {', '.join(report['missing_runs'])}. "
                  "Each Δ compares a variant with SFT on the seeds that variant has."]  # fmt: skip
    lines += ["", "Targets:"]
    for name, target in report["targets"].items():
        verdict = "met" if target["met"] else "**NOT met**"
        if target["met"] and target.get("significant") is False:
            verdict = "met on the point estimate only (**not significant**: the 95% interval includes 0)"
        shown = {key: value for key, value in target.items() if key not in ("wanted", "met", "significant")}
        measured = ", ".join(f"{key} {_rounded(value)}" for key, value in shown.items())
        lines.append(f"- {name}: {target['wanted']}: {verdict} ({measured})")
    if not report["targets"]:
        lines.append("- not measured: they need the sft, grpo and grpo_offline variants")
    for line in paired_lines(results):
        lines += ["", line]

    lines += ["", "Variants:"]
    for name in names:
        extra = ""
        if name == "grpo_offline_relabel":
            extra = (f"; {results[name]['groups_rescued']} all-fail groups rescued, {results[name]['relabelled_episodes']} "
                     f"episodes relabelled ({setup['relabel_note']})")  # fmt: skip
        lines.append(f"- {name}: {DESCRIPTIONS[name]}{extra}")

    curve_when = f"every {setup['curve_every']} env steps" if setup["curve_every"] else "at the start and end"
    held_out = evaluation["held_out_note"]
    if not evaluation["held_out"]:
        held_out = "**" + held_out.replace("not held out", "NOT HELD OUT", 1) + "**"
    lines += [
        "",
        f"Setup: SFT {setup['sft']}; fine-tuning budget {setup['total_timesteps']} env steps per run, groups of "
        f"{setup['group_size']} episodes from {setup['num_groups']} (task, init state) pairs per rollout, "
        f"{train_starts_text(setup)}, rollouts of at most "
        f"{setup['rollout_max_episode_steps']} steps ({setup.get('rollout_num_envs', 1)} side by side); learning curve "
        f"on init states {id_ranges(evaluation['curve_init_state_ids'])} {curve_when}; {held_out}.",
        "",
        "| wall time (s, all seeds) | training | curve evaluations | evaluation | env steps / s |",
        "|:---|---:|---:|---:|---:|",
    ]
    for name in names:
        result = results[name]
        train = "untimed" if result["train_seconds"] is None else f"{result['train_seconds']:.0f}"
        rate = "-" if name == "sft" or not result["train_seconds"] else f"{sum(result['steps']) / result['train_seconds']:.1f}"
        lines.append(f"| {name} | {train} | {result['curve_eval_seconds']:.0f} | {result['eval_seconds']:.0f} | {rate} |")
    demos, machine = report["demos"], report["machine"]
    made = f"generated in {demos['seconds']:.0f} s" if demos["generated_this_run"] else "reused"
    lines += [
        "",
        f"- demos: {demo_files_text(demos)} ({made}), {demos['num_demos']} demos, {demos['num_transitions']} transitions",
        f"- machine: {machine_text(machine)}",
        f"- command: `{report['command']}`",
    ]
    return "\n".join(lines + video_lines(report["runs"])) + "\n"


def video_lines(runs: list[dict]) -> list[str]:
    """Markdown links to the runs' videos (see :func:`record_videos`), or nothing."""
    links = [f"- {run['variant']} seed {run['seed']}: " + ", ".join(f"[{os.path.basename(p)}]({p})" for p in run["videos"])
             for run in runs if run.get("videos")]  # fmt: skip
    return ["", "Videos (a successful and a failed held-out episode, greedy, first seed):", "", *links] if links else []


def plot(report: dict, path: str) -> None:
    """Two panels: held-out success (curve subset) vs env steps, and the policy's entropy on its rollouts vs env
    steps; a thin line per seed and, with several seeds, their mean. The full evaluation (every held-out start, all
    seeds) stands beside the curves as a diamond with its Wilson interval (SFT's as a dotted line): the curve subset
    is a few episodes a point, and its end can point the other way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(VARIANTS, ("tab:gray", "tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange")))
    figure, (success_axes, entropy_axes) = plt.subplots(1, 2, figsize=(12, 4.2))
    sft_start = [run["curve"]["success"][0][1] for run in report["runs"] if run["variant"] != "sft"]
    if sft_start:
        success_axes.axhline(float(np.mean(sft_start)), color=colors["sft"], linestyle="--", label="sft: curve start")
    for variant in FINE_TUNED:
        runs = [run for run in report["runs"] if run["variant"] == variant]
        if not runs:
            continue
        several = len(runs) > 1
        for index, run in enumerate(runs):
            label = None if several or index else variant
            steps, rates = zip(*run["curve"]["success"])
            success_axes.plot(steps, rates, color=colors[variant], alpha=0.3 if several else 1.0, marker=".", label=label)
            if run["curve"]["entropy"]:
                steps, entropies = zip(*run["curve"]["entropy"])
                entropy_axes.plot(steps, entropies, color=colors[variant], alpha=0.5, label=None if index else variant)
        if several:  # the seeds' k-th points, averaged
            length = min(len(run["curve"]["success"]) for run in runs)
            points = np.array([run["curve"]["success"][:length] for run in runs], dtype=float).mean(axis=0)
            success_axes.plot(points[:, 0], points[:, 1], color=colors[variant], linewidth=2, marker="o", label=variant)
        overall = report["results"].get(variant, {}).get("overall")
        if overall:
            low, high = overall["ci95"]
            rate, end = overall["success_rate"], float(np.mean([run["curve"]["success"][-1][0] for run in runs]))
            success_axes.errorbar(
                [end],
                [rate],
                yerr=[[rate - low], [high - rate]],
                color=colors[variant],
                marker="D",
                markersize=7,
                capsize=4,
                label=f"{variant}: all {overall['episodes']} episodes",
            )
    sft_overall = report["results"].get("sft", {}).get("overall")
    if sft_overall:
        success_axes.axhline(
            sft_overall["success_rate"],
            color=colors["sft"],
            linestyle=":",
            label=f"sft: all {sft_overall['episodes']} episodes",
        )
    curve_states = id_ranges(report["eval"]["curve_init_state_ids"])
    success_axes.set(xlabel="env steps", ylabel="success rate", ylim=(0.0, 1.0),
                     title=f"{report['env_id']}: held-out success, greedy (curves: init states {curve_states})")  # fmt: skip
    entropy_axes.set(xlabel="env steps", ylabel="mean token entropy (nats)", title="entropy of the policy on its rollouts")
    for axes in (success_axes, entropy_axes):
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(loc="best", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(report: dict, json_out: str) -> None:
    """The JSON, the Markdown table and the plot, each renamed into place whole."""
    table = markdown(report)
    write_report_files(report, table, json_out, plot=functools.partial(plot, report))
    print(table)


def build_report(
    args: Args, suite, task_ids, init_state_ids, curve_starts, instructions, demos: dict, runs: list[dict]
) -> dict:
    """Summaries per variant (over the seeds done), deltas to SFT, targets, the runs with their curves and outcomes."""
    seeds = [seed for seed in args.seeds if any(run["seed"] == seed for run in runs)]
    results = {}
    for variant in VARIANTS:
        of_variant = [run for run in runs if run["variant"] == variant and variant in args.variants]
        if of_variant:
            results[variant] = {"description": DESCRIPTIONS[variant], **runs_summary(of_variant, task_ids, instructions)}
    for variant, result in results.items():
        if variant != "sft" and "sft" in results:
            # Against SFT on the same seeds (a report written mid-run may have SFT for a seed whose variants are not
            # all done yet): the same init states and reset seeds on both sides.
            variant_seeds = set(result["overall"]["seeds"])
            sft_runs = [run for run in runs if run["variant"] == "sft" and run["seed"] in variant_seeds]
            if {run["seed"] for run in sft_runs} == variant_seeds:
                result["delta_vs_sft"] = delta_vs(
                    result, runs_summary(sft_runs, task_ids, instructions), task_ids,
                    [run for run in runs if run["variant"] == variant], sft_runs,
                )  # fmt: skip
    for variant, baseline, _, _ in PAIRED_COMPARISONS:
        # (b) against (e): what the policy-gradient term adds over imitating the same offline data (pg_coef 0);
        # (b) against (a): what the offline regularization adds to plain GRPO. On the seeds both have.
        if variant not in results or baseline not in results:
            continue
        seeds_both = set(results[variant]["overall"]["seeds"]) & set(results[baseline]["overall"]["seeds"])
        pair = {name: [run for run in runs if run["variant"] == name and run["seed"] in seeds_both]
                for name in (variant, baseline)}  # fmt: skip
        if seeds_both:
            summaries = {name: runs_summary(of_name, task_ids, instructions) for name, of_name in pair.items()}
            results[variant][f"delta_vs_{baseline}"] = delta_vs(
                summaries[variant], summaries[baseline], task_ids, pair[variant], pair[baseline]
            )
    done = {(run["variant"], run["seed"]) for run in runs}
    missing = [f"{variant} seed {seed}" for seed in args.seeds for variant in args.variants if (variant, seed) not in done]
    rollout_limit = args.rollout_max_episode_steps or args.max_episode_steps or suite.max_episode_steps
    shares_scene = any(other in task_ids for task_id in task_ids for other, _ in scene_goals(suite.libero_name, task_id))
    sft_setup = (
        f"{args.sft_steps} steps of {args.sft.batch_size} transitions per seed, CompactVLA width {args.policy.hidden_size}"
    )
    cameras = policy_cameras(args.obs_mode, args.policy.cameras)
    if args.sft_checkpoint:
        sft_setup = f"the checkpoint {args.sft_checkpoint} for every seed"
        cameras = tuple(key for key in load_policy(args.sft_checkpoint).observation_keys if key in CAMERA_KEYS)
    return {
        "benchmark": BENCHMARK,
        "command": command_line(dataclasses.replace(args, report_only=False), "benchmarks/sft_vs_grpo.py"),
        "args": dataclasses.asdict(args),
        "env_id": suite.env_id, "obs_mode": args.obs_mode, "image_size": args.image_size, "cameras": list(cameras),
        "object_state": args.object_state, "task_ids": list(task_ids), "seeds": seeds,
        "demos": demos,
        "eval": {
            "init_state_ids": list(init_state_ids),
            "curve_init_state_ids": sorted({start.init_state_id for start in curve_starts}),
            "max_episode_steps": args.max_episode_steps or suite.max_episode_steps, "deterministic": True,
            "held_out": demos["held_out"], "held_out_note": demos["held_out_note"],
        },
        "setup": {
            "sft": sft_setup, "total_timesteps": args.total_timesteps, "num_groups": args.grpo.num_groups,
            "group_size": args.grpo.group_size, "train_init_state_ids": list(range(args.demo.demo_init_state_end)),
            "train_init_states": args.grpo.init_states,
            "rollout_max_episode_steps": rollout_limit, "rollout_num_envs": args.rollout_num_envs,
            "vectorization_mode": args.vectorization_mode,
            "eval_num_envs": eval_num_envs(args), "curve_every": args.curve_every,
            "relabel_note": "some tasks share a scene: relabelling can happen" if shares_scene else
            "no two of these tasks share a scene, so no relabelling can happen: (c) is (b) + group rescue",
        },
        "complete": not missing, "missing_runs": missing,
        "results": results,
        "targets": check_targets(results),
        "runs": build_report_runs(runs),
        "machine": machine_info(args.threads.torch_threads, args.threads.sft_threads),
    }  # fmt: skip


def build_report_runs(runs: list[dict]) -> list[dict]:
    """The runs as the report keeps them: each episode row reduced to its outcome (task, init state, success, steps)."""
    return [
        {
            **{key: value for key, value in run.items() if key != "rows"},
            "outcomes": [[row["task_id"], row["init_state_id"], int(row["success"]), row["length"]] for row in run["rows"]],
        }
        for run in runs
    ]


# ---------------------------------------------------------------------------------------------- main
def main(args: Args) -> dict:
    args.threads.apply()
    suite, task_ids, init_state_ids = check_args(args)
    short_name = suite.libero_name.removeprefix("libero_")
    output_dir = args.output_dir or os.path.join("runs", "sft_vs_grpo", short_name)
    json_out = args.json_out or os.path.join("benchmarks", "results", f"sft_vs_grpo_{short_name}.json")
    instructions = {task.task_id: task.instruction for task in suites.suite_tasks(suite.libero_name)}
    max_episode_steps = args.max_episode_steps or suite.max_episode_steps

    # 1. Demos (generated when missing), shared by SFT, the offline terms, the rescues and iRe-VLA's SL stages.
    generate = args.demo.generate_args(
        default_demo_path(suite.libero_name, args.obs_mode, args.image_size, args.policy.reflections),
        suite=suite.libero_name, task_ids=task_ids, obs_mode=args.obs_mode, image_size=args.image_size,
        reflections=args.policy.reflections, object_state=args.object_state,
        seed=args.seeds[0], progress=args.progress,
    )  # fmt: skip
    if args.report_only and not os.path.exists(generate.out):
        raise ValueError(f"report_only: no demos at {generate.out}, so no run can have finished: run without it first")
    clock = time.perf_counter()
    episodes, generated = args.demo.load(generate)
    os.makedirs(output_dir, exist_ok=True)
    held_out, note = held_out_note(episodes, task_ids, init_state_ids)
    if not held_out:
        print(f"WARNING: the evaluation is {note.replace('not held out', 'NOT HELD OUT', 1)}", file=sys.stderr, flush=True)
        warnings.warn(f"evaluation {note}: success there overstates generalization to new init states", stacklevel=2)
    demos = {
        **args.demo.summary(generate, episodes, generated), "seconds": time.perf_counter() - clock,
        "held_out": held_out, "held_out_note": note,
    }  # fmt: skip

    runs: list[dict] = []
    report: dict = {}
    run = not args.report_only
    tuned = [variant for variant in FINE_TUNED if variant in args.variants]
    for seed in args.seeds:
        eval_starts = [Start(task_id, init_state_id, seed) for task_id in task_ids for init_state_id in init_state_ids]
        curve_starts = [start for start in eval_starts if start.init_state_id < init_state_ids[0] + args.curve_num_init_states]

        # 2. SFT of this seed, evaluated (on the curve subset at least: it is every learning curve's start).
        sft = prepare_sft(args, seed, episodes, list(instructions.values()), output_dir, train=run)
        sft_dir = os.path.join(output_dir, f"sft_seed{seed}")
        sft_starts = eval_starts if "sft" in args.variants else curve_starts
        rows, run_now = (None, 0) if sft is None else evaluate(sft["path"], suite, sft_starts, max_episode_steps, sft_dir,
                                                               args, run)  # fmt: skip
        if rows is None:
            print(f"sft seed {seed}: not trained or not evaluated: seed {seed} left out of the report", flush=True)
            continue
        runs.append({
            "variant": "sft", "seed": seed, "checkpoint": sft["path"], "steps": sft["steps"],
            "steps_this_run": sft["steps_this_run"], "rows": rows, "episodes_this_run": run_now,
            "success_rate": float(np.mean([row["success"] for row in rows])), "train_seconds": sft["seconds"],
            "eval_seconds": float(sum(row["seconds"] for row in rows)),
        })  # fmt: skip
        if args.videos and seed == args.seeds[0] and "sft" in args.variants:
            runs[-1]["videos"] = record_videos(sft["path"], f"sft_seed{seed}", rows, suite, max_episode_steps, sft_dir,
                                               json_out, args, run)  # fmt: skip
        sft_curve_rate = success_on(rows, curve_starts)

        # 3. Each fine-tuning variant from that SFT checkpoint, on the same budget; 4. its evaluation.
        for variant in tuned:
            run_dir = os.path.join(output_dir, f"{variant}_seed{seed}")
            trained = fine_tune(variant, args, seed, sft, episodes, run_dir, suite, task_ids, curve_starts,
                                max_episode_steps, train=run)  # fmt: skip
            rows, run_now = (None, 0) if trained is None else evaluate(trained["checkpoint"], suite, eval_starts,
                                                                       max_episode_steps, run_dir, args, run)  # fmt: skip
            if rows is None:
                print(f"{variant} seed {seed}: not trained or not evaluated: left out of the report", flush=True)
                continue
            runs.append(run_record(variant, seed, trained, rows, run_now, curve_starts, sft_curve_rate))
            if args.videos and seed == args.seeds[0]:
                runs[-1]["videos"] = record_videos(trained["checkpoint"], f"{variant}_seed{seed}", rows, suite,
                                                   max_episode_steps, run_dir, json_out, args, run)  # fmt: skip
            # 5. The report over the runs done so far, rewritten after each (a long run shows results early).
            if run:
                report = build_report(args, suite, task_ids, init_state_ids, curve_starts, instructions, demos, runs)
                write_report(report, json_out)
    if not runs:
        raise ValueError(f"report_only: no finished run of seeds {list(args.seeds)} in {output_dir}: nothing to report")
    if args.report_only or len(report.get("runs", ())) != len(runs):  # SFT alone since the last
        report = build_report(args, suite, task_ids, init_state_ids, curve_starts, instructions, demos, runs)
        write_report(report, json_out)
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
