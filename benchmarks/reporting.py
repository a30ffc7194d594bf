"""Helpers every benchmark report shares: what machine and software measured it, the command that reproduces it,
success summaries, whether an evaluation is held out from the demos, and writing the JSON and Markdown.

Benchmarks run as scripts (``python benchmarks/<name>.py``), so Python puts this folder on ``sys.path`` and they
import this module as ``reporting``. Statistics (Wilson intervals, paired bootstraps) live in the library,
:mod:`gym_libero_vla.evaluate`, because evaluation reports use them too.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib.metadata
import json
import multiprocessing
import os
import platform
import shlex
import typing

import numpy as np
import tyro
from tqdm import tqdm

from gym_libero_vla.episode import SAMPLED_INIT_STATE
from gym_libero_vla.evaluate import difference_interval, paired_difference_interval, wilson_interval
from gym_libero_vla.suites import resolve_suite, suite_tasks

# The simulator's results depend on these and on the CPU: the same code has made different demos (a few episodes
# of LIBERO-Spatial flip between success and failure) on two machines, and LIBERO's scenes change with MuJoCo.
SIMULATOR_PACKAGES = ("mujoco", "robosuite", "numpy", "scipy")


def package_versions(packages=SIMULATOR_PACKAGES) -> dict[str, str]:
    versions = {}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def machine_info(torch_threads: int | None = None, sft_torch_threads: int | None = None) -> dict:
    """CPU, OS, Python, torch (and its threads: ``torch_threads`` while simulators run, ``sft_torch_threads`` for SFT)
    and simulator package versions; the 1-minute load average at the time of the call."""
    info = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if torch_threads is not None:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch_threads)
    if sft_torch_threads is not None:
        info["sft_torch_threads"] = sft_torch_threads
    info.update(package_versions())
    info["cpu_model"] = cpu_model()
    return info


def machine_text(machine: dict) -> str:
    """One line of a report naming the machine of :func:`machine_info`: CPUs, MuJoCo, torch and its threads, load."""
    sft = f" ({machine['sft_torch_threads']} for SFT)" if "sft_torch_threads" in machine else ""
    return (
        f"{machine['cpu_count']} CPUs, {machine['cpu_model']}, MuJoCo {machine.get('mujoco')}, torch {machine['torch']} "
        f"on {machine['torch_threads']} thread(s){sft}, load average {machine['load_average_1min_at_end']}"
    )


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def command_line(args, script: str) -> str:
    """The command that runs ``script`` with ``args``, a tyro dataclass (flags only where they differ from its defaults;
    nested config dataclasses as tyro spells them, ``--sft.batch-size 32``)."""
    return shlex.join(["python", script, *_flags(args, _defaults(type(args)), "")])


def _defaults(cls) -> dict:
    values = {}
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            values[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            values[field.name] = field.default_factory()
    return values


def _omits_prefix(cls, field_name: str) -> bool:
    """Whether ``cls`` declares ``field_name`` with ``tyro.conf.OmitArgPrefixes`` (its flags are spelled without the
    field's name, ``--demos`` rather than ``--demo.demos``)."""
    hint = typing.get_type_hints(cls, include_extras=True).get(field_name)
    return any(marker is tyro.conf.OmitArgPrefixes for marker in getattr(hint, "__metadata__", ()))


def _flags(args, defaults: dict, prefix: str) -> list[str]:
    parts = []
    for field in dataclasses.fields(args):
        value, name = getattr(args, field.name), prefix + field.name.replace("_", "-")
        default = defaults.get(field.name, dataclasses.MISSING)
        if value == default:
            continue
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            if dataclasses.is_dataclass(default):  # the script's own default of the nested config
                nested_defaults = {f.name: getattr(default, f.name) for f in dataclasses.fields(default)}
            else:
                nested_defaults = _defaults(type(value))
            parts += _flags(value, nested_defaults, prefix if _omits_prefix(type(args), field.name) else name + ".")
        elif isinstance(value, bool):
            group, _, flag = name.rpartition(".")  # tyro's negation: --no-progress, --policy.no-use-state
            parts.append("--" + name if value else f"--{group + '.' if group else ''}no-{flag}")
        elif isinstance(value, tuple):
            parts += ["--" + name, *(str(item) for item in value)]
        else:
            parts += ["--" + name, str(value)]
    return parts


def policy_cameras(obs_mode: str, cameras) -> tuple[str, ...]:
    """The cameras a fresh policy reads in ``obs_mode``: none in "state" mode; ``cameras`` (``--policy.cameras``,
    agentview when empty) in "rgb+state" mode."""
    return () if obs_mode == "state" else (tuple(cameras) or ("agentview",))


def success_summary(rows: list[dict]) -> dict:
    """Successes / episodes of evaluation rows, the success rate with its Wilson 95% interval, mean seconds and steps."""
    successes, episodes = sum(bool(row["success"]) for row in rows), len(rows)
    low, high = wilson_interval(successes, episodes)
    return {
        "successes": successes,
        "episodes": episodes,
        "success_rate": successes / episodes,
        "ci95": [low, high],
        "mean_episode_seconds": float(np.mean([row["seconds"] for row in rows])),
        "mean_steps": float(np.mean([row["length"] for row in rows])),
    }


def held_out_note(episodes, task_ids, init_state_ids) -> tuple[bool, str]:
    """Whether no evaluation init state of a task is one its demos started from; a note saying so. Demos from newly
    sampled layouts (``SAMPLED_INIT_STATE``) started from none of the suite's stored init states."""
    overlaps = {}
    for task_id in task_ids:
        demo_init_states = {episode.init_state_id for episode in episodes if episode.task_id == task_id}
        demo_init_states.discard(SAMPLED_INIT_STATE)
        if -1 in demo_init_states:
            return False, "not held out? the demos do not record their init states"
        common = sorted(demo_init_states & set(init_state_ids))
        if common:
            overlaps[task_id] = common
    if not overlaps:
        return True, "held out: no evaluation init state is one a demo started from"
    details = "; ".join(f"task {task_id}: {', '.join(map(str, ids))}" for task_id, ids in overlaps.items())
    return False, f"not held out: evaluation init states that demos started from ({details})"


def demo_files_text(demos: dict) -> str:
    """The demo files joined by ' + ', each with the scripted expert and layout versions that made it (when known)."""
    configs = demos.get("generator_configs", {})  # reports written before the key lack it
    texts = []
    for path in [demos["path"], *demos.get("extra_paths", [])]:
        config = configs.get(path) or {}
        made = [f"expert v{config['expert_version']}"] if "expert_version" in config else []
        if config.get("init_states") == "sampled":  # generate.generator_config fills in the keys it leaves out
            made.append(f"layouts v{config['layout_version']}")
            made.append(f"robot noise {config['robot_init_noise']}")
        texts.append(f"{path} ({', '.join(made)})" if made else path)
    return " + ".join(texts)


def id_ranges(ids) -> str:
    """``20..39`` for a run of consecutive ids, else the ids listed."""
    ids = sorted(ids)
    if len(ids) > 2 and ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}..{ids[-1]}"
    return ", ".join(str(i) for i in ids)


