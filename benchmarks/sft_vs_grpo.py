"""SFT vs GRPO (issue #7): does GRPO with offline regularization beat behaviour cloning on LIBERO?

One command, five policies on the same suite, the same held-out init states and the same env-step budget:

- ``sft``: behaviour cloning on the scripted expert's demos (:mod:`benchmarks.sft_baseline`); every other
  variant starts from this checkpoint.
- ``grpo``: (a) plain GRPO -- group-relative clipped surrogate on binary success, no demos (imitation weight 0,
  no success replay, no rescue of all-fail groups).
- ``grpo_offline``: (b) GRPO with offline regularization -- the demos' NLL weighted by how often the rollouts
  fail (``imitation_weight_max`` at all-fail down to ``imitation_weight_min`` at all-success), plus replayed
  successes.
- ``grpo_offline_relabel``: (c) (b) plus Rollout Relabel -- all-fail groups get a demo (group rescue) and the env
  is wrapped in :class:`RolloutRelabel` (hindsight relabelling with LIBERO's BDDL goals). Relabelling needs tasks
  that share a scene (LIBERO-Goal, LIBERO-90); on LIBERO-Spatial and LIBERO-Object no task's goal can be reached
  in another's rollout, so there (c) is (b) plus group rescue; the report counts the relabelled episodes.
- ``irevla``: (d) iRe-VLA -- head-only GRPO stages alternating with supervised stages on demos + successes.

Every fine-tuned policy is trained once per ``--seeds`` entry (its own SFT checkpoint too, SFT seeded alike) on the
demos' init states (0 .. demo_init_state_end - 1), then evaluated greedily on every task and every held-out init
state (20..39 by default) with that seed as the reset seed. The report gives per-task success (over all seeds'
episodes) with Wilson 95% intervals, the mean, the difference to SFT with a 95% interval from a paired bootstrap
over the evaluation starts, the per-seed rates, the entropy of each learner's policy at the start and end of
training (the collapse check), the wall time of every stage, and a plot: held-out success (a small subset, every
``--curve-every`` env steps) and entropy against env steps. It checks issue #7's targets as measured: (b) beats SFT
by at least 5 points of mean success, and (b)'s entropy does not collapse (its end-of-training value stays above
half its start-of-training value; the report says whether (a)'s did).

    # LIBERO-Spatial and LIBERO-Object, state mode with privileged object poses, 3 seeds, one core each: about
    # 12 h per suite on a 2-core CPU running both (per seed: SFT ~25 min, each fine-tuning ~35 min, evaluating
    # 5 x 200 episodes ~1.5 h with 8 envs side by side)
    python benchmarks/sft_vs_grpo.py --suite spatial
    python benchmarks/sft_vs_grpo.py --suite object
    # from an OpenVLA checkpoint on a GPU: PATH is a policy checkpoint, e.g. written by
    # HFVLAPolicy.from_pretrained(<local OpenVLA dir>).save_pretrained(PATH); frames at the env's 128 px
    python benchmarks/sft_vs_grpo.py --suite spatial --sft-checkpoint PATH --obs-mode rgb+state --image-size 128 \
        --no-object-state --device cuda
    # a quicker look: two variants, one seed, two tasks
    python benchmarks/sft_vs_grpo.py --variants sft grpo_offline --seeds 0 --task-ids 0 1 --total-timesteps 10000
    # the key comparison on every seed first, then the full report from whatever has finished (nothing is run)
    python benchmarks/sft_vs_grpo.py --suite spatial --variants sft grpo_offline
    python benchmarks/sft_vs_grpo.py --suite spatial --report-only

Every stage resumes after a kill, so running the same command again only does what is left and rewrites the
report (which is also rewritten after every fine-tuning run, so a long run shows its first results early): demos from
``<demos>.parts/``; SFT from ``<output-dir>/sft_seed<s>/sft``; fine-tuning from the newest checkpoint in
``<output-dir>/<variant>_seed<s>/checkpoints`` (``final/`` once done), with its learning curve in ``curve.jsonl``;
evaluation from each directory's ``episodes.jsonl`` (episodes are reused for the same checkpoint). Writes
``benchmarks/results/sft_vs_grpo_<suite>.{json,md,png}``. Commands sharing an ``--output-dir`` (e.g. one per variant,
to use more cores) can run side by side: each stage holds a lock (``gym_libero_vla/run_lock.py``) on its files, so
a second command wanting the same demos, SFT, run or evaluation waits for the first and then reuses its work.

On a machine without those directories (a fresh clone), ``--previous-reports`` lets the runs of a committed report
stand in for the ones missing here, so that adding a seed or a variant does not redo what the report already
measured (their settings, demos and SFT weights are checked against this command's). Regenerated demos can differ
from one machine to another (the simulator's floats do: a few LIBERO-Spatial expert episodes flip between success
and failure), and then the check refuses: such a machine needs the report's demo file and SFT checkpoint.

    python benchmarks/sft_vs_grpo.py --suite object --sft-checkpoint runs/sft_baseline/object_state/sft \
        --variants sft grpo_offline offline_only --seeds 0 1 \
        --previous-reports benchmarks/results/sft_vs_grpo_object_ablation.json benchmarks/results/sft_vs_grpo_object.json \
        --json-out benchmarks/results/sft_vs_grpo_object_ablation.json
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
import warnings
from typing import Literal

import gymnasium as gym
import numpy as np
import sft_baseline  # the sibling script: python puts benchmarks/ first on sys.path
import torch
import tyro
from reporting import command_line, machine_info  # benchmarks/reporting.py
from stable_baselines3.common.callbacks import BaseCallback

import gym_libero_vla  # noqa: F401  (registers the env ids)
from gym_libero_vla import suites
from gym_libero_vla.algos.callbacks import RolloutCheckpointCallback
from gym_libero_vla.algos.grpo import GRPO, GRPO_CONFIG_FILENAME, GRPOConfig, latest_checkpoint
from gym_libero_vla.algos.irevla import IReVLA, IReVLAConfig
from gym_libero_vla.algos.sft import SFT_CONFIG_FILENAME
from gym_libero_vla.evaluate import (
    difference_interval,
    env_kwargs_for_policy,
    make_eval_envs,
    paired_difference_interval,
    run_episodes_batched,
)
from gym_libero_vla.policies import load_policy, resolve_device
from gym_libero_vla.run_lock import exclusive
from gym_libero_vla.wrappers.rollout_relabel import RolloutRelabel, scene_goals

VARIANTS = ("sft", "grpo", "grpo_offline", "grpo_offline_relabel", "irevla", "offline_only")
ISSUE_VARIANTS = VARIANTS[:5]
"""The ones issue #7 names, run by default; ``offline_only`` is an ablation to ask for."""
PAIRED_COMPARISONS = (
    ("grpo_offline", "offline_only", "Ablation (e)",
     "what the policy-gradient term adds to imitating the same demos and replayed successes"),
    ("grpo_offline", "grpo", "(b) vs (a)", "what the offline regularization adds to plain GRPO"),
)  # fmt: skip
"""Pairs of variants compared head to head (besides each against SFT) when both are in a report: (variant,
baseline, label, what the difference measures); the result is ``results[variant]["delta_vs_<baseline>"]``."""
FINE_TUNED = VARIANTS[1:]
DESCRIPTIONS = {
    "sft": "behaviour cloning on the demos; the start of every other variant",
    "grpo": "(a) plain GRPO: clipped group-relative surrogate only (no demos, no success replay, no rescue)",
    "grpo_offline": "(b) GRPO + offline regularization: adaptive demo NLL and success replay",
    "grpo_offline_relabel": "(c) (b) + Rollout Relabel: all-fail groups rescued with a demo, hindsight relabelling",
    "irevla": "(d) iRe-VLA: head-only GRPO stages alternating with SL stages on demos + successes",
    "offline_only": "(e) ablation: (b) without its policy-gradient term (pg_coef 0), the same rollouts feeding only "
    "the success replay and the imitation weight; (b) minus (e) is what RL adds over more imitation",
}
BENCHMARK = "SFT vs GRPO with offline regularization (issue #7)"
TARGET_DELTA = 0.05
"""Issue #7: (b) should beat SFT by at least this much mean success."""
COLLAPSE_RATIO = 0.5
"""Entropy "collapses" when its end-of-training value falls below this fraction of its start-of-training value."""


