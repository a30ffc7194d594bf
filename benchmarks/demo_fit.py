"""How a policy fits demonstrations, per action dimension, and which inputs its predictions rest on.

For each demo file (LIBERO HDF5: ours, or the official LIBERO data), on up to ``--max-transitions`` evenly spaced
transitions, teacher-forced as in SFT (:func:`gym_libero_vla.algos.sft.demo_fit`):

- per action dimension (x, y, z, roll, pitch, yaw, gripper), the accuracy of the policy's greedy token and its mean
  distance in bins from the demonstrated one. On the demos a policy was trained on this is its fit; on demos of other
  states (held-out init states, or DART demos whose perturbed states the clean demos never visit) it is how the
  policy's actions generalize off its training data, without running an episode;
- for each input the policy reads (instruction, each camera, proprio state), the same with that input taken from
  another transition drawn at random: permutation importance (Breiman, 2001). The accuracy lost is what the
  predictions rest on that input; an input whose swap costs nothing is one the policy ignores.

    python benchmarks/demo_fit.py --checkpoint runs/vision/spatial_sft/sft --demos data/spatial_rgb128.hdf5 \\
        data/spatial_rgb128_dart.hdf5 --json-out benchmarks/results/demo_fit_vision_spatial.json
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Annotated

import tyro
from reporting import command_line, machine_info, publish

from gym_libero_vla.algos.sft import Transitions, demo_fit
from gym_libero_vla.demos.libero_hdf5 import load_episodes
from gym_libero_vla.policies import TorchThreads, load_policy

DIMENSIONS = ("x", "y", "z", "roll", "pitch", "yaw", "gripper")


@dataclasses.dataclass
class Args:
    checkpoint: str
    """A policy directory (``save_pretrained``; an SFT or GRPO checkpoint's ``policy`` is found there too)."""
    demos: tuple[str, ...] = ()
    """LIBERO HDF5 demo files, each measured on its own."""
    max_transitions: int = 2048
    """Transitions per file (evenly spaced over its episodes)."""
    permute: tuple[str, ...] | None = None
    """Inputs to permute one at a time (default: every input the policy reads)."""
    seed: int = 0
    """Draws the transitions each permuted input is taken from."""
    threads: Annotated[TorchThreads, tyro.conf.OmitArgPrefixes] = dataclasses.field(default_factory=lambda: TorchThreads(2))
    """Torch CPU threads: --torch-threads (default 2: no simulator runs)."""
    json_out: str | None = None
    """Also write the results as JSON (and Markdown next to it)."""


def check_args(args: Args) -> None:
    if not args.demos:
        raise ValueError("give at least one demo file: --demos FILE [FILE ...]")
    missing = [path for path in args.demos if not os.path.exists(path)]
    if missing:
        raise FileNotFoundError(f"demo file(s) {missing} do not exist")
    if not (isinstance(args.max_transitions, int) and args.max_transitions >= 1):
        raise ValueError(f"max_transitions {args.max_transitions!r} must be an int >= 1")


def measure(policy, path: str, max_transitions: int, permute, seed: int) -> dict:
    """The fit on ``path``, and the fit with each input of ``permute`` permuted."""
    clock = time.perf_counter()
    episodes = load_episodes(path)
    if not episodes:
        raise ValueError(f"{path} holds no successful demonstration")
    demos = Transitions.from_episodes(episodes, policy.observation_keys, policy.action_dim, policy.chunk_size)
    fits = {"none": demo_fit(policy, demos, max_transitions)}
    for key in permute:
        fits[key] = demo_fit(policy, demos, max_transitions, permute=(key,), seed=seed)
    return {"path": path, "episodes": len(episodes), "transitions": len(demos), "fits": fits,
            "seconds": time.perf_counter() - clock}  # fmt: skip


def markdown(report: dict) -> str:
    lines = [f"## Demo fit of `{report['checkpoint']}`", ""]
    names = DIMENSIONS[: len(next(iter(report["files"]))["fits"]["none"]["token_accuracy_per_dimension"])]
    for entry in report["files"]:
        lines += [
            f"### {entry['path']} ({entry['episodes']} episodes, {entry['fits']['none']['transitions']} of "
            f"{entry['transitions']} transitions)",
            "",
            "Token accuracy per action dimension (the input in the first column taken from another transition):",
            "",
            "| permuted | " + " | ".join(names) + " | all | loss |",
            "|---|" + "---:|" * (len(names) + 2),
        ]
        for key, fit in entry["fits"].items():
            cells = [f"{value:.3f}" for value in fit["token_accuracy_per_dimension"]]
            lines.append(f"| {key} | " + " | ".join(cells) + f" | {fit['token_accuracy']:.3f} | {fit['loss']:.3f} |")
        errors = entry["fits"]["none"]["bin_error_per_dimension"]
        lines += ["", "Mean distance of the greedy token from the demonstrated one, in bins (of 256), nothing permuted: "
                  + ", ".join(f"{name} {value:.1f}" for name, value in zip(names, errors)), ""]  # fmt: skip
    lines += [f"- command: `{report['command']}`", ""]
    return "\n".join(lines)


def main(args: Args) -> dict:
    check_args(args)
    args.threads.apply()
    policy = load_policy(args.checkpoint)
    inputs = ("instruction", *(key for key in policy.observation_keys if key != "instruction"))
    permute = inputs if args.permute is None else args.permute
    unknown = sorted(set(permute) - set(inputs))
    if unknown:
        raise ValueError(f"permute: the policy reads no input {unknown}: valid {list(inputs)}")
    report = {
        "checkpoint": args.checkpoint, "inputs": list(inputs),
        "files": [measure(policy, path, args.max_transitions, permute, args.seed) for path in args.demos],
        "machine": machine_info(args.threads.torch_threads), "command": command_line(args, "benchmarks/demo_fit.py"),
    }  # fmt: skip
    text = markdown(report)
    return publish(report, text, args.json_out)


if __name__ == "__main__":
    main(tyro.cli(Args))
