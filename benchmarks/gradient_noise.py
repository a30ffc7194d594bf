"""How much of a GRPO update is signal: the gradient noise scale of a run's rollout groups.

GRPO steps along a gradient estimated from a few groups of sparse-reward episodes. For every *informative* group
(mixed outcomes: an all-success or all-fail group has advantage 0 and no gradient) in a GRPO run's episode store
(its ``cache_dir``), at the weights of ``--checkpoint``, this takes the policy gradient of that group alone,
``g_i``: the gradient of GRPO's clipped surrogate at ratio 1 (its value before a step), a token mean over the
group's tokens with its group-relative advantages. From N such groups:

- the **simple noise scale** ``B = tr(Sigma) / |G|^2`` (McCandlish et al. 2018, "An Empirical Model of Large-Batch
  Training"), in groups: ``G`` the mean gradient, ``Sigma`` a group's covariance around it. A batch of ``n`` groups
  points along ``G`` with ``cos^2 ~ 1 / (1 + B / n)``: about ``B`` informative groups make an update direction that is
  half signal, and an update of far fewer is mostly noise. Estimated from the Gram matrix ``K_ij = g_i . g_j``:
  ``|G|^2`` as the mean of ``K_ij`` over pairs ``i != j`` (unbiased), ``E|g|^2`` as the mean of ``K_ii``,
  ``tr(Sigma) = E|g|^2 - |G|^2``; a 95% interval by resampling the groups (pairs of one group's copies left out);
- the check: the mean cosine between the summed gradients of two disjoint random sets of ``n`` groups, measured, next
  to the ``1 / (1 + B / n)`` the noise scale predicts;
- ``B`` in env steps: times the env steps the store's complete groups took per informative one (all-equal groups
  cost steps too);
- with ``--demos``: the offline term's gradient (the demo NLL of GRPO's imitation term on batches of
  ``--imitation-batch-size`` chunks): its norm per batch against the norm of one update's policy gradient
  (``--num-groups`` groups), its own noise scale (in batches), and the cosine between the two means: whether the
  imitation term pulls along the reward's direction or against it.

    python benchmarks/gradient_noise.py --checkpoint runs/vision/spatial_sft_ema_sampled/sft \\
        --cache runs/vision/sft_vs_grpo_spatial_ema_long/grpo_offline_seed0/cache \\
        --demos data/spatial_rgb128.hdf5 --json-out benchmarks/results/gradient_noise_vision_spatial.json

Groups are read by their ``group_id`` (:func:`gym_libero_vla.rollouts.run_group` tags them). Stores written by the
synchronous GRPO before it tagged groups hold none: there a group is ``--group-size`` consecutive online episodes of
one (task, init state) and policy version. Memory: N gradients of the trainable parameters (175 groups of a 0.56M
parameter CompactVLA: 0.4 GB).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Annotated

import numpy as np
import torch
import tyro
from reporting import command_line, machine_info, publish

from gym_libero_vla.algos.base import check_ints, is_int
from gym_libero_vla.algos.grpo import GroupRollout, clipped_surrogate, group_relative_advantages
from gym_libero_vla.algos.sft import Transitions, demo_token_log_probs, masked_mean
from gym_libero_vla.demos.libero_hdf5 import load_episodes
from gym_libero_vla.episode_store import EpisodeStore
from gym_libero_vla.policies import TorchThreads, load_policy


@dataclasses.dataclass
class Args:
    checkpoint: str
    """The policy whose gradients are measured (a policy directory, or an SFT / GRPO checkpoint holding one)."""
    cache: tuple[str, ...] = ()
    """Episode stores of GRPO runs (``cache_dir``), read: their groups are pooled."""
    demos: tuple[str, ...] = ()
    """LIBERO HDF5 demo files for the offline term's gradient (none: not measured)."""
    group_size: int = 4
    """Episodes a group; the stores' groups must have it."""
    num_groups: int = 2
    """Groups one GRPO update takes (GRPO's --num-groups): the update whose gradient norm is reported."""
    max_groups: int | None = None
    """Use at most this many informative groups, the first in the stores' order (default: all)."""
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    """Set sizes (in groups) whose cosine is measured (those above half the groups are left out)."""
    imitation_batch_size: int = 64
    """Demo chunks a batch of the offline term (GRPO's --imitation-batch-size)."""
    imitation_batches: int = 64
    """Batches of the offline term measured (its own gradient is noisy too: its mean needs many)."""
    minibatch_size: int = 128
    """Steps a forward pass (memory only: the gradient is the same)."""
    draws: int = 200
    """Random set pairs a measured cosine averages; resamples of the noise scale's interval."""
    seed: int = 0
    threads: Annotated[TorchThreads, tyro.conf.OmitArgPrefixes] = dataclasses.field(default_factory=TorchThreads)
    """Torch CPU threads: --torch-threads (default 1)."""
    json_out: str | None = None
    """Also write the results as JSON (and Markdown next to it)."""


