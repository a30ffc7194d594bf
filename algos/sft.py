"""SFT: supervised fine-tuning (behaviour cloning) of a token-action VLA policy on demonstrations.

OpenVLA's fine-tuning objective (Kim et al., 2024): each demonstrated action is tokenized into 7 bins
(:class:`ActionBins`, q01..q99) and the policy is trained by next-token cross-entropy on those tokens,
teacher-forced (:func:`demo_token_log_probs`):

    loss = - 1 / (B * 7) * sum_b sum_i log pi(a_{b,i} | o_b, a_{b,<i})

The same term is GRPO's offline regularizer and iRe-VLA's supervised stage.

The surface is stable-baselines3's: ``SFT(policy, env, demos=..., **hyperparameters)`` (the fields of
:class:`SFTConfig`), ``learn(total_steps, callback, progress_bar)``, ``predict(obs, deterministic)``, ``save(path)``,
``SFT.load(path, env, demos)``; SB3 callbacks work, and TensorBoard gets ``train/loss``, ``train/token_accuracy``,
``train/entropy``, ``train/action_l1``, ``train/grad_norm``, ``train/learning_rate``, ``train/epoch`` and
``time/fps``. One "step" is one gradient step on one batch (``num_timesteps`` counts them, for callbacks).

Demonstrations (``demos=``) can be: a LIBERO / generated HDF5 file path, an :class:`EpisodeStore` (or its
directory), or a sequence of episodes (:class:`gym_libero_vla.episode.Episode`, or dicts
``{"observations": {...}, "actions": (T, 7)}``). They are flattened into transitions holding only the
observation entries the policy reads.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback

from gym_libero_vla.algos.base import BaseLearner, check_ema_decay, check_ints, check_positive, is_finite, is_int
from gym_libero_vla.episode import Episode, as_episode
from gym_libero_vla.libero_env import CAMERAS


# ---------------------------------------------------------------------------------------------- demonstrations
def episodes_of(demos: Any, observation_keys: Sequence[str] = ()) -> list[Episode]:
    """``demos`` as a list of :class:`Episode`: a file or store is read (camera frames only when
    ``observation_keys`` name a camera), dicts are converted."""
    if isinstance(demos, (str, os.PathLike)):
        path = os.fspath(demos)
        if os.path.isdir(path):
            from gym_libero_vla.episode_store import EpisodeStore

            demos = EpisodeStore(path)
        else:
            from gym_libero_vla.demos import load_episodes

            needs_images = any(key in ("agentview", "wrist") for key in observation_keys)
            demos = load_episodes(path, load_images=needs_images)
    if hasattr(demos, "episode_ids") and hasattr(demos, "load"):  # an EpisodeStore
        demos = [demos.load(episode_id) for episode_id in demos.episode_ids()]
    if isinstance(demos, Mapping) or not isinstance(demos, Iterable):
        raise TypeError(f"demos must be a path, an EpisodeStore or a sequence of episodes: got {type(demos).__name__}")
    return [as_episode(episode) for episode in demos]


class StepColumn:
    """One observation entry (a camera's frames) of many episodes as one ``(N, ...)`` column without copying it: the
    episodes' own arrays, one after the other; ``column[indices]`` gathers those steps. Flattening the frames of a
    pixel demo set by concatenation would hold them twice (2.2 GB for LIBERO-Spatial's 193 demos at 128 px), and GRPO
    rebuilds its offline data after every update with new successes."""

    def __init__(self, parts: Sequence[np.ndarray]):
        if not parts:
            raise ValueError("a StepColumn needs at least one episode's array")
        self.parts = list(parts)
        self.starts = np.concatenate([[0], np.cumsum([len(part) for part in self.parts])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.parts[0].shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.parts[0].dtype

    def __getitem__(self, indices) -> np.ndarray:
        indices = np.arange(len(self))[indices] if isinstance(indices, slice) else np.asarray(indices)
        if indices.dtype == bool and indices.shape != (len(self),):
            raise IndexError(f"a boolean mask of a StepColumn has {len(self)} entries: got shape {indices.shape}")
        indices = np.flatnonzero(indices) if indices.dtype == bool else indices.astype(np.int64)
        if indices.ndim != 1:
            raise IndexError(f"a StepColumn is indexed by a 1-D array of steps or a slice: got shape {indices.shape}")
        if not len(indices):
            return np.empty((0, *self.shape[1:]), self.dtype)
        if indices.min() < -len(self) or indices.max() >= len(self):
            raise IndexError(f"step index out of range for {len(self)} steps")
        indices = indices % len(self)
        episode = np.searchsorted(self.starts, indices, side="right") - 1
        return np.stack([self.parts[e][i - self.starts[e]] for e, i in zip(episode, indices)])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        values = np.concatenate(self.parts)
        return values if dtype is None else values.astype(dtype)


@dataclasses.dataclass
class Transitions:
    """Episodes flattened to ``N`` (observation, action) pairs, with the behaviour policy's token log-probs where
    known. For a chunking policy each pair's action is a chunk: the next ``chunk_size`` actions, padded past the
    episode's end (or past what the env executed) and masked there."""

    observations: dict[str, Any]
    """Each key the policy reads -> ``(N, ...)`` array (camera frames: a :class:`StepColumn` over the episodes' own
    arrays); "instruction" -> ``(N,)`` array of str."""
    actions: np.ndarray
    """(N, action_dim) float32, or (N, chunk_size, action_dim) chunks."""
    task_ids: np.ndarray
    """(N,) int64, -1 where unknown."""
    behaviour_log_probs: np.ndarray | None = None
    """(N, num_action_tokens) float32 log mu of the policy that produced each step, NaN where unknown (scripted or
    human demos); None when no step has one."""
    action_mask: np.ndarray | None = None
    """(N, chunk_size) bool: which actions of each chunk are real (None: all of them; one-action steps)."""

    def __len__(self) -> int:
        return len(self.actions)

    def batch(self, indices: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
        obs = {key: values[indices] for key, values in self.observations.items()}
        obs["instruction"] = tuple(obs["instruction"].tolist())
        return obs, self.actions[indices]

    def token_mask(self, indices: np.ndarray) -> np.ndarray | None:
        """(B, num_action_tokens) bool: the tokens of real actions (None: every token is)."""
        if self.action_mask is None:
            return None
        return np.repeat(self.action_mask[indices], self.actions.shape[-1], axis=1)

    @classmethod
    def from_episodes(cls, demos: Any, observation_keys: Sequence[str], action_dim: int, chunk_size: int = 1) -> Transitions:
        """Flatten ``demos`` (see the module docstring) with ``observation_keys``; with ``chunk_size > 1``, one chunk per
        step: a chunking policy's own episodes as recorded, one-action demos as the window of their next actions."""
        episodes = episodes_of(demos, observation_keys)
        if not episodes:
            raise ValueError("demos hold no episodes: give at least one demonstration")
        columns: dict[str, list] = {key: [] for key in observation_keys}
        actions, masks, task_ids, behaviour = [], [], [], []
        for index, episode in enumerate(episodes):
            chunks, mask, log_probs = _action_chunks(episode, index, action_dim, chunk_size)
            episode = episode.with_observations(observation_keys)
            num_steps = episode.num_steps
            for key in observation_keys:
                values = episode.observations[key]
                columns[key].append(
                    np.full(num_steps, values, dtype=object) if isinstance(values, str) else values[:num_steps]
                )
            actions.append(chunks)
            masks.append(mask)
            task_ids.append(np.full(num_steps, episode.task_id, dtype=np.int64))
            behaviour.append(log_probs)
        observations = {key: StepColumn(values) if key in CAMERAS else np.concatenate(values)
                        for key, values in columns.items()}  # fmt: skip
        observations["instruction"] = observations["instruction"].astype(object)
        behaviour_log_probs = np.concatenate(behaviour)
        if np.isnan(behaviour_log_probs).all():
            behaviour_log_probs = None  # scripted / human demos only: plain behaviour cloning
        action_mask = np.concatenate(masks) if chunk_size > 1 else None
        return cls(observations, np.concatenate(actions), np.concatenate(task_ids), behaviour_log_probs, action_mask)


def _action_chunks(episode: Episode, index: int, action_dim: int, chunk_size: int):
    """An episode's actions as a policy with ``chunk_size`` predicts them: ``(actions, mask, behaviour log-probs)``."""
    actions = np.asarray(episode.actions, dtype=np.float32)
    num_steps, num_tokens = episode.num_steps, chunk_size * action_dim
    if actions.shape[-1] != action_dim or actions.ndim not in (2, 3):
        raise ValueError(f"demonstration {index}: actions have shape {actions.shape}, expected (T, {action_dim})")
    if actions.ndim == 3 and actions.shape[1] != chunk_size:
        raise ValueError(
            f"demonstration {index} holds chunks of {actions.shape[1]} actions, but the policy predicts {chunk_size}"
        )
    known = episode.log_probs is not None and np.asarray(episode.log_probs).reshape(num_steps, -1).shape[1] == num_tokens
    log_probs = (np.asarray(episode.log_probs, np.float32).reshape(num_steps, -1) if known
                 else np.full((num_steps, num_tokens), np.nan, np.float32))  # fmt: skip
    if chunk_size == 1:
        return actions, None, log_probs
    if actions.ndim == 3:  # a chunking policy's episode: what the env executed is real
        executed = episode.executed if episode.executed is not None else np.full(num_steps, chunk_size)
        return actions, np.arange(chunk_size)[None] < executed[:, None], log_probs
    # One action per step: step t's chunk is actions t .. t + chunk_size - 1, padded (and masked) past the end.
    padded = np.concatenate([actions, np.zeros((chunk_size - 1, action_dim), np.float32)])
    windows = np.stack([padded[t : t + chunk_size] for t in range(num_steps)])
    mask = np.arange(chunk_size)[None] < (num_steps - np.arange(num_steps))[:, None]
    return windows, mask, log_probs


def demo_token_log_probs(
    policy, obs: Mapping[str, Any], actions: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced ``log pi(a_i | o, a_<i)`` of demonstrated actions (or chunks) under ``policy``: their tokens (the
    bins of each dimension), the token log-probs ``(B, num_action_tokens)`` and the full log-softmax ``(B,
    num_action_tokens, num_bins)``. The NLL of SFT, of GRPO's offline term and of iRe-VLA's supervised stage is
    ``-token_log_probs.mean()`` (over the real tokens, and weighted in GRPO)."""
    action_tokens = torch.as_tensor(policy.encode_actions(actions), device=policy.device)
    logits = policy.action_logits(obs, action_tokens)  # (B, n, num_bins), teacher-forced
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    token_log_probs = log_probs.gather(-1, action_tokens[..., None]).squeeze(-1)
    return action_tokens, token_log_probs, log_probs


def random_shift(frames: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
    """``(B, H, W, C)`` frames, each padded by ``pad`` pixels (edges repeated) and cropped back to ``H x W`` at an
    offset drawn uniformly from ``0..2 * pad`` in each direction (DrQ, Kostrikov et al., 2020)."""
    frames = np.asarray(frames)
    if frames.ndim != 4:
        raise ValueError(f"random_shift takes (B, H, W, C) frames: got shape {frames.shape}")
    batch_size, height, width = frames.shape[:3]
    padded = np.pad(frames, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    offsets = rng.integers(0, 2 * pad + 1, size=(batch_size, 2))
    return np.stack([padded[i, y : y + height, x : x + width] for i, (y, x) in enumerate(offsets)])


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of ``values`` over the entries ``mask`` keeps: the tokens of real actions (None: every entry, exactly
    ``values.mean()``); a float ``mask`` weighs them (SFT's ``action_weights``): the weighted mean."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1e-12)


@torch.no_grad()
def demo_fit(
    policy, demos: Transitions, max_transitions: int = 2048, batch_size: int = 256, permute: Sequence[str] = (), seed: int = 0
) -> dict[str, Any]:
    """Teacher-forced loss and token accuracy (SFT's objective) of ``policy`` on up to ``max_transitions`` evenly spaced
    demo transitions: how well it fits its demonstrations. Also per action dimension (x, y, z, roll, pitch, yaw,
    gripper; over every action of a chunk): the accuracy of the greedy token and its mean distance in bins from the
    demonstrated one. ``permute``: observation keys (or "instruction") each transition takes from another transition
    drawn at random (``seed``) instead of its own: the accuracy lost then is what the predictions rest on that input
    (permutation importance)."""
    unknown = sorted(set(permute) - set(demos.observations))
    if unknown:
        raise ValueError(f"permute: unknown input(s) {unknown}: valid {sorted(demos.observations)}")
    rng = np.random.default_rng(seed)
    indices = np.unique(np.linspace(0, len(demos) - 1, min(len(demos), max_transitions)).astype(np.int64))
    action_dim = policy.action_dim
    loss_sum, correct, count = 0.0, 0, 0
    dim_correct, dim_error, dim_count = np.zeros(action_dim), np.zeros(action_dim), np.zeros(action_dim)
    was_training = policy.training
    policy.eval()
    for chunk in np.array_split(indices, max(1, -(-len(indices) // batch_size))):
        obs, actions = demos.batch(chunk)
        if permute:
            others = demos.batch(rng.integers(0, len(demos), len(chunk)))[0]
            obs = {**obs, **{key: others[key] for key in permute}}
        action_tokens, token_log_probs, log_probs = demo_token_log_probs(policy, obs, actions)
        mask = demos.token_mask(chunk)
        real = torch.ones_like(token_log_probs) if mask is None else torch.as_tensor(mask, device=policy.device).float()
        predicted = log_probs.argmax(-1)
        right = (predicted == action_tokens).float() * real
        error = (predicted - action_tokens).abs().float() * real
        loss_sum -= (token_log_probs * real).sum().item()
        correct += right.sum().item()
        count += real.sum().item()
        dim_correct += right.reshape(len(chunk), -1, action_dim).sum((0, 1)).cpu().numpy()
        dim_error += error.reshape(len(chunk), -1, action_dim).sum((0, 1)).cpu().numpy()
        dim_count += real.reshape(len(chunk), -1, action_dim).sum((0, 1)).cpu().numpy()
    policy.train(was_training)
    return {
        "loss": loss_sum / count, "token_accuracy": correct / count, "transitions": len(indices),
        "token_accuracy_per_dimension": (dim_correct / dim_count).tolist(),
        "bin_error_per_dimension": (dim_error / dim_count).tolist(), "permuted": list(permute),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- hyperparameters
@dataclasses.dataclass
class SFTConfig:
    """Hyperparameters of :class:`SFT`; validated on construction."""

    learning_rate: float = 3e-4
    """AdamW step size."""
    batch_size: int = 64
    """Demo transitions per gradient step (shuffled epochs, one after the other)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient's global norm to this (None: no clipping)."""
    log_interval: int = 10
    """Log the averaged training scalars every this many steps."""
    random_shift: int = 0
    """Image augmentation: each camera frame of a batch is padded by this many pixels (edge pixels repeated) and
    cropped back at a random offset, per sample (DrQ's random shift; pixel BC and OpenVLA-OFT augment likewise).
    0: none."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights with this decay (0: none; 0.999 averages over about the last
    1,000 steps, with a warm-up): outside ``learn`` the policy holds the average, which ``predict``, evaluation and
    ``save`` use; the training weights are saved beside it to continue from (:mod:`gym_libero_vla.algos.ema`)."""
    action_weights: tuple[float, ...] | None = None
    """Weight of each action dimension's tokens in the cross-entropy, one number per dimension (LIBERO: x, y, z,
    roll, pitch, yaw, gripper; e.g. ``1 1 1 1 1 1 4`` stresses when to close and open the hand); every token of a
    chunk's step gets its dimension's weight, and the loss is the weighted mean (its scale stays that of the plain
    mean). None: every token weighs the same."""
    seed: int | None = None
    """Seeds torch's RNG, the batch order and the augmentation."""

    def __post_init__(self):
        check_positive(self, "learning_rate")
        check_ema_decay(self)
        check_ints(self, batch_size=1, log_interval=1, random_shift=0)
        if self.action_weights is not None:
            weights = self.action_weights
            if isinstance(weights, (str, bytes)) or not hasattr(weights, "__iter__"):
                raise ValueError(f"action_weights {weights!r} must be a sequence: one number per action dimension")
            self.action_weights = weights = tuple(weights)
            if not weights or not all(is_finite(weight) and weight >= 0 for weight in weights):
                raise ValueError(f"action_weights {weights!r} must be finite numbers >= 0, one per action dimension")
            if not sum(weights) > 0:
                raise ValueError(f"action_weights {weights!r} are all 0: nothing would be learned")
        if not (is_finite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay {self.weight_decay!r} must be >= 0")
        if self.max_grad_norm is not None and not (is_finite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm {self.max_grad_norm!r} must be > 0 or None")


# ---------------------------------------------------------------------------------------------- the learner
class SFT(BaseLearner):
    """Behaviour cloning on action tokens, with stable-baselines3's surface.

    Args:
        policy: a :class:`VLAPolicy` (e.g. ``CompactVLA``, ``HFVLAPolicy``), or a checkpoint directory.
        env: the env the policy acts in (optional; checked against the policy's inputs, returned by ``get_env``).
        demos: demonstrations (see the module docstring); needed by ``learn``.
        tensorboard_log: directory for TensorBoard runs (None: no TensorBoard).
        verbose: 1 prints the logged scalars.
        device: move the policy here (default: leave it where it is).
        **hyperparameters: the fields of :class:`SFTConfig`.
    """

    config_class = SFTConfig
    config_filename = "sft.json"
    config: SFTConfig

    def __init__(self, policy, env=None, demos: Any = None, tensorboard_log=None, verbose: int = 0, device=None, **kwargs):
        super().__init__(policy, env, tensorboard_log=tensorboard_log, verbose=verbose, device=device, **kwargs)
        self.demos: Transitions | None = None
        if demos is not None:
            self.set_demos(demos)
        config = self.config
        if config.action_weights is not None and len(config.action_weights) != self.policy.action_dim:
            raise ValueError(
                f"action_weights has {len(config.action_weights)} numbers, but the policy's actions have "
                f"{self.policy.action_dim} dimensions: give one weight per dimension"
            )
        self.optimizer = torch.optim.AdamW(
            self._trainable_parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        self.ema = self._make_ema(config.ema_decay)
        self._rng = np.random.default_rng(config.seed)
        if config.seed is not None:
            torch.manual_seed(config.seed)
        self._pending = np.zeros(0, dtype=np.int64)  # transition indices left in the current epoch

    def set_demos(self, demos: Any) -> None:
        """Train on ``demos`` from now on (the current epoch's order is dropped)."""
        policy = self.policy
        self.demos = Transitions.from_episodes(demos, policy.observation_keys, policy.action_dim, policy.chunk_size)
        self._pending = np.zeros(0, dtype=np.int64)

    def _next_indices(self) -> np.ndarray:
        while len(self._pending) < self.config.batch_size:  # shuffled epochs, one after the other
            self._pending = np.concatenate([self._pending, self._rng.permutation(len(self.demos))])
        indices, self._pending = self._pending[: self.config.batch_size], self._pending[self.config.batch_size :]
        return indices

    # ------------------------------------------------------------------ training
    def train_step(self) -> dict[str, float]:
        """One gradient step on the next batch of demo transitions; its scalars."""
        policy = self.policy
        if self.ema is not None:
            self.ema.put_training()
        indices = self._next_indices()
        obs, actions = self.demos.batch(indices)
        if self.config.random_shift:
            obs = {key: random_shift(value, self.config.random_shift, self._rng) if key in CAMERAS else value
                   for key, value in obs.items()}  # fmt: skip
        action_tokens, token_log_probs, log_probs = demo_token_log_probs(policy, obs, actions)
        mask = self.demos.token_mask(indices)  # chunks: the padding past an episode's end is not learned
        mask = None if mask is None else torch.as_tensor(mask, device=policy.device)
        loss = -masked_mean(token_log_probs, self._loss_weights(mask, token_log_probs.shape))  # cross-entropy
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.config.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, self.config.max_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None]))
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update()
        self.num_timesteps += 1
        with torch.no_grad():
            predicted = log_probs.argmax(-1)
            entropy = masked_mean(-(log_probs.exp() * log_probs).sum(-1), mask)  # H(pi(. | o, a_<i)), mean over tokens
            token_accuracy = masked_mean((predicted == action_tokens).float(), mask)
            errors = np.abs(policy.action_bins.decode(predicted.cpu().numpy().reshape(actions.shape)) - actions)
            action_l1 = errors.mean() if mask is None else errors[self.demos.action_mask[indices]].mean()  # greedy vs demo
        return {
            "train/loss": loss.item(), "train/token_accuracy": token_accuracy.item(), "train/entropy": entropy.item(),
            "train/action_l1": float(action_l1), "train/grad_norm": float(grad_norm),
        }  # fmt: skip

    def _loss_weights(self, mask: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
        """Each token's weight in the loss: ``action_weights`` by dimension (tokens run step by step, each step's
        dimensions in order), times ``mask`` (0 on chunk padding); None: the plain mean."""
        if self.config.action_weights is None:
            return mask
        weights = torch.tensor(self.config.action_weights, dtype=torch.float32, device=self.policy.device)
        weights = weights.repeat(shape[-1] // len(weights)).expand(shape)
        return weights if mask is None else weights * mask.to(weights.dtype)

    def learn(
        self,
        total_steps: int,
        callback: BaseCallback | list[BaseCallback] | None = None,
        log_interval: int | None = None,
        tb_log_name: str = "SFT",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SFT:
        """Run ``total_steps`` gradient steps (or until a callback's ``on_step`` returns False)."""
        if not is_int(total_steps, 1):
            raise ValueError(f"total_steps {total_steps!r} must be an int >= 1")
        if self.demos is None:
            raise ValueError("SFT has no demonstrations: pass demos= to SFT(...) or SFT.load(..., demos=...)")
        log_interval = self.config.log_interval if log_interval is None else log_interval
        total_steps, callback, bar = self._setup_learn(total_steps, callback, reset_num_timesteps, tb_log_name, progress_bar)
        self.policy.train()
        sums: dict[str, float] = {}
        count = 0
        while self.num_timesteps < total_steps:
            metrics = self.train_step()
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + value
            count += 1
            if count == log_interval or self.num_timesteps == total_steps:
                self.last_metrics = {name: value / count for name, value in sums.items()}
                self.last_metrics["train/learning_rate"] = self.optimizer.param_groups[0]["lr"]
                self.last_metrics["train/epoch"] = self.num_timesteps * self.config.batch_size / len(self.demos)
                self._dump_logs(self.last_metrics)
                sums, count = {}, 0
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{self.last_metrics.get('train/loss', float('nan')):.3f}", refresh=False)
            if callback is not None:
                callback.update_locals(locals())
                if not callback.on_step():
                    break
        self.policy.eval()
        self._finish_learn(callback, bar)
        return self

    # ------------------------------------------------------------------ checkpoints
    def _save_state(self, directory: str) -> dict[str, Any]:
        self._save_optimizer_and_rng(directory, self.optimizer, self._rng)
        np.save(os.path.join(directory, "sft_pending.npy"), self._pending)  # the rest of the current epoch
        return {}

    def _load_state(self, directory: str, state: dict[str, Any]) -> None:
        self._load_optimizer_and_rng(directory, self.optimizer, self._rng, self.config.learning_rate)
        pending = os.path.join(directory, "sft_pending.npy")
        if os.path.exists(pending) and self.demos is not None:
            indices = np.load(pending)
            self._pending = indices[indices < len(self.demos)]


def continue_sft(
    path: str,
    create,
    total_steps: int,
    save_every: int = 1000,
    progress_bar: bool = False,
    keep_at: tuple[int, ...] = (),
    **load_kwargs,
) -> tuple[SFT, int]:
    """The SFT learner saved at ``path`` (``create()`` when there is none), trained on to ``total_steps`` gradient steps
    and saved there every ``save_every`` steps and at the end (atomically: a kill loses at most ``save_every`` steps, and
    running the same again continues). The checkpoints at the steps of ``keep_at`` are also kept as
    ``<path>_step<N>`` (:func:`~gym_libero_vla.algos.callbacks.kept_checkpoint_path`). ``load_kwargs`` go to
    :meth:`SFT.load` (demos, device, overrides). Returns the learner and the steps this call took."""
    from gym_libero_vla.algos.base import resume_or_create
    from gym_libero_vla.algos.callbacks import LatestCheckpointCallback

    model, resumed = resume_or_create(SFT, path, create, **load_kwargs)
    remaining = total_steps - model.num_timesteps
    if remaining <= 0:
        print(f"{path} has {model.num_timesteps} SFT steps (>= {total_steps}): not training")
        return model, 0
    print(f"SFT: {model.num_timesteps} -> {total_steps} steps on {len(model.demos)} transitions", flush=True)
    seconds_before = model.train_seconds
    callback = LatestCheckpointCallback(save_every, path, keep_at=keep_at)
    model.learn(remaining, callback=callback, reset_num_timesteps=not resumed, progress_bar=progress_bar)
    model.save(path)
    print(f"SFT: {remaining} steps in {model.train_seconds - seconds_before:.0f} s; last logged {model.last_metrics}")
    return model, remaining


def __getattr__(name: str):  # names that moved in the restructure: gym_libero_vla/deprecated.py
    from gym_libero_vla.deprecated import moved

    return moved(__name__, name)
