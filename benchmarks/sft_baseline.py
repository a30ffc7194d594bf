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
report: demo generation from its ``<demos>.parts/`` sidecar; SFT from ``<output-dir>/sft``, saved every
``--save-every`` steps (to a temporary directory, then renamed into place); evaluation from
``<output-dir>/episodes.jsonl``, one line per finished episode, reused when it was run with the same checkpoint
(same weights and step count) and step limit. Writes ``benchmarks/results/sft_baseline_<suite>_<mode>.json`` and
the Markdown table next to it (``.md``); TensorBoard runs go to ``<output-dir>/tb``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from typing import Literal

import numpy as np
import torch
import tyro
from reporting import command_line, machine_info  # benchmarks/reporting.py
from stable_baselines3.common.callbacks import BaseCallback

import gym_libero_vla  # noqa: F401  (registers the env ids)
from gym_libero_vla import suites
from gym_libero_vla.algos.sft import SFT, Transitions
from gym_libero_vla.demos import Episode, action_stats, load_episodes
from gym_libero_vla.demos.generate import PARTS_SUFFIX, GenerateArgs, generate
from gym_libero_vla.evaluate import (
    CAMERA_KEYS,
    env_kwargs_for_policy,
    make_eval_envs,
    run_episodes_batched,
    wilson_interval,
)
from gym_libero_vla.policies import (
    CompactVLA,
    CompactVLAConfig,
    VLAPolicy,
    WordTokenizer,
    load_policy,
    resolve_device,
)
from gym_libero_vla.run_lock import exclusive
from gym_libero_vla.wrappers.action_tokenizer import ActionBins

OBS_MODES = ("state", "rgb+state")
TRAIN_RECORD = "sft_baseline.json"
"""Written into the SFT checkpoint next to ``sft.json``: the wall seconds its steps took, so they survive resumes."""


@dataclasses.dataclass
class Args:
    suite: str = "spatial"
    """LIBERO suite: short name (spatial, object, goal, 10, 90), LIBERO name or env id."""
    obs_mode: Literal["state", "rgb+state"] = "state"
    """"state": proprio (+ object poses with --object-state); "rgb+state": agentview frames too."""
    image_size: int = 64
    """Side of the agentview frames (rgb+state only); the demos' frames must have it."""
    object_state: bool = False
    """Also give the policy LIBERO's privileged object poses (demos generated with them, env privileged_state)."""
    task_ids: tuple[int, ...] | None = None
    """Tasks to train on and evaluate (default: every task of the suite)."""
    demos: str | None = None
    """Demo HDF5 file (default data/<suite>_state.hdf5, or data/<suite>_rgb<image_size>.hdf5 in rgb+state mode).
    Used as it is when it exists; otherwise generated with the scripted expert (resuming <demos>.parts/)."""
    episodes_per_task: int = 20
    """Successful demos per task to generate (only when the demo file is missing)."""
    demo_init_state_end: int = 20
    """Generate demos from init states 0 .. demo_init_state_end - 1 (only when the demo file is missing)."""
    filter_noops: bool = True
    """Drop no-op steps from the demos, as OpenVLA's processed LIBERO data."""
    sft_steps: int = 15000
    """Total SFT gradient steps of the checkpoint; a checkpoint with fewer is continued, one with as many is kept."""
    batch_size: int = 64
    """Transitions per gradient step."""
    learning_rate: float = 3e-4
    """AdamW step size (also applied when continuing a checkpoint)."""
    hidden_size: int = 128
    """CompactVLA transformer width (fresh policy only)."""
    num_layers: int = 2
    """CompactVLA transformer blocks (fresh policy only)."""
    num_heads: int = 4
    """CompactVLA attention heads (fresh policy only)."""
    init_from: str | None = None
    """Start from this SFT checkpoint directory (copied to <output-dir>/sft; its step counter continues) instead of
    a fresh CompactVLA. Ignored once <output-dir>/sft exists."""
    init_from_seconds: float | None = None
    """Wall seconds the init_from checkpoint took to train, for the report (read from the checkpoint when this
    script made it; otherwise its steps are reported as untimed)."""
    save_every: int = 1000
    """Save the SFT checkpoint every this many steps, so that a kill loses at most that many."""
    seed: int = 0
    """Seed of demo generation, of the fresh policy's weights and of the SFT batch order."""
    eval_init_state_start: int = 20
    """First evaluation init state; demos from init states 0..19 leave 20.. held out."""
    eval_num_init_states: int = 20
    """Evaluation init states per task: eval_init_state_start .. + eval_num_init_states - 1."""
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
    torch_threads: int = 1
    """Torch CPU threads; more than the free cores slows small models down a lot."""
    progress: bool = True
    """Show progress bars (demo generation, SFT, evaluation)."""


