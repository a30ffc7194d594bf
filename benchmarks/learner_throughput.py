"""The learner's update throughput for CompactVLAs of growing size, on the CPU or a GPU: what a bigger policy costs.

    python benchmarks/learner_throughput.py --json-out benchmarks/results/learner_throughput_cpu.json  # ~7 min
    python benchmarks/learner_throughput.py --sizes xl --phases sft act --sft-steps 2 --warmup 0   # CPU, 'xl': ~5 min
    python benchmarks/learner_throughput.py --device cuda --sizes recipe large xl --torch-threads 16 \\
        --json-out benchmarks/results/learner_throughput_cuda.json      # a GPU: all three sizes in ~40 s

For each size of the vision recipe (both cameras at 128 px, proprio, the instruction's words, chunks of 8 actions),
times the real learner code on batches shaped like the pixel runs':

- **SFT**: :meth:`SFT.train_step` (a batch of ``sft.batch_size`` demo transitions, random shifts, backward, AdamW,
  the weights' moving average): steps/s and transitions/s.
- **GRPO**: :meth:`GRPO.train` on one rollout of ``num_groups * group_size`` episodes of ``rollout_queries`` chunk
  queries each (the length of a failed LIBERO-Spatial episode: 220 env steps / 8), half of them successes, with
  the offline term on demos: the whole update (every epoch and minibatch) per rollout, and the env steps it learns
  from per second -- to set against the env steps/s the CPU rollout workers produce.
- **Acting**: one chunk query (:meth:`VLAPolicy.act`, sampling) for one env and for a batch of ``act_batch`` envs:
  a rollout worker's cost per query.

The frames, states and actions are random (uniform), the instructions LIBERO-Spatial's own: what a step costs
depends on shapes, not on pixel values, and random data lets the command run where neither LIBERO nor demo files
exist (a lent GPU machine). Steps are timed after ``warmup`` untimed ones (CUDA: synchronised). Writes Markdown and
JSON (``--json-out``).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Annotated

import numpy as np
import torch
import tyro
from reporting import command_line, cpu_model, machine_info, publish, write_report_files

from gym_libero_vla.algos import GRPO, SFT, GRPOConfig, SFTConfig
from gym_libero_vla.algos.grpo import GroupRollout
from gym_libero_vla.episode import Episode
from gym_libero_vla.policies import CompactVLA, CompactVLAConfig, TorchThreads, WordTokenizer, resolve_device
from gym_libero_vla.wrappers.action_tokenizer import ActionBins

# LIBERO-Spatial's instructions, written out so that the benchmark runs where LIBERO is not installed (a GPU machine);
# tests/benchmarks/test_learner_throughput.py checks them against the suite.
SPATIAL_INSTRUCTIONS = (
    "pick up the black bowl between the plate and the ramekin and place it on the plate",
    "pick up the black bowl next to the ramekin and place it on the plate",
    "pick up the black bowl from table center and place it on the plate",
    "pick up the black bowl on the cookie box and place it on the plate",
    "pick up the black bowl in the top drawer of the wooden cabinet and place it on the plate",
    "pick up the black bowl on the ramekin and place it on the plate",
    "pick up the black bowl next to the cookie box and place it on the plate",
    "pick up the black bowl on the stove and place it on the plate",
    "pick up the black bowl next to the plate and place it on the plate",
    "pick up the black bowl on the wooden cabinet and place it on the plate",
)

# Policy sizes: "recipe" is the pixel policy of the SFT/GRPO results (benchmarks/sft_vs_grpo.py's vision flags); the
# others widen and deepen its transformer and encode the frames at full resolution.
SIZES: dict[str, dict] = {
    "recipe": dict(hidden_size=128, num_layers=2, num_heads=4, encoder_size=64),
    "large": dict(hidden_size=512, num_layers=8, num_heads=8, encoder_size=128),
    "xl": dict(hidden_size=1024, num_layers=16, num_heads=16, encoder_size=128),
}
PHASES = ("sft", "grpo", "act")


@dataclasses.dataclass
class Args:
    device: str = "cpu"
    """Where the learner runs: "cpu", "cuda", "cuda:<i>" or "auto"."""
    sizes: tuple[str, ...] = ("recipe", "large")
    """Policy sizes to measure, from SIZES ("recipe", "large", "xl")."""
    phases: tuple[str, ...] = PHASES
    """What to time, from PHASES: "sft" (SFT steps), "grpo" (GRPO updates), "act" (chunk queries)."""
    sft_steps: int = 5
    """Timed SFT steps per size."""
    grpo_updates: int = 2
    """Timed GRPO updates (whole rollouts) per size."""
    act_queries: int = 10
    """Timed chunk queries per batch size."""
    act_batch: int = 8
    """Envs per batched query (a vector env's sub-envs)."""
    warmup: int = 1
    """Untimed steps / updates / queries before each measurement."""
    rollout_queries: int = 28
    """Chunk queries per synthetic rollout episode (a failed LIBERO-Spatial episode: 220 env steps in chunks of 8)."""
    demo_steps: int = 120
    """Steps per synthetic demonstration (LIBERO-Spatial's scripted demos: ~100-150 after no-ops are dropped)."""
    num_demos: int = 16
    image_size: int = 128
    chunk_size: int = 8
    threads: Annotated[TorchThreads, tyro.conf.OmitArgPrefixes] = dataclasses.field(default_factory=lambda: TorchThreads(2))
    """Torch CPU threads: --torch-threads (default 2, the CPU learner's setting on 2 cores)."""
    sft: SFTConfig = dataclasses.field(default_factory=lambda: SFTConfig(random_shift=8, ema_decay=0.999, seed=0))
    """SFT settings (the Spatial recipe's random shifts and moving average)."""
    grpo: GRPOConfig = dataclasses.field(default_factory=lambda: GRPOConfig(seed=0))
    """GRPO settings (the pixel runs': 2 groups of 4, 2 epochs of 128-step minibatches, 64 demo steps each)."""
    json_out: str | None = None
    seed: int = 0


def make_policy(size: str, args: Args, device: torch.device) -> CompactVLA:
    config = CompactVLAConfig(
        cameras=("agentview", "wrist"), image_size=args.image_size, chunk_size=args.chunk_size, **SIZES[size]
    )
    bins = ActionBins.from_statistics({"q01": [-0.9] * 6 + [-1.0], "q99": [0.9] * 6 + [1.0]})
    return CompactVLA(config, bins, WordTokenizer.from_texts(SPATIAL_INSTRUCTIONS)).to(device)


def random_observations(num_steps: int, image_size: int, instruction: str, rng: np.random.Generator) -> dict:
    frame = (num_steps, image_size, image_size, 3)
    return {
        "agentview": rng.integers(0, 256, frame, dtype=np.uint8), "wrist": rng.integers(0, 256, frame, dtype=np.uint8),
        "state": rng.normal(size=(num_steps, 8)).astype(np.float32), "instruction": instruction,
    }  # fmt: skip


def synthetic_demos(args: Args, rng: np.random.Generator) -> list[Episode]:
    """One-action demonstrations with random frames, states and actions (SFT windows them into chunks)."""
    return [
        Episode(
            observations=random_observations(args.demo_steps, args.image_size, SPATIAL_INSTRUCTIONS[i % 10], rng),
            actions=rng.uniform(-1, 1, (args.demo_steps, 7)).astype(np.float32),
            rewards=np.zeros(args.demo_steps, np.float32),
            success=True,
            task_id=i % 10,
            source="offline",
        )
        for i in range(args.num_demos)
    ]


def synthetic_rollout(policy: CompactVLA, args: Args, rng: np.random.Generator) -> GroupRollout:
    """``num_groups * group_size`` chunked on-policy episodes, half of each group successful (every group informative)."""
    config, steps, tokens = args.grpo, args.rollout_queries, policy.num_action_tokens
    episodes = [
        Episode(
            observations=random_observations(steps, args.image_size, SPATIAL_INSTRUCTIONS[group % 10], rng),
            actions=rng.uniform(-1, 1, (steps, args.chunk_size, 7)).astype(np.float32),
            rewards=np.zeros(steps, np.float32),
            success=bool(member % 2),
            task_id=group % 10,
            log_probs=np.full((steps, tokens), -np.log(policy.num_bins), np.float32),
        )
        for group in range(config.num_groups)
        for member in range(config.group_size)
    ]
    return GroupRollout.from_episodes(episodes, policy.action_bins, policy.observation_keys, chunk_size=policy.chunk_size)


def timed(function, repeats: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of ``function`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def time_sft(policy: CompactVLA, demos: list[Episode], args: Args, device: torch.device) -> float:
    """Seconds per :meth:`SFT.train_step`."""
    sft = SFT(policy, demos=demos, **dataclasses.asdict(args.sft))
    policy.train()
    return timed(sft.train_step, args.sft_steps, args.warmup, device)


def time_grpo(policy: CompactVLA, demos: list[Episode], rollout: GroupRollout, args: Args, device: torch.device) -> float:
    """Seconds per :meth:`GRPO.train` on ``rollout`` (every epoch and minibatch, with the offline term)."""
    grpo = GRPO(policy, demos=demos, **dataclasses.asdict(args.grpo))

    def update():
        grpo.policy_version = 0  # the rollout stays on-policy, as in synchronous GRPO
        grpo.train(rollout)

    return timed(update, args.grpo_updates, args.warmup, device)


def time_act(policy: CompactVLA, batch: int, args: Args, rng: np.random.Generator, device: torch.device) -> float:
    """Seconds per sampled chunk query for ``batch`` envs."""
    obs = random_observations(batch, args.image_size, SPATIAL_INSTRUCTIONS[0], rng)
    obs["instruction"] = [obs["instruction"]] * batch
    policy.eval()
    return timed(lambda: policy.act(obs), args.act_queries, args.warmup, device)


def measure(size: str, args: Args, device: torch.device) -> dict:
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    policy = make_policy(size, args, device)
    demos = synthetic_demos(args, rng)
    row = {"size": size, **SIZES[size], "parameters": sum(p.numel() for p in policy.parameters())}
    if "sft" in args.phases:
        seconds = time_sft(policy, demos, args, device)
        row.update(sft_step_s=seconds, sft_transitions_per_s=args.sft.batch_size / seconds)
        print(f"{size}: SFT {seconds:.3f} s a step", flush=True)
    if "grpo" in args.phases:
        rollout = synthetic_rollout(policy, args, rng)
        seconds = time_grpo(policy, demos, rollout, args, device)
        env_steps = len(rollout.action_tokens) * args.chunk_size
        row.update(grpo_update_s=seconds, grpo_env_steps_learned_per_s=env_steps / seconds, grpo_rollout_env_steps=env_steps)
        print(f"{size}: GRPO {seconds:.2f} s an update", flush=True)
    if "act" in args.phases:
        for batch in (1, args.act_batch):
            row[f"act_batch{batch}_s"] = time_act(policy, batch, args, rng, device)
        print(f"{size}: act {1000 * row['act_batch1_s']:.1f} ms a query", flush=True)
    if device.type == "cuda":
        row["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def _cell(row: dict, key: str, form: str, scale: float = 1.0) -> str:
    return format(scale * row[key], form) if key in row else ""


def markdown(report: dict) -> str:
    args = report["args"]
    grpo = args["grpo"]
    env_steps = grpo["num_groups"] * grpo["group_size"] * args["rollout_queries"] * args["chunk_size"]
    lines = [
        f"# Learner throughput on {report['device_name']} ({report['device']})",
        "",
        f"`{report['command']}`: {report['wall_s']:.0f} s wall. Random frames and actions shaped like the pixel runs' "
        f"(two {args['image_size']} px cameras, chunks of {args['chunk_size']}). SFT: batches of {args['sft']['batch_size']} "
        f"transitions. GRPO: one rollout of {env_steps} env steps ({grpo['num_groups']} groups of {grpo['group_size']}, "
        f"{args['rollout_queries']} queries each), {grpo['num_epochs']} epochs of {grpo['minibatch_size']}-step "
        f"minibatches plus {grpo['imitation_batch_size']} demo steps each. Blank: a phase not measured (--phases).",
        "",
        "| size | hidden x layers | encoder px | parameters | SFT step (s) | SFT transitions/s | GRPO update (s) | "
        f"GRPO env steps learned/s | act, 1 env (ms) | act, {args['act_batch']} envs (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    batched = f"act_batch{args['act_batch']}_s"
    for row in report["rows"]:
        cell = functools.partial(_cell, row)
        lines.append(
            f"| {row['size']} | {row['hidden_size']} x {row['num_layers']} | {row['encoder_size']} | "
            f"{row['parameters'] / 1e6:.1f} M | {cell('sft_step_s', '.3f')} | {cell('sft_transitions_per_s', '.1f')} | "
            f"{cell('grpo_update_s', '.2f')} | {cell('grpo_env_steps_learned_per_s', '.0f')} | "
            f"{cell('act_batch1_s', '.1f', 1000)} | {cell(batched, '.1f', 1000)} |"
        )
    return "\n".join(lines) + "\n"


def main(args: Args) -> dict:
    unknown = [size for size in args.sizes if size not in SIZES]
    if unknown:
        raise ValueError(f"unknown size(s) {unknown}: valid {tuple(SIZES)}")
    unknown = [phase for phase in args.phases if phase not in PHASES]
    if unknown or not args.phases:
        raise ValueError(f"unknown phase(s) {unknown or list(args.phases)}: valid {PHASES}, at least one")
    args.threads.apply()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    started = time.perf_counter()
    report = {
        "command": command_line(args, "benchmarks/learner_throughput.py"), "device": str(device), "device_name": name,
        "args": dataclasses.asdict(args), "rows": [],
    }  # fmt: skip
    for size in args.sizes:
        report["rows"].append(measure(size, args, device))
        report.update(wall_s=time.perf_counter() - started, machine=machine_info(args.threads.torch_threads))
        if args.json_out and size != args.sizes[-1]:  # each size as it finishes: a kill keeps those measured
            write_report_files(report, markdown(report), args.json_out)
    return publish(report, markdown(report), args.json_out)


if __name__ == "__main__":
    main(tyro.cli(Args))
