"""Did a change help? Two or more evaluations of the same starts, compared start by start.

Each input is a report whose ``episodes`` hold one row per evaluation episode (``task_id``, ``init_state_id``,
``success``): ``benchmarks/sft_baseline.py``'s JSON, ``python -m gym_libero_vla.evaluate``'s ``success.json``, an
``episodes.jsonl`` that evaluations append to (``--policy-sha`` picks one policy's rows from it), or one variant of a
``benchmarks/sft_vs_grpo.py`` report, ``report.json:grpo_offline`` (all its seeds) or ``report.json:grpo_offline:1``.
The first input is the baseline. On the starts every input has (task and init state, or task and new layout of
``python -m gym_libero_vla.evaluate --layouts N``: its seed and the layout version that drew it), the script prints
each one's success per task (Wilson 95% intervals) and each one's difference to the baseline with a 95% interval from
the paired bootstrap over the starts (resampled within tasks: :func:`gym_libero_vla.evaluate.paired_difference_interval`,
the interval sft_vs_grpo.py's targets use). Rows of several seeds of one start are averaged first.

    python benchmarks/compare_evaluations.py benchmarks/results/sft_vision_object.json \\
        benchmarks/results/sft_vision_object_minilm.json --names words minilm
    python benchmarks/compare_evaluations.py runs/a/success.json runs/b/success.json --json-out runs/a_vs_b.json
"""

from __future__ import annotations

import dataclasses
import json
import os

import tyro
from reporting import paired_delta, publish, start_success

from gym_libero_vla.evaluate import read_episode_rows, wilson_interval


@dataclasses.dataclass
class Args:
    reports: tyro.conf.Positional[tuple[str, ...]]
    """Evaluation reports (JSON with "episodes", an episodes.jsonl, or sft_vs_grpo.py's report.json:VARIANT[:SEED]);
    the first is the baseline."""
    names: tuple[str, ...] | None = None
    """A short name per report for the table (default: the file names, with the variant picked from a report)."""
    policy_sha: tuple[str, ...] | None = None
    """Per report, the policy fingerprint whose rows to keep ("" keeps all; only needed for a .jsonl file that
    several policies' evaluations share)."""
    json_out: str | None = None
    """Also write the comparison as JSON (and Markdown next to it)."""


def start_outcomes(path: str, policy_sha: str = "") -> dict[tuple[int, int, int, int], float]:
    """Success per start (task, init state, layout seed, layout version) of one report, averaged over the seeds it
    ran."""
    rows = report_rows(path)
    if policy_sha:
        rows = [row for row in rows if row.get("policy_sha") == policy_sha]
    if not rows:
        raise ValueError(f"{path} holds no episodes" + (f" of policy {policy_sha}" if policy_sha else ""))
    return start_success([{"rows": rows}])


def report_rows(path: str) -> list[dict]:
    """The evaluation episodes of ``path``: an episodes.jsonl, a JSON report's "episodes", or the held-out outcomes of
    one variant of a ``sft_vs_grpo.py`` report, ``report.json:VARIANT`` (every seed's) or ``report.json:VARIANT:SEED``.
    The last outlives the run directories: the committed reports alone compare runs whose checkpoints are gone."""
    file_path, selected, selector = path.partition(".json:")
    file_path += ".json" if selected else ""
    if not os.path.exists(file_path):
        raise FileNotFoundError(f"no evaluation report at {file_path}")
    if file_path.endswith(".jsonl"):
        return read_episode_rows(file_path)
    with open(file_path) as file:
        report = json.load(file)
    if "runs" in report and "episodes" not in report:  # sft_vs_grpo.py: one entry per (variant, seed)
        return variant_rows(file_path, report["runs"], selector)
    if selector:
        raise ValueError(f"{file_path} is not a sft_vs_grpo.py report: give it without ':{selector}'")
    if "episodes" not in report:
        raise ValueError(f"{file_path} has no 'episodes' rows: give an evaluation report (valid keys found: {sorted(report)})")
    return report["episodes"]


def variant_rows(path: str, runs: list[dict], selector: str) -> list[dict]:
    """The ``[task, init state, success, steps]`` outcomes of the runs ``selector`` ("VARIANT" or "VARIANT:SEED")
    names, as evaluation rows."""
    variant, _, seed = selector.partition(":")
    choices = sorted({f"{run['variant']}:{run['seed']}" for run in runs})
    chosen = [run for run in runs if run["variant"] == variant and (not seed or str(run["seed"]) == seed)]
    if not chosen:
        raise ValueError(f"{path} is a sft_vs_grpo.py report: give {path}:VARIANT or {path}:VARIANT:SEED, one of {choices}")
    return [
        {"task_id": task_id, "init_state_id": init_state_id, "seed": run["seed"], "success": bool(success), "length": steps}
        for run in chosen
        for task_id, init_state_id, success, steps in run["outcomes"]
    ]