# ---------------------------------------------------------------------------------------------- input checks
def check_args(args: Args) -> tuple[suites.SuiteSpec, tuple[int, ...], tuple[int, ...]]:
    """Fail before any work on input that cannot run; returns (suite, task_ids, eval init state ids)."""
    suite = suites.resolve_suite(args.suite)  # names the valid suites
    resolve_device(args.device)  # names the devices this machine has
    if args.obs_mode not in OBS_MODES:
        raise ValueError(f"unknown obs_mode {args.obs_mode!r}: valid {OBS_MODES}")
    for name in ("image_size", "episodes_per_task", "demo_init_state_end", "sft_steps", "batch_size", "save_every"):
        value = getattr(args, name)
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} {value!r} must be an int >= 1")
    if args.eval_num_init_states < 1 or args.eval_init_state_start < 0:
        raise ValueError(
            f"eval_init_state_start {args.eval_init_state_start} / eval_num_init_states {args.eval_num_init_states}: "
            "need >= 0 / >= 1"
        )
    if not args.seeds:
        raise ValueError("seeds is empty: give at least one evaluation seed")
    if args.eval_num_envs is not None and not (isinstance(args.eval_num_envs, int) and args.eval_num_envs >= 1):
        raise ValueError(f"eval_num_envs {args.eval_num_envs!r} must be an int >= 1 (or left out for the default)")
    if args.max_episode_steps is not None and args.max_episode_steps < 1:
        raise ValueError(f"max_episode_steps {args.max_episode_steps} must be >= 1")
    if args.init_from is not None and not os.path.isfile(os.path.join(args.init_from, "sft.json")):
        raise ValueError(f"init_from {args.init_from!r} is not an SFT checkpoint directory (no sft.json in it)")
    tasks = suites.suite_tasks(suite.libero_name)
    task_ids = tuple(range(len(tasks))) if args.task_ids is None else tuple(args.task_ids)
    if not task_ids:
        raise ValueError("task_ids is empty: give at least one task (or leave it out for every task)")
    for task_id in task_ids:
        if not 0 <= task_id < len(tasks):
            raise ValueError(f"unknown task_id {task_id} for {suite.env_id}: valid 0..{len(tasks) - 1}")
    init_state_ids = tuple(range(args.eval_init_state_start, args.eval_init_state_start + args.eval_num_init_states))
    for task_id in task_ids:
        num_init_states = suites.task_init_states(suite.libero_name, task_id).shape[0]
        if init_state_ids[-1] >= num_init_states:
            raise ValueError(
                f"unknown init_state_id {init_state_ids[-1]} for task {task_id} of {suite.env_id}: "
                f"valid 0..{num_init_states - 1}"
            )
    return suite, task_ids, init_state_ids


def eval_num_envs(args) -> int:
    """``args.eval_num_envs``, or its default for ``args.obs_mode``: 8 in state mode, 2 in rgb+state mode."""
    if args.eval_num_envs is not None:
        return args.eval_num_envs
    return 8 if args.obs_mode == "state" else 2


def check_policy_inputs(policy: VLAPolicy, args: Args, source: str) -> None:
    """A checkpoint must read what ``args`` trains on: same cameras and image size, object_state or not."""
    keys = tuple(policy.observation_keys)
    cameras = tuple(key for key in keys if key in CAMERA_KEYS)
    wanted = ("agentview",) if args.obs_mode == "rgb+state" else ()
    if cameras != wanted:
        raise ValueError(f"{source} reads cameras {cameras}, but --obs-mode {args.obs_mode} means {wanted}")
    image_size = getattr(getattr(policy, "config", None), "image_size", args.image_size)
    if cameras and image_size != args.image_size:
        raise ValueError(f"{source} reads {image_size} px frames: pass --image-size {image_size}")
    if ("object_state" in keys) != args.object_state:
        fix = "add --object-state" if "object_state" in keys else "drop --object-state"
        raise ValueError(f"{source} {'reads' if 'object_state' in keys else 'does not read'} object_state: {fix}")