@dataclasses.dataclass
class Args:
    suite: str = "spatial"
    """LIBERO suite: short name (spatial, object, goal, 10, 90), LIBERO name or env id."""
    task_ids: tuple[int, ...] | None = None
    """Tasks to train on and evaluate (default: every task of the suite)."""
    obs_mode: Literal["state", "rgb+state"] = "state"
    """"state": proprio (+ object poses); "rgb+state": agentview frames too (e.g. an OpenVLA checkpoint given as
    --sft-checkpoint, on a GPU with --device cuda). Rendering makes rgb+state ~10x slower on a CPU."""
    image_size: int = 64
    """Side of the agentview frames (rgb+state only); the demos' frames and the policy's must have it."""
    object_state: bool = True
    """Give the policies LIBERO's privileged object poses (without them a small state-mode policy sees only the
    gripper and hardly ever succeeds)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Training seeds: SFT and each variant are trained once per seed and evaluated with it as the reset seed."""
    variants: tuple[str, ...] = ISSUE_VARIANTS
    """Which of sft, grpo, grpo_offline, grpo_offline_relabel, irevla (the default) and the ablation offline_only
    to run (SFT is trained anyway as the start)."""
    output_dir: str | None = None
    """Checkpoints, curves and episodes, one subdirectory per variant and seed (default runs/sft_vs_grpo/<suite>)."""
    json_out: str | None = None
    """Report JSON; the Markdown and the plot go next to it as .md and .png
    (default benchmarks/results/sft_vs_grpo_<suite>.json)."""

    # --- demonstrations
    demos: str | None = None
    """Demo HDF5 file (default data/<suite>_state.hdf5, or data/<suite>_rgb<image_size>.hdf5 in rgb+state mode;
    shared with sft_baseline.py). Used as it is when it exists; otherwise generated with the scripted expert
    (resuming <demos>.parts/)."""
    episodes_per_task: int = 20
    """Successful demos per task to generate (only when the demo file is missing)."""
    demo_init_state_end: int = 20
    """Demos and GRPO groups use init states 0 .. demo_init_state_end - 1; evaluation must start past them."""
    filter_noops: bool = True
    """Drop no-op steps from the demos, as OpenVLA's processed LIBERO data."""

    # --- SFT
    sft_checkpoint: str | None = None
    """Start every seed's fine-tuning from this policy checkpoint instead of training SFT per seed (sft_steps and
    the SFT settings below are then unused; its sft row is evaluated once per seed)."""
    sft_steps: int = 15000
    """SFT gradient steps per seed (a checkpoint with fewer is continued)."""
    sft_batch_size: int = 64
    """Demo transitions per SFT step (also iRe-VLA's SL batch)."""
    sft_learning_rate: float = 3e-4
    """AdamW step size of SFT."""
    sft_save_every: int = 1000
    """Save the SFT checkpoint every this many steps, so that a kill loses at most that many."""
    hidden_size: int = 128
    """CompactVLA transformer width."""
    num_layers: int = 2
    """CompactVLA transformer blocks."""
    num_heads: int = 4
    """CompactVLA attention heads."""

    # --- fine-tuning (the same for every variant unless said otherwise)
    total_timesteps: int = 40000
    """Env-step budget of each fine-tuning run (whole rollouts: the last one may overshoot)."""
    num_groups: int = 2
    """(task, init state) pairs per GRPO rollout."""
    group_size: int = 4
    """Episodes per (task, init state): the G of GRPO."""
    learning_rate: float = 3e-5
    """GRPO's AdamW step size (iRe-VLA's RL stage too)."""
    num_epochs: int = 2
    """Passes over each rollout."""
    minibatch_size: int = 128
    """Env steps per GRPO gradient step."""
    dynamic_sampling: bool = True
    """Leave all-equal groups out of the policy-gradient term (DAPO)."""
    max_sampling_rounds: int = 2
    """Dynamic sampling's refill: up to this many rounds of num_groups groups per rollout."""
    temperature: float = 1.0
    """Rollout sampling temperature of every variant's RL term (the ratio, entropy and KL use the same)."""
    loss_aggregation: Literal["token-mean", "episode-mean"] = "token-mean"
    """Policy-gradient weighting: every token the same (token-mean), or every episode the same (episode-mean)."""
    entropy_coef: float = 0.0
    """Entropy bonus of every GRPO loss (0: none, so that a collapse shows)."""
    imitation_weight_max: float = 1.0
    """(b), (c): weight of the demos' NLL when every rollout fails."""
    imitation_weight_min: float = 0.1
    """(b), (c): weight of the demos' NLL when every rollout succeeds."""
    success_replay_size: int = 500
    """(b), (c): successful rollouts replayed beside the demos in the offline term."""
    rl_updates_per_stage: int = 2
    """(d): GRPO updates of the action head per RL stage."""
    sl_steps_per_stage: int = 100
    """(d): supervised steps on demos + successes per SL stage."""
    sl_learning_rate: float = 1e-4
    """(d): AdamW step size of the SL stages."""
    rollout_max_episode_steps: int | None = None
    """Step limit of training rollouts (default: max_episode_steps)."""
    rollout_num_envs: int = 4
    """Envs a group's episodes run in side by side (``gym.make_vec``, sync, in the learner's process), the policy
    acting on all of them in one batched call; must divide group_size. 1: one episode after another. Each env
    keeps two tasks' simulators (~0.3 GB each, ~1 GB with a renderer in rgb+state mode)."""
    checkpoint_every: int = 2000
    """Save a fine-tuning checkpoint after the first rollout past every this many env steps."""

    # --- evaluation
    eval_init_state_start: int = 20
    """First evaluation init state (>= demo_init_state_end: held out from demos and GRPO groups)."""
    eval_num_init_states: int = 20
    """Evaluation init states per task: eval_init_state_start .. + eval_num_init_states - 1."""
    max_episode_steps: int | None = None
    """Step limit of evaluation episodes (default: the suite's, OpenVLA's evaluation limits)."""
    curve_every: int = 10000
    """Learning curve: evaluate on the curve subset after the first rollout past every this many env steps
    (0: only at the start and the end, from the SFT and final evaluations)."""
    curve_num_init_states: int = 1
    """Curve subset: the first this many evaluation init states of every task, greedy, the run's seed (each curve
    point costs this many episodes per task)."""
    device: str = "cpu"
    """Torch device of the policies (SFT, fine-tuning, evaluation): cpu, cuda, cuda:<index>, mps or auto. The
    simulators stay on the CPU."""
    eval_num_envs: int | None = None
    """Evaluation envs run side by side in one process, the policy acting on all of them in one batched call;
    1 runs the episodes one after another. The outcomes do not depend on it. Default: 8 in state mode (~0.3 GB
    each), 2 in rgb+state mode (~1 GB each with a renderer, and rendering dominates the step anyway)."""
    torch_threads: int = 1
    """Torch CPU threads; more than the free cores slows small models down a lot."""
    progress: bool = True
    """Show progress bars."""
    report_only: bool = False
    """Train and evaluate nothing: write the report from the runs already finished (trained to total_timesteps
    and evaluated on every episode), listing the others as missing. E.g. after running the key comparison first
    (``--variants sft grpo_offline --seeds 0 1 2``), or to rebuild the report files of an interrupted run."""
    previous_reports: tuple[str, ...] = ()
    """Report JSONs of this benchmark (e.g. the committed benchmarks/results/sft_vs_grpo_<suite>.json) whose runs stand
    in for the runs this machine has no directory of: a fresh machine adds seeds or variants to a report without
    redoing the runs already measured. Each must have been measured with this command's settings (only seeds,
    variants, paths, device, threads and progress may differ; the others are checked and any difference named), on
    as many demos, and, where it records them, from the same SFT weights. Where several have a run, the first gives
    it; the report says which runs were reused and from where."""