def compare(outcomes: list[dict[tuple[int, int, int, int], float]], names: list[str]) -> dict:
    """Per report: success per task and overall on the common starts; per report but the first: its paired
    difference to the first, overall and per task."""
    starts = sorted(set.intersection(*(set(each) for each in outcomes)))
    if not starts:
        versions = [sorted({start[3] for start in each if start[2] >= 0}) for each in outcomes]
        if all(versions) and len({tuple(each) for each in versions}) > 1:
            raise ValueError(
                f"the reports share no start: their new layouts were drawn by different layout versions "
                f"(per report: {', '.join(map(str, versions))}; see libero_env.LAYOUT_VERSION), so a "
                f"layout seed is a different scene in each: evaluate them again under one version"
            )
        raise ValueError("the reports share no start (task, init state or layout): nothing to compare")
    task_ids = sorted({start[0] for start in starts})

    def success(values: list[float]) -> dict:
        successes, episodes = float(sum(values)), len(values)
        return {"success_rate": successes / episodes, "successes": successes, "starts": episodes,
                "ci95": list(wilson_interval(round(successes), episodes))}  # fmt: skip

    result: dict = {"starts": len(starts), "task_ids": task_ids, "reports": {}}
    for index, (name, mine) in enumerate(zip(names, outcomes)):
        entry = {
            "overall": success([mine[start] for start in starts]),
            "per_task": {str(t): success([mine[s] for s in starts if s[0] == t]) for t in task_ids},
        }
        if index:
            entry["delta_vs_baseline"] = {
                "overall": paired_delta(mine, outcomes[0], starts),
                "per_task": {str(t): paired_delta(mine, outcomes[0], [s for s in starts if s[0] == t]) for t in task_ids},
            }
        result["reports"][name] = entry
    return result


def markdown(result: dict, names: list[str]) -> str:
    baseline = names[0]
    lines = [
        f"## Paired comparison on {result['starts']} common starts (baseline: {baseline})",
        "",
        "| task | " + " | ".join(names) + " | " + " | ".join(f"{name} − {baseline}" for name in names[1:]) + " |",
        "|---:|" + "---:|" * (2 * len(names) - 1),
    ]
    for task in [str(t) for t in result["task_ids"]] + ["all"]:
        entries = [result["reports"][name]["overall" if task == "all" else "per_task"] for name in names]
        entries = [entry if task == "all" else entry[task] for entry in entries]
        cells = [f"{entry['success_rate']:.2f}" for entry in entries]
        for name in names[1:]:
            deltas = result["reports"][name]["delta_vs_baseline"]
            entry = deltas["overall"] if task == "all" else deltas["per_task"][task]
            cells.append(f"{entry['delta']:+.2f} [{entry['ci95'][0]:+.2f}, {entry['ci95'][1]:+.2f}]")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines += ["", "Differences: mean over starts with a 95% paired-bootstrap interval (resampled within tasks).", ""]
    return "\n".join(lines)


def default_name(path: str) -> str:
    """A report's name in the table: its file name without the extension, and the variant picked from it."""
    file_name, _, selector = os.path.basename(path).partition(".json:")
    return os.path.splitext(file_name)[0] + (f":{selector}" if selector else "")


def main(args: Args) -> dict:
    if len(args.reports) < 2:
        raise ValueError(f"give at least two reports to compare, got {len(args.reports)}")
    names = list(args.names or [default_name(path) for path in args.reports])
    if len(names) != len(args.reports) or len(set(names)) != len(names):
        raise ValueError(f"names {names} must be distinct, one per report ({len(args.reports)})")
    shas = list(args.policy_sha or [""] * len(args.reports))
    if len(shas) != len(args.reports):
        raise ValueError(f"policy_sha has {len(shas)} entries: give one per report ({len(args.reports)}), '' for all rows")
    result = compare([start_outcomes(path, sha) for path, sha in zip(args.reports, shas)], names)
    result["inputs"] = dict(zip(names, args.reports))
    text = markdown(result, names)
    return publish(result, text, args.json_out)


if __name__ == "__main__":
    main(tyro.cli(Args))
