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

    loss = pg_loss + imitation_weight * imitation_loss - entropy_coef * entropy + kl_coef * kl(pi || pi_ref)

with the k3 estimator of the KL to the reference policy (the base model without its LoRA adapter, or a
frozen copy of the initial policy).

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
import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.logger import Logger

from gym_libero_vla.algos.base import BaseLearner
from gym_libero_vla.algos.base import progress_bar as make_progress_bar
from gym_libero_vla.algos.sft import Transitions, load_demonstrations
from gym_libero_vla.policies.base import VLAPolicy, batch_observation, load_policy

GRPO_CONFIG_FILENAME = "grpo.json"
OPTIMIZER_FILENAME = "optimizer.pt"


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per action token, with asymmetric bounds (DAPO's clip-higher).

    ``log_probs`` ``(B, 7)`` under the current policy (differentiable), ``old_log_probs`` ``(B, 7)`` under the
    policy that sampled the tokens, ``advantages`` broadcastable to ``(B, 7)`` (an episode's advantage on
    each of its tokens). Returns ``(pg_loss, clip_fraction, approx_kl)``: the loss is a token-level mean;
    ``clip_fraction`` the share of tokens whose ratio lies outside ``[1 - clip_low, 1 + clip_high]``;
    ``approx_kl`` the k3 estimate of KL(old || new) (Schulman, "Approximating KL divergence").
    """
    log_ratio = log_probs - old_log_probs
    ratio = log_ratio.exp()  # pi_theta(a_i | ...) / pi_old(a_i | ...)
    advantages = torch.broadcast_to(advantages, ratio.shape)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg_loss = torch.max(pg_loss1, pg_loss2).mean()  # pessimistic bound, PPO
    with torch.no_grad():
        clip_fraction = ((ratio < 1.0 - clip_low) | (ratio > 1.0 + clip_high)).float().mean()
        approx_kl = ((ratio - 1.0) - log_ratio).mean()
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
def _is_int(value, minimum: int) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum


def _is_finite(value) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass
class GRPOConfig:
    """Hyperparameters of :class:`GRPO`; validated on construction."""

    num_groups: int = 4
    """(task, init state) pairs per rollout; each gets ``group_size`` episodes."""
    group_size: int = 8
    """Episodes per (task, init state) pair: the G of GRPO (>= 2, a group of one has no variance)."""
    learning_rate: float = 1e-4
    """AdamW step size."""
    num_epochs: int = 1
    """Passes over each rollout's tokens (1 keeps GRPO on-policy; more reuse the data under the clip)."""
    minibatch_size: int = 256
    """Env steps (each 7 action tokens) per gradient step."""
    clip_low: float = 0.2
    """The ratio's lower clip: 1 - clip_low (PPO's epsilon)."""
    clip_high: float = 0.28
    """The ratio's upper clip: 1 + clip_high (DAPO's clip-higher keeps exploring tokens alive)."""
    advantage_eps: float = 1e-6
    """Added to the group's std before dividing."""
    dynamic_sampling: bool = True
    """Leave groups with all-equal rewards (zero advantage) out of the policy-gradient term (DAPO)."""
    kl_coef: float = 0.0
    """Weight of KL(pi || pi_ref); 0 (DAPO's choice) builds no reference policy."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus."""
    imitation_weight_min: float = 0.0
    """Imitation weight when every rollout succeeds."""
    imitation_weight_max: float = 1.0
    """Imitation weight when every rollout fails."""
    imitation_batch_size: int = 64
    """Demonstration steps per gradient step (when demos are given)."""
    is_clip: float = 2.0
    """Truncation of the importance ratio pi / mu on offline tokens that carry behaviour log-probs."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient's global norm to this (None: no clipping)."""
    task_ids: tuple[int, ...] | None = None
    """Tasks to draw groups from (default: every task of the env)."""
    init_state_ids: tuple[int, ...] | None = None
    """Init states to draw groups from (default: all of each task's); leave evaluation init states out of it
    to measure success on held-out ones."""
    seed: int | None = None
    """Seeds torch's RNG and the draw of (task, init state) pairs."""

    def __post_init__(self):
        for name, minimum in (
            ("num_groups", 1), ("group_size", 2), ("num_epochs", 1), ("minibatch_size", 1), ("imitation_batch_size", 1),
        ):  # fmt: skip
            if not _is_int(getattr(self, name), minimum):
                raise ValueError(f"{name} {getattr(self, name)!r} must be an int >= {minimum}")
        for name in ("learning_rate", "clip_low", "clip_high", "advantage_eps"):
            if not (_is_finite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} {getattr(self, name)!r} must be a finite number > 0")
        if self.clip_low >= 1.0:
            raise ValueError(f"clip_low {self.clip_low!r} must be < 1: the ratio's lower bound 1 - clip_low must stay > 0")
        for name in ("kl_coef", "entropy_coef", "imitation_weight_min", "imitation_weight_max"):
            if not (_is_finite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} {getattr(self, name)!r} must be a finite number >= 0")
        if self.imitation_weight_min > self.imitation_weight_max:
            raise ValueError(
                f"imitation_weight_min {self.imitation_weight_min!r} must be <= "
                f"imitation_weight_max {self.imitation_weight_max!r}"
            )
        if not (_is_finite(self.is_clip) and self.is_clip >= 1.0):
            raise ValueError(f"is_clip {self.is_clip!r} must be a finite number >= 1 (1 weights offline tokens by at most 1)")
        if self.max_grad_norm is not None and not (_is_finite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm {self.max_grad_norm!r} must be > 0 or None")
        if self.task_ids is not None:
            self.task_ids = tuple(int(task_id) for task_id in self.task_ids)
            if not self.task_ids:
                raise ValueError("task_ids is empty: give at least one task, or None for every task of the env")
        if self.init_state_ids is not None:
            self.init_state_ids = tuple(int(init_state_id) for init_state_id in self.init_state_ids)
            if not self.init_state_ids or min(self.init_state_ids) < 0:
                raise ValueError(f"init_state_ids {self.init_state_ids!r} must be non-empty ints >= 0, or None for all")


# ---------------------------------------------------------------------------------------------- rollouts
@dataclasses.dataclass
class GroupRollout:
    """The env steps of ``num_groups * group_size`` episodes, flattened, with per-episode outcomes."""

    observations: dict[str, Any]
    """Each key the policy reads -> ``(N, ...)`` array; "instruction" -> ``(N,)`` object array of str."""
    action_tokens: np.ndarray
    """(N, 7) int64 tokens sampled by the behaviour policy."""
    old_log_probs: np.ndarray
    """(N, 7) float32 log pi_old(a_i | o, a_<i) at sampling time."""
    episode_index: np.ndarray
    """(N,) int64: which episode each step belongs to (episodes of group g are g*G .. g*G + G-1)."""
    episode_rewards: np.ndarray
    """(num_groups * group_size,) float32 binary outcome."""
    episode_lengths: np.ndarray
    """(num_groups * group_size,) int64."""

    def batch(self, indices: np.ndarray) -> dict[str, Any]:
        obs = {key: values[indices] for key, values in self.observations.items()}
        obs["instruction"] = tuple(obs["instruction"].tolist())
        return obs


def _is_vector_env(env) -> bool:
    return hasattr(env, "num_envs")


def _run_episodes(policy: VLAPolicy, env, options: dict, num_episodes: int, observation_keys, on_step) -> list[dict]:
    """``num_episodes`` episodes from the same reset options, sampled (not greedy) from ``policy``.

    A vector env runs ``num_envs`` of them at a time (every sub-env reset with the same options); a plain
    env one at a time. Each episode is ``{"observations": [obs dict], "tokens": [(7,)], "log_probs": [(7,)],
    "reward": float}``. ``on_step(num_steps)`` is called after each env step with the number of episode steps
    it took; False stops early (and an empty list is returned).
    """
    num_envs = env.num_envs if _is_vector_env(env) else 1
    episodes: list[dict] = []
    while len(episodes) < num_episodes:
        obs, _ = env.reset(options=options)
        obs = dict(obs) if _is_vector_env(env) else batch_observation(obs)
        running = [{"observations": [], "tokens": [], "log_probs": [], "reward": 0.0} for _ in range(num_envs)]
        done = np.zeros(num_envs, dtype=bool)
        while not done.all():
            obs_batch = {key: obs[key] for key in observation_keys}
            actions, tokens, log_probs = policy.act(obs_batch, deterministic=False)
            actions, tokens, log_probs = actions.cpu().numpy(), tokens.cpu().numpy(), log_probs.cpu().numpy()
            if _is_vector_env(env):
                obs, rewards, terminated, truncated, _ = env.step(actions)
                obs = dict(obs)
            else:
                next_obs, reward, term, trunc, _ = env.step(actions[0])
                obs, rewards, terminated, truncated = batch_observation(next_obs), [reward], [term], [trunc]
            stepped = np.flatnonzero(~done)  # sub-envs still in their episode (finished ones await the reset)
            for env_index in stepped:
                episode = running[env_index]
                episode["observations"].append({key: obs_batch[key][env_index] for key in observation_keys})
                episode["tokens"].append(tokens[env_index])
                episode["log_probs"].append(log_probs[env_index])
                episode["reward"] += float(rewards[env_index])
            done |= np.asarray(terminated, dtype=bool) | np.asarray(truncated, dtype=bool)
            if not on_step(len(stepped)):
                return []
        episodes.extend(running)
    return episodes[:num_episodes]


# ---------------------------------------------------------------------------------------------- the learner
class GRPO(BaseLearner):
    """Group-relative policy optimization with an adaptive offline imitation term, SB3's surface.

    Args:
        policy: a :class:`VLAPolicy` (e.g. ``CompactVLA``), or a checkpoint directory.
        env: a LIBERO env (``gym.make``) or a vector env of them (``gym.make_vec``; ``group_size`` must be a
            multiple of its ``num_envs``); needed by ``learn``.
        demos: demonstrations for the imitation term (anything :func:`load_demonstrations` accepts); episodes
            carrying ``log_probs`` are importance-weighted.
        tensorboard_log: directory for TensorBoard runs (None: no TensorBoard).
        verbose: 1 prints the logged scalars.
        device: move the policy here (default: leave it where it is).
        **hyperparameters: the fields of :class:`GRPOConfig`.
    """

    def __init__(
        self,
        policy: VLAPolicy | str | os.PathLike,
        env=None,
        demos: Any = None,
        tensorboard_log: str | None = None,
        verbose: int = 0,
        device: str | torch.device | None = None,
        **hyperparameters,
    ):
        unknown = sorted(set(hyperparameters) - {field.name for field in dataclasses.fields(GRPOConfig)})
        if unknown:
            valid = sorted(field.name for field in dataclasses.fields(GRPOConfig))
            raise ValueError(f"unknown GRPO hyperparameter(s) {unknown}: valid {valid}")
        self.config = GRPOConfig(**hyperparameters)
        if isinstance(policy, (str, os.PathLike)):
            policy = load_policy(policy)
        if not isinstance(policy, VLAPolicy):
            raise TypeError(f"policy must be a VLAPolicy or a checkpoint directory: got {type(policy).__name__}")
        if device is not None:
            policy.to(device)
        self.policy, self.env = policy, env
        self.tensorboard_log, self.verbose = tensorboard_log, verbose
        if env is not None:
            self._check_env(env)
        self.demos: Transitions | None = None
        self.demo_log_probs: np.ndarray | None = None  # (N, 7) behaviour log-probs, NaN where unknown
        if demos is not None:
            self._set_demos(demos)
        parameters = [p for p in policy.parameters() if p.requires_grad]
        if not parameters:
            raise ValueError("the policy has no trainable parameters")
        self.optimizer = torch.optim.AdamW(parameters, lr=self.config.learning_rate, weight_decay=0.0)
        # The KL reference: the base model under the LoRA adapter, else a frozen copy of the starting policy.
        self.reference_policy = None
        if self.config.kl_coef > 0 and not policy.lora_enabled:
            self.reference_policy = copy.deepcopy(policy).eval().requires_grad_(False)
        self.num_timesteps = 0
        self._rng = np.random.default_rng(self.config.seed)
        if self.config.seed is not None:
            torch.manual_seed(self.config.seed)
        self._logger: Logger | None = None
        self.last_metrics: dict[str, float] = {}

    def _check_env(self, env) -> None:
        keys = set(getattr(env.single_observation_space if _is_vector_env(env) else env.observation_space, "spaces", {}))
        missing = [key for key in self.policy.observation_keys if key not in keys]
        if missing:
            raise ValueError(
                f"the env's observations lack {missing}, which the policy reads: the env gives {sorted(keys)} "
                "(choose a matching obs_mode / cameras / privileged_state)"
            )
        if _is_vector_env(env) and self.config.group_size % env.num_envs:
            raise ValueError(
                f"group_size {self.config.group_size} must be a multiple of the vector env's num_envs {env.num_envs}"
            )

    def _set_demos(self, demos: Any) -> None:
        if isinstance(demos, (list, tuple)) and any(getattr(episode, "log_probs", None) is not None for episode in demos):
            behaviour = [
                np.asarray(episode.log_probs, dtype=np.float32).reshape(len(episode.actions), -1)
                if getattr(episode, "log_probs", None) is not None
                else np.full((len(episode.actions), self.policy.action_dim), np.nan, dtype=np.float32)
                for episode in demos
            ]
            self.demo_log_probs = np.concatenate(behaviour)
        self.demos = load_demonstrations(demos, self.policy.observation_keys, self.policy.action_dim)

    def _env_task_ids(self) -> tuple[int, ...]:
        if self.config.task_ids is not None:
            return self.config.task_ids
        if _is_vector_env(self.env):
            return tuple(self.env.get_attr("task_ids")[0])
        return tuple(self.env.unwrapped.task_ids)

    def _num_init_states(self, task_id: int) -> int:
        if _is_vector_env(self.env):
            return int(self.env.call("num_init_states", task_id)[0])
        return int(self.env.unwrapped.num_init_states(task_id))

    # ------------------------------------------------------------------ rollout
    def collect_rollouts(self, callback: BaseCallback | None = None) -> GroupRollout | None:
        """``num_groups`` groups of ``group_size`` episodes, each group from one (task, init state) pair.
        None when a callback stopped training."""
        config, policy = self.config, self.policy
        task_ids = self._env_task_ids()
        keys = policy.observation_keys
        stopped = False

        def on_step(num_envs: int) -> bool:
            nonlocal stopped
            self.num_timesteps += num_envs
            if callback is not None:
                callback.update_locals({"self": self})
                stopped = not callback.on_step()
            return not stopped

        policy.eval()
        episodes = []
        for _ in range(config.num_groups):
            task_id = int(task_ids[self._rng.integers(len(task_ids))])
            if config.init_state_ids is None:
                init_state_id = int(self._rng.integers(self._num_init_states(task_id)))
            else:
                init_state_id = int(config.init_state_ids[self._rng.integers(len(config.init_state_ids))])
            options = {"task_id": task_id, "init_state_id": init_state_id}
            group = _run_episodes(policy, self.env, options, config.group_size, keys, on_step)
            if stopped:
                return None
            episodes.extend(group)

        lengths = np.array([len(episode["tokens"]) for episode in episodes], dtype=np.int64)
        observations = {key: np.stack([step[key] for ep in episodes for step in ep["observations"]]) for key in keys}
        observations["instruction"] = observations["instruction"].astype(object)
        return GroupRollout(
            observations=observations,
            action_tokens=np.concatenate([np.stack(episode["tokens"]) for episode in episodes]).astype(np.int64),
            old_log_probs=np.concatenate([np.stack(episode["log_probs"]) for episode in episodes]).astype(np.float32),
            episode_index=np.repeat(np.arange(len(episodes)), lengths),
            episode_rewards=np.array([float(episode["reward"] > 0) for episode in episodes], dtype=np.float32),
            episode_lengths=lengths,
        )

    # ------------------------------------------------------------------ update
    def train(self, rollout: GroupRollout) -> dict[str, float]:
        """Several epochs of minibatch updates on one rollout (plus demonstration batches); returns the means."""
        config, policy, device = self.config, self.policy, self.policy.device
        rewards = torch.as_tensor(rollout.episode_rewards)
        episode_advantages = group_relative_advantages(rewards, config.group_size, config.advantage_eps)
        zero_std = zero_variance_groups(rewards, config.group_size)
        step_advantages = episode_advantages[rollout.episode_index]  # A_j broadcast to every step of episode j
        step_indices = np.arange(len(rollout.action_tokens))
        if config.dynamic_sampling:  # no signal in all-equal groups: leave their steps out (DAPO)
            step_groups = rollout.episode_index // config.group_size
            step_indices = step_indices[~zero_std.numpy()[step_groups]]
        success_rate = float(rewards.mean())
        imitation_weight = adaptive_imitation_weight(success_rate, config.imitation_weight_min, config.imitation_weight_max)
        use_demos = self.demos is not None and imitation_weight > 0
        # Minibatches over the online steps; with none left (every group all-equal) the demos still train.
        num_minibatches = math.ceil(len(step_indices) / config.minibatch_size) or int(use_demos)

        policy.train()
        sums: dict[str, float] = {}
        num_updates = 0
        for _ in range(config.num_epochs):
            order = self._rng.permutation(step_indices)
            for minibatch in range(num_minibatches):
                indices = order[minibatch * config.minibatch_size : (minibatch + 1) * config.minibatch_size]
                loss = torch.zeros((), device=device)
                metrics: dict[str, float] = {}
                if len(indices):
                    obs = rollout.batch(indices)
                    action_tokens = torch.as_tensor(rollout.action_tokens[indices], device=device)
                    old_log_probs = torch.as_tensor(rollout.old_log_probs[indices], device=device)
                    advantages = step_advantages[indices].to(device)[:, None]  # same A for the 7 tokens of a step
                    log_probs, entropy = policy.log_prob(obs, action_tokens)
                    pg_loss, clip_fraction, approx_kl = clipped_surrogate(
                        log_probs, old_log_probs, advantages, config.clip_low, config.clip_high
                    )
                    entropy_loss = entropy.mean()
                    loss = pg_loss - config.entropy_coef * entropy_loss
                    if config.kl_coef > 0:
                        kl = k3_kl(log_probs, self._reference_log_probs(obs, action_tokens)).mean()
                        loss = loss + config.kl_coef * kl
                        metrics["kl"] = kl.item()
                    metrics.update(
                        pg_loss=pg_loss.item(), entropy=entropy_loss.item(),
                        clip_fraction=clip_fraction.item(), approx_kl=approx_kl.item(),
                    )  # fmt: skip
                if use_demos:
                    imitation_loss, is_weight_mean = self._imitation_loss()
                    loss = loss + imitation_weight * imitation_loss  # offline regularization
                    metrics.update(imitation_loss=imitation_loss.item(), is_weight_mean=is_weight_mean)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.max_grad_norm is not None:
                    parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
                    torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
                self.optimizer.step()
                metrics["loss"] = loss.item()
                for name, value in metrics.items():
                    sums[name] = sums.get(name, 0.0) + value
                num_updates += 1
        policy.eval()
        means = {name: value / num_updates for name, value in sums.items()}
        means.update(
            success_rate=success_rate,
            imitation_weight=imitation_weight if self.demos is not None else 0.0,
            frac_groups_zero_std=float(zero_std.float().mean()),
            ep_len_mean=float(rollout.episode_lengths.mean()),
            num_updates=float(num_updates),
        )
        return means

    def _imitation_loss(self) -> tuple[torch.Tensor, float]:
        """(IS-weighted) NLL of a random batch of demonstration tokens, and the mean importance weight."""
        indices = self._rng.integers(len(self.demos), size=self.config.imitation_batch_size)
        obs, actions = self.demos.batch(indices)
        action_tokens = torch.as_tensor(self.policy.action_bins.encode(actions), device=self.policy.device)
        log_probs, _ = self.policy.log_prob(obs, action_tokens)
        weights = torch.ones_like(log_probs)
        if self.demo_log_probs is not None:
            behaviour = torch.as_tensor(self.demo_log_probs[indices], device=log_probs.device)
            known = ~torch.isnan(behaviour)  # scripted / human demos have no mu: plain behaviour cloning
            truncated = importance_weights(log_probs, torch.nan_to_num(behaviour), self.config.is_clip)
            weights = torch.where(known, truncated, weights)
        return -(weights * log_probs).mean(), weights.mean().item()

    @torch.no_grad()
    def _reference_log_probs(self, obs: Mapping[str, Any], action_tokens: torch.Tensor) -> torch.Tensor:
        if self.reference_policy is not None:
            return self.reference_policy.log_prob(obs, action_tokens)[0]
        with self.policy.disable_adapter():
            return self.policy.log_prob(obs, action_tokens)[0]

    # ------------------------------------------------------------------ the loop
    def learn(
        self,
        total_timesteps: int,
        callback: BaseCallback | list[BaseCallback] | None = None,
        log_interval: int = 1,
        tb_log_name: str = "GRPO",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> GRPO:
        """Collect groups and update until ``total_timesteps`` env steps (or a callback's ``on_step`` says stop)."""
        if not (isinstance(total_timesteps, (int, np.integer)) and total_timesteps >= 1):
            raise ValueError(f"total_timesteps {total_timesteps!r} must be an int >= 1")
        if self.env is None:
            raise ValueError("GRPO has no env: pass env= to GRPO(...) or GRPO.load(..., env=...)")
        if reset_num_timesteps:
            self.num_timesteps = 0
        total_timesteps += 0 if reset_num_timesteps else self.num_timesteps
        self._setup_logger(tb_log_name)
        callback = CallbackList(callback) if isinstance(callback, list) else callback
        if callback is not None:
            callback.init_callback(self)
            callback.on_training_start(locals(), globals())
        bar = make_progress_bar(total_timesteps, "GRPO") if progress_bar else None
        start_time, start_step, iteration = time.time(), self.num_timesteps, 0
        while self.num_timesteps < total_timesteps:
            if callback is not None:
                callback.on_rollout_start()
            before = self.num_timesteps
            rollout = self.collect_rollouts(callback)
            if bar is not None:
                bar.update(self.num_timesteps - before)
            if rollout is None:
                break
            if callback is not None:
                callback.on_rollout_end()
            self.last_metrics = self.train(rollout)
            iteration += 1
            if iteration % log_interval == 0:
                self._log(self.last_metrics, start_time, start_step)
        if bar is not None:
            bar.close()
        if callback is not None:
            callback.on_training_end()
        return self

    def _log(self, metrics: dict[str, float], start_time: float, start_step: int) -> None:
        for name in ("success_rate", "frac_groups_zero_std", "ep_len_mean"):
            self.logger.record(f"rollout/{name}", metrics[name])
        for name in ("pg_loss", "imitation_loss", "imitation_weight", "entropy", "kl", "clip_fraction", "approx_kl",
                     "is_weight_mean", "loss"):  # fmt: skip
            if name in metrics:
                self.logger.record(f"train/{name}", metrics[name])
        elapsed = max(time.time() - start_time, 1e-9)
        self.logger.record("time/fps", (self.num_timesteps - start_step) / elapsed)
        self.logger.record("time/total_timesteps", self.num_timesteps, exclude="tensorboard")
        self.logger.dump(step=self.num_timesteps)

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | os.PathLike) -> None:
        """A directory: the policy checkpoint (``save_pretrained``), ``grpo.json`` and the optimizer state."""
        self.policy.save_pretrained(path)
        config = dataclasses.asdict(self.config)
        with open(os.path.join(path, GRPO_CONFIG_FILENAME), "w") as file:
            json.dump({**config, "num_timesteps": self.num_timesteps}, file, indent=2)
        torch.save(self.optimizer.state_dict(), os.path.join(path, OPTIMIZER_FILENAME))

    @classmethod
    def load(cls, path: str | os.PathLike, env=None, demos: Any = None, device=None, **kwargs) -> GRPO:
        """Rebuild from :meth:`save`; ``kwargs`` override saved hyperparameters (or set tensorboard_log, verbose).

        With ``kl_coef > 0`` on a policy without LoRA, the reference is a copy of the *loaded* policy."""
        config_path = os.path.join(path, GRPO_CONFIG_FILENAME)
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"{os.fspath(path)!r} is not a GRPO checkpoint: it has no {GRPO_CONFIG_FILENAME}")
        with open(config_path) as file:
            saved = json.load(file)
        num_timesteps = int(saved.pop("num_timesteps", 0))
        model = cls(load_policy(path), env=env, demos=demos, device=device, **{**saved, **kwargs})
        model.num_timesteps = num_timesteps
        optimizer_path = os.path.join(path, OPTIMIZER_FILENAME)
        if os.path.exists(optimizer_path):
            model.optimizer.load_state_dict(torch.load(optimizer_path, map_location=model.policy.device))
            for group in model.optimizer.param_groups:
                group["lr"] = model.config.learning_rate
        return model