def check_args(args: Args) -> None:
    if not args.cache:
        raise ValueError("give at least one episode store: --cache DIR [DIR ...] (a GRPO run's cache_dir)")
    for path in args.cache:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"episode store {path!r} does not exist (a GRPO run's cache_dir)")
    missing = [path for path in args.demos if not os.path.exists(path)]
    if missing:
        raise FileNotFoundError(f"demo file(s) {missing} do not exist")
    check_ints(args, group_size=2, num_groups=1, imitation_batch_size=1, imitation_batches=1, minibatch_size=1, draws=1)
    if args.max_groups is not None and not is_int(args.max_groups, 2):
        raise ValueError(f"max_groups {args.max_groups!r} must be an int >= 2 or None")
    if not args.batch_sizes or any(not is_int(n, 1) for n in args.batch_sizes):
        raise ValueError(f"batch_sizes {args.batch_sizes!r} must be ints >= 1")


def stored_groups(store: EpisodeStore, group_size: int) -> tuple[list[list[dict]], int]:
    """The store's complete groups (their online episodes' index rows) and the online env steps they took."""
    rows = store.records(source="online")
    online = {row["episode_id"]: row for row in rows}
    groups = [[online[i] for i in group["episode_ids"] if i in online] for group in store.groups()]
    untagged = [row for row in rows if row["group_id"] is None]  # a synchronous GRPO's store before group ids
    start = 0
    while start + group_size <= len(untagged):
        run = untagged[start : start + group_size]
        if len({(row["task_id"], row["init_state_id"], row["policy_version"]) for row in run}) == 1:
            groups.append(run)
            start += group_size
        else:
            start += 1
    complete = [group for group in groups if len(group) == group_size]
    return complete, sum(row["num_steps"] for group in complete for row in group)


def trainable(policy) -> list[torch.nn.Parameter]:
    return [parameter for parameter in policy.parameters() if parameter.requires_grad]


def flat_gradient(parameters) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in parameters])


def group_gradient(policy, episodes, group_size: int, minibatch_size: int) -> torch.Tensor:
    """GRPO's policy gradient of one group at ratio 1: the clipped surrogate's, a token mean over its tokens."""
    rollout = GroupRollout.from_episodes(episodes, policy.action_bins, policy.observation_keys,
                                         chunk_size=policy.chunk_size)  # fmt: skip
    advantages = group_relative_advantages(torch.as_tensor(rollout.episode_rewards), group_size)
    step_advantages = advantages[rollout.episode_index][:, None].to(policy.device)
    steps = np.arange(len(rollout.action_tokens))
    mask = rollout.token_mask if rollout.token_mask is not None else np.ones(rollout.action_tokens.shape, bool)
    num_tokens = float(mask.sum())
    parameters = trainable(policy)
    policy.zero_grad(set_to_none=True)
    for start in range(0, len(steps), minibatch_size):
        part = steps[start : start + minibatch_size]
        tokens = torch.as_tensor(rollout.action_tokens[part], device=policy.device)
        log_probs, _ = policy.log_prob(rollout.batch(part), tokens, 1.0)
        part_mask = torch.as_tensor(mask[part], device=policy.device)
        # The surrogate's token mean over this part, weighted by its share of the group's tokens: the group's mean.
        loss, _, _ = clipped_surrogate(log_probs, log_probs.detach(), step_advantages[part], 0.2, 0.2, mask=part_mask)
        (loss * float(mask[part].sum()) / num_tokens).backward()
    return flat_gradient(parameters)


def noise_scale(gram: np.ndarray, counts: np.ndarray | None = None) -> dict:
    """``|G|^2``, ``E|g|^2``, ``tr(Sigma)`` and ``B`` from a Gram matrix of per-group gradients; ``counts``: how
    often each group was drawn (a resample), pairs of one group with itself left out of ``|G|^2``."""
    counts = np.ones(len(gram)) if counts is None else counts
    diagonal = np.diag(gram)
    pairs = counts.sum() ** 2 - (counts**2).sum()
    signal = float((counts @ gram @ counts - (counts**2 * diagonal).sum()) / pairs)
    mean_square = float((counts * diagonal).sum() / counts.sum())
    trace = mean_square - signal
    return {"signal": signal, "mean_square": mean_square, "trace_sigma": trace,
            "noise_scale": trace / signal if signal > 0 else float("inf")}  # fmt: skip


