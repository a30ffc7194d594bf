"""SFT baseline (issue #5): behaviour cloning on scripted-expert demos, then per-task success on held-out init states.

One command gives the numbers. It generates the demos with the scripted expert if the demo file is missing, trains
a :class:`CompactVLA` with :class:`gym_libero_vla.algos.sft.SFT` (or continues a checkpoint), rolls the policy out
deterministically (greedy action tokens) once per (task, init state, seed), and writes a per-task success table
with Wilson 95% confidence intervals, the SFT and evaluation wall times and what machine they were measured on.

    # LIBERO-Spatial in state mode (proprio + privileged object poses), 20 held-out init states per task
    python benchmarks/sft_baseline.py --object-state
    # the same for one task in rgb mode (agentview frames, 64 px)
    python benchmarks/sft_baseline.py --obs-mode rgb+state --task-ids 0 --sft-steps 3000

Every stage resumes after a kill, so running the same command again only does what is left and rewrites the
report: demo generation from its ``<demos>.parts/`` sidecar (:func:`gym_libero_vla.demos.generate.prepare_demos`);
SFT from ``<output-dir>/sft``, saved every ``--save-every`` steps (``SFT.save`` is atomic); evaluation from
``<output-dir>/episodes.jsonl`` (:func:`gym_libero_vla.evaluate.evaluate_policy` with ``episodes_path``), one line
per finished episode, reused when it was run with the same weights and step limit. Writes
``benchmarks/results/sft_baseline_<suite>_<mode>.json`` and
the Markdown table next to it (``.md``); TensorBoard runs go to ``<output-dir>/tb``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import warnings
from typing import Annotated, Literal

import numpy as np
import torch
import tyro
from reporting import (
    command_line,
    demo_files_text,
    held_out_note,
    id_ranges,
    machine_info,
    machine_text,
    policy_cameras,
    success_summary,
    write_report_files,
)

import gym_libero_vla  # noqa: F401  (registers the env ids)
from gym_libero_vla import suites
from gym_libero_vla.algos import SFT, SFTConfig
from gym_libero_vla.algos.sft import continue_sft, demo_fit
from gym_libero_vla.demos.generate import DemoConfig, GenerateArgs, default_demo_path
from gym_libero_vla.evaluate import CAMERA_KEYS, EvalRange, check_reflections, evaluate_policy
from gym_libero_vla.policies import CompactVLA, CompactVLAConfig, ThreadConfig, VLAPolicy, resolve_device, torch_threads
from gym_libero_vla.policies.base import weights_fingerprint
from gym_libero_vla.run_lock import exclusive

OBS_MODES = ("state", "rgb+state")


@dataclasses.dataclass
class Args:
    suite: str = "spatial"
    """LIBERO suite: short name (spatial, object, goal, 10, 90), LIBERO name or env id."""
    obs_mode: Literal["state", "rgb+state"] = "state"
    """"state": proprio (+ object poses with --object-state); "rgb+state": camera frames too (--policy.cameras)."""
    image_size: int = 64
    """Side of the agentview frames (rgb+state only); the demos' frames must have it."""
    object_state: bool = False
    """Also give the policy LIBERO's privileged object poses (demos generated with them, env privileged_state)."""
    task_ids: tuple[int, ...] | None = None
    """Tasks to train on and evaluate (default: every task of the suite)."""
    demo: Annotated[DemoConfig, tyro.conf.OmitArgPrefixes] = dataclasses.field(default_factory=DemoConfig)
    """The demos: --demos (default data/<suite>_state.hdf5, or data/<suite>_rgb<image_size>.hdf5 in rgb+state mode;
    shared with sft_vs_grpo.py), --extra-demos, and how a missing file is generated."""
    sft_steps: int = 15000
    """Total SFT gradient steps of the checkpoint; a checkpoint with fewer is continued, one with as many is kept."""
    sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)
    """SFT's settings (its seed is --seed unless given; its step size also applies when continuing a checkpoint)."""
    policy: CompactVLAConfig = dataclasses.field(default_factory=lambda: CompactVLAConfig(cameras=()))
    """The fresh CompactVLA's sizes; in rgb+state mode it reads --policy.cameras (default agentview only; OpenVLA-OFT
    reads agentview and wrist), in state mode none. Frame and object-state sizes come from the demos."""
    init_from: str | None = None
    """Start from this SFT checkpoint directory (copied to <output-dir>/sft; its step counter and wall time continue)
    instead of a fresh CompactVLA. Ignored once <output-dir>/sft exists."""
    save_every: int = 1000
    """Save the SFT checkpoint every this many steps, so that a kill loses at most that many."""
    keep_checkpoints: tuple[int, ...] = ()
    """Also keep the checkpoint at these SFT steps, as <output-dir>/sft_step<N> (later saves replace sft/ only), to
    evaluate a long run at its intermediate steps afterwards (python -m gym_libero_vla.evaluate <dir>)."""
    seed: int = 0
    """Seed of demo generation, of the fresh policy's weights and of the SFT batch order."""
    eval: Annotated[EvalRange, tyro.conf.OmitArgPrefixes] = dataclasses.field(
        default_factory=lambda: EvalRange(eval_num_init_states=20)
    )
    """The held-out starts of every task: --eval-init-state-start, --eval-num-init-states."""
    seeds: tuple[int, ...] = (0,)
    """Evaluation reset seeds; each (task, init state) is run once per seed."""
    max_episode_steps: int | None = None
    """Step limit per evaluation episode (default: the suite's, OpenVLA's evaluation limits)."""
    output_dir: str | None = None
    """SFT checkpoint (sft/), TensorBoard runs (tb/) and episodes.jsonl (default runs/sft_baseline/<suite>_<mode>)."""
    json_out: str | None = None
    """Report JSON; the Markdown table goes next to it as .md (default benchmarks/results/sft_baseline_<suite>_<mode>.json)."""
    device: str = "cpu"
    """Torch device of the policy for SFT and evaluation: cpu, cuda, cuda:<index>, mps or auto."""
    eval_num_envs: int | None = None
    """Evaluation envs run side by side in this process, the policy acting on all of them in one batched call;
    1 runs the episodes one after another. The outcomes do not depend on it. Default: 8 in state mode (~0.3 GB
    each), 2 in rgb+state mode (~1 GB each with a renderer, and rendering dominates the step anyway)."""
    eval_vectorization_mode: Literal["sync", "async"] = "async"
    """"async": each evaluation env in a worker process (gym.make_vec), all stepping at once (both cores busy);
    "sync": all in this process. The outcomes do not depend on it."""
    demo_workers: int = 2
    """Processes generating the demos when the demo file is missing (one per core)."""
    threads: Annotated[ThreadConfig, tyro.conf.OmitArgPrefixes] = dataclasses.field(default_factory=ThreadConfig)
    """--sft-torch-threads for SFT (default: every core), --torch-threads while simulators run."""
    progress: bool = True
    """Show progress bars (demo generation, SFT, evaluation)."""


