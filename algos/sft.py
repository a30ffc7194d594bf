"""SFT: supervised fine-tuning (behaviour cloning) of a token-action VLA policy on demonstrations.

OpenVLA's fine-tuning objective (Kim et al., 2024): each demonstrated action is tokenized into 7 bins
(:class:`ActionBins`, q01..q99) and the policy is trained by next-token cross-entropy on those tokens,
teacher-forced:

    loss = - 1 / (B * 7) * sum_b sum_i log pi(a_{b,i} | o_b, a_{b,<i})

The surface is stable-baselines3's: ``SFT(policy, env, demos=..., **hyperparameters)``, ``learn(total_steps,
callback, progress_bar)``, ``predict(obs, deterministic)``, ``save(path)``, ``SFT.load(path, env)``; SB3
callbacks (``BaseCallback``, ``CallbackList``, ``CheckpointCallback``) work, and TensorBoard gets
``train/loss``, ``train/token_accuracy``, ``train/entropy``, ``train/action_l1``, ``train/grad_norm``,
``train/learning_rate``, ``train/epoch`` and ``time/fps``, ``time/total_steps``, ``time/time_elapsed``.
One "step" is one gradient step on one batch (``num_timesteps`` counts them, for callbacks).

Demonstrations (``demos=``) can be: a LIBERO / generated HDF5 file path, an :class:`EpisodeStore` (or its
directory), or any sequence of episodes -- :class:`gym_libero_vla.demos.Episode`,
:class:`gym_libero_vla.episode_store.Episode`, or dicts ``{"observations": {...}, "actions": (T, 7)}``.
They are flattened into transitions holding only the observation entries the policy reads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.logger import Logger

from gym_libero_vla.algos.base import BaseLearner
from gym_libero_vla.algos.base import progress_bar as make_progress_bar
from gym_libero_vla.policies.base import VLAPolicy, load_policy

SFT_CONFIG_FILENAME = "sft.json"
OPTIMIZER_FILENAME = "optimizer.pt"
HYPERPARAMETERS = ("learning_rate", "batch_size", "weight_decay", "max_grad_norm", "log_interval", "seed")


# ---------------------------------------------------------------------------------------------- demonstrations
@dataclasses.dataclass
class Transitions:
    """Demonstrations flattened to ``N`` (observation, action) pairs."""

    observations: dict[str, Any]
    """Each key the policy reads -> ``(N, ...)`` array; "instruction" -> ``(N,)`` array of str."""
    actions: np.ndarray
    """(N, action_dim) float32."""
    task_ids: np.ndarray
    """(N,) int64, -1 where unknown."""

    def __len__(self) -> int:
        return len(self.actions)

    def batch(self, indices: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
        obs = {key: values[indices] for key, values in self.observations.items()}
        obs["instruction"] = tuple(obs["instruction"].tolist())
        return obs, self.actions[indices]


def _episode_parts(episode: Any) -> tuple[Mapping[str, Any], np.ndarray, int]:
    """(observations, actions, task_id) of an episode in any of the accepted forms."""
    if isinstance(episode, Mapping):
        if "actions" not in episode:
            raise ValueError(f"a demonstration dict needs 'actions': got keys {sorted(episode)}")
        if "observations" in episode:
            observations = episode["observations"]
        else:
            observations = {key: value for key, value in episode.items() if key != "actions"}
        task_id = episode.get("task_id", observations.get("task_id", -1))
        return observations, episode["actions"], int(np.asarray(task_id).ravel()[0]) if np.size(task_id) else -1
    if not (hasattr(episode, "observations") and hasattr(episode, "actions")):
        raise TypeError(f"a demonstration must have observations and actions: got {type(episode).__name__}")
    observations = dict(episode.observations)
    if "instruction" not in observations and hasattr(episode, "instruction"):
        observations["instruction"] = episode.instruction  # gym_libero_vla.demos.Episode keeps it apart
    return observations, episode.actions, int(getattr(episode, "task_id", -1))


def episodes_of(demos: Any, observation_keys: Sequence[str]) -> Sequence[Any]:
    """``demos`` (see the module docstring) as a sequence of episodes: a file or store is read (camera frames
    only when ``observation_keys`` name a camera)."""
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
    return demos if isinstance(demos, Sequence) else list(demos)


def load_demonstrations(demos: Any, observation_keys: Sequence[str], action_dim: int) -> Transitions:
    """Flatten ``demos`` (see the module docstring) into :class:`Transitions` with ``observation_keys``."""
    demos = episodes_of(demos, observation_keys)
    columns: dict[str, list] = {key: [] for key in observation_keys}
    actions_list, task_list = [], []
    for index, episode in enumerate(demos):
        observations, actions, task_id = _episode_parts(episode)
        actions = np.asarray(actions, dtype=np.float32)
        if actions.ndim != 2 or actions.shape[1] != action_dim or len(actions) == 0:
            raise ValueError(
                f"demonstration {index}: actions have shape {actions.shape}, expected (T, {action_dim}) with T >= 1"
            )
        num_steps = len(actions)
        for key in observation_keys:
            if key not in observations:
                raise ValueError(
                    f"demonstration {index} has no observation {key!r}, which the policy reads: it has {sorted(observations)} "
                    "(record demos in a matching obs_mode, or build the policy without that input)"
                )
            values = observations[key]
            if isinstance(values, str):
                values = np.array([values] * num_steps, dtype=object)
            values = np.asarray(values)
            if len(values) not in (num_steps, num_steps + 1):  # rollouts keep the final observation too
                raise ValueError(f"demonstration {index}: observation {key!r} has {len(values)} steps for {num_steps} actions")
            columns[key].append(values[:num_steps])
        actions_list.append(actions)
        task_list.append(np.full(num_steps, task_id, dtype=np.int64))
    if not actions_list:
        raise ValueError("demos hold no episodes: SFT needs at least one demonstration")
    observations = {key: np.concatenate(values) for key, values in columns.items()}
    observations["instruction"] = observations["instruction"].astype(object)
    return Transitions(observations, np.concatenate(actions_list), np.concatenate(task_list))


# ---------------------------------------------------------------------------------------------- the learner
class SFT(BaseLearner):
    """Behaviour cloning on action tokens, with stable-baselines3's surface.

    Args:
        policy: a :class:`VLAPolicy` (e.g. ``CompactVLA``, ``HFVLAPolicy``), or a checkpoint directory.
        env: the env the policy acts in (optional; checked against the policy's inputs, returned by ``get_env``).
        demos: demonstrations (see the module docstring); needed by ``learn``.
        learning_rate: AdamW step size.
        batch_size: transitions per gradient step.
        weight_decay: AdamW weight decay.
        max_grad_norm: clip the gradient's global norm to this (None: no clipping).
        log_interval: log the averaged training scalars every this many steps.
        seed: seeds torch's RNG and the batch order.
        tensorboard_log: directory for TensorBoard runs (None: no TensorBoard).
        verbose: 1 prints the logged scalars.
        device: move the policy here (default: leave it where it is).
    """

    def __init__(
        self,
        policy: VLAPolicy | str | os.PathLike,
        env=None,
        demos: Any = None,
        learning_rate: float = 3e-4,
        batch_size: int = 64,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = 1.0,
        log_interval: int = 10,
        seed: int | None = None,
        tensorboard_log: str | None = None,
        verbose: int = 0,
        device: str | torch.device | None = None,
    ):
        if not (isinstance(learning_rate, (int, float)) and math.isfinite(learning_rate) and learning_rate > 0):
            raise ValueError(f"learning_rate {learning_rate!r} must be a finite number > 0")
        if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
            raise ValueError(f"batch_size {batch_size!r} must be an int >= 1")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay {weight_decay!r} must be >= 0")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm {max_grad_norm!r} must be > 0 or None")
        if not (isinstance(log_interval, (int, np.integer)) and log_interval >= 1):
            raise ValueError(f"log_interval {log_interval!r} must be an int >= 1")
        if isinstance(policy, (str, os.PathLike)):
            policy = load_policy(policy)
        if not isinstance(policy, VLAPolicy):
            raise TypeError(f"policy must be a VLAPolicy or a checkpoint directory: got {type(policy).__name__}")
        if device is not None:
            policy.to(device)
        self.policy, self.env = policy, env
        self.learning_rate, self.batch_size, self.weight_decay = float(learning_rate), int(batch_size), float(weight_decay)
        self.max_grad_norm, self.log_interval, self.seed = max_grad_norm, int(log_interval), seed
        self.tensorboard_log, self.verbose = tensorboard_log, verbose
        if env is not None:
            self._check_env(env)
        self.demos = None if demos is None else load_demonstrations(demos, policy.observation_keys, policy.action_dim)
        parameters = [p for p in policy.parameters() if p.requires_grad]
        if not parameters:
            raise ValueError("the policy has no trainable parameters")
        self.optimizer = torch.optim.AdamW(parameters, lr=self.learning_rate, weight_decay=self.weight_decay)
        self.num_timesteps = 0
        self._rng = np.random.default_rng(seed)
        if seed is not None:
            torch.manual_seed(seed)
        self._pending = np.zeros(0, dtype=np.int64)  # transition indices left in the current epoch
        self._logger: Logger | None = None

    def _check_env(self, env) -> None:
        keys = set(getattr(env.observation_space, "spaces", {}))
        missing = [key for key in self.policy.observation_keys if key not in keys]
        if missing:
            raise ValueError(
                f"the env's observations lack {missing}, which the policy reads: the env gives {sorted(keys)} "
                "(choose a matching obs_mode / cameras / privileged_state)"
            )
        shape = env.action_space.shape
        if shape[-1:] != (self.policy.action_dim,):
            raise ValueError(f"the env's action space has shape {shape}: the policy outputs {self.policy.action_dim} numbers")

    def _next_indices(self) -> np.ndarray:
        while len(self._pending) < self.batch_size:  # shuffled epochs, one after the other
            self._pending = np.concatenate([self._pending, self._rng.permutation(len(self.demos))])
        indices, self._pending = self._pending[: self.batch_size], self._pending[self.batch_size :]
        return indices

    # ------------------------------------------------------------------ training
    def learn(
        self,
        total_steps: int,
        callback: BaseCallback | list[BaseCallback] | None = None,
        log_interval: int | None = None,
        tb_log_name: str = "SFT",
        reset_num_timesteps: bool = True,
        progress_bar: bool = True,
    ) -> SFT:
        """Run ``total_steps`` gradient steps (or until a callback's ``on_step`` returns False)."""
        if not (isinstance(total_steps, (int, np.integer)) and total_steps >= 1):
            raise ValueError(f"total_steps {total_steps!r} must be an int >= 1")
        if self.demos is None:
            raise ValueError("SFT has no demonstrations: pass demos= to SFT(...) or SFT.load(..., demos=...)")
        log_interval = self.log_interval if log_interval is None else log_interval
        if reset_num_timesteps:
            self.num_timesteps = 0
        self._setup_logger(tb_log_name)
        callback = CallbackList(callback) if isinstance(callback, list) else callback
        if callback is not None:
            callback.init_callback(self)
            callback.on_training_start(locals(), globals())
        bar = make_progress_bar(total_steps, "SFT") if progress_bar else None
        policy, bins = self.policy, self.policy.action_bins
        policy.train()
        start_time, start_step = time.time(), self.num_timesteps
        sums: dict[str, float] = {}
        for step in range(1, total_steps + 1):
            obs, actions = self.demos.batch(self._next_indices())
            action_tokens = torch.as_tensor(bins.encode(actions), device=policy.device)  # a_i: the bin of each dimension

            logits = policy.action_logits(obs, action_tokens)  # (B, 7, num_bins), teacher-forced
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            token_log_probs = log_probs.gather(-1, action_tokens[..., None]).squeeze(-1)  # log pi(a_i | o, a_<i)
            loss = -token_log_probs.mean()  # cross-entropy on action tokens
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
            if self.max_grad_norm is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(parameters, self.max_grad_norm)
            else:
                grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None]))
            self.optimizer.step()
            self.num_timesteps += 1

            with torch.no_grad():
                predicted = logits.argmax(-1)
                entropy = -(log_probs.exp() * log_probs).sum(-1).mean()  # H(pi(. | o, a_<i)), averaged over tokens
                token_accuracy = (predicted == action_tokens).float().mean()
                action_l1 = np.abs(bins.decode(predicted.cpu().numpy()) - actions).mean()  # greedy action vs demo
            for name, value in (
                ("loss", loss.item()), ("token_accuracy", token_accuracy.item()), ("entropy", entropy.item()),
                ("action_l1", float(action_l1)), ("grad_norm", float(grad_norm)),
            ):  # fmt: skip
                sums[name] = sums.get(name, 0.0) + value
            if step % log_interval == 0 or step == total_steps:
                count = step % log_interval or log_interval
                for name, value in sums.items():
                    self.logger.record(f"train/{name}", value / count)
                elapsed = max(time.time() - start_time, 1e-9)
                self.logger.record("train/learning_rate", self.optimizer.param_groups[0]["lr"])
                self.logger.record("train/epoch", self.num_timesteps * self.batch_size / len(self.demos))
                self.logger.record("time/fps", (self.num_timesteps - start_step) / elapsed)
                self.logger.record("time/total_steps", self.num_timesteps, exclude="tensorboard")
                self.logger.record("time/time_elapsed", int(elapsed), exclude="tensorboard")
                self.logger.dump(step=self.num_timesteps)
                self.last_metrics = {name: value / count for name, value in sums.items()}
                sums = {}
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{token_accuracy.item():.2f}", refresh=False)
            if callback is not None:
                callback.update_locals(locals())
                if not callback.on_step():
                    break
        if bar is not None:
            bar.close()
        if callback is not None:
            callback.on_training_end()
        policy.eval()
        return self

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | os.PathLike) -> None:
        """A directory: the policy checkpoint (``save_pretrained``), ``sft.json`` and the optimizer state."""
        self.policy.save_pretrained(path)
        config = {name: getattr(self, name) for name in HYPERPARAMETERS}
        with open(os.path.join(path, SFT_CONFIG_FILENAME), "w") as file:
            json.dump({**config, "num_timesteps": self.num_timesteps}, file, indent=2)
        torch.save(self.optimizer.state_dict(), os.path.join(path, OPTIMIZER_FILENAME))

    @classmethod
    def load(cls, path: str | os.PathLike, env=None, demos: Any = None, device=None, **kwargs) -> SFT:
        """Rebuild from :meth:`save`; ``kwargs`` override saved hyperparameters."""
        config_path = os.path.join(path, SFT_CONFIG_FILENAME)
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"{os.fspath(path)!r} is not an SFT checkpoint: it has no {SFT_CONFIG_FILENAME}")
        with open(config_path) as file:
            saved = json.load(file)
        unknown = sorted(set(kwargs) - set(HYPERPARAMETERS) - {"tensorboard_log", "verbose"})
        if unknown:
            raise ValueError(f"unknown SFT argument(s) {unknown}: valid {sorted(HYPERPARAMETERS)} + tensorboard_log, verbose")
        hyperparameters = {name: saved[name] for name in HYPERPARAMETERS if name in saved}
        hyperparameters.update(kwargs)
        model = cls(load_policy(path), env=env, demos=demos, device=device, **hyperparameters)
        model.num_timesteps = int(saved.get("num_timesteps", 0))
        optimizer_path = os.path.join(path, OPTIMIZER_FILENAME)
        if os.path.exists(optimizer_path):
            model.optimizer.load_state_dict(torch.load(optimizer_path, map_location=model.policy.device))
            for group in model.optimizer.param_groups:
                group["lr"] = model.learning_rate
        return model