def chosen_tasks(suites, task_ids=None) -> dict[str, list]:
    """The tasks of each of ``suites`` (short names, LIBERO names or env ids), by LIBERO name; only ``task_ids`` of
    each when given (an id a suite lacks is named with the valid range)."""
    chosen = set(task_ids) if task_ids is not None else None
    tasks = {}
    for suite in suites:
        name = resolve_suite(suite).libero_name
        tasks[name] = [task for task in suite_tasks(name) if chosen is None or task.task_id in chosen]
        if chosen is not None and len(tasks[name]) != len(chosen):
            raise ValueError(f"task_ids {tuple(task_ids)} for {name}: valid 0..{len(suite_tasks(name)) - 1}")
    return tasks


def run_per_task(function, tasks: dict[str, list], num_workers: int, *args) -> dict[str, dict[int, dict]]:
    """``function(libero_name, task_id, *args)`` for every task of ``tasks`` (:func:`chosen_tasks`), in
    ``num_workers`` processes, with a progress bar; each result (a dict with its "task_id") by LIBERO name and task id.
    The processes are spawned: each imports LIBERO afresh, nothing inherited from this process's simulators."""
    results: dict[str, dict[int, dict]] = {name: {} for name in tasks}
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
        futures = {pool.submit(function, name, task.task_id, *args): name for name in tasks for task in tasks[name]}
        for future in tqdm(concurrent.futures.as_completed(futures), total=len(futures), desc="tasks"):
            result = future.result()
            results[futures[future]][result["task_id"]] = result
    return results