# ---------------------------------------------------------------------------------------------- demos
def prepare_demos(args: Args, suite: suites.SuiteSpec, task_ids: tuple[int, ...], path: str) -> tuple[list[Episode], bool]:
    """The successful demos of ``task_ids`` in ``path``, generated first if the file is missing (one process
    generates; another wanting the same file waits for it and loads the result)."""
    with exclusive(path + ".lock", f"demos {path}"):
        generated = not os.path.exists(path)
        if generated:
            resuming = " (resuming " + path + PARTS_SUFFIX + ")" if os.path.isdir(path + PARTS_SUFFIX) else ""
            print(f"{path} not found: generating it with the scripted expert{resuming}", flush=True)
            counts = generate(
                GenerateArgs(
                    suite=suite.libero_name, out=path, episodes_per_task=args.episodes_per_task, task_ids=task_ids,
                    init_state_start=0, init_state_end=args.demo_init_state_end, obs_mode=args.obs_mode,
                    image_size=args.image_size, object_state=args.object_state, seed=args.seed, progress=args.progress,
                )
            )  # fmt: skip
            print(f"demos: {counts}")
    episodes = load_episodes(path, filter_noops=args.filter_noops, load_images=args.obs_mode == "rgb+state")
    present = sorted({episode.task_id for episode in episodes})
    missing = [task_id for task_id in task_ids if task_id not in present]
    if missing:
        raise ValueError(
            f"{path} has no successful demos of task(s) {missing}: it has tasks {present}. Give another --demos, "
            "or move the file away to have it generated"
        )
    episodes = [episode for episode in episodes if episode.task_id in task_ids]
    observations = episodes[0].observations
    if args.object_state and "object_state" not in observations:
        raise ValueError(
            f"{path} has no obs/object_state, which --object-state trains on: give demos generated with --object-state "
            "(move this file away to have them generated) or drop --object-state"
        )
    if args.obs_mode == "rgb+state":
        if "agentview" not in observations:
            raise ValueError(f"{path} has no agentview frames: rgb+state needs demos generated with --obs-mode rgb+state")
        if observations["agentview"].shape[1] != args.image_size:
            raise ValueError(
                f"{path} holds {observations['agentview'].shape[1]} px frames: pass --image-size "
                f"{observations['agentview'].shape[1]} or give demos of {args.image_size} px"
            )
    return episodes, generated


def held_out_note(episodes: list[Episode], task_ids, init_state_ids) -> tuple[bool, str]:
    """Whether no evaluation init state of a task is one its demos started from; a note saying so."""
    overlaps = {}
    for task_id in task_ids:
        demo_init_states = {episode.init_state_id for episode in episodes if episode.task_id == task_id}
        if -1 in demo_init_states:
            return False, "not held out? the demos do not record their init states"
        common = sorted(demo_init_states & set(init_state_ids))
        if common:
            overlaps[task_id] = common
    if not overlaps:
        return True, "held out: no evaluation init state is one a demo started from"
    details = "; ".join(f"task {task_id}: {_ranges(ids)}" for task_id, ids in overlaps.items())
    return False, f"not held out: evaluation init states that demos started from ({details})"


# ---------------------------------------------------------------------------------------------- SFT
def save_checkpoint(model: SFT, record: dict, path: str) -> None:
    """``model.save`` into ``<path>.tmp``, then swap it for ``path``: a kill leaves a whole checkpoint (see recover)."""
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp)
    with open(os.path.join(tmp, TRAIN_RECORD), "w") as file:
        json.dump(record, file, indent=2)
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, old)  # a directory cannot be renamed over a non-empty one: two renames
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def recover_checkpoint(path: str) -> None:
    """Undo a kill between save_checkpoint's two renames; drop a half-written ``<path>.tmp``."""
    if not os.path.exists(path) and os.path.exists(path + ".old"):
        os.replace(path + ".old", path)
    shutil.rmtree(path + ".tmp", ignore_errors=True)


class SaveEvery(BaseCallback):
    """Save the learner (and its wall-seconds record) every ``save_every`` steps."""

    def __init__(self, path: str, save_every: int, record: dict, start_time: float):
        super().__init__()
        self.path, self.save_every, self.record, self.start_time = path, save_every, record, start_time
        self.seconds_before = record["seconds"]

    def _on_step(self) -> bool:
        if self.model.num_timesteps % self.save_every == 0:
            self.record.update(
                num_timesteps=self.model.num_timesteps,
                seconds=self.seconds_before + time.perf_counter() - self.start_time,
                last_metrics=getattr(self.model, "last_metrics", None),
            )
            save_checkpoint(self.model, self.record, self.path)
        return True


