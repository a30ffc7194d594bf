"""Does every LIBERO task start the way its BDDL file says? Each task's ``:init`` premise, checked after reset.

For every task of the chosen suites (all five: 130 tasks) and init states ``0..num_init_states-1``, the env is
reset (settle steps included, as every episode starts) and each predicate of the task's BDDL ``:init`` is
evaluated with LIBERO's own ``_eval_predicate`` (:func:`gym_libero_vla.fidelity.init_predicates`): objects on or
in other objects, articulated fixtures open / closed / on / off, objects on placement regions. A task's premise
holds when every predicate holds on every init state checked. Prints a per-suite table and the failing predicates
by name, and writes JSON (with the MuJoCo version) and Markdown.

    python benchmarks/init_state_fidelity.py                                # all suites, 50 init states per task
    python benchmarks/init_state_fidelity.py --suites spatial --num-init-states 5

To compare MuJoCo versions, run it in an environment with another version, e.g. without touching the venv:
``pip install --no-deps --target /tmp/mujoco-4 mujoco==4.0.0 mujoco-core==4.0.0 mujoco-studio==4.0.0`` and
``PYTHONPATH=/tmp/mujoco-4 GYM_LIBERO_VLA_STRICT_MUJOCO=0 python benchmarks/init_state_fidelity.py --json-out ...``.
Tasks run in ``--num-workers`` processes (state mode: no renderer), one simulator each.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings

import tyro
from reporting import chosen_tasks, command_line, machine_info, run_per_task  # benchmarks/reporting.py

from gym_libero_vla.fidelity import PINNED_MUJOCO_VERSION, MujocoVersionWarning, init_predicates, installed_mujoco_version
from gym_libero_vla.suites import SUITES, resolve_suite, task_init_states


@dataclasses.dataclass
class Args:
    suites: tuple[str, ...] = tuple(spec.libero_name.removeprefix("libero_") for spec in SUITES.values())
    """Suites to check (short names, LIBERO names or env ids)."""
    task_ids: tuple[int, ...] | None = None
    """Only these tasks of each suite (default: all of them)."""
    num_init_states: int = 50
    """Init states per task, 0..N-1 (LIBERO stores 50 per task)."""
    num_workers: int = 2
    """Processes checking tasks side by side."""
    json_out: str | None = None
    """Report JSON, Markdown next to it (default benchmarks/results/init_state_fidelity_mujoco<version>.json)."""


def check_task(libero_name: str, task_id: int, num_init_states: int) -> dict:
    """Reset one task on each init state and evaluate its ``:init`` predicates; runs in a worker process."""
    import gymnasium as gym

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MujocoVersionWarning)  # measuring other versions is the point here
        env = gym.make(resolve_suite(libero_name).env_id, obs_mode="state", task_ids=[task_id], max_cached_tasks=1)
    start = time.perf_counter()
    init_states = []
    try:
        for init_state_id in range(min(num_init_states, len(task_init_states(libero_name, task_id)))):
            env.reset(options={"task_id": task_id, "init_state_id": init_state_id})
            checks = init_predicates(env)
            init_states.append([{**dataclasses.asdict(check), "is_premise": check.is_premise} for check in checks])
    finally:
        env.close()
    return {"task_id": task_id, "init_states": init_states, "seconds": time.perf_counter() - start}


def summarize_task(task: dict, name: str) -> dict:
    """Per predicate that failed anywhere: on how many init states, and the largest horizontal offset seen there."""
    failing: dict[str, dict] = {}
    for checks in task["init_states"]:
        for check in checks:
            if check["holds"]:
                continue
            text = "(" + " ".join(check["predicate"]) + ")"
            entry = failing.setdefault(
                text,
                {"kind": check["kind"], "is_premise": check["is_premise"], "init_states_failing": 0, "max_offset_m": None},
            )
            entry["init_states_failing"] += 1
            if check["horizontal_offset"] is not None:
                entry["max_offset_m"] = max(entry["max_offset_m"] or 0.0, round(check["horizontal_offset"], 4))
    kinds: dict[str, int] = {}
    for check in task["init_states"][0] if task["init_states"] else []:
        kinds[check["kind"]] = kinds.get(check["kind"], 0) + 1
    premise = {text: entry for text, entry in failing.items() if entry["is_premise"]}
    return {
        "task_id": task["task_id"], "name": name, "num_init_states": len(task["init_states"]),
        "predicates_by_kind": kinds, "premise_holds": not premise, "failing": premise,
        "regions_failing": {text: entry for text, entry in failing.items() if not entry["is_premise"]},
        "seconds": round(task["seconds"], 2),
    }  # fmt: skip


def markdown(report: dict) -> str:
    mujoco = report["machine"].get("mujoco")
    pinned = "the pinned version" if mujoco == PINNED_MUJOCO_VERSION else f"not the pinned {PINNED_MUJOCO_VERSION}"
    lines = [
        f"# LIBERO init-state fidelity under MuJoCo {mujoco} ({pinned})",
        "",
        f"Command: `{report['command']}`. Each task reset on init states 0..{report['num_init_states'] - 1} (settle "
        "steps included); its BDDL `:init` predicates evaluated with LIBERO's `_eval_predicate`. The premise: every "
        "object-object predicate (on or in an object, a fixture or a fixture's site) and every fixture state "
        "(open, close, turnon, turnoff). Region predicates (an object on its 2 cm table placement site) are counted "
        "apart: objects settle a centimetre or two off those sites in LIBERO's own stored init states.",
        "",
        "| suite | tasks | premise holds on every init state | tasks whose premise fails | premise predicates per task "
        "| region predicates false (of checked) |",
        "|---|---|---|---|---|---|",
    ]
    failures = []
    for suite, entry in report["suites"].items():
        tasks = entry["tasks"]
        holding = sum(task["premise_holds"] for task in tasks)
        premise_counts = [sum(n for kind, n in t["predicates_by_kind"].items() if kind != "object-region") for t in tasks]
        region_checked = sum(t["predicates_by_kind"].get("object-region", 0) * t["num_init_states"] for t in tasks)
        region_false = sum(f["init_states_failing"] for t in tasks for f in t["regions_failing"].values())
        failing_ids = ", ".join(str(task["task_id"]) for task in tasks if not task["premise_holds"]) or "-"
        lines.append(
            f"| {suite} | {len(tasks)} | {holding} | {failing_ids} | {min(premise_counts)}-{max(premise_counts)} "
            f"| {region_false} of {region_checked} |"
        )
        for task in tasks:
            for text, failure in task["failing"].items():
                offset = f", horizontal offset up to {100 * failure['max_offset_m']:.1f} cm" if failure["max_offset_m"] else ""
                failures.append(
                    f"- {suite} task {task['task_id']} ({task['name']}): `{text}` ({failure['kind']}) false on "
                    f"{failure['init_states_failing']} of {task['num_init_states']} init states{offset}"
                )
    lines += ["", "Premise predicates that failed:" if failures else "No premise predicate failed.", *failures]
    lines += ["", f"Wall time {report['wall_seconds']:.0f} s with {report['num_workers']} workers; "
              f"{report['machine']['cpu_model']}, robosuite {report['machine'].get('robosuite')}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(args: Args) -> dict:
    if args.num_init_states < 1 or args.num_workers < 1:
        raise ValueError(f"num_init_states {args.num_init_states} and num_workers {args.num_workers} must be >= 1")
    tasks = chosen_tasks(args.suites, args.task_ids)
    start = time.perf_counter()
    results = run_per_task(check_task, tasks, args.num_workers, args.num_init_states)
    report = {
        "command": command_line(args, "benchmarks/init_state_fidelity.py"),
        "pinned_mujoco": PINNED_MUJOCO_VERSION,
        "num_init_states": args.num_init_states,
        "num_workers": args.num_workers,
        "wall_seconds": time.perf_counter() - start,
        "suites": {
            name: {"tasks": [summarize_task(results[name][task.task_id], task.name) for task in tasks[name]]} for name in tasks
        },
        "machine": machine_info(),
    }
    json_out = args.json_out or f"benchmarks/results/init_state_fidelity_mujoco{installed_mujoco_version()}.json"
    os.makedirs(os.path.dirname(os.path.abspath(json_out)), exist_ok=True)
    with open(json_out, "w") as file:
        json.dump(report, file, indent=1)
    text = markdown(report)
    with open(os.path.splitext(json_out)[0] + ".md", "w") as file:
        file.write(text)
    print(text)
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