def set_cosines(gram: np.ndarray, sizes, draws: int, rng: np.random.Generator) -> dict:
    """Mean cosine (and its standard error) between the summed gradients of two disjoint random sets of n groups."""
    out = {}
    for n in sizes:
        if 2 * n > len(gram):
            continue
        cosines = []
        for _ in range(draws):
            order = rng.permutation(len(gram))
            a, b = order[:n], order[n : 2 * n]
            dot = gram[np.ix_(a, b)].sum()
            cosines.append(dot / np.sqrt(gram[np.ix_(a, a)].sum() * gram[np.ix_(b, b)].sum()))
        out[n] = {"mean": float(np.mean(cosines)), "sem": float(np.std(cosines) / np.sqrt(draws))}
    return out


def imitation_gradients(policy, paths, batch_size: int, batches: int, rng: np.random.Generator) -> torch.Tensor:
    """Gradients of the offline term's demo NLL (GRPO's imitation loss on demos), one per random batch."""
    episodes = load_episodes(list(paths))
    if not episodes:
        raise ValueError(f"{list(paths)} hold no successful demonstration")
    demos = Transitions.from_episodes(episodes, policy.observation_keys, policy.action_dim, policy.chunk_size)
    parameters, gradients = trainable(policy), []
    for _ in range(batches):
        indices = rng.integers(len(demos), size=batch_size)
        obs, actions = demos.batch(indices)
        mask = demos.token_mask(indices)
        policy.zero_grad(set_to_none=True)
        _, token_log_probs, _ = demo_token_log_probs(policy, obs, actions)
        (-masked_mean(token_log_probs, None if mask is None else torch.as_tensor(mask, device=policy.device))).backward()
        gradients.append(flat_gradient(parameters))
    return torch.stack(gradients)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp(min=1e-30))