# ---------------------------------------------------------------------------------------------- input checks
def check_args(args: Args) -> tuple[suites.SuiteSpec, tuple[int, ...], tuple[int, ...]]:
    """Fail before any work on input that cannot run; returns (suite, task_ids, eval init state ids)."""
    suite = suites.resolve_suite(args.suite)  # names the valid suites
    resolve_device(args.device)  # names the devices this machine has
    if args.obs_mode not in OBS_MODES:
        raise ValueError(f"unknown obs_mode {args.obs_mode!r}: valid {OBS_MODES}")
    for name in ("image_size", "sft_steps", "save_every"):
        value = getattr(args, name)
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} {value!r} must be an int >= 1")
    for step in args.keep_checkpoints:
        if not (isinstance(step, int) and 1 <= step <= args.sft_steps):
            raise ValueError(f"keep_checkpoints step {step!r} must be an int in 1..sft_steps ({args.sft_steps})")
    if not args.seeds:
        raise ValueError("seeds is empty: give at least one evaluation seed")
    if args.init_from is not None and not os.path.isfile(os.path.join(args.init_from, SFT.config_filename)):
        raise ValueError(f"init_from {args.init_from!r} is not an SFT checkpoint directory (no {SFT.config_filename} in it)")
    task_ids = suites.resolve_task_ids(suite.env_id, args.task_ids)
    init_state_ids = args.eval.init_state_ids(suite.env_id, task_ids)
    return suite, task_ids, init_state_ids


def check_policy_inputs(policy: VLAPolicy, args: Args, source: str) -> None:
    """A checkpoint must read what ``args`` trains on: same cameras and image size, object_state or not."""
    keys = tuple(policy.observation_keys)
    cameras = tuple(key for key in keys if key in CAMERA_KEYS)
    wanted = policy_cameras(args.obs_mode, args.policy.cameras)
    if cameras != wanted:
        raise ValueError(f"{source} reads cameras {cameras}, but --obs-mode {args.obs_mode} means {wanted}")
    image_size = getattr(getattr(policy, "config", None), "image_size", args.image_size)
    if cameras and image_size != args.image_size:
        raise ValueError(f"{source} reads {image_size} px frames: pass --image-size {image_size}")
    check_reflections(policy, args.policy.reflections, source)
    if ("object_state" in keys) != args.object_state:
        fix = "add --object-state" if "object_state" in keys else "drop --object-state"
        raise ValueError(f"{source} {'reads' if 'object_state' in keys else 'does not read'} object_state: {fix}")