def load_or_create_sft(args: Args, episodes: list[Episode], instructions: list[str], path: str, tb_dir: str):
    """The SFT learner of ``path`` (continued), of a copy of ``args.init_from``, or a fresh CompactVLA; and its record."""
    recover_checkpoint(path)
    if os.path.exists(path) and args.init_from is not None:
        print(f"{path} exists: continuing it (--init-from {args.init_from} is only used to start it)")
    elif args.init_from is not None:
        print(f"starting from a copy of {args.init_from}")
        shutil.rmtree(path + ".tmp", ignore_errors=True)
        shutil.copytree(args.init_from, path + ".tmp")
        os.replace(path + ".tmp", path)
    if os.path.exists(path):
        check_policy_inputs(load_policy(path), args, f"checkpoint {path}")
        model = SFT.load(
            path, demos=episodes, learning_rate=args.learning_rate, batch_size=args.batch_size, tensorboard_log=tb_dir,
            device=resolve_device(args.device),
        )  # fmt: skip
        record_path = os.path.join(path, TRAIN_RECORD)
        if os.path.exists(record_path):
            with open(record_path) as file:
                record = json.load(file)
        else:  # a checkpoint made elsewhere (--init-from): its steps took time we may be told
            timed = args.init_from_seconds is not None
            record = {
                "num_timesteps": model.num_timesteps, "seconds": args.init_from_seconds if timed else 0.0,
                "untimed_steps": 0 if timed else model.num_timesteps, "last_metrics": None, "init_from": args.init_from,
            }  # fmt: skip
        return model, record
    torch.manual_seed(args.seed)
    object_state_dim = episodes[0].observations["object_state"].shape[1] if args.object_state else 0
    config = CompactVLAConfig(
        cameras=("agentview",) if args.obs_mode == "rgb+state" else (), image_size=args.image_size,
        object_state_dim=object_state_dim, hidden_size=args.hidden_size, num_layers=args.num_layers,
        num_heads=args.num_heads,
    )  # fmt: skip
    bins = ActionBins.from_statistics(action_stats(episodes))  # q01..q99 of the demos' actions, as OpenVLA
    policy = CompactVLA(config, bins, WordTokenizer.from_texts(instructions))
    model = SFT(
        policy, demos=episodes, learning_rate=args.learning_rate, batch_size=args.batch_size, seed=args.seed,
        tensorboard_log=tb_dir, device=resolve_device(args.device),
    )  # fmt: skip
    return model, {"num_timesteps": 0, "seconds": 0.0, "untimed_steps": 0, "last_metrics": None, "init_from": None}


def train(model: SFT, record: dict, sft_steps: int, path: str, save_every: int, progress: bool) -> dict:
    """Continue ``model`` to ``sft_steps`` steps, saving every ``save_every``; returns this run's steps and seconds."""
    remaining = sft_steps - model.num_timesteps
    if remaining <= 0:
        print(f"{path} has {model.num_timesteps} SFT steps (>= {sft_steps}): not training")
        return {"steps": 0, "seconds": 0.0}
    print(f"SFT: {model.num_timesteps} -> {sft_steps} steps on {len(model.demos)} transitions", flush=True)
    start = time.perf_counter()
    callback = SaveEvery(path, save_every, record, start)
    seconds_before = record["seconds"]
    model.learn(remaining, callback=callback, reset_num_timesteps=False, progress_bar=progress)
    seconds = time.perf_counter() - start
    record.update(num_timesteps=model.num_timesteps, seconds=seconds_before + seconds, last_metrics=model.last_metrics)
    save_checkpoint(model, record, path)
    print(f"SFT: {remaining} steps in {seconds:.0f} s; last logged {model.last_metrics}")
    return {"steps": remaining, "seconds": seconds}


