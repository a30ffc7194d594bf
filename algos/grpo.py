"""GRPO with offline regularization: group-relative policy optimization of a token-action VLA policy.

GRPO (Shao et al., 2024, DeepSeekMath) drops PPO's value function: for one prompt -- here one LIBERO
(task, init state) pair -- it samples a *group* of ``group_size`` episodes and scores each against the
group,

    A_j = (R_j - mean(R_1..R_G)) / (std(R_1..R_G) + eps)        R_j in {0, 1}: did episode j succeed

and every action token of episode ``j`` gets advantage ``A_j``. The policy is trained with PPO's clipped
surrogate per action token (Schulman et al., 2017), with DAPO's asymmetric "clip-higher" bounds
``[1 - clip_low, 1 + clip_high]`` (Yu et al., 2025) so that unlikely tokens of successful episodes can
grow. A group where every episode succeeded (or every one failed) has zero advantage everywhere;
``dynamic_sampling`` leaves those groups out of the update (DAPO) and logs their fraction.

Sparse success rarely happens early, so the loss adds an *offline* term: the negative log-likelihood of
demonstration tokens, weighted by ``imitation_weight``, which grows as the policy fails (adaptive
mixing of on- and off-policy data, as in LUFFY / SRFT). Demonstrations that carry the log-probabilities
of the policy that produced them (stale rollouts, relabelled episodes) are importance-weighted by the
truncated ratio ``min(pi / mu, is_clip)`` (truncated IS, as in Retrace / V-trace); scripted or human
demos carry none and get weight 1 (plain behaviour cloning). The full loss per minibatch:

    loss = pg_coef * pg_loss + imitation_weight * imitation_loss - entropy_coef * entropy + kl_coef * kl(pi || pi_ref)

with the k3 estimator of the KL to the reference policy (the base model without its LoRA adapter, or a
frozen copy of the initial policy). ``pg_loss`` is a mean over action tokens (DAPO); ``loss_aggregation=
"episode-mean"`` weighs every episode the same instead (:func:`episode_mean_advantages`).

The surface is stable-baselines3's: ``GRPO(policy, env, demos=None, **hyperparameters)``,
``learn(total_timesteps, callback, progress_bar)`` (timesteps are env steps), ``predict(obs,
deterministic)``, ``save(path)``, ``GRPO.load(path, env)``. TensorBoard gets ``rollout/success_rate``,
``rollout/frac_groups_zero_std``, ``rollout/ep_len_mean``, ``train/pg_loss``, ``train/imitation_loss``,
``train/imitation_weight``, ``train/entropy``, ``train/kl``, ``train/clip_fraction``, ``train/approx_kl``,
``train/is_weight_mean``, ``train/loss``, ``time/fps``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback

from gym_libero_vla import rollouts
from gym_libero_vla.algos.base import BaseLearner, check_ema_decay, check_ints, check_positive, is_finite
from gym_libero_vla.algos.sft import Transitions, demo_token_log_probs, episodes_of, masked_mean
from gym_libero_vla.episode import Episode
from gym_libero_vla.episode_store import EpisodeStore
from gym_libero_vla.policies.base import check_temperature
from gym_libero_vla.start_sampler import START_SAMPLING, StartSampler
from gym_libero_vla.success_replay import SuccessReplay
from gym_libero_vla.wrappers.rollout_relabel import rescue_failed_group, same_start_first

LOSS_AGGREGATIONS = ("token-mean", "episode-mean")


# ---------------------------------------------------------------------------------------------- the math
def group_relative_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """``(num_groups * group_size,)`` episode rewards -> advantages of the same shape.

    Group-relative advantage (GRPO): ``(R - mean_group) / (std_group + eps)``, with the unbiased std as
    TRL's GRPOTrainer. A group whose rewards are all equal (all success, all fail) gets exactly 0.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if rewards.ndim != 1 or len(rewards) % group_size:
        raise ValueError(f"rewards have shape {tuple(rewards.shape)}: expected (num_groups * {group_size},)")
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)
    advantages = (grouped - mean) / (std + eps)
    return torch.where(std > 0, advantages, torch.zeros_like(advantages)).view(-1)  # exactly 0, even with eps = 0