# ---------------------------------------------------------------------------------------------- input checks
def baseline_args(args: Args, seed: int) -> sft_baseline.Args:
    """``args`` as :mod:`sft_baseline` reads them, for its demo, SFT and input-check functions."""
    return sft_baseline.Args(
        suite=args.suite, obs_mode=args.obs_mode, image_size=args.image_size, object_state=args.object_state,
        task_ids=args.task_ids, demos=args.demos,
        episodes_per_task=args.episodes_per_task, demo_init_state_end=args.demo_init_state_end,
        filter_noops=args.filter_noops, sft_steps=args.sft_steps, batch_size=args.sft_batch_size,
        learning_rate=args.sft_learning_rate, hidden_size=args.hidden_size, num_layers=args.num_layers,
        num_heads=args.num_heads, save_every=args.sft_save_every, seed=seed,
        eval_init_state_start=args.eval_init_state_start, eval_num_init_states=args.eval_num_init_states,
        seeds=args.seeds, max_episode_steps=args.max_episode_steps, device=args.device,
        eval_num_envs=args.eval_num_envs,
        torch_threads=args.torch_threads, progress=args.progress,
    )  # fmt: skip


def grpo_hyperparameters(args: Args, task_ids: tuple[int, ...], seed: int) -> dict:
    """The GRPO settings every variant shares; groups come from the demos' init states only."""
    return dict(
        num_groups=args.num_groups, group_size=args.group_size, learning_rate=args.learning_rate,
        num_epochs=args.num_epochs, minibatch_size=args.minibatch_size, dynamic_sampling=args.dynamic_sampling,
        max_sampling_rounds=args.max_sampling_rounds, entropy_coef=args.entropy_coef, temperature=args.temperature,
        loss_aggregation=args.loss_aggregation,
        task_ids=task_ids,
        init_state_ids=tuple(range(args.demo_init_state_end)), seed=seed,
    )  # fmt: skip


def check_args(args: Args) -> tuple[suites.SuiteSpec, tuple[int, ...], tuple[int, ...]]:
    """Fail before any work on input that cannot run; returns (suite, task_ids, evaluation init state ids)."""
    unknown = [variant for variant in args.variants if variant not in VARIANTS]
    if unknown or not args.variants:
        raise ValueError(f"unknown variant(s) {unknown or '(none given)'}: valid {VARIANTS}")
    if len(set(args.variants)) != len(args.variants):
        raise ValueError(f"variants {args.variants} name one twice")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"seeds {args.seeds} must be distinct and at least one")
    for name, minimum in (("total_timesteps", 1), ("checkpoint_every", 1), ("curve_every", 0), ("curve_num_init_states", 1),
                          ("rl_updates_per_stage", 1), ("sl_steps_per_stage", 0)):  # fmt: skip
        value = getattr(args, name)
        if not (isinstance(value, int) and value >= minimum):
            raise ValueError(f"{name} {value!r} must be an int >= {minimum}")
    if args.curve_num_init_states > args.eval_num_init_states:
        raise ValueError(
            f"curve_num_init_states {args.curve_num_init_states} must be <= eval_num_init_states {args.eval_num_init_states}"
        )
    if args.eval_init_state_start < args.demo_init_state_end:
        raise ValueError(
            f"eval_init_state_start {args.eval_init_state_start} lies inside the training init states "
            f"0..{args.demo_init_state_end - 1} (demos and GRPO groups): give >= {args.demo_init_state_end}"
        )
    if not (isinstance(args.rollout_num_envs, int) and args.rollout_num_envs >= 1) or args.group_size % args.rollout_num_envs:
        raise ValueError(
            f"rollout_num_envs {args.rollout_num_envs!r} must be an int >= 1 that divides group_size {args.group_size}"
        )
    if args.rollout_max_episode_steps is not None and args.rollout_max_episode_steps < 1:
        raise ValueError(f"rollout_max_episode_steps {args.rollout_max_episode_steps} must be >= 1")
    baseline = baseline_args(args, args.seeds[0])
    suite, task_ids, init_state_ids = sft_baseline.check_args(baseline)  # names bad suites, tasks, init states
    GRPOConfig(**grpo_hyperparameters(args, task_ids, args.seeds[0]))  # the learners' own checks, before any work
    GRPOConfig(imitation_weight_max=args.imitation_weight_max, imitation_weight_min=args.imitation_weight_min,
               success_replay_size=args.success_replay_size)  # fmt: skip
    IReVLAConfig(rl_updates_per_stage=args.rl_updates_per_stage, sl_steps_per_stage=args.sl_steps_per_stage,
                 sl_batch_size=args.sft_batch_size, sl_learning_rate=args.sl_learning_rate)  # fmt: skip
    if args.sft_checkpoint is not None:
        if not os.path.isdir(args.sft_checkpoint):
            raise ValueError(f"sft_checkpoint {args.sft_checkpoint!r} is not a directory")
        sft_baseline.check_policy_inputs(load_policy(args.sft_checkpoint), baseline, f"sft_checkpoint {args.sft_checkpoint}")
    return suite, task_ids, init_state_ids


# ---------------------------------------------------------------------------------------------- earlier reports' runs
SETTINGS_NOT_MEASURED = ("seeds", "variants", "output_dir", "json_out", "demos", "device", "eval_num_envs",
                         "torch_threads", "progress", "report_only", "previous_reports")  # fmt: skip
"""Args that do not change what a run measures: a previous report may differ from this command in these only."""


def previous_runs(args: Args, demos: dict) -> dict[tuple[str, int], dict]:
    """The runs of ``args.previous_reports`` by (variant, seed), the first report's where several have one, as
    :func:`main` keeps runs: episode rows rebuilt from the outcomes (each row's seconds the run's mean), nothing
    trained or evaluated this run, and ``reused_from`` naming the report. Refuses a report made with other settings
    or other demos, naming the difference."""
    mine = json.loads(json.dumps(dataclasses.asdict(args)))
    defaults = json.loads(json.dumps(dataclasses.asdict(Args())))
    found: dict[tuple[str, int], dict] = {}
    for path in args.previous_reports:
        report = _read_json(path)
        if report.get("benchmark") != BENCHMARK:
            raise ValueError(f"previous report {path!r} is not a report of this benchmark ({BENCHMARK!r}): "
                             "give the .json that benchmarks/sft_vs_grpo.py wrote")  # fmt: skip
        theirs = report["args"]
        differing = [f"{key} {theirs.get(key, defaults[key])!r} there, {value!r} here" for key, value in mine.items()
                     if key not in SETTINGS_NOT_MEASURED and theirs.get(key, defaults[key]) != value]  # fmt: skip
        if differing:
            raise ValueError(f"previous report {path} was measured with other settings, so its runs cannot stand in "
                             f"for this command's: {'; '.join(differing)}")  # fmt: skip
        for key in ("num_demos", "num_transitions"):
            if report["demos"][key] != demos[key]:
                raise ValueError(f"previous report {path} trained on other demos: {key} {report['demos'][key]} there, "
                                 f"{demos[key]} in {demos['path']} here")  # fmt: skip
        for run in report["runs"]:
            if (run["variant"], run["seed"]) in found:
                continue
            seconds = run["eval_seconds"] / max(len(run["outcomes"]), 1)
            rows = [{"task_id": task_id, "init_state_id": init_state_id, "seed": run["seed"], "success": bool(success),
                     "steps": steps, "seconds": seconds}
                    for task_id, init_state_id, success, steps in run["outcomes"]]  # fmt: skip
            kept = {key: value for key, value in run.items() if key != "outcomes"}
            found[(run["variant"], run["seed"])] = {**kept, "rows": rows, "steps_this_run": 0, "episodes_this_run": 0,
                                                    "reused_from": path}  # fmt: skip
    return found