def demo_fit(policy: VLAPolicy, transitions: Transitions, max_transitions: int = 2048, batch_size: int = 256) -> dict:
    """Teacher-forced loss and token accuracy (SFT's objective) of ``policy`` on evenly spaced demo transitions."""
    indices = np.unique(np.linspace(0, len(transitions) - 1, min(len(transitions), max_transitions)).astype(np.int64))
    bins, loss_sum, correct, count = policy.action_bins, 0.0, 0, 0
    policy.eval()
    with torch.no_grad():
        for chunk in np.array_split(indices, math.ceil(len(indices) / batch_size)):
            obs, actions = transitions.batch(chunk)
            action_tokens = torch.as_tensor(bins.encode(actions), device=policy.device)
            logits = policy.action_logits(obs, action_tokens)
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            loss_sum -= log_probs.gather(-1, action_tokens[..., None]).sum().item()
            correct += (logits.argmax(-1) == action_tokens).sum().item()
            count += action_tokens.numel()
    return {"loss": loss_sum / count, "token_accuracy": correct / count, "transitions": len(indices)}


def checkpoint_fingerprint(path: str) -> str:
    """SHA-256 (16 hex digits) of the policy files of a checkpoint: episodes are reused only for the same weights."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name in ("optimizer.pt", "sft.json", TRAIN_RECORD) or not os.path.isfile(os.path.join(path, name)):
            continue
        digest.update(name.encode())
        with open(os.path.join(path, name), "rb") as file:
            digest.update(file.read())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- evaluation
def read_episodes(path: str) -> list[dict]:
    """The lines of ``episodes.jsonl``; a line cut short by a kill is skipped."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as file:
        for line in file:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def recorded_episodes(episodes_path: str, checkpoint_sha: str, max_episode_steps: int) -> dict[tuple, dict]:
    """The rows of ``episodes_path`` run by the weights of ``checkpoint_sha`` with this step limit, by
    (task, init state, seed)."""
    return {
        (row["task_id"], row["init_state_id"], row["seed"]): row
        for row in read_episodes(episodes_path)
        if row.get("checkpoint_sha") == checkpoint_sha and row.get("max_episode_steps") == max_episode_steps
    }


def evaluate_resumably(
    policy: VLAPolicy, env_id: str, runs: list[tuple[int, int, int]], max_episode_steps: int, episodes_path: str,
    checkpoint: dict, progress: bool, num_envs: int = 1,
) -> tuple[list[dict], int]:  # fmt: skip
    """One deterministic episode per (task, init state, seed) of ``runs``, ``num_envs`` at a time
    (:func:`run_episodes_batched`), each appended to ``episodes_path`` as it ends; those already there for the
    same checkpoint and step limit are not run again (also those another process evaluating into the same file
    wrote while this one waited for it). Returns (rows, run now)."""
    with exclusive(episodes_path + ".lock", f"evaluation into {episodes_path}"):  # another process may be on it
        done = recorded_episodes(episodes_path, checkpoint["sha"], max_episode_steps)
        todo = [run for run in runs if run not in done]
        print(f"evaluation: {len(runs) - len(todo)} of {len(runs)} episodes already in {episodes_path}", flush=True)
        if not todo:
            return [done[run] for run in runs], 0
        task_ids = sorted({task_id for task_id, _, _ in runs})
        envs = make_eval_envs(
            env_id, num_envs, task_ids, num_runs=len(todo), max_episode_steps=max_episode_steps,
            **env_kwargs_for_policy(policy),
        )  # fmt: skip
        if "object_state" in policy.observation_keys:
            env_dim, policy_dim = envs[0].observation_space["object_state"].shape[0], policy.config.object_state_dim
            if env_dim != policy_dim:
                for env in envs:
                    env.close()
                raise ValueError(f"the policy reads {policy_dim} object_state numbers but {env_id} gives {env_dim}")
        if os.path.exists(episodes_path) and os.path.getsize(episodes_path):
            with open(episodes_path, "rb") as file:
                file.seek(-1, os.SEEK_END)
                cut_short = file.read(1) != b"\n"
        else:
            cut_short = False
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc=f"evaluate {env_id}", unit="episode")
        policy.eval()
        try:
            with open(episodes_path, "a") as file:
                if cut_short:
                    file.write("\n")  # end the line a kill cut short, so the next one stays readable
                for result in run_episodes_batched(policy, envs, todo, deterministic=True):
                    row = {
                        "task_id": result.task_id, "init_state_id": result.init_state_id, "seed": result.seed,
                        "success": result.success, "steps": result.length, "seconds": result.seconds,
                        "checkpoint_steps": checkpoint["steps"], "checkpoint_sha": checkpoint["sha"],
                        "max_episode_steps": max_episode_steps, "num_envs": len(envs),
                    }  # fmt: skip
                    file.write(json.dumps(row) + "\n")
                    file.flush()
                    os.fsync(file.fileno())
                    done[(result.task_id, result.init_state_id, result.seed)] = row
                    if bar is not None:
                        bar.update(1)
        finally:
            for env in envs:
                env.close()
            if bar is not None:
                bar.close()
        return [done[run] for run in runs], len(todo)