def demo_args(args: Args, task_ids) -> GenerateArgs:
    """The demo file of this run and how to generate it when it is missing."""
    return args.demo.generate_args(
        default_demo_path(args.suite, args.obs_mode, args.image_size, args.policy.reflections), suite=args.suite,
        task_ids=task_ids, obs_mode=args.obs_mode, image_size=args.image_size, reflections=args.policy.reflections,
        object_state=args.object_state, seed=args.seed,
        progress=args.progress, workers=args.demo_workers,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- SFT
def train_sft(args: Args, episodes, instructions: list[str], path: str, tb_dir: str) -> tuple[SFT, int]:
    """The SFT learner of ``path`` continued to ``args.sft_steps`` (started from a copy of ``--init-from``, or a fresh
    CompactVLA), saved every ``save_every`` steps; returns it and the steps this run took."""
    device = resolve_device(args.device)
    sft_config = dataclasses.replace(args.sft, seed=args.seed if args.sft.seed is None else args.sft.seed)
    if args.init_from is not None and not os.path.exists(path):
        print(f"starting from a copy of {args.init_from}")
        shutil.rmtree(path + ".tmp", ignore_errors=True)
        shutil.copytree(args.init_from, path + ".tmp")
        os.replace(path + ".tmp", path)
    elif args.init_from is not None:
        print(f"{path} exists: continuing it (--init-from {args.init_from} is only used to start it)")

    def create() -> SFT:
        torch.manual_seed(args.seed)
        config = dataclasses.replace(args.policy, cameras=policy_cameras(args.obs_mode, args.policy.cameras))
        policy = CompactVLA.from_demos(episodes, config, instructions=instructions, object_state=args.object_state)
        return SFT(policy, demos=episodes, tensorboard_log=tb_dir, device=device, **dataclasses.asdict(sft_config))

    model, steps = continue_sft(path, create, args.sft_steps, args.save_every, args.progress, args.keep_checkpoints,
                                demos=episodes, device=device, tensorboard_log=tb_dir,
                                learning_rate=sft_config.learning_rate)  # fmt: skip
    check_policy_inputs(model.policy, args, f"checkpoint {path}")
    return model, steps


# ---------------------------------------------------------------------------------------------- report
def markdown(report: dict) -> str:
    """The report as a Markdown table with its context lines."""
    evaluation, sft, demos, machine = report["eval"], report["sft"], report["demos"], report["machine"]
    inputs = report["obs_mode"] + (" + object_state" if report["object_state"] else "")
    lines = [
        f"## SFT baseline: {report['env_id']}, {inputs}",
        "",
        "| task | instruction | demos | successes | success rate | 95% CI | s/episode |",
        "|---:|:---|---:|---:|---:|:---:|---:|",
    ]
    demo_counts = {task: len(ids) for task, ids in demos["init_state_ids"].items()}
    rows = [(task_id, entry["instruction"], entry) for task_id, entry in report["per_task"].items()]
    for task_id, instruction, entry in [*rows, ("all", "", report["overall"])]:
        low, high = entry["ci95"]
        count = demos["num_demos"] if task_id == "all" else demo_counts.get(str(task_id), "")
        lines.append(
            f"| {task_id} | {instruction} | {count} | {entry['successes']}/{entry['episodes']} | "
            f"{entry['success_rate']:.2f} | {low:.2f}-{high:.2f} | {entry['mean_episode_seconds']:.1f} |"
        )
    held_out = evaluation["held_out_note"]
    if not evaluation["held_out"]:
        held_out = "**" + held_out.replace("not held out", "NOT HELD OUT", 1) + "**"
    wall = f"{sft['seconds']:.1f} s wall ({sft['seconds_per_step']:.3f} s/step)" if sft["seconds"] else "wall time unknown"
    lines += [
        "",
        f"- evaluation: init states {id_ranges(evaluation['init_state_ids'])} per task, "
        f"seeds {id_ranges(evaluation['seeds'])}, "
        f"greedy actions, at most {evaluation['max_episode_steps']} steps; {held_out}",
        f"- demos: {demo_files_text(demos)}, {demos['num_demos']} demos ({demos['num_transitions']} transitions)",
        f"- SFT: {sft['steps']} steps of {sft['batch_size']} transitions, {wall}; "
        f"fit on the demos: loss {sft['demo_fit']['loss']:.3f}, token accuracy {sft['demo_fit']['token_accuracy']:.3f}",
        f"- evaluation wall time: {evaluation['seconds']:.1f} s ({evaluation['episodes']} episodes)",
        f"- machine: {machine_text(machine)}",
        f"- command: `{report['command']}`",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main
def main(args: Args) -> dict:
    args.threads.apply()
    suite, task_ids, init_state_ids = check_args(args)
    short_name = suite.libero_name.removeprefix("libero_")
    mode = "state" if args.obs_mode == "state" else "rgb"
    output_dir = args.output_dir or os.path.join("runs", "sft_baseline", f"{short_name}_{mode}")
    json_out = args.json_out or os.path.join("benchmarks", "results", f"sft_baseline_{short_name}_{mode}.json")
    instructions = {task.task_id: task.instruction for task in suites.suite_tasks(suite.libero_name)}

    # 1. Demos (generated when missing) and whether the evaluation init states are held out from them.
    generate = demo_args(args, task_ids)
    episodes, generated = args.demo.load(generate)
    os.makedirs(output_dir, exist_ok=True)
    held_out, note = held_out_note(episodes, task_ids, init_state_ids)
    if not held_out:
        banner = "=" * 100
        loud = note.replace("not held out", "NOT HELD OUT", 1)
        print(f"{banner}\nWARNING: the evaluation is {loud}\n{banner}", file=sys.stderr, flush=True)
        warnings.warn(f"evaluation {note}: success there overstates generalization to new init states", stacklevel=2)

    # 2. SFT, continued from <output_dir>/sft (or --init-from) up to sft_steps.
    checkpoint_path = os.path.join(output_dir, "sft")
    with exclusive(checkpoint_path + ".lock", f"SFT {checkpoint_path}"), torch_threads(args.threads.sft_torch_threads):
        model, steps_this_run = train_sft(
            args, episodes, list(instructions.values()), checkpoint_path, os.path.join(output_dir, "tb")
        )
    fit = demo_fit(model.policy, model.demos)

    # 3. Evaluation: one deterministic episode per (task, init state, seed), resumable.
    evaluation = evaluate_policy(
        model.policy, suite.env_id, task_ids, init_state_ids, seeds=args.seeds, max_episode_steps=args.max_episode_steps,
        progress=args.progress, num_envs=args.eval_num_envs or (8 if args.obs_mode == "state" else 2),
        episodes_path=os.path.join(output_dir, "episodes.jsonl"), vectorization_mode=args.eval_vectorization_mode,
    )  # fmt: skip
    rows = evaluation["episodes"]

    # 4. Report.
    report = {
        "benchmark": "SFT baseline (issue #5)",
        "command": command_line(args, "benchmarks/sft_baseline.py"),
        "args": dataclasses.asdict(args),
        "env_id": suite.env_id,
        "obs_mode": args.obs_mode,
        "object_state": args.object_state,
        "image_size": args.image_size if args.obs_mode == "rgb+state" else None,
        "demos": {
            **args.demo.summary(generate, episodes, generated),
            "init_state_ids": {
                str(task_id): sorted(episode.init_state_id for episode in episodes if episode.task_id == task_id)
                for task_id in task_ids
            },
        },
        "sft": {
            "checkpoint": checkpoint_path,
            "steps": model.num_timesteps,
            "batch_size": model.config.batch_size,
            "learning_rate": model.config.learning_rate,
            "seconds": model.train_seconds,
            "seconds_per_step": model.train_seconds / model.num_timesteps,
            "init_from": args.init_from,
            "steps_this_run": steps_this_run,
            "last_logged_metrics": model.last_metrics or None,
            "demo_fit": fit,
        },
        "eval": {
            "task_ids": list(task_ids),
            "init_state_ids": list(init_state_ids),
            "seeds": list(args.seeds),
            "max_episode_steps": evaluation["max_episode_steps"],
            "deterministic": True,
            "held_out": held_out,
            "held_out_note": note,
            "checkpoint_steps": model.num_timesteps,
            "checkpoint_sha": weights_fingerprint(model.policy),
            "episodes": len(rows),
            "episodes_this_run": evaluation["run_now"],
            "seconds": float(sum(row["seconds"] for row in rows)),
            "wall_seconds_this_run": evaluation["seconds"],
        },
        "per_task": {
            str(task_id): {
                "instruction": instructions[task_id],
                **success_summary([row for row in rows if row["task_id"] == task_id]),
            }
            for task_id in task_ids
        },
        "overall": success_summary(rows),
        "machine": machine_info(args.threads.torch_threads, args.threads.sft_threads),
        "episodes": rows,
    }
    report["overall"]["mean_of_task_rates"] = float(np.mean([entry["success_rate"] for entry in report["per_task"].values()]))
    table = markdown(report)
    print(table)
    write_report_files(report, table, json_out)
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