def reusable(previous: dict, variant: str, seed: int, here: str, runs) -> dict | None:
    """The previous report's run of (variant, seed), when this machine has nothing of it at ``here`` (a run
    directory, or SFT's episodes file: a run begun here is this machine's to finish) and the report has its episodes
    from every start of ``runs``; its rows are those starts'. Else None."""
    run = previous.get((variant, seed))
    if run is None or os.path.exists(here):
        return None
    by_run = {(row["task_id"], row["init_state_id"], row["seed"]): row for row in run["rows"]}
    if not all(start in by_run for start in runs):
        return None
    print(f"{variant} seed {seed}: taken from {run['reused_from']} (no {here} here)", flush=True)
    return {**run, "rows": [by_run[start] for start in runs]}


def check_same_sft(run: dict, fingerprint: str | None, sft_path: str | None) -> None:
    """A reused run must have started from (or be) the SFT weights this command's new runs start from, where it
    records which; one that does not record them is used with a warning."""
    recorded, name = run.get("sft_fingerprint"), f"{run['variant']} seed {run['seed']} of {run['reused_from']}"
    if fingerprint is None:
        return
    if recorded is None:
        warnings.warn(f"{name} records no SFT fingerprint: that it started from the weights of {sft_path} "
                      f"({fingerprint}) is not checked", stacklevel=2)  # fmt: skip
    elif recorded != fingerprint:
        raise ValueError(f"{name} started from SFT weights {recorded}, but {sft_path} has {fingerprint}: its "
                         "results cannot be pooled with runs from these weights (use its SFT checkpoint, or leave "
                         "it out)")  # fmt: skip


# ---------------------------------------------------------------------------------------------- SFT
def prepare_sft(args: Args, seed: int, episodes, instructions: list[str], output_dir: str) -> dict:
    """The SFT checkpoint of ``seed``: ``--sft-checkpoint`` as it is, or ``<output_dir>/sft_seed<seed>/sft`` trained
    (or continued) to ``sft_steps`` with sft_baseline's resumable loop. Returns its path, steps and wall seconds."""
    if args.sft_checkpoint is not None:
        return saved_sft(args.sft_checkpoint)
    directory = os.path.join(output_dir, f"sft_seed{seed}")
    path = os.path.join(directory, "sft")
    baseline = baseline_args(args, seed)
    with exclusive(path + ".lock", f"SFT seed {seed}"):  # another process training it: wait, then continue from it
        model, record = sft_baseline.load_or_create_sft(baseline, episodes, instructions, path, os.path.join(directory, "tb"))
        this_run = sft_baseline.train(model, record, args.sft_steps, path, args.sft_save_every, args.progress)
    return {"path": path, "steps": model.num_timesteps, "seconds": record["seconds"], "steps_this_run": this_run["steps"]}


def saved_sft(path: str) -> dict:
    """What :func:`prepare_sft` returns for the SFT checkpoint at ``path``, as it is."""
    steps = int(_read_json(os.path.join(path, SFT_CONFIG_FILENAME)).get("num_timesteps", 0))
    seconds = _read_json(os.path.join(path, sft_baseline.TRAIN_RECORD)).get("seconds")  # made by sft_baseline.py
    return {"path": path, "steps": steps, "seconds": seconds, "steps_this_run": 0}


def finished_sft(args: Args, seed: int, output_dir: str) -> dict | None:
    """What :func:`prepare_sft` returns, for an SFT checkpoint already trained to ``sft_steps``; else None."""
    if args.sft_checkpoint is not None:
        return saved_sft(args.sft_checkpoint)  # used as it is: nothing to train
    sft = saved_sft(os.path.join(output_dir, f"sft_seed{seed}", "sft"))
    return sft if os.path.isdir(sft["path"]) and sft["steps"] >= args.sft_steps else None


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as file:
        return json.load(file)


# ---------------------------------------------------------------------------------------------- fine-tuning
def learner_metrics(model) -> dict:
    """The scalars of the learner's last policy update (iRe-VLA: of its last RL-stage update)."""
    return model.last_rl_metrics if isinstance(model, IReVLA) else model.last_metrics