# ---------------------------------------------------------------------------------------------- report
def success_summary(rows: list[dict]) -> dict:
    """Successes / episodes, success rate with its Wilson 95% interval, mean seconds and steps per episode."""
    successes, episodes = sum(bool(row["success"]) for row in rows), len(rows)
    low, high = wilson_interval(successes, episodes)
    return {
        "successes": successes,
        "episodes": episodes,
        "success_rate": successes / episodes,
        "ci95": [low, high],
        "mean_episode_seconds": float(np.mean([row["seconds"] for row in rows])),
        "mean_steps": float(np.mean([row["steps"] for row in rows])),
    }


def markdown(report: dict) -> str:
    """The report as a Markdown table with its context lines."""
    evaluation, sft, demos, machine = report["eval"], report["sft"], report["demos"], report["machine"]
    inputs = report["obs_mode"] + (" + object_state" if report["object_state"] else "")
    lines = [
        f"## SFT baseline: {report['env_id']}, {inputs}",
        "",
        "| task | instruction | successes | success rate | 95% CI | s/episode |",
        "|---:|:---|---:|---:|:---:|---:|",
    ]
    rows = [(task_id, entry["instruction"], entry) for task_id, entry in report["per_task"].items()]
    for task_id, instruction, entry in [*rows, ("all", "", report["overall"])]:
        low, high = entry["ci95"]
        lines.append(
            f"| {task_id} | {instruction} | {entry['successes']}/{entry['episodes']} | {entry['success_rate']:.2f} | "
            f"{low:.2f}-{high:.2f} | {entry['mean_episode_seconds']:.1f} |"
        )
    held_out = evaluation["held_out_note"]
    if not evaluation["held_out"]:
        held_out = "**" + held_out.replace("not held out", "NOT HELD OUT", 1) + "**"
    if sft["untimed_steps"] == sft["steps"]:
        wall = "wall time unknown (trained elsewhere: pass --init-from-seconds)"
    else:
        wall = f"{sft['seconds']:.1f} s wall ({sft['seconds_per_step']:.3f} s/step)"
        wall += f", the first {sft['untimed_steps']} steps untimed" if sft["untimed_steps"] else ""
    lines += [
        "",
        f"- evaluation: init states {_ranges(evaluation['init_state_ids'])} per task, seeds {_ranges(evaluation['seeds'])}, "
        f"greedy actions, at most {evaluation['max_episode_steps']} steps; {held_out}",
        f"- demos: {demos['path']}, {demos['num_demos']} demos ({demos['num_transitions']} transitions)",
        f"- SFT: {sft['steps']} steps of {sft['batch_size']} transitions, {wall}; "
        f"fit on the demos: loss {sft['demo_fit']['loss']:.3f}, token accuracy {sft['demo_fit']['token_accuracy']:.3f}",
        f"- evaluation wall time: {evaluation['seconds']:.1f} s ({evaluation['episodes']} episodes)",
        f"- machine: {machine['cpu_count']} CPUs, {machine['platform']}, torch {machine['torch']} on "
        f"{machine['torch_threads']} thread(s), load average {machine['load_average_1min_at_end']}",
        f"- command: `{report['command']}`",
    ]
    return "\n".join(lines) + "\n"


def _ranges(ids) -> str:
    ids = sorted(ids)
    if len(ids) > 2 and ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}..{ids[-1]}"
    return ", ".join(str(i) for i in ids)