def episode_mean_advantages(advantages: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Scale each episode's advantage by ``mean(lengths) / length`` (``loss_aggregation="episode-mean"``).

    Under the token-mean loss an episode's total weight is ``A_j * L_j``: long failures outweigh short successes
    (one success in four, 144 vs 220 steps: +1.5 * 144 against 3 * -0.5 * 220). Scaled, every episode weighs
    ``A_j * mean(L)``, so a group's weights sum to zero like its advantages; the mean keeps the loss's scale."""
    lengths = torch.as_tensor(lengths, dtype=advantages.dtype)
    if lengths.shape != advantages.shape or not bool((lengths > 0).all()):
        raise ValueError(f"lengths {tuple(lengths.shape)} must be positive, one per advantage {tuple(advantages.shape)}")
    return advantages * lengths.mean() / lengths


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(num_groups,)`` bool: True where every episode of the group got the same reward (no learning signal;
    dynamic sampling, DAPO, leaves these groups out)."""
    grouped = torch.as_tensor(rewards, dtype=torch.float32).view(-1, group_size)
    return (grouped == grouped[:, :1]).all(dim=1)


def clipped_surrogate(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
    weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per action token, with asymmetric bounds (DAPO's clip-higher).

    ``log_probs`` ``(B, n)`` under the current policy (differentiable; ``n`` = 7 tokens an action, ``chunk_size * 7``
    a chunk), ``old_log_probs`` ``(B, n)`` under the policy the ratio is taken against (the sampling policy when
    on-policy, the proximal one otherwise), ``advantages`` broadcastable to ``(B, n)`` (an episode's advantage on each
    of its tokens), ``weights`` (optional, broadcastable, detached) per-token importance weights of off-policy tokens
    (decoupled PPO), ``mask`` (optional, ``(B, n)`` bool) the tokens that count: a chunk's tokens of actions the env
    never executed (the episode ended inside it) carry no consequence and are left out.
    Returns ``(pg_loss, clip_fraction, approx_kl)``: the loss is a token-level mean; ``clip_fraction`` the
    share of tokens whose ratio lies outside ``[1 - clip_low, 1 + clip_high]``; ``approx_kl`` the k3
    estimate of KL(old || new) (Schulman, "Approximating KL divergence").
    """
    log_ratio = log_probs - old_log_probs
    ratio = log_ratio.exp()  # pi_theta(a_i | ...) / pi_old(a_i | ...)
    advantages = torch.broadcast_to(advantages, ratio.shape)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg_losses = torch.max(pg_loss1, pg_loss2)  # pessimistic bound, PPO
    if weights is not None:
        pg_losses = pg_losses * weights
    pg_loss = masked_mean(pg_losses, mask)
    with torch.no_grad():
        clip_fraction = masked_mean(((ratio < 1.0 - clip_low) | (ratio > 1.0 + clip_high)).float(), mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
    return pg_loss, clip_fraction, approx_kl


def importance_weights(log_probs: torch.Tensor, behaviour_log_probs: torch.Tensor, is_clip: float) -> torch.Tensor:
    """Truncated importance weights ``min(pi / mu, is_clip)``, detached (Retrace / V-trace truncation).

    Offline or stale tokens were sampled by ``mu``; weighting their loss by ``pi / mu`` corrects for it, and
    the truncation bounds the variance when ``pi`` has moved far from ``mu``. Detached: the weight scales
    the gradient of the NLL, it is not itself optimized.
    """
    return torch.exp(log_probs.detach() - behaviour_log_probs).clamp(max=is_clip)


def adaptive_imitation_weight(success_rate: float, weight_min: float, weight_max: float) -> float:
    """The weight of the offline NLL term: ``weight_max`` when every rollout fails, ``weight_min`` when every
    one succeeds, linear between. A failing policy gets no GRPO signal (all-fail groups have zero
    advantage), so demonstrations must carry the learning then; a succeeding one should be free to improve
    on them (adaptive on/off-policy mixing, as in LUFFY / SRFT)."""
    if not 0.0 <= success_rate <= 1.0:
        raise ValueError(f"success_rate {success_rate!r} must lie in [0, 1]")
    return weight_max * (1.0 - success_rate) + weight_min * success_rate


def k3_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate ``exp(ref - lp) - (ref - lp) - 1`` (k3; the GRPO paper's KL term)."""
    log_ratio = ref_log_probs - log_probs
    return log_ratio.exp() - log_ratio - 1.0


# ---------------------------------------------------------------------------------------------- hyperparameters
@dataclasses.dataclass
class GRPOConfig:
    """Hyperparameters of :class:`GRPO`; validated on construction. The defaults are the settings the main job
    (``examples/train_grpo.py``) and the SFT-vs-GRPO benchmark run: a warm-started policy, small groups, a small step."""

    num_groups: int = 2
    """(task, init state) pairs per rollout; each gets ``group_size`` episodes."""
    group_size: int = 4
    """Episodes per (task, init state) pair: the G of GRPO (>= 2, a group of one has no variance)."""
    learning_rate: float = 3e-5
    """AdamW step size (small: the warm start is already good at some states)."""
    warmup_steps: int = 0
    """Optimizer steps over which the step size rises linearly to ``learning_rate`` (``k / warmup_steps`` of it at
    the k-th step; HF's ``warmup_steps``; 0: none). Adam's first steps move every weight by about the step size
    whatever its gradient, before its second-moment estimate has seen more than one gradient; with few, large steps
    (``gradient_accumulation_steps``) the first ones would move the policy the most. Counted over the run (a resumed
    run continues the count)."""
    num_epochs: int = 2
    """Passes over each rollout's tokens (1 keeps GRPO on-policy; more reuse the data under the clip)."""
    minibatch_size: int = 128
    """Env steps (policy queries: 7 action tokens each, ``chunk_size * 7`` a chunk) per forward and backward pass."""
    gradient_accumulation_steps: int = 1
    """Minibatches whose gradients are averaged into one optimizer step, at the memory of one minibatch (HF's
    ``gradient_accumulation_steps``); an epoch's last step takes the minibatches left. The policy gradient of a few
    groups is mostly noise (``benchmarks/gradient_noise.py`` measures how many groups a step needs for its direction
    to be half signal): accumulating makes each step see more of them."""
    clip_low: float = 0.2
    """The ratio's lower clip: 1 - clip_low (PPO's epsilon)."""
    clip_high: float = 0.28
    """The ratio's upper clip: 1 + clip_high (DAPO's clip-higher keeps exploring tokens alive)."""
    advantage_eps: float = 1e-6
    """Added to the group's std before dividing."""
    temperature: float = 1.0
    """Rollouts sample ``softmax(logits / temperature)``: above 1 explores more, below 1 stays nearer the greedy
    policy (whose success a poorly calibrated SFT policy's samples can fall far short of). The policy-gradient
    ratio, the proximal log-probs, the entropy and the KL use the same tempered distribution, so the update is
    exact for the policy that sampled; the imitation term stays at temperature 1."""
    loss_aggregation: str = "token-mean"
    """How the policy-gradient term weighs episodes. ``token-mean`` (DAPO): every action token counts the same, so
    an episode weighs in proportion to its length; failures run to the time limit and successes stop early, so
    in a group with a few successes most of the weight is negative advantage. ``episode-mean`` (the original
    GRPO's per-sequence mean): each episode's tokens are scaled by (mean episode length of the rollout) /
    (its length), so every episode of a group weighs the same and a group's advantages sum to zero in weight."""
    dynamic_sampling: bool = True
    """Leave groups with all-equal rewards (zero advantage) out of the policy-gradient term (DAPO)."""
    max_sampling_rounds: int = 2
    """Dynamic sampling's refill: while fewer than ``num_groups`` groups carry signal, draw ``num_groups`` more,
    up to this many rounds per rollout (DAPO's max_num_gen_batches; 1: filter only, never refill)."""
    rescue_failed_groups: bool = False
    """Put a demonstration of the task into every group whose rollouts all failed (Rollout Relabel's group
    rescue), so the group has a success to move towards; the demo's tokens enter the policy-gradient term
    (needs demos)."""
    success_replay_size: int = 500
    """Keep the newest this many successful online (and hindsight-relabelled) episodes beside the demos in the
    offline term, importance-weighted by their behaviour log-probs (0: demos only)."""
    cache_dir: str | None = None
    """An :class:`EpisodeStore` directory every rollout episode is written to (with its behaviour log-probs
    and policy version); a new run (or a resumed one) refills its success replay from it."""
    cache_max_episodes: int | None = 20_000
    """Evict the oldest cached online episodes past this many (None: keep all)."""
    pg_coef: float = 1.0
    """Weight of the policy-gradient term. 0 leaves the offline term alone on the same rollouts (their
    successes still enter the replay and set the imitation weight): the ablation that shows what RL adds."""
    kl_coef: float = 0.0
    """Weight of KL(pi || pi_ref); 0 (DAPO's choice) builds no reference policy."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus."""
    imitation_weight_min: float = 0.1
    """Imitation weight when every rollout succeeds."""
    imitation_weight_max: float = 1.0
    """Imitation weight when every rollout fails."""
    imitation_batch_size: int = 64
    """Demonstration steps per minibatch (when demos are given): an optimizer step that averages k minibatches
    (``gradient_accumulation_steps``) imitates k such batches."""
    is_clip: float = 2.0
    """Truncation of the importance ratio pi / mu on offline tokens that carry behaviour log-probs."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient's global norm to this (None: no clipping)."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights with this decay, started at the policy GRPO begins from
    (0: none; 0.99 averages over about the last 100 gradient steps, no warm-up). Rollouts sample the training
    weights (GRPO is on-policy); outside ``learn`` the policy holds the average, which ``predict``, evaluation
    callbacks and ``save`` use, as :class:`SFT`'s ``ema_decay`` (the training weights are saved beside it)."""
    task_ids: tuple[int, ...] | None = None
    """Tasks to draw groups from (default: every task of the env)."""
    init_state_ids: tuple[int, ...] | None = None
    """Init states to draw groups from (default: all of each task's); leave evaluation init states out of it
    to measure success on held-out ones."""
    init_states: Literal["suite", "sampled"] = "suite"
    """Where groups start: "suite" (the stored init states, ``init_state_ids``) or "sampled" (a new layout per group,
    drawn by LIBERO's placement sampler: the policy trains on the distribution the stored starts come from, never on
    one of them)."""
    start_sampling: Literal["uniform", "learnability"] = "uniform"
    """How groups' starts are drawn: "uniform" over ``task_ids`` and ``init_state_ids``, or "learnability", in
    proportion to ``p (1 - p)`` of each task's and start's recent success rate (``p`` estimated from the run's
    groups, :class:`~gym_libero_vla.start_sampler.StartSampler`): fewer groups from starts the policy always or
    never solves, whose groups carry no gradient."""
    seed: int | None = None
    """Seeds torch's RNG and the draw of (task, init state) pairs."""

    def __post_init__(self):
        check_ints(self, num_groups=1, group_size=2, num_epochs=1, minibatch_size=1, gradient_accumulation_steps=1,
                   warmup_steps=0, imitation_batch_size=1, max_sampling_rounds=1, success_replay_size=0)  # fmt: skip
        check_positive(self, "learning_rate", "clip_low", "clip_high", "advantage_eps")
        check_temperature(self.temperature)  # the same rule as the policies' sampling
        check_ema_decay(self)
        if self.loss_aggregation not in LOSS_AGGREGATIONS:
            raise ValueError(f"loss_aggregation {self.loss_aggregation!r} is not one of {', '.join(LOSS_AGGREGATIONS)}")
        if self.clip_low >= 1.0:
            raise ValueError(f"clip_low {self.clip_low!r} must be < 1: the ratio's lower bound 1 - clip_low must stay > 0")
        for name in ("pg_coef", "kl_coef", "entropy_coef", "imitation_weight_min", "imitation_weight_max"):
            if not (is_finite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} {getattr(self, name)!r} must be a finite number >= 0")
        if self.imitation_weight_min > self.imitation_weight_max:
            raise ValueError(
                f"imitation_weight_min {self.imitation_weight_min!r} must be <= "
                f"imitation_weight_max {self.imitation_weight_max!r}"
            )
        if not (is_finite(self.is_clip) and self.is_clip >= 1.0):
            raise ValueError(f"is_clip {self.is_clip!r} must be a finite number >= 1 (1 weights offline tokens by at most 1)")
        if self.max_grad_norm is not None and not (is_finite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm {self.max_grad_norm!r} must be > 0 or None")
        if self.cache_max_episodes is not None:
            check_ints(self, cache_max_episodes=1)
        if self.cache_dir is not None:
            self.cache_dir = str(self.cache_dir)
        self._check_starts()

    def _check_starts(self) -> None:
        if self.task_ids is not None:
            self.task_ids = tuple(int(task_id) for task_id in self.task_ids)
            if not self.task_ids:
                raise ValueError("task_ids is empty: give at least one task, or None for every task of the env")
        if self.init_state_ids is not None:
            self.init_state_ids = tuple(int(init_state_id) for init_state_id in self.init_state_ids)
            if not self.init_state_ids or min(self.init_state_ids) < 0:
                raise ValueError(f"init_state_ids {self.init_state_ids!r} must be non-empty ints >= 0, or None for all")
        if self.init_states not in rollouts.INIT_STATES:
            raise ValueError(f"unknown init_states {self.init_states!r}: valid {rollouts.INIT_STATES}")
        if self.init_states == "sampled" and self.init_state_ids is not None:
            raise ValueError("init_state_ids picks stored init states: leave it None with init_states='sampled'")
        if self.start_sampling not in START_SAMPLING:
            raise ValueError(f"unknown start_sampling {self.start_sampling!r}: valid {START_SAMPLING}")


# ---------------------------------------------------------------------------------------------- rollouts
@dataclasses.dataclass
class GroupRollout:
    """``num_groups * group_size`` episodes in group order (episodes ``g*G .. g*G + G-1`` are group ``g``),
    and their steps flattened for minibatches.

    ``episodes`` are online rollouts (``source="online"``, ``log_probs`` the behaviour policy's token log-probs,
    ``policy_version`` the learner update that produced them) and, in rescued groups, demonstrations
    (``source="offline"``, behaviour unknown).
    """

    observations: dict[str, Any]
    """Each key the policy reads -> ``(N, ...)`` array; "instruction" -> ``(N,)`` object array of str."""
    action_tokens: np.ndarray
    """(N, num_action_tokens) int64 action tokens (7 per action; a chunk's ``chunk_size * 7``)."""
    behaviour_log_probs: np.ndarray
    """(N, num_action_tokens) float32 log mu(a_i | o, a_<i) of the policy that produced the step; NaN where unknown
    (demos)."""
    episode_index: np.ndarray
    """(N,) int64: which episode each step belongs to."""
    episode_rewards: np.ndarray
    """(num_groups * group_size,) float32 binary outcome."""
    episode_lengths: np.ndarray
    """(num_groups * group_size,) int64."""
    episode_policy_versions: np.ndarray
    """(num_groups * group_size,) int64; -1 for demos."""
    episode_online: np.ndarray
    """(num_groups * group_size,) bool: False for demonstrations put into rescued groups."""
    episode_task_ids: np.ndarray
    """(num_groups * group_size,) int64."""
    episodes: list[Episode]
    """The episodes themselves, in the same order."""
    stats: dict[str, float] = dataclasses.field(default_factory=dict)
    """Collection counts, named by their logger keys: groups sampled / informative / rescued, relabelled episodes."""
    token_mask: np.ndarray | None = None
    """(N, num_action_tokens) bool: tokens of actions the env executed (a chunk's actions after the episode ended
    never reached it, so the update leaves their tokens out); None: every token."""

    @classmethod
    def from_episodes(
        cls, episodes: Sequence[Episode], action_bins, observation_keys: Sequence[str], stats=None, chunk_size: int = 1
    ):
        if not episodes:
            raise ValueError("a GroupRollout needs at least one episode")
        steps = Transitions.from_episodes(episodes, observation_keys, action_bins.action_dim, chunk_size)
        lengths = np.array([episode.num_steps for episode in episodes], dtype=np.int64)
        behaviour = steps.behaviour_log_probs
        if behaviour is None:
            behaviour = np.full((len(steps), chunk_size * action_bins.action_dim), np.nan, np.float32)
        all_steps = np.arange(len(steps))
        return cls(
            observations=steps.observations,
            action_tokens=action_bins.encode(steps.actions).reshape(len(steps), -1),
            behaviour_log_probs=behaviour,
            token_mask=steps.token_mask(all_steps),
            episode_index=np.repeat(np.arange(len(episodes)), lengths),
            episode_rewards=np.array([float(episode.success) for episode in episodes], dtype=np.float32),
            episode_lengths=lengths,
            episode_policy_versions=np.array(
                [episode.policy_version if episode.source == "online" else -1 for episode in episodes], dtype=np.int64
            ),
            episode_online=np.array([episode.source == "online" for episode in episodes]),
            episode_task_ids=np.array([episode.task_id for episode in episodes], dtype=np.int64),
            episodes=list(episodes),
            stats=dict(stats or {}),
        )

    def batch(self, indices: np.ndarray) -> dict[str, Any]:
        obs = {key: values[indices] for key, values in self.observations.items()}
        obs["instruction"] = tuple(obs["instruction"].tolist())
        return obs


# ---------------------------------------------------------------------------------------------- the learner
class GRPO(BaseLearner):
    """Group-relative policy optimization with an adaptive offline imitation term, SB3's surface.

    Args:
        policy: a :class:`VLAPolicy` (e.g. ``CompactVLA``), or a checkpoint directory.
        env: a LIBERO env (``gym.make``) or a vector env of them (``gym.make_vec``; ``group_size`` must be a
            multiple of its ``num_envs``); needed by ``learn``.
        demos: demonstrations for the imitation term and group rescue (anything :class:`SFT` takes); episodes
            carrying ``log_probs`` are importance-weighted.
        tensorboard_log: directory for TensorBoard runs (None: no TensorBoard).
        verbose: 1 prints the logged scalars.
        device: move the policy here (default: leave it where it is).
        **hyperparameters: the fields of :class:`GRPOConfig`.
    """

    config_class: type[GRPOConfig] = GRPOConfig
    config_filename = "grpo.json"
    state_keys = ("policy_version", "num_optimizer_steps", "start_outcomes")
    config: GRPOConfig

    def __init__(self, policy, env=None, demos: Any = None, tensorboard_log=None, verbose: int = 0, device=None, **kwargs):
        super().__init__(policy, env, tensorboard_log=tensorboard_log, verbose=verbose, device=device, **kwargs)
        config = self.config
        # The offline term's data: the demos plus the success replay, flattened (see _rebuild_offline).
        self.demo_episodes: list[Episode] = episodes_of(demos, self.policy.observation_keys) if demos is not None else []
        if demos is not None and not self.demo_episodes:
            raise ValueError("demos hold no episodes: give at least one demonstration, or demos=None")
        self.demo_episodes = [episode.with_observations(self.policy.observation_keys) for episode in self.demo_episodes]
        self._demos_by_task: dict[int, list[Episode]] = {}
        for demo in self.demo_episodes:
            self._demos_by_task.setdefault(demo.task_id, []).append(demo)
        self.cache = EpisodeStore(config.cache_dir, max_episodes=config.cache_max_episodes) if config.cache_dir else None
        # Successes replayed in the offline term, refilled from the cache of earlier runs (the cache gets every episode).
        self.replay = SuccessReplay(config.success_replay_size, self.policy.observation_keys, sources=("online", "relabelled"),
                                    store=self.cache)  # fmt: skip
        self.demos: Transitions | None = None
        self._rebuild_offline()
        self.optimizer = torch.optim.AdamW(self._trainable_parameters(), lr=config.learning_rate, weight_decay=0.0)
        self.ema = self._make_ema(config.ema_decay, warmup=False)  # starts at the (trained) policy it fine-tunes
        # The KL reference: the base model under the LoRA adapter, else a frozen copy of the starting policy.
        self.reference_policy = None
        if config.kl_coef > 0 and not self.policy.lora_enabled:
            self.reference_policy = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.policy_version = 0  # learner updates so far; rollouts carry the version that sampled them
        self.num_optimizer_steps = 0  # over the run (the step size's warm-up counts them)
        self._rng = np.random.default_rng(config.seed)
        self.starts = StartSampler(config.start_sampling)  # every group's outcomes, to weigh the next starts by
        if config.seed is not None:
            torch.manual_seed(config.seed)

    def _check_env(self, env) -> None:
        super()._check_env(env)
        if hasattr(env, "num_envs") and self.config.group_size % env.num_envs:
            raise ValueError(
                f"group_size {self.config.group_size} must be a multiple of the vector env's num_envs {env.num_envs}"
            )

    def _rebuild_offline(self) -> None:
        """The offline term's data: the demos plus the success replay, flattened, with behaviour log-probs."""
        episodes, policy = self.demo_episodes + self.replay.episodes, self.policy
        keys, action_dim, chunk_size = policy.observation_keys, policy.action_dim, policy.chunk_size
        self.demos = Transitions.from_episodes(episodes, keys, action_dim, chunk_size) if episodes else None

    # ------------------------------------------------------------------ rollout
    def _env_task_ids(self) -> tuple[int, ...]:
        if self.config.task_ids is not None:
            return self.config.task_ids
        if hasattr(self.env, "num_envs"):
            return tuple(self.env.get_attr("task_ids")[0])
        return tuple(self.env.unwrapped.task_ids)

    def _num_init_states(self, task_id: int) -> int:
        if hasattr(self.env, "num_envs"):
            return int(self.env.call("num_init_states", task_id)[0])
        return int(self.env.unwrapped.num_init_states(task_id))

    def _sample_groups(
        self, count: int, callback: BaseCallback | None
    ) -> Iterator[tuple[list[Episode], list[Episode]] | None]:
        """``count`` groups: ``group_size`` episodes of the policy from one drawn (task, init state) each, and the
        episodes a ``RolloutRelabel`` wrapper relabelled on the way; None when a callback stopped training."""
        config, stopped = self.config, False

        def on_step(num_steps: int) -> bool:
            nonlocal stopped
            self.num_timesteps += num_steps
            if callback is not None:
                callback.update_locals({"self": self})
                stopped = not callback.on_step()
            return not stopped

        for _ in range(count):
            start = self.starts.draw(
                self._rng, self._env_task_ids(), config.init_state_ids, self._num_init_states, config.init_states
            )
            sampled = rollouts.run_group(self.policy, self.env, start, config.group_size, temperature=config.temperature,
                                         policy_version=self.policy_version, on_step=on_step)  # fmt: skip
            if sampled is None or stopped:
                yield None
                return
            group, relabelled = sampled
            self.starts.record(start.task_id, start.init_state_id, [episode.success for episode in group])
            if self.cache is not None:  # the group as one unit, as the rollout workers store theirs
                self.cache.append_many([copy.copy(episode) for episode in group + relabelled])  # ids on the copies
            yield group, relabelled

    def collect_rollouts(self, callback: BaseCallback | None = None) -> GroupRollout | None:
        """Groups of ``group_size`` episodes, each group from one (task, init state) pair: ``num_groups`` of
        them, refilled (up to ``max_sampling_rounds`` rounds) while fewer carry signal; all-fail groups rescued
        with a demo. None when a callback stopped training."""
        config = self.config
        self.policy.eval()
        episodes: list[Episode] = []
        relabelled: list[Episode] = []
        stats = {"rollout/groups_sampled": 0, "rollout/groups_informative": 0, "rollout/groups_rescued": 0,
                 "rollout/sampling_rounds": 0}  # fmt: skip
        for _ in range(config.max_sampling_rounds):
            stats["rollout/sampling_rounds"] += 1
            for sampled in self._sample_groups(config.num_groups, callback):
                if sampled is None:
                    return None
                group, group_relabelled = sampled
                relabelled += group_relabelled
                stats["rollout/groups_sampled"] += 1
                if config.rescue_failed_groups and not any(episode.success for episode in group):
                    group, rescued = self._rescue(group)
                    stats["rollout/groups_rescued"] += int(rescued)
                stats["rollout/groups_informative"] += int(len({episode.success for episode in group}) > 1)
                episodes.extend(group)
            if not config.dynamic_sampling or stats["rollout/groups_informative"] >= config.num_groups:
                break
        stats["rollout/relabelled_episodes"] = len(relabelled)
        if self.replay.add([episode for episode in episodes if episode.source == "online"] + relabelled):
            self._rebuild_offline()
        policy = self.policy
        return GroupRollout.from_episodes(episodes, policy.action_bins, policy.observation_keys, stats, policy.chunk_size)

    def _rescue(self, group: list[Episode]) -> tuple[list[Episode], bool]:
        """Replace the last rollout of an all-fail group by a demo of its task (from its init state if any)."""
        candidates = self._demos_by_task.get(group[0].task_id, [])
        if not candidates:
            return group, False
        pool = same_start_first(candidates, group[0].init_state_id)
        demo = dataclasses.replace(
            pool[self._rng.integers(len(pool))], task_id=group[0].task_id, init_state_id=group[0].init_state_id,
            success=True, source="offline",
        )  # fmt: skip
        return rescue_failed_group(group, [demo], mode="replace")

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def _current_log_probs(self, rollout: GroupRollout, indices: np.ndarray) -> np.ndarray:
        """log pi(a_i | o, a_<i) of the given steps under the policy as it is now (no gradient)."""
        self.policy.eval()
        out = np.empty((len(indices), self.policy.num_action_tokens), dtype=np.float32)
        batch = self.config.minibatch_size
        for start in range(0, len(indices), batch):
            part = indices[start : start + batch]
            tokens = torch.as_tensor(rollout.action_tokens[part], device=self.policy.device)
            log_probs = self.policy.log_prob(rollout.batch(part), tokens, self.config.temperature)[0]
            out[start : start + len(part)] = log_probs.cpu().numpy()
        return out

    def train(self, rollout: GroupRollout) -> dict[str, float]:
        """Several epochs of minibatch updates on one rollout (plus offline batches); returns the means, named by
        their logger keys.

        On-policy steps (sampled by the current policy version) take PPO's ratio against their behaviour
        log-probs. Off-policy steps -- stale rollouts of an older policy version, demos in rescued groups --
        take it against the *proximal* policy (the current one, before this update) and are weighted by the
        truncated importance ratio ``min(pi_prox / mu, is_clip)`` (decoupled PPO, Hilton et al. 2022); demos,
        whose ``mu`` is unknown, get weight 1. With ``ema_decay`` the training weights are updated (and the average
        after each step), even when called outside ``learn``.
        """
        config, policy, device = self.config, self.policy, self.policy.device
        if self.ema is not None:
            self.ema.put_training()
        rewards = torch.as_tensor(rollout.episode_rewards)
        episode_advantages = group_relative_advantages(rewards, config.group_size, config.advantage_eps)
        if config.loss_aggregation == "episode-mean":  # every episode the same total weight, whatever its length
            lengths = rollout.episode_lengths  # in tokens that count, for chunks cut short by the episode's end
            if rollout.token_mask is not None:
                lengths = np.bincount(rollout.episode_index, rollout.token_mask.sum(1), len(rollout.episode_lengths))
            episode_advantages = episode_mean_advantages(episode_advantages, lengths)
        zero_std = zero_variance_groups(rewards, config.group_size)
        step_advantages = episode_advantages[rollout.episode_index]  # A_j broadcast to every step of episode j
        step_indices = np.arange(len(rollout.action_tokens))
        if config.dynamic_sampling:  # no signal in all-equal groups: leave their steps out (DAPO)
            step_groups = rollout.episode_index // config.group_size
            step_indices = step_indices[~zero_std.numpy()[step_groups]]

        # Proximal log-probs and importance weights of the off-policy steps.
        behaviour = rollout.behaviour_log_probs
        step_versions = rollout.episode_policy_versions[rollout.episode_index]
        off_policy = np.isnan(behaviour).any(-1) | (step_versions != self.policy_version)
        proximal = behaviour.copy()
        weights = np.ones_like(behaviour)
        stale = step_indices[off_policy[step_indices]]
        if len(stale):
            proximal[stale] = self._current_log_probs(rollout, stale)
            known = ~np.isnan(behaviour[stale])
            ratio = np.exp(np.minimum(proximal[stale] - np.nan_to_num(behaviour[stale]), math.log(config.is_clip)))
            weights[stale] = np.where(known, ratio, 1.0)

        online = rollout.episode_online
        success_rate = float(rollout.episode_rewards[online].mean()) if online.any() else 0.0
        imitation_weight = adaptive_imitation_weight(success_rate, config.imitation_weight_min, config.imitation_weight_max)
        use_demos = self.demos is not None and imitation_weight > 0
        # Minibatches over the online steps; with none left (every group all-equal) the demos still train.
        num_minibatches = math.ceil(len(step_indices) / config.minibatch_size) or int(use_demos)

        policy.train()
        sums: dict[str, float] = {}
        num_passes = num_steps = 0
        accumulate = config.gradient_accumulation_steps
        for _ in range(config.num_epochs):
            order = self._rng.permutation(step_indices)
            for minibatch in range(num_minibatches):
                # The optimizer step this minibatch belongs to: `accumulate` minibatches (the epoch's last, fewer).
                first = minibatch - minibatch % accumulate
                num_in_step = min(accumulate, num_minibatches - first)
                if minibatch == first:
                    self.optimizer.zero_grad(set_to_none=True)
                indices = order[minibatch * config.minibatch_size : (minibatch + 1) * config.minibatch_size]
                loss, metrics = torch.zeros((), device=device), {}
                if len(indices):
                    loss, metrics = self._policy_gradient_loss(rollout, indices, proximal, weights, step_advantages)
                if use_demos:
                    imitation_loss, is_weight_mean = self._imitation_loss()
                    loss = loss + imitation_weight * imitation_loss  # offline regularization
                    metrics.update({"train/imitation_loss": imitation_loss.item(), "train/is_weight_mean": is_weight_mean})
                (loss / num_in_step).backward()  # the step's gradient: the mean over its minibatches
                if minibatch == first + num_in_step - 1:
                    self._optimizer_step()
                    num_steps += 1
                metrics["train/loss"] = loss.item()
                for name, value in metrics.items():
                    sums[name] = sums.get(name, 0.0) + value
                num_passes += 1
        policy.eval()
        self.policy_version += 1
        means = {name: value / num_passes for name, value in sums.items()} if num_passes else {}
        if "train/entropy" not in means:  # no online minibatch: still report the policy's entropy on the rollout
            means["train/entropy"] = self._rollout_entropy(rollout)
        means.update({
            "rollout/success_rate": success_rate,
            "rollout/frac_groups_zero_std": float(zero_std.float().mean()),
            "rollout/ep_len_mean": (  # in env steps (actions executed), as SB3's
                float(np.mean([episode.num_env_steps for episode, keep in zip(rollout.episodes, online) if keep]))
                if online.any() else 0.0
            ),
            "train/imitation_weight": imitation_weight if self.demos is not None else 0.0,
            "train/n_updates": float(num_steps),  # optimizer steps
            "train/learning_rate": float(self.optimizer.param_groups[0]["lr"]),  # of the last step
            "train/off_policy_fraction": float(off_policy.mean()),
            "train/offline_buffer_size": float(len(self.demos) if self.demos is not None else 0),
            "train/replay_episodes": float(len(self.replay.episodes)),
            "train/policy_version": float(self.policy_version),
        })  # fmt: skip
        for task_id in np.unique(rollout.episode_task_ids[online]):
            of_task = online & (rollout.episode_task_ids == task_id)
            means[f"rollout/success_rate_task{int(task_id)}"] = float(rollout.episode_rewards[of_task].mean())
        means.update({name: float(value) for name, value in rollout.stats.items()})
        return means

    def _policy_gradient_loss(
        self, rollout: GroupRollout, indices: np.ndarray, proximal: np.ndarray, weights: np.ndarray, step_advantages
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The clipped surrogate (plus the entropy and KL terms) of the steps ``indices``, and its metrics."""
        config, policy, device = self.config, self.policy, self.policy.device
        obs = rollout.batch(indices)
        action_tokens = torch.as_tensor(rollout.action_tokens[indices], device=device)
        old_log_probs = torch.as_tensor(proximal[indices], device=device)
        token_weights = torch.as_tensor(weights[indices], device=device)
        advantages = step_advantages[indices].to(device)[:, None]  # same A for every token of a step
        mask = None if rollout.token_mask is None else torch.as_tensor(rollout.token_mask[indices], device=device)
        log_probs, entropy = policy.log_prob(obs, action_tokens, config.temperature)
        pg_loss, clip_fraction, approx_kl = clipped_surrogate(
            log_probs, old_log_probs, advantages, config.clip_low, config.clip_high, token_weights, mask
        )
        entropy_loss = masked_mean(entropy, mask)
        loss = config.pg_coef * pg_loss - config.entropy_coef * entropy_loss
        metrics: dict[str, float] = {}
        if config.kl_coef > 0:
            kl = masked_mean(k3_kl(log_probs, self._reference_log_probs(obs, action_tokens)), mask)
            loss = loss + config.kl_coef * kl
            metrics["train/kl"] = kl.item()
        metrics.update({
            "train/pg_loss": pg_loss.item(), "train/entropy": entropy_loss.item(),
            "train/clip_fraction": clip_fraction.item(), "train/approx_kl": approx_kl.item(),
            "train/pg_is_weight_mean": masked_mean(token_weights, mask).item(),
        })  # fmt: skip
        return loss, metrics

    def _optimizer_step(self) -> None:
        """Clip the accumulated gradient's norm, set the (warming-up) step size, step the optimizer and the moving
        average."""
        config = self.config
        if config.max_grad_norm is not None:
            parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
        if config.warmup_steps:
            scale = min(1.0, (self.num_optimizer_steps + 1) / config.warmup_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = config.learning_rate * scale
        self.optimizer.step()
        self.num_optimizer_steps += 1
        if self.ema is not None:
            self.ema.update()

    @torch.no_grad()
    def _rollout_entropy(self, rollout: GroupRollout, max_steps: int = 256) -> float:
        indices = np.linspace(0, len(rollout.action_tokens) - 1, min(max_steps, len(rollout.action_tokens))).astype(int)
        tokens = torch.as_tensor(rollout.action_tokens[indices], device=self.policy.device)
        mask = None if rollout.token_mask is None else torch.as_tensor(rollout.token_mask[indices], device=tokens.device)
        return masked_mean(self.policy.log_prob(rollout.batch(indices), tokens, self.config.temperature)[1], mask).item()

    def _imitation_loss(self) -> tuple[torch.Tensor, float]:
        """(IS-weighted) NLL of a random batch of offline tokens, and the mean importance weight."""
        indices = self._rng.integers(len(self.demos), size=self.config.imitation_batch_size)
        obs, actions = self.demos.batch(indices)
        _, log_probs, _ = demo_token_log_probs(self.policy, obs, actions)
        mask = self.demos.token_mask(indices)  # chunks: padding past an episode's end is not imitated
        mask = None if mask is None else torch.as_tensor(mask, device=log_probs.device)
        weights = torch.ones_like(log_probs)
        if self.demos.behaviour_log_probs is not None:
            behaviour = torch.as_tensor(self.demos.behaviour_log_probs[indices], device=log_probs.device)
            known = ~torch.isnan(behaviour)  # scripted / human demos have no mu: plain behaviour cloning
            truncated = importance_weights(log_probs, torch.nan_to_num(behaviour), self.config.is_clip)
            weights = torch.where(known, truncated, weights)
        return -masked_mean(weights * log_probs, mask), masked_mean(weights, mask).item()

    @torch.no_grad()
    def _reference_log_probs(self, obs, action_tokens: torch.Tensor) -> torch.Tensor:
        temperature = self.config.temperature
        if self.reference_policy is not None:
            return self.reference_policy.log_prob(obs, action_tokens, temperature)[0]
        with self.policy.disable_adapter():
            return self.policy.log_prob(obs, action_tokens, temperature)[0]

    # ------------------------------------------------------------------ the loop
    def learn(
        self,
        total_timesteps: int,
        callback: BaseCallback | list[BaseCallback] | None = None,
        log_interval: int = 1,
        tb_log_name: str = "GRPO",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
        max_updates: int | None = None,
    ) -> GRPO:
        """Collect groups and update until ``total_timesteps`` env steps (or ``max_updates`` updates, or a callback's
        ``on_step`` says stop). As in SB3, ``reset_num_timesteps=False`` continues the step counter (``total_timesteps``
        more steps): with :meth:`load` this resumes a run from its last checkpoint."""
        if self.env is None:
            raise ValueError(
                f"{type(self).__name__} has no env: pass env= to {type(self).__name__}(...) or .load(..., env=...)"
            )
        if self.config.rescue_failed_groups and not self.demo_episodes:
            raise ValueError("rescue_failed_groups needs demos: pass demos= with successful episodes of the tasks")
        total_timesteps, callback, bar = self._setup_learn(
            total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar
        )
        iteration = 0
        while self.num_timesteps < total_timesteps and (max_updates is None or iteration < max_updates):
            if callback is not None:
                callback.on_rollout_start()
            before = self.num_timesteps
            rollout = self.collect_rollouts(callback)
            if bar is not None:
                bar.update(self.num_timesteps - before)
            if rollout is None:
                break
            self.last_metrics = self.train(rollout)
            if callback is not None:  # after the update: a checkpoint saved here holds this rollout's learning
                callback.update_locals(locals())
                callback.on_rollout_end()
            iteration += 1
            if iteration % log_interval == 0:
                self._dump_logs(self.last_metrics)
        self._finish_learn(callback, bar)
        return self

    # ------------------------------------------------------------------ checkpoints
    def _save_state(self, directory: str) -> dict[str, Any]:
        self._save_optimizer_and_rng(directory, self.optimizer, self._rng)
        return {"policy_version": self.policy_version, "num_optimizer_steps": self.num_optimizer_steps,
                "start_outcomes": self.starts.state_dict()}  # fmt: skip

    def _load_state(self, directory: str, state: dict[str, Any]) -> None:
        """With ``kl_coef > 0`` on a policy without LoRA, the reference is a copy of the *loaded* policy."""
        self.policy_version = int(state.get("policy_version", 0))
        self.num_optimizer_steps = int(state.get("num_optimizer_steps", 0))
        self.starts.load_state_dict(state.get("start_outcomes", {}))
        self._load_optimizer_and_rng(directory, self.optimizer, self._rng, self.config.learning_rate)


def __getattr__(name: str):  # names that moved in the restructure: gym_libero_vla/deprecated.py
    from gym_libero_vla.deprecated import moved

    return moved(__name__, name)