def write_report_files(report: dict, markdown: str, json_out: str, plot=None) -> None:
    """``report`` to ``json_out``, ``markdown`` next to it (``.md``) and, with ``plot`` (a function of a path), a
    ``.png``: each written to a temporary file and renamed into place, so a kill leaves the previous report whole."""
    base = os.path.splitext(json_out)[0]
    os.makedirs(os.path.dirname(os.path.abspath(json_out)), exist_ok=True)
    with open(json_out + ".tmp", "w") as file:
        json.dump(report, file, indent=2)
    with open(base + ".md.tmp", "w") as file:
        file.write(markdown)
    renames = [(json_out + ".tmp", json_out), (base + ".md.tmp", base + ".md")]
    if plot is not None:
        plot(base + ".tmp.png")
        renames.append((base + ".tmp.png", base + ".png"))
    for temporary, path in renames:
        os.replace(temporary, path)
    print(f"wrote {', '.join(path for _, path in renames)}", flush=True)


def publish(report: dict, markdown: str, json_out: str | None) -> dict:
    """Print ``markdown`` and, with ``json_out``, write the report files (:func:`write_report_files`). Returns
    ``report``."""
    print(markdown)
    if json_out:
        write_report_files(report, markdown, json_out)
    return report


# ---------------------------------------------------------------------------------------------- comparing runs
def runs_summary(runs: list[dict], task_ids, instructions: dict) -> dict:
    """Per-task and overall success over the runs' (seeds') evaluation rows (Wilson 95%), per-seed rates, the entropy at
    the start and end of training, wall times and counts."""
    rows = [row for run in runs for row in run["rows"]]
    per_task = {
        str(task_id): {"instruction": instructions[task_id],
                       **success_summary([row for row in rows if row["task_id"] == task_id])}
        for task_id in task_ids
    }  # fmt: skip
    seed_rates = [run["success_rate"] for run in runs]
    overall = {
        **success_summary(rows),
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


def start_success(runs: list[dict]) -> dict[tuple[int, int, int, int], float]:
    """Success per evaluation start, averaged over the runs' (seeds') episodes from it. A start is (task, init state,
    layout seed, layout version): a stored init state has layout seed -1 and version 0; a new layout's version is
    the ``layout_version`` its row recorded (1 where it recorded none), so layouts of one seed drawn by different
    versions of :meth:`~gym_libero_vla.libero_env.LiberoEnv.sample_init_state` are different starts."""
    outcomes: dict[tuple[int, int, int, int], list[float]] = {}
    for run in runs:
        for row in run["rows"]:
            if row.get("layout_seed") is None:
                layout = (-1, 0)
            else:
                layout = (row["layout_seed"], row.get("layout_version", 1))
            outcomes.setdefault((row["task_id"], row["init_state_id"], *layout), []).append(float(row["success"]))
    return {start: float(np.mean(values)) for start, values in outcomes.items()}


def paired_delta(mine: dict, theirs: dict, starts) -> dict:
    """Mean of ``mine[start] - theirs[start]`` over ``starts`` (success per start, e.g. from :func:`start_success`)
    with its 95% paired-bootstrap interval, resampled within tasks."""
    differences = [mine[start] - theirs[start] for start in starts]
    low, high = paired_difference_interval(differences, [start[0] for start in starts])
    return {"delta": float(np.mean(differences)), "ci95": [low, high], "starts": len(differences)}


def delta_vs(summary: dict, baseline: dict, task_ids, runs: list[dict], baseline_runs: list[dict]) -> dict:
    """``summary`` minus ``baseline`` success, overall, per task and per seed. ``ci95``: paired bootstrap over the
    evaluation starts (both sides averaged over their seeds per start; resampled within tasks), the interval the
    targets use; ``ci95_newcombe``: Newcombe's on the pooled episodes, which counts a start once per seed as if
    the episodes were independent (too narrow when a seed barely changes a greedy episode, as on these suites)."""
    mine, theirs = start_success(runs), start_success(baseline_runs)
    if set(mine) != set(theirs):
        raise ValueError("a variant and its baseline must be evaluated on the same starts (task, init state or layout)")
    starts = sorted(mine)

    def delta(entry, base, task_id=None):
        chosen = [start for start in starts if task_id is None or start[0] == task_id]
        paired = paired_delta(mine, theirs, chosen)
        newcombe = difference_interval(entry["successes"], entry["episodes"], base["successes"], base["episodes"])
        return {"delta": entry["success_rate"] - base["success_rate"], "ci95": paired["ci95"],
                "ci95_newcombe": list(newcombe), "starts": len(chosen)}  # fmt: skip

    per_seed = [rate - base for rate, base in zip(summary["overall"]["seed_rates"], baseline["overall"]["seed_rates"])]
    return {
        "overall": delta(summary["overall"], baseline["overall"]),
        "per_task": {str(t): delta(summary["per_task"][str(t)], baseline["per_task"][str(t)], t) for t in task_ids},
        "per_seed": per_seed,
    }