# ---------------------------------------------------------------------------------------------- main
def main(args: Args) -> dict:
    torch.set_num_threads(args.torch_threads)
    suite, task_ids, init_state_ids = check_args(args)
    short_name = suite.libero_name.removeprefix("libero_")
    mode = "state" if args.obs_mode == "state" else "rgb"
    demos_path = args.demos or (
        f"data/{short_name}_state.hdf5" if mode == "state" else f"data/{short_name}_rgb{args.image_size}.hdf5"
    )
    output_dir = args.output_dir or os.path.join("runs", "sft_baseline", f"{short_name}_{mode}")
    json_out = args.json_out or os.path.join("benchmarks", "results", f"sft_baseline_{short_name}_{mode}.json")
    os.makedirs(output_dir, exist_ok=True)
    instructions = {task.task_id: task.instruction for task in suites.suite_tasks(suite.libero_name)}

    # 1. Demos (generated when missing) and whether the evaluation init states are held out from them.
    episodes, generated = prepare_demos(args, suite, task_ids, demos_path)
    held_out, note = held_out_note(episodes, task_ids, init_state_ids)
    if not held_out:
        banner = "=" * 100
        loud = note.replace("not held out", "NOT HELD OUT", 1)
        print(f"{banner}\nWARNING: the evaluation is {loud}\n{banner}", file=sys.stderr, flush=True)
        warnings.warn(f"evaluation {note}: success there overstates generalization to new init states", stacklevel=2)

    # 2. SFT, continued from <output_dir>/sft (or --init-from) up to sft_steps.
    checkpoint_path = os.path.join(output_dir, "sft")
    with exclusive(checkpoint_path + ".lock", f"SFT {checkpoint_path}"):
        model, record = load_or_create_sft(
            args, episodes, list(instructions.values()), checkpoint_path, os.path.join(output_dir, "tb")
        )
        this_run = train(model, record, args.sft_steps, checkpoint_path, args.save_every, args.progress)
    fit = demo_fit(model.policy, model.demos)
    timed_steps = model.num_timesteps - record["untimed_steps"]

    # 3. Evaluation: one deterministic episode per (task, init state, seed), resumable.
    max_episode_steps = args.max_episode_steps or suite.max_episode_steps
    checkpoint = {"steps": model.num_timesteps, "sha": checkpoint_fingerprint(checkpoint_path)}
    runs = [(task_id, init_state_id, seed) for task_id in task_ids for init_state_id in init_state_ids for seed in args.seeds]
    start = time.perf_counter()
    rows, run_now = evaluate_resumably(
        model.policy, suite.env_id, runs, max_episode_steps, os.path.join(output_dir, "episodes.jsonl"), checkpoint,
        args.progress, eval_num_envs(args),
    )  # fmt: skip

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
            "path": demos_path,
            "generated_this_run": generated,
            "num_demos": len(episodes),
            "num_transitions": int(sum(len(episode) for episode in episodes)),
            "init_state_ids": {
                str(task_id): sorted(episode.init_state_id for episode in episodes if episode.task_id == task_id)
                for task_id in task_ids
            },
        },
        "sft": {
            "checkpoint": checkpoint_path,
            "steps": model.num_timesteps,
            "batch_size": model.batch_size,
            "learning_rate": model.learning_rate,
            "seconds": record["seconds"],
            "untimed_steps": record["untimed_steps"],
            "seconds_per_step": record["seconds"] / timed_steps if timed_steps else None,
            "init_from": args.init_from or record.get("init_from"),
            "steps_this_run": this_run["steps"],
            "seconds_this_run": this_run["seconds"],
            "last_logged_metrics": record.get("last_metrics"),
            "demo_fit": fit,
        },
        "eval": {
            "task_ids": list(task_ids),
            "init_state_ids": list(init_state_ids),
            "seeds": list(args.seeds),
            "max_episode_steps": max_episode_steps,
            "deterministic": True,
            "held_out": held_out,
            "held_out_note": note,
            "checkpoint_steps": checkpoint["steps"],
            "checkpoint_sha": checkpoint["sha"],
            "episodes": len(rows),
            "episodes_this_run": run_now,
            "seconds": float(sum(row["seconds"] for row in rows)),
            "wall_seconds_this_run": time.perf_counter() - start,
        },
        "per_task": {
            str(task_id): {
                "instruction": instructions[task_id],
                **success_summary([row for row in rows if row["task_id"] == task_id]),
            }
            for task_id in task_ids
        },
        "overall": success_summary(rows),
        "machine": machine_info(args.torch_threads),
        "episodes": rows,
    }
    report["overall"]["mean_of_task_rates"] = float(np.mean([entry["success_rate"] for entry in report["per_task"].values()]))
    table = markdown(report)
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(json_out)), exist_ok=True)
    with open(json_out, "w") as file:
        json.dump(report, file, indent=2)
    with open(os.path.splitext(json_out)[0] + ".md", "w") as file:
        file.write(table)
    print(f"wrote {json_out} and {os.path.splitext(json_out)[0]}.md")
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