class LearningCurve(BaseCallback):
    """After every update, append the learner's entropy and rollout success to ``path`` (JSONL); at the first update
    past every ``curve_every`` env steps, also the greedy success on ``runs`` ((task, init state, seed) triples held
    out from training), in an env of its own. ``train_seconds`` in the rows counts training only, across resumes."""

    def __init__(self, path: str, env_id: str, runs, curve_every: int, max_episode_steps: int, seconds_before: float,
                 num_envs: int = 1):  # fmt: skip
        super().__init__()
        self.path, self.env_id, self.runs, self.curve_every = path, env_id, list(runs), curve_every
        self.max_episode_steps, self.seconds_before, self.num_envs = max_episode_steps, seconds_before, num_envs
        self.eval_seconds = 0.0  # spent in curve evaluations this run (not training)

    def _init_callback(self) -> None:
        self.start = time.perf_counter()
        self.next_eval = self._next_multiple(self.model.num_timesteps)

    def _next_multiple(self, steps: int) -> int | None:
        return (steps // self.curve_every + 1) * self.curve_every if self.curve_every else None

    def train_seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.start - self.eval_seconds

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        metrics, steps = learner_metrics(self.model), self.model.num_timesteps
        row = {"kind": "update", "num_timesteps": steps, "train_seconds": self.train_seconds()}
        for name in ("entropy", "success_rate", "imitation_weight", "frac_groups_zero_std", "groups_rescued",
                     "relabelled_episodes"):  # fmt: skip
            row[name] = metrics.get(name)
        self.append(row)
        if self.next_eval is not None and steps >= self.next_eval:
            self.next_eval = self._next_multiple(steps)
            start = time.perf_counter()
            policy = self.model.policy
            task_ids = sorted({task_id for task_id, _, _ in self.runs})
            # Made for each curve point and closed after it: the simulators would otherwise sit in memory all run.
            envs = make_eval_envs(self.env_id, self.num_envs, task_ids, num_runs=len(self.runs),
                                  max_episode_steps=self.max_episode_steps, **env_kwargs_for_policy(policy))  # fmt: skip
            was_training = policy.training
            policy.eval()
            try:
                successes = sum(result.success for result in run_episodes_batched(policy, envs, self.runs))
            finally:
                policy.train(was_training)
                for env in envs:
                    env.close()
            seconds = time.perf_counter() - start
            self.eval_seconds += seconds
            self.append({"kind": "eval", "num_timesteps": steps, "successes": int(successes), "episodes": len(self.runs),
                         "success_rate": successes / len(self.runs), "seconds": seconds})  # fmt: skip

    def append(self, row: dict) -> None:
        with open(self.path, "a") as file:
            file.write(json.dumps(row) + "\n")


def resume_curve(path: str, num_timesteps: int) -> list[dict]:
    """The curve rows up to ``num_timesteps`` (the checkpoint a run resumes from); the file is rewritten to them,
    since the rows past it describe updates the resumed run does again."""
    rows = [row for row in sft_baseline.read_episodes(path) if row["num_timesteps"] <= num_timesteps]
    with open(path + ".tmp", "w") as file:
        file.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(path + ".tmp", path)
    return rows


def make_learner(variant: str, args: Args, policy, env, episodes, hyperparameters: dict, run_dir: str):
    """A fresh learner of ``variant`` on the SFT ``policy``."""
    tensorboard_log = os.path.join(run_dir, "tb")
    if variant == "irevla":
        return IReVLA(
            policy, env, demos=episodes, rl_updates_per_stage=args.rl_updates_per_stage,
            sl_steps_per_stage=args.sl_steps_per_stage, sl_batch_size=args.sft_batch_size,
            sl_learning_rate=args.sl_learning_rate, success_store=os.path.join(run_dir, "successes"),
            tensorboard_log=tensorboard_log, **hyperparameters,
        )  # fmt: skip
    if variant == "grpo":  # (a): the policy-gradient term alone
        return GRPO(
            policy, env, demos=None, imitation_weight_max=0.0, imitation_weight_min=0.0, success_replay_size=0,
            rescue_failed_groups=False, tensorboard_log=tensorboard_log, **hyperparameters,
        )  # fmt: skip
    return GRPO(  # (b), (c): plus the offline term; (c) also rescues all-fail groups; (e): the offline term alone
        policy, env, demos=episodes, imitation_weight_max=args.imitation_weight_max,
        imitation_weight_min=args.imitation_weight_min, success_replay_size=args.success_replay_size,
        rescue_failed_groups=variant == "grpo_offline_relabel", pg_coef=0.0 if variant == "offline_only" else 1.0,
        cache_dir=os.path.join(run_dir, "cache"), tensorboard_log=tensorboard_log, **hyperparameters,
    )  # fmt: skip


def saved_steps(checkpoint: str | None) -> int:
    """Env steps of a learner checkpoint; -1 when there is none."""
    if checkpoint is None or not os.path.exists(os.path.join(checkpoint, GRPO_CONFIG_FILENAME)):
        return -1
    return int(_read_json(os.path.join(checkpoint, GRPO_CONFIG_FILENAME)).get("num_timesteps", 0))


def make_rollout_env(args: Args, env_id: str, task_ids, max_episode_steps: int, policy, relabel: bool):
    """The training env: one LIBERO env, or ``rollout_num_envs`` of them as a sync vector env (a group's episodes
    side by side; each env keeps two tasks' simulators); wrapped in :class:`RolloutRelabel` for (c)."""
    kwargs = dict(task_ids=task_ids, max_episode_steps=max_episode_steps, **env_kwargs_for_policy(policy))
    wrap = functools.partial(RolloutRelabel, target_task_ids=task_ids, observation_keys=policy.observation_keys)
    if args.rollout_num_envs == 1:
        env = gym.make(env_id, **kwargs)
        return wrap(env) if relabel else env
    return gym.make_vec(env_id, num_envs=args.rollout_num_envs, vectorization_mode="sync",
                        wrappers=[wrap] if relabel else None, max_cached_tasks=2, **kwargs)  # fmt: skip


def finished_training(run_dir: str, total_timesteps: int) -> dict | None:
    """What :func:`fine_tune` returns, for a run whose final checkpoint has ``total_timesteps``; else None."""
    final = os.path.join(run_dir, "checkpoints", "final")
    if saved_steps(final) < total_timesteps:
        return None
    return {"checkpoint": final, "steps": saved_steps(final), "steps_this_run": 0,
            "curve": sft_baseline.read_episodes(os.path.join(run_dir, "curve.jsonl"))}  # fmt: skip


def fine_tune(variant: str, args: Args, seed: int, sft: dict, episodes, run_dir: str, suite, task_ids, curve_runs,
              max_episode_steps: int) -> dict:  # fmt: skip
    """Train ``variant`` from the SFT checkpoint to ``total_timesteps`` env steps into ``<run_dir>/checkpoints/final``,
    resuming from the newest checkpoint there; a finished run is not touched. One process at a time: another one
    on the same ``run_dir`` is waited for, and what it trained is then resumed or reused. Returns its path, steps
    and curve rows."""
    with exclusive(os.path.join(run_dir, "run.lock"), f"{variant} seed {seed}"):
        trained = finished_training(run_dir, args.total_timesteps)
        if trained is not None:
            print(f"{variant} seed {seed}: {trained['checkpoint']} has {trained['steps']} env steps "
                  f"(>= {args.total_timesteps}): not training", flush=True)  # fmt: skip
            return trained
        checkpoints, curve_path = os.path.join(run_dir, "checkpoints"), os.path.join(run_dir, "curve.jsonl")
        final = os.path.join(checkpoints, "final")
        resume_from = latest_checkpoint(checkpoints)
        if saved_steps(final) >= max(saved_steps(resume_from), 0):  # on a tie final also holds iRe-VLA's last SL stage
            resume_from = final
        device = resolve_device(args.device)
        policy = load_policy(sft["path"]).to(device)
        rollout_limit = args.rollout_max_episode_steps or max_episode_steps
        env = make_rollout_env(args, suite.env_id, task_ids, rollout_limit, policy, relabel=variant == "grpo_offline_relabel")
        demos = None if variant == "grpo" else episodes
        if resume_from is not None:
            learner_class = IReVLA if variant == "irevla" else GRPO
            model = learner_class.load(
                resume_from, env=env, demos=demos, device=device, tensorboard_log=os.path.join(run_dir, "tb")
            )
            print(f"{variant} seed {seed}: resuming from {resume_from} at {model.num_timesteps} env steps", flush=True)
        else:
            model = make_learner(variant, args, policy, env, demos, grpo_hyperparameters(args, task_ids, seed), run_dir)
        steps_before = model.num_timesteps
        rows = resume_curve(curve_path, steps_before) if os.path.exists(curve_path) else []
        seconds_before = max([row["train_seconds"] for row in rows if row["kind"] == "update"], default=0.0)
        curve = LearningCurve(curve_path, suite.env_id, curve_runs, args.curve_every, max_episode_steps, seconds_before,
                              sft_baseline.eval_num_envs(args))  # fmt: skip
        try:
            if args.total_timesteps > steps_before:
                print(f"{variant} seed {seed}: {steps_before} -> {args.total_timesteps} env steps", flush=True)
                callbacks = [RolloutCheckpointCallback(args.checkpoint_every, checkpoints, variant, keep_last=2), curve]
                model.learn(args.total_timesteps - steps_before, callback=callbacks, tb_log_name=variant,
                            reset_num_timesteps=False, progress_bar=args.progress)  # fmt: skip
            elif variant == "irevla":  # killed after the checkpoint of its last RL update: the SL stage after it is owed
                model.train_sl_stage()
        finally:
            env.close()
        model.save(final)
        return {"checkpoint": final, "steps": model.num_timesteps, "steps_this_run": model.num_timesteps - steps_before,
                "curve": sft_baseline.read_episodes(curve_path)}  # fmt: skip


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate_checkpoint(path: str, steps: int, env_id: str, runs, max_episode_steps: int, directory: str,
                        args: Args):  # fmt: skip
    """One greedy episode per (task, init state, seed) of ``runs`` for the policy of ``path``, appended to
    ``<directory>/episodes.jsonl``; episodes already there for the same weights are reused. Returns (rows, run now)."""
    os.makedirs(directory, exist_ok=True)
    checkpoint = {"steps": steps, "sha": sft_baseline.checkpoint_fingerprint(path)}
    episodes_path = os.path.join(directory, "episodes.jsonl")
    policy = load_policy(path).to(resolve_device(args.device))
    return sft_baseline.evaluate_resumably(
        policy, env_id, runs, max_episode_steps, episodes_path, checkpoint, args.progress, sft_baseline.eval_num_envs(args)
    )


def recorded_evaluation(path: str, runs, max_episode_steps: int, directory: str) -> list[dict] | None:
    """The rows :func:`evaluate_checkpoint` would return, when every episode of ``runs`` is already recorded for the
    weights of ``path``; else None."""
    done = sft_baseline.recorded_episodes(
        os.path.join(directory, "episodes.jsonl"), sft_baseline.checkpoint_fingerprint(path), max_episode_steps
    )
    return [done[run] for run in runs] if all(run in done for run in runs) else None


def success_on(rows: list[dict], runs) -> float:
    """Success rate of the rows of ``runs`` ((task, init state, seed) triples)."""
    wanted = set(runs)
    outcomes = [row["success"] for row in rows if (row["task_id"], row["init_state_id"], row["seed"]) in wanted]
    return float(np.mean(outcomes))


def run_record(variant: str, seed: int, trained: dict, rows: list[dict], run_now: int, curve_runs, sft_curve_rate: float):
    """What the report keeps of one fine-tuning run: its curve (from the SFT start to the final evaluation), the
    entropy at the start and end of training (each the mean of the first / last tenth of its updates), counts."""
    updates = [row for row in trained["curve"] if row["kind"] == "update"]
    evals = [row for row in trained["curve"] if row["kind"] == "eval"]
    entropies = [row["entropy"] for row in updates if row["entropy"] is not None]
    tenth = max(1, math.ceil(len(entropies) / 10))
    return {
        "variant": variant, "seed": seed, "checkpoint": trained["checkpoint"], "steps": trained["steps"],
        "steps_this_run": trained["steps_this_run"], "rows": rows, "episodes_this_run": run_now,
        "success_rate": float(np.mean([row["success"] for row in rows])),
        "train_seconds": updates[-1]["train_seconds"] if updates else None,
        "curve_eval_seconds": float(sum(row["seconds"] for row in evals)),
        "eval_seconds": float(sum(row["seconds"] for row in rows)),
        "entropy_start": float(np.mean(entropies[:tenth])) if entropies else None,
        "entropy_end": float(np.mean(entropies[-tenth:])) if entropies else None,
        "updates": len(updates),
        "groups_rescued": int(sum(row["groups_rescued"] or 0 for row in updates)),
        "relabelled_episodes": int(sum(row["relabelled_episodes"] or 0 for row in updates)),
        "curve": {
            "success": [[0, sft_curve_rate]] + [[row["num_timesteps"], row["success_rate"]] for row in evals]
            + [[trained["steps"], success_on(rows, curve_runs)]],
            "entropy": [[row["num_timesteps"], row["entropy"]] for row in updates if row["entropy"] is not None],
            "rollout_success": [[row["num_timesteps"], row["success_rate"]] for row in updates],
        },
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- report
def variant_summary(runs: list[dict], task_ids, instructions: dict) -> dict:
    """Per-task and overall success over every seed's episodes (Wilson 95%), per-seed rates, entropy, wall time."""
    rows = [row for run in runs for row in run["rows"]]
    per_task = {
        str(task_id): {"instruction": instructions[task_id],
                       **sft_baseline.success_summary([row for row in rows if row["task_id"] == task_id])}
        for task_id in task_ids
    }  # fmt: skip
    seed_rates = [run["success_rate"] for run in runs]
    overall = {
        **sft_baseline.success_summary(rows),
        "mean_of_task_rates": float(np.mean([entry["success_rate"] for entry in per_task.values()])),
        "seeds": [run["seed"] for run in runs], "seed_rates": seed_rates,
        "seed_std": float(np.std(seed_rates, ddof=1)) if len(seed_rates) > 1 else 0.0,
    }  # fmt: skip
    starts = [run["entropy_start"] for run in runs if run.get("entropy_start") is not None]
    ends = [run["entropy_end"] for run in runs if run.get("entropy_end") is not None]
    entropy = {"start": float(np.mean(starts)) if starts else None, "end": float(np.mean(ends)) if ends else None}
    entropy["end_over_start"] = entropy["end"] / entropy["start"] if starts and ends and entropy["start"] > 0 else None
    train_seconds = [run["train_seconds"] for run in runs]
    return {
        "per_task": per_task, "overall": overall, "entropy": entropy,
        "steps": [run["steps"] for run in runs],
        "train_seconds": None if None in train_seconds else float(sum(train_seconds)),
        "curve_eval_seconds": float(sum(run.get("curve_eval_seconds", 0.0) for run in runs)),
        "eval_seconds": float(sum(run["eval_seconds"] for run in runs)),
        "groups_rescued": sum(run.get("groups_rescued", 0) for run in runs),
        "relabelled_episodes": sum(run.get("relabelled_episodes", 0) for run in runs),
    }  # fmt: skip


def start_success(runs: list[dict]) -> dict[tuple[int, int], float]:
    """Success per evaluation start (task, init state), averaged over the runs' (seeds') episodes from it."""
    outcomes: dict[tuple[int, int], list[float]] = {}
    for run in runs:
        for row in run["rows"]:
            outcomes.setdefault((row["task_id"], row["init_state_id"]), []).append(float(row["success"]))
    return {start: float(np.mean(values)) for start, values in outcomes.items()}


def delta_vs(summary: dict, baseline: dict, task_ids, runs: list[dict], baseline_runs: list[dict]) -> dict:
    """``summary`` minus ``baseline`` success, overall, per task and per seed. ``ci95``: paired bootstrap over the
    evaluation starts (both sides averaged over their seeds per start; resampled within tasks), the interval the
    targets use; ``ci95_newcombe``: Newcombe's on the pooled episodes, which counts a start once per seed as if
    the episodes were independent (too narrow when a seed barely changes a greedy episode, as on these suites)."""
    mine, theirs = start_success(runs), start_success(baseline_runs)
    if set(mine) != set(theirs):
        raise ValueError("a variant and its baseline must be evaluated on the same (task, init state) starts")
    starts = sorted(mine)

    def delta(entry, base, task_id=None):
        chosen = [start for start in starts if task_id is None or start[0] == task_id]
        differences = [mine[start] - theirs[start] for start in chosen]
        paired = paired_difference_interval(differences, [task for task, _ in chosen])
        newcombe = difference_interval(entry["successes"], entry["episodes"], base["successes"], base["episodes"])
        return {"delta": entry["success_rate"] - base["success_rate"], "ci95": list(paired),
                "ci95_newcombe": list(newcombe), "starts": len(chosen)}  # fmt: skip

    per_seed = [rate - base for rate, base in zip(summary["overall"]["seed_rates"], baseline["overall"]["seed_rates"])]
    return {
        "overall": delta(summary["overall"], baseline["overall"]),
        "per_task": {str(t): delta(summary["per_task"][str(t)], baseline["per_task"][str(t)], t) for t in task_ids},
        "per_seed": per_seed,
    }


def check_targets(results: dict) -> dict:
    """Issue #7's two targets, measured: (b) beats SFT by >= 5 points; its entropy holds up better than (a)'s."""
    targets = {}
    if "sft" in results and "grpo_offline" in results:
        delta = results["grpo_offline"]["delta_vs_sft"]["overall"]
        targets["grpo_offline_beats_sft"] = {
            "wanted": f"grpo_offline mean success >= sft + {TARGET_DELTA:.2f}", "delta": delta["delta"],
            "ci95": delta["ci95"], "met": delta["delta"] >= TARGET_DELTA,
            "significant": delta["ci95"][0] > 0,  # the 95% interval of the difference excludes 0
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
    inputs = ("state" if mode == "state" else f"agentview {report.get('image_size')} px + state") + (
        " + object_state" if report["object_state"] else ""
    )
    lines = [
        f"## SFT vs GRPO: {report['env_id']}, {inputs}",
        "",
        f"Success on held-out init states {sft_baseline._ranges(evaluation['init_state_ids'])} of every task, seeds "
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
    lines += ["", "Targets (issue #7):"]
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
        f"{setup['group_size']} episodes from {setup['num_groups']} (task, init state) pairs per rollout, training "
        f"init states {sft_baseline._ranges(setup['train_init_state_ids'])}, rollouts of at most "
        f"{setup['rollout_max_episode_steps']} steps ({setup.get('rollout_num_envs', 1)} side by side); learning curve "
        f"on init states {sft_baseline._ranges(evaluation['curve_init_state_ids'])} {curve_when}; {held_out}.",
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
        f"- demos: {demos['path']} ({made}), {demos['num_demos']} demos, {demos['num_transitions']} transitions",
        f"- machine: {machine['cpu_count']} CPUs, {machine['platform']}, torch {machine['torch']} on "
        f"{machine['torch_threads']} thread(s), load average {machine['load_average_1min_at_end']}",
        f"- command: `{report['command']}`",
    ]
    return "\n".join(lines + reused_lines(report["runs"])) + "\n"


def reused_lines(runs: list[dict]) -> list[str]:
    """One Markdown line per previous report that runs were taken from, naming them."""
    reused: dict[str, dict[str, list[int]]] = {}
    for run in runs:
        if run.get("reused_from"):
            reused.setdefault(run["reused_from"], {}).setdefault(run["variant"], []).append(run["seed"])
    return [
        f"- taken from {path} (measured before, with these settings; not rerun here): "
        + "; ".join(f"{variant} seed {', '.join(map(str, seeds))}" for variant, seeds in of_path.items())
        for path, of_path in reused.items()
    ]


def plot(report: dict, path: str) -> None:
    """Two panels: held-out success (curve subset) vs env steps, and the policy's entropy on its rollouts vs env
    steps; a thin line per seed and, with several seeds, their mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(VARIANTS, ("tab:gray", "tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange")))
    figure, (success_axes, entropy_axes) = plt.subplots(1, 2, figsize=(12, 4.2))
    sft_start = [run["curve"]["success"][0][1] for run in report["runs"] if run["variant"] != "sft"]
    if sft_start:
        success_axes.axhline(float(np.mean(sft_start)), color=colors["sft"], linestyle="--", label="sft (start)")
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
    curve_states = sft_baseline._ranges(report["eval"]["curve_init_state_ids"])
    success_axes.set(xlabel="env steps", ylabel="success rate", ylim=(0.0, 1.0),
                     title=f"{report['env_id']}: held-out init states {curve_states}, greedy")  # fmt: skip
    entropy_axes.set(xlabel="env steps", ylabel="mean token entropy (nats)", title="entropy of the policy on its rollouts")
    for axes in (success_axes, entropy_axes):
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(loc="best", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(report: dict, json_out: str) -> None:
    """The JSON, the Markdown table and the plot, each written to a temporary file and renamed into place, so
    that a kill leaves the previous report whole."""
    base = os.path.splitext(json_out)[0]
    os.makedirs(os.path.dirname(os.path.abspath(json_out)), exist_ok=True)
    table = markdown(report)
    with open(json_out + ".tmp", "w") as file:
        json.dump(report, file, indent=2)
    with open(base + ".md.tmp", "w") as file:
        file.write(table)
    plot(report, base + ".tmp.png")
    for temporary, path in ((json_out + ".tmp", json_out), (base + ".md.tmp", base + ".md"),
                            (base + ".tmp.png", base + ".png")):  # fmt: skip
        os.replace(temporary, path)
    print(table)
    print(f"wrote {json_out}, {base}.md and {base}.png", flush=True)


def build_report(args: Args, suite, task_ids, init_state_ids, curve_runs, instructions, demos: dict, runs: list[dict]) -> dict:
    """Summaries per variant (over the seeds done), deltas to SFT, targets, the runs with their curves and outcomes."""
    seeds = [seed for seed in args.seeds if any(run["seed"] == seed for run in runs)]
    results = {}
    for variant in VARIANTS:
        of_variant = [run for run in runs if run["variant"] == variant and variant in args.variants]
        if of_variant:
            results[variant] = {"description": DESCRIPTIONS[variant], **variant_summary(of_variant, task_ids, instructions)}
    for variant, result in results.items():
        if variant != "sft" and "sft" in results:
            # Against SFT on the same seeds (a report written mid-run may have SFT for a seed whose variants are not
            # all done yet): the same init states and reset seeds on both sides.
            variant_seeds = set(result["overall"]["seeds"])
            sft_runs = [run for run in runs if run["variant"] == "sft" and run["seed"] in variant_seeds]
            if {run["seed"] for run in sft_runs} == variant_seeds:
                result["delta_vs_sft"] = delta_vs(
                    result, variant_summary(sft_runs, task_ids, instructions), task_ids,
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
            summaries = {name: variant_summary(of_name, task_ids, instructions) for name, of_name in pair.items()}
            results[variant][f"delta_vs_{baseline}"] = delta_vs(
                summaries[variant], summaries[baseline], task_ids, pair[variant], pair[baseline]
            )
    done = {(run["variant"], run["seed"]) for run in runs}
    missing = [f"{variant} seed {seed}" for seed in args.seeds for variant in args.variants if (variant, seed) not in done]
    rollout_limit = args.rollout_max_episode_steps or args.max_episode_steps or suite.max_episode_steps
    shares_scene = any(other in task_ids for task_id in task_ids for other, _ in scene_goals(suite.libero_name, task_id))
    sft_setup = f"{args.sft_steps} steps of {args.sft_batch_size} transitions per seed, CompactVLA width {args.hidden_size}"
    if args.sft_checkpoint:
        sft_setup = f"the checkpoint {args.sft_checkpoint} for every seed"
    return {
        "benchmark": BENCHMARK,
        "command": command_line(dataclasses.replace(args, report_only=False), "benchmarks/sft_vs_grpo.py"),
        "args": dataclasses.asdict(args),
        "env_id": suite.env_id, "obs_mode": args.obs_mode, "image_size": args.image_size,
        "object_state": args.object_state, "task_ids": list(task_ids), "seeds": seeds,
        "demos": demos,
        "eval": {
            "init_state_ids": list(init_state_ids), "curve_init_state_ids": sorted({init for _, init, _ in curve_runs}),
            "max_episode_steps": args.max_episode_steps or suite.max_episode_steps, "deterministic": True,
            "held_out": demos["held_out"], "held_out_note": demos["held_out_note"],
        },
        "setup": {
            "sft": sft_setup, "total_timesteps": args.total_timesteps, "num_groups": args.num_groups,
            "group_size": args.group_size, "train_init_state_ids": list(range(args.demo_init_state_end)),
            "rollout_max_episode_steps": rollout_limit, "rollout_num_envs": args.rollout_num_envs,
            "eval_num_envs": sft_baseline.eval_num_envs(args), "curve_every": args.curve_every,
            "relabel_note": "some tasks share a scene: relabelling can happen" if shares_scene else
            "no two of these tasks share a scene, so no relabelling can happen: (c) is (b) + group rescue",
        },
        "complete": not missing, "missing_runs": missing,
        "results": results,
        "targets": check_targets(results),
        "runs": build_report_runs(runs),
        "machine": machine_info(args.torch_threads),
    }  # fmt: skip


def build_report_runs(runs: list[dict]) -> list[dict]:
    """The runs as the report keeps them: each episode row reduced to its outcome (task, init state, success, steps)."""
    return [
        {
            **{key: value for key, value in run.items() if key != "rows"},
            "outcomes": [[row["task_id"], row["init_state_id"], int(row["success"]), row["steps"]] for row in run["rows"]],
        }
        for run in runs
    ]


# ---------------------------------------------------------------------------------------------- main
def main(args: Args) -> dict:
    torch.set_num_threads(args.torch_threads)
    suite, task_ids, init_state_ids = check_args(args)
    short_name = suite.libero_name.removeprefix("libero_")
    demos_path = args.demos or (
        f"data/{short_name}_state.hdf5" if args.obs_mode == "state" else f"data/{short_name}_rgb{args.image_size}.hdf5"
    )
    output_dir = args.output_dir or os.path.join("runs", "sft_vs_grpo", short_name)
    json_out = args.json_out or os.path.join("benchmarks", "results", f"sft_vs_grpo_{short_name}.json")
    os.makedirs(output_dir, exist_ok=True)
    instructions = {task.task_id: task.instruction for task in suites.suite_tasks(suite.libero_name)}
    max_episode_steps = args.max_episode_steps or suite.max_episode_steps

    if args.report_only and not os.path.exists(demos_path):
        raise ValueError(f"report_only: no demos at {demos_path}, so no run can have finished: run without it first")
    # 1. Demos (generated when missing), shared by SFT, the offline terms, the rescues and iRe-VLA's SL stages.
    start = time.perf_counter()
    episodes, generated = sft_baseline.prepare_demos(baseline_args(args, args.seeds[0]), suite, task_ids, demos_path)
    held_out, note = sft_baseline.held_out_note(episodes, task_ids, init_state_ids)
    if not held_out:
        print(f"{'=' * 100}\nWARNING: the evaluation is {note.replace('not held out', 'NOT HELD OUT', 1)}\n{'=' * 100}",
              file=sys.stderr, flush=True)  # fmt: skip
        warnings.warn(f"evaluation {note}: success there overstates generalization to new init states", stacklevel=2)
    demos = {
        "path": demos_path, "generated_this_run": generated, "seconds": time.perf_counter() - start,
        "num_demos": len(episodes), "num_transitions": int(sum(len(episode) for episode in episodes)),
        "held_out": held_out, "held_out_note": note,
    }  # fmt: skip

    runs: list[dict] = []
    report: dict = {}
    previous = previous_runs(args, demos)
    tuned = [variant for variant in FINE_TUNED if variant in args.variants]
    for seed in args.seeds:
        eval_runs = [(task_id, init_state_id, seed) for task_id in task_ids for init_state_id in init_state_ids]
        curve_runs = [(task_id, init_state_id, seed) for task_id, init_state_id, _ in eval_runs
                      if init_state_id < init_state_ids[0] + args.curve_num_init_states]  # fmt: skip
        sft_dir = os.path.join(output_dir, f"sft_seed{seed}")
        sft_runs = eval_runs if "sft" in args.variants else curve_runs
        run_dirs = {variant: os.path.join(output_dir, f"{variant}_seed{seed}") for variant in tuned}
        sft_reused = reusable(previous, "sft", seed, os.path.join(sft_dir, "episodes.jsonl"), sft_runs)
        tuned_reused = {variant: reusable(previous, variant, seed, run_dirs[variant], eval_runs) for variant in tuned}

        # 2. SFT of this seed, evaluated (on the curve subset at least: it is every learning curve's start).
        if args.report_only or (sft_reused is not None and None not in tuned_reused.values()):
            sft = finished_sft(args, seed, output_dir)  # nothing to train: only its weights' fingerprint is wanted
        else:
            sft = prepare_sft(args, seed, episodes, list(instructions.values()), output_dir)
        fingerprint = None if sft is None else sft_baseline.checkpoint_fingerprint(sft["path"])
        if sft_reused is not None:
            check_same_sft(sft_reused, fingerprint, sft and sft["path"])
            sft_run = sft_reused
        else:
            if args.report_only:
                rows = None if sft is None else recorded_evaluation(sft["path"], sft_runs, max_episode_steps, sft_dir)
                if rows is None:
                    print(f"sft seed {seed}: not trained or not evaluated: seed {seed} left out of the report", flush=True)
                    continue
                run_now = 0
            else:
                rows, run_now = evaluate_checkpoint(
                    sft["path"], sft["steps"], suite.env_id, sft_runs, max_episode_steps, sft_dir, args
                )
            sft_run = {
                "variant": "sft", "seed": seed, "checkpoint": sft["path"], "steps": sft["steps"],
                "steps_this_run": sft["steps_this_run"], "rows": rows, "episodes_this_run": run_now,
                "success_rate": float(np.mean([row["success"] for row in rows])),
                "train_seconds": sft["seconds"], "eval_seconds": float(sum(row["seconds"] for row in rows)),
                "sft_fingerprint": fingerprint,
            }  # fmt: skip
        runs.append(sft_run)
        sft_curve_rate = success_on(sft_run["rows"], curve_runs)

        # 3. Each fine-tuning variant from that SFT checkpoint, on the same budget; 4. its evaluation.
        for variant in tuned:
            run_dir = run_dirs[variant]
            if tuned_reused[variant] is not None:
                check_same_sft(tuned_reused[variant], fingerprint, sft and sft["path"])
                runs.append(tuned_reused[variant])
                continue
            if args.report_only:
                trained = finished_training(run_dir, args.total_timesteps)
                rows = None if trained is None else recorded_evaluation(
                    trained["checkpoint"], eval_runs, max_episode_steps, run_dir
                )  # fmt: skip
                if rows is None:
                    print(f"{variant} seed {seed}: not trained or not evaluated: left out of the report", flush=True)
                    continue
                run_now = 0
            else:
                trained = fine_tune(variant, args, seed, sft, episodes, run_dir, suite, task_ids, curve_runs,
                                    max_episode_steps)  # fmt: skip
                rows, run_now = evaluate_checkpoint(
                    trained["checkpoint"], trained["steps"], suite.env_id, eval_runs, max_episode_steps, run_dir, args
                )
            runs.append({**run_record(variant, seed, trained, rows, run_now, curve_runs, sft_curve_rate),
                         "sft_fingerprint": fingerprint})  # fmt: skip

            # 5. The report over the runs done so far, rewritten after each (a long run shows results early).
            if not args.report_only:
                report = build_report(args, suite, task_ids, init_state_ids, curve_runs, instructions, demos, runs)
                write_report(report, json_out)
    if not runs:  # report_only (training adds an SFT run per seed)
        where = " or ".join([output_dir, *args.previous_reports])
        raise ValueError(f"report_only: no finished run of seeds {list(args.seeds)} in {where}: nothing to report")
    if args.report_only or len(report.get("runs", ())) != len(runs):  # runs reused (or SFT alone) since the last
        report = build_report(args, suite, task_ids, init_state_ids, curve_runs, instructions, demos, runs)
        write_report(report, json_out)
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