def measure(args: Args) -> dict:
    clock = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    policy = load_policy(args.checkpoint)
    policy.train()  # as GRPO's update
    gradients, groups_info, stores = [], [], []
    for path in args.cache:
        with EpisodeStore(path) as store:
            groups, env_steps = stored_groups(store, args.group_size)
            informative = [group for group in groups if 0 < sum(row["success"] for row in group) < args.group_size]
            stores.append({"path": path, "groups": len(groups), "informative": len(informative), "env_steps": env_steps})
            for group in informative:
                if args.max_groups is not None and len(gradients) >= args.max_groups:
                    break
                episodes = [store.load(row["episode_id"]) for row in group]
                gradients.append(group_gradient(policy, episodes, args.group_size, args.minibatch_size).numpy())
                groups_info.append({"task_id": group[0]["task_id"], "init_state_id": group[0]["init_state_id"],
                                    "policy_version": group[0]["policy_version"],
                                    "successes": sum(row["success"] for row in group)})  # fmt: skip
    if len(gradients) < 4:
        raise ValueError(f"{len(gradients)} informative groups (mixed outcomes, {args.group_size} episodes) in "
                         f"{list(args.cache)}: need at least 4")  # fmt: skip
    matrix = torch.as_tensor(np.stack(gradients))
    gram = (matrix.double() @ matrix.double().T).numpy()
    estimate = noise_scale(gram)
    resampled = [noise_scale(gram, np.bincount(rng.integers(len(gram), size=len(gram)), minlength=len(gram)))
                 for _ in range(args.draws)]  # fmt: skip
    scales = np.array([entry["noise_scale"] for entry in resampled])
    cosines = set_cosines(gram, args.batch_sizes + (len(gram) // 2,), args.draws, rng)
    for n, entry in cosines.items():
        entry["predicted"] = 1.0 / (1.0 + estimate["noise_scale"] / n)
    total_steps = sum(store["env_steps"] for store in stores)
    total_informative = sum(store["informative"] for store in stores)
    steps_per_informative = total_steps / total_informative if total_informative else float("inf")
    update_norms = [float(matrix[rng.choice(len(matrix), args.num_groups, replace=False)].mean(0).norm())
                    for _ in range(args.draws)]  # fmt: skip
    report = {
        "checkpoint": args.checkpoint, "stores": stores, "num_groups_measured": len(gradients),
        "parameters": int(matrix.shape[1]),
        **estimate,
        "noise_scale_ci95": [float(np.percentile(scales, 2.5, method="lower")),  # no inf - inf between draws
                             float(np.percentile(scales, 97.5, method="higher"))],
        "env_steps_per_informative_group": steps_per_informative,
        "noise_scale_env_steps": estimate["noise_scale"] * steps_per_informative,
        "set_cosines": cosines,
        "update_groups": args.num_groups,
        "update_gradient_norm": float(np.mean(update_norms)),
        "mean_gradient_norm": float(matrix.mean(0).norm()),
        "groups": groups_info,
    }  # fmt: skip
    if args.demos:
        imitation = imitation_gradients(policy, args.demos, args.imitation_batch_size, args.imitation_batches, rng)
        pairs = [cosine(imitation[i], imitation[j]) for i in range(len(imitation)) for j in range(i + 1, len(imitation))]
        imitation_scale = noise_scale((imitation.double() @ imitation.double().T).numpy())["noise_scale"]
        report["imitation"] = {
            "demos": list(args.demos), "batch_size": args.imitation_batch_size, "batches": len(imitation),
            "gradient_norm": float(imitation.norm(dim=1).mean()),
            "cosine_between_batches": float(np.mean(pairs)) if pairs else None,
            "noise_scale_batches": imitation_scale,
            "cosine_with_policy_gradient": cosine(imitation.mean(0).float(), matrix.mean(0).float()),
        }  # fmt: skip
    report["seconds"] = time.perf_counter() - clock
    return report


def markdown(report: dict) -> str:
    scale, (low, high) = report["noise_scale"], report["noise_scale_ci95"]
    if np.isfinite(scale):
        headline = (f"- **noise scale B = {scale:.1f} groups [95%: {low:.1f}, {high:.1f}]**: about {scale:.0f} "
                    f"informative groups make an update direction that is half signal; "
                    f"{report['env_steps_per_informative_group']:.0f} env steps per informative group, so "
                    f"**{report['noise_scale_env_steps']:,.0f} env steps**")  # fmt: skip
    else:
        headline = (f"- **noise scale B: no signal measured** (the groups' mean gradient is not distinguishable from 0; "
                    f"95%: {low:.1f}, {high:.1f})")  # fmt: skip
    lines = [
        f"## GRPO gradient noise of `{report['checkpoint']}`",
        "",
        f"{report['num_groups_measured']} informative groups from "
        + ", ".join(f"`{s['path']}` ({s['informative']} of {s['groups']} groups informative)" for s in report["stores"])
        + f"; {report['parameters']:,} trainable parameters.",
        "",
        headline,
        f"- one update of {report['update_groups']} groups: expected cos^2 with the true gradient "
        f"{1 / (1 + scale / report['update_groups']):.2f}; its gradient norm {report['update_gradient_norm']:.3g}, "
        f"the mean over all groups {report['mean_gradient_norm']:.3g}",
        "",
        "Cosine between the gradients of two disjoint random sets of n groups, measured against 1 / (1 + B / n):",
        "",
        "| n (groups) | measured | ± s.e. | predicted |",
        "|---:|---:|---:|---:|",
    ]
    for n, entry in report["set_cosines"].items():
        lines.append(f"| {n} | {entry['mean']:.3f} | {entry['sem']:.3f} | {entry['predicted']:.3f} |")
    if "imitation" in report:
        imitation = report["imitation"]
        lines += ["", f"Offline term (demo NLL, batches of {imitation['batch_size']} chunks, {imitation['batches']} "
                  f"batches): gradient norm {imitation['gradient_norm']:.3g} a batch, cosine between batches "
                  f"{imitation['cosine_between_batches']:.3f} (noise scale {imitation['noise_scale_batches']:.1f} "
                  f"batches), cosine of its mean with the mean policy gradient "
                  f"{imitation['cosine_with_policy_gradient']:.3f}."]  # fmt: skip
    lines += ["", f"- machine: {report['machine']['cpu_count']} CPUs, torch {report['machine']['torch']}; "
              f"{report['seconds']:.0f} s", f"- command: `{report['command']}`", ""]  # fmt: skip
    return "\n".join(lines)


def main(args: Args) -> dict:
    check_args(args)
    args.threads.apply()
    report = measure(args)
    report.update(machine=machine_info(args.threads.torch_threads), command=command_line(args, "benchmarks/gradient_noise.py"))
    return publish(report, markdown(report), args.json_out)


if __name__ == "__main__":
    main(tyro.cli(Args))
