"""iRe-VLA: alternate head-only online RL with supervised learning on demonstrations plus the policy's own successes.

iRe-VLA (Guo et al., 2025, "Improving Vision-Language-Action Model with Online Reinforcement Learning")
finds online RL on a whole large VLA unstable and expensive, and supervised fine-tuning unable to go beyond
its demonstrations. After a supervised warm start on expert demonstrations ``D_e``, it iterates:

1. **RL stage** -- the VLM backbone is frozen; only the light action head on top of it is trained online
   (the paper uses PPO with a critic). Successful trajectories are collected into ``D_RL``.
2. **SL stage** -- everything trainable is unfrozen (the paper: LoRA on the VLM, the whole head) and trained
   by supervised learning on ``D_e ∪ D_RL``, which distils what exploration found into the backbone while
   the demonstrations keep it from forgetting.

How this file maps to it:

- The action head is :meth:`VLAPolicy.head_parameters` (``CompactVLA``: ``lm_head`` and the final norm;
  ``HFVLAPolicy``: the language model's output layer). A token-action VLA's head is its output layer.
- RL stage: ``rl_updates_per_stage`` iterations of :class:`GRPO` (``collect_rollouts`` then ``train``) with
  ``requires_grad`` off everywhere but the head and GRPO's AdamW built over the head alone. GRPO gets no
  demonstrations and no success replay (``success_replay_size=0`` unless given): the stage is pure RL,
  imitation is the SL stage's job. GRPO's other hyperparameters (``group_size``, ``clip_high``, ``kl_coef``,
  ``entropy_coef``, ...) pass through and act on the head.
- ``D_RL``: the successful online episodes of the RL stages (``episode.success``), newest
  ``success_buffer_size`` kept in memory and, with ``success_store=``, appended to an :class:`EpisodeStore`
  directory that a later run reads back, so a resumed run keeps its successes.
- SL stage: ``sl_steps_per_stage`` gradient steps of SFT's loss (OpenVLA's token cross-entropy, as
  :mod:`gym_libero_vla.algos.sft`),

      sl_loss = - 1 / (B * 7) * sum_b sum_i log pi(a_{b,i} | o_b, a_{b,<i})      (o_b, a_b) ~ D_e ∪ D_RL

  with its own AdamW over every parameter that was trainable when ``IReVLA`` was built (all of them, or a
  LoRA adapter plus the head; a LoRA policy whose head is frozen is refused, its head would never train).

What differs from the paper:

- The RL stage uses GRPO's group-relative clipped surrogate (advantages from ``group_size`` episodes of the
  same init state, no critic), not PPO with a value head. With a binary success reward a group whose
  episodes all fail (or all succeed) carries no gradient, so an RL stage of a policy that never succeeds
  changes nothing; the SL stage still trains on the demonstrations.
- The paper's head is a separate MLP on the VLM's embeddings that outputs continuous actions; here it is
  the output layer scoring the 7 action tokens.
- The initial supervised stage is not part of ``learn``: warm-start with :class:`SFT` first. ``learn`` starts
  with an RL stage, and every RL stage is followed by its SL stage (also the last one, which folds in the
  last successes), unless a callback stopped training.

The surface is stable-baselines3's: ``IReVLA(policy, env, demos, **hyperparameters)`` (the fields of
:class:`IReVLAConfig` and of :class:`GRPOConfig`), ``learn(total_timesteps, callback, progress_bar)``
(timesteps are env steps; callbacks get ``on_step`` per env step and can stop training), ``predict``,
``save(path)``, ``IReVLA.load(path, env, demos)``. TensorBoard gets GRPO's scalars after every RL update
(``rollout/success_rate``, ``rollout/ep_len_mean``, ``train/pg_loss``, ...), the SL stage's after each SL stage
(``sl/loss``, ``sl/token_accuracy``, ``sl/entropy``, ``sl/grad_norm``, ``sl/num_transitions``,
``sl/success_fraction``), and ``irevla/stage`` (0: RL, 1: SL), ``irevla/success_buffer``, ``time/fps``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.logger import Logger

from gym_libero_vla.algos.base import BaseLearner
from gym_libero_vla.algos.base import progress_bar as make_progress_bar
from gym_libero_vla.algos.grpo import GRPO, GRPO_CONFIG_FILENAME, GRPOConfig
from gym_libero_vla.algos.grpo import OPTIMIZER_FILENAME as GRPO_OPTIMIZER_FILENAME
from gym_libero_vla.algos.grpo import RNG_FILENAME as GRPO_RNG_FILENAME
from gym_libero_vla.algos.sft import Transitions, load_demonstrations
from gym_libero_vla.episode_store import Episode, EpisodeStore
from gym_libero_vla.policies.base import VLAPolicy, load_policy

IREVLA_CONFIG_FILENAME = "irevla.json"
SL_OPTIMIZER_FILENAME = "sl_optimizer.pt"
RL_STAGE, SL_STAGE = 0, 1
"""The values logged as ``irevla/stage``."""
ROLLOUT_METRICS = ("success_rate", "frac_groups_zero_std", "ep_len_mean", "groups_sampled", "groups_informative",
                   "groups_rescued", "sampling_rounds", "relabelled_episodes")  # fmt: skip
"""GRPO metrics logged under ``rollout/`` (with ``success_rate_task<k>``); the rest under ``train/``, as GRPO logs them."""


# ---------------------------------------------------------------------------------------------- hyperparameters
def _is_int(value, minimum: int) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum


def _is_positive(value) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@dataclasses.dataclass
class IReVLAConfig:
    """iRe-VLA's own hyperparameters (GRPO's, for the RL stage, are :class:`GRPOConfig`'s); validated on construction."""

    rl_updates_per_stage: int = 4
    """GRPO iterations (one rollout of ``num_groups * group_size`` episodes, one update of the head) per RL stage."""
    sl_steps_per_stage: int = 100
    """Gradient steps of each supervised stage (0: no SL stages, head-only RL)."""
    sl_batch_size: int = 64
    """Transitions (demos and online successes, drawn uniformly) per supervised gradient step."""
    sl_learning_rate: float = 1e-4
    """AdamW step size of the supervised stage (GRPO's ``learning_rate`` is the RL stage's, for the head)."""
    sl_max_grad_norm: float | None = 1.0
    """Clip the supervised gradient's global norm to this (None: no clipping)."""
    success_buffer_size: int = 500
    """Keep the newest this many successful online episodes for the supervised stage (0: demos only). They live in
    memory with their camera frames, so mind the size in rgb modes."""
    success_store: str | None = None
    """An :class:`EpisodeStore` directory of its own where successful online episodes are appended (bounded by
    ``success_buffer_size``); a new run refills its buffer from it. None: the buffer lives in memory only."""

    def __post_init__(self):
        if not _is_int(self.rl_updates_per_stage, 1):
            raise ValueError(
                f"rl_updates_per_stage {self.rl_updates_per_stage!r} must be an int >= 1 "
                "(each RL stage runs at least one GRPO rollout and update)"
            )
        if not _is_int(self.sl_steps_per_stage, 0):
            raise ValueError(
                f"sl_steps_per_stage {self.sl_steps_per_stage!r} must be an int >= 0 (0 skips the supervised stages)"
            )
        if not _is_int(self.sl_batch_size, 1):
            raise ValueError(f"sl_batch_size {self.sl_batch_size!r} must be an int >= 1")
        if not _is_positive(self.sl_learning_rate):
            raise ValueError(f"sl_learning_rate {self.sl_learning_rate!r} must be a finite number > 0")
        if self.sl_max_grad_norm is not None and not _is_positive(self.sl_max_grad_norm):
            raise ValueError(f"sl_max_grad_norm {self.sl_max_grad_norm!r} must be > 0 or None")
        if not _is_int(self.success_buffer_size, 0):
            raise ValueError(f"success_buffer_size {self.success_buffer_size!r} must be an int >= 0")
        if self.success_store is not None:
            self.success_store = os.fspath(self.success_store)


# ---------------------------------------------------------------------------------------------- D_RL
def successful_episodes(episodes: Iterable[Episode]) -> list[Episode]:
    """The online episodes that reached the goal, in order: what iRe-VLA adds to the supervised data (``D_RL``).
    Demonstrations in a rollout (GRPO's rescued groups) are ``D_e`` already and are left out."""
    return [episode for episode in episodes if episode.success and episode.source == "online"]


def concatenate_transitions(parts: Sequence[Transitions]) -> Transitions:
    """One :class:`Transitions` holding every part's, in order (``D_e ∪ D_RL``)."""
    observations = {key: np.concatenate([part.observations[key] for part in parts]) for key in parts[0].observations}
    observations["instruction"] = observations["instruction"].astype(object)
    actions = np.concatenate([part.actions for part in parts])
    return Transitions(observations, actions, np.concatenate([part.task_ids for part in parts]))


# ---------------------------------------------------------------------------------------------- the learner
class IReVLA(BaseLearner):
    """iRe-VLA: RL stages on the action head (GRPO, backbone frozen) alternating with supervised stages on
    demonstrations plus online successes, with stable-baselines3's surface.

    Args:
        policy: a :class:`VLAPolicy` implementing ``head_parameters()`` (``CompactVLA``, ``HFVLAPolicy``), or a
            checkpoint directory. Warm-start it with :class:`SFT` on the demonstrations first.
        env: a LIBERO env (``gym.make``) or a vector env of them, as :class:`GRPO` takes; needed by ``learn``.
        demos: the expert demonstrations ``D_e`` of the supervised stage (anything :func:`load_demonstrations`
            accepts). None: the supervised stages train on online successes alone (and are skipped while there
            are none).
        tensorboard_log: directory for TensorBoard runs (None: no TensorBoard).
        verbose: 1 prints the logged scalars.
        device: move the policy here (default: leave it where it is).
        **hyperparameters: the fields of :class:`IReVLAConfig` and of :class:`GRPOConfig` (the RL stage's).
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
        irevla_names = {field.name for field in dataclasses.fields(IReVLAConfig)}
        grpo_names = {field.name for field in dataclasses.fields(GRPOConfig)}
        unknown = sorted(set(hyperparameters) - irevla_names - grpo_names)
        if unknown:
            raise ValueError(
                f"unknown iRe-VLA hyperparameter(s) {unknown}: valid {sorted(irevla_names)} "
                f"and GRPO's (the RL stage's) {sorted(grpo_names)}"
            )
        self.config = IReVLAConfig(**{name: value for name, value in hyperparameters.items() if name in irevla_names})
        if isinstance(policy, (str, os.PathLike)):
            policy = load_policy(policy)
        if not isinstance(policy, VLAPolicy):
            raise TypeError(f"policy must be a VLAPolicy or a checkpoint directory: got {type(policy).__name__}")
        if device is not None:
            policy.to(device)
        self.policy, self.env = policy, env
        self.tensorboard_log, self.verbose = tensorboard_log, verbose

        # Which parameters each stage trains: SL everything trainable now, RL the head's share of it.
        self.sl_parameters = [p for p in policy.parameters() if p.requires_grad]
        if not self.sl_parameters:
            raise ValueError("the policy has no trainable parameters")
        head = policy.head_parameters()
        if not head:
            raise ValueError(f"{type(policy).__name__}.head_parameters() is empty: iRe-VLA's RL stage has no head to train")
        trainable = {id(p) for p in self.sl_parameters}
        self.head_parameters = [p for p in dict.fromkeys(head) if id(p) in trainable]
        if not self.head_parameters:
            raise ValueError(
                f"the action head of the {type(policy).__name__} is frozen (none of its {len(head)} parameter tensors is "
                "trainable; a LoRA adapter freezes everything but itself): iRe-VLA's RL stage trains the head, so make it "
                "trainable and saved, e.g. HFVLAPolicy.add_lora(modules_to_save=['lm_head']), or use a policy without LoRA"
            )
        grpo_hyperparameters = {name: value for name, value in hyperparameters.items() if name in grpo_names}
        if grpo_hyperparameters.get("rescue_failed_groups"):
            raise ValueError(
                "rescue_failed_groups=True is not available in iRe-VLA: its RL stage is pure RL (GRPO gets no "
                "demonstrations to rescue groups with); the demonstrations train the policy in the SL stage"
            )
        grpo_hyperparameters.setdefault("success_replay_size", 0)  # successes go to the SL stage, not GRPO's offline term
        with self._head_only():  # GRPO's AdamW takes the parameters that require grad: the head's
            self.rl = GRPO(policy, env, demos=None, **grpo_hyperparameters)
        self.sl_optimizer = torch.optim.AdamW(self.sl_parameters, lr=self.config.sl_learning_rate, weight_decay=0.0)

        self.demos: Transitions | None = None
        if demos is not None:
            self.demos = load_demonstrations(demos, policy.observation_keys, policy.action_dim)
        self.success_buffer: list[Episode] = []
        self.success_store: EpisodeStore | None = None
        if self.config.success_store is not None:
            self._open_success_store()
        self._rng = np.random.default_rng(self.rl.config.seed)
        self.num_rl_stages, self.num_sl_stages, self.num_rl_updates = 0, 0, 0
        self._start_time, self._start_step = time.time(), 0  # of the current learn call, for time/fps
        self._logger: Logger | None = None
        self.last_rl_metrics: dict[str, float] = {}
        self.last_sl_metrics: dict[str, float] = {}

    @property
    def num_timesteps(self) -> int:
        """Env steps so far (GRPO's count; SB3 callbacks read it)."""
        return self.rl.num_timesteps

    @num_timesteps.setter
    def num_timesteps(self, value: int) -> None:
        self.rl.num_timesteps = int(value)

    @contextlib.contextmanager
    def _head_only(self):
        """Freeze every trainable parameter but the action head's (the RL stage); unfreeze them on exit."""
        head = {id(p) for p in self.head_parameters}
        for parameter in self.sl_parameters:
            parameter.requires_grad_(id(parameter) in head)
        try:
            yield
        finally:
            for parameter in self.sl_parameters:
                parameter.requires_grad_(True)

    def _open_success_store(self) -> None:
        """Open the success store and refill the buffer with the newest successes earlier runs wrote into it."""
        size = self.config.success_buffer_size
        self.success_store = EpisodeStore(self.config.success_store, max_episodes=size or None)
        episode_ids = self.success_store.episode_ids(source="online", success=True)
        for episode_id in episode_ids[len(episode_ids) - size :] if size else []:
            try:
                episode = self.success_store.load(episode_id)
            except KeyError:  # evicted or corrupt since the query
                continue
            if set(self.policy.observation_keys) <= set(episode.observations):
                self.success_buffer.append(episode)

    def remember_successes(self, episodes: Iterable[Episode]) -> list[Episode]:
        """Add the successful ones of ``episodes`` to the success buffer (and store); returns them."""
        successes = successful_episodes(episodes)
        if self.config.success_buffer_size == 0:
            return successes
        self.success_buffer = (self.success_buffer + successes)[-self.config.success_buffer_size :]
        if self.success_store is not None:
            for episode in successes:
                self.success_store.append(copy.copy(episode))  # the store sets episode_id on its own copy
        return successes

    # ------------------------------------------------------------------ the loop
    def learn(
        self,
        total_timesteps: int,
        callback: BaseCallback | list[BaseCallback] | None = None,
        log_interval: int = 1,
        tb_log_name: str = "IReVLA",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> IReVLA:
        """Alternate RL and SL stages until ``total_timesteps`` env steps (or a callback's ``on_step`` says stop).

        ``log_interval`` counts RL updates between logs of GRPO's scalars; every SL stage is logged. As in SB3,
        ``reset_num_timesteps=False`` continues the step counter (``total_timesteps`` more steps): with :meth:`load`
        this resumes a run."""
        if not _is_int(total_timesteps, 1):
            raise ValueError(f"total_timesteps {total_timesteps!r} must be an int >= 1")
        if not _is_int(log_interval, 1):
            raise ValueError(f"log_interval {log_interval!r} must be an int >= 1")
        if self.env is None:
            raise ValueError("IReVLA has no env: pass env= to IReVLA(...) or IReVLA.load(..., env=...)")
        if reset_num_timesteps:
            self.num_timesteps = 0
        total_timesteps += 0 if reset_num_timesteps else self.num_timesteps
        self._setup_logger(tb_log_name)
        callback = CallbackList(callback) if isinstance(callback, list) else callback
        if callback is not None:
            callback.init_callback(self)
            callback.on_training_start(locals(), globals())
        bar = make_progress_bar(total_timesteps, "iRe-VLA", initial=self.num_timesteps) if progress_bar else None
        self._start_time, self._start_step = time.time(), self.num_timesteps
        while self.num_timesteps < total_timesteps:
            if not self._rl_stage(total_timesteps, callback, bar, log_interval):
                break  # a callback stopped training
            self.train_sl_stage()
        if bar is not None:
            bar.close()
        if callback is not None:
            callback.on_training_end()
        return self

    def _rl_stage(self, total_timesteps: int, callback: BaseCallback | None, bar, log_interval: int) -> bool:
        """iRe-VLA's stage 1: up to ``rl_updates_per_stage`` GRPO iterations on the head, the backbone frozen.
        False when a callback stopped training."""
        with self._head_only():
            for _ in range(self.config.rl_updates_per_stage):
                if self.num_timesteps >= total_timesteps:
                    break
                if callback is not None:
                    callback.on_rollout_start()
                before = self.num_timesteps
                rollout = self.rl.collect_rollouts(callback)
                if bar is not None:
                    bar.update(self.num_timesteps - before)
                if rollout is None:
                    return False
                self.last_rl_metrics = self.rl.train(rollout)
                self.remember_successes(rollout.episodes)  # D_RL
                if callback is not None:  # after the update: a checkpoint saved here holds this rollout's learning
                    callback.update_locals({"self": self})
                    callback.on_rollout_end()
                self.num_rl_updates += 1
                if self.num_rl_updates % log_interval == 0:
                    self._log_rl(self.last_rl_metrics)
        self.num_rl_stages += 1
        return True

    def train_sl_stage(self) -> dict[str, float]:
        """iRe-VLA's stage 2 (``learn`` runs one after every RL stage): ``sl_steps_per_stage`` supervised steps on
        demos + online successes, everything trainable. Returns the stage's mean scalars; skipped (``{}``) when
        there are no steps to take or no data."""
        parts = [self.demos] if self.demos is not None else []
        if self.success_buffer:
            parts.append(load_demonstrations(self.success_buffer, self.policy.observation_keys, self.policy.action_dim))
        if self.config.sl_steps_per_stage == 0 or not parts:
            return {}
        data = concatenate_transitions(parts)  # D_e ∪ D_RL
        num_demo_transitions = len(self.demos) if self.demos is not None else 0
        policy, bins = self.policy, self.policy.action_bins
        policy.train()
        sums: dict[str, float] = {}
        for _ in range(self.config.sl_steps_per_stage):
            obs, actions = data.batch(self._rng.integers(len(data), size=self.config.sl_batch_size))
            action_tokens = torch.as_tensor(bins.encode(actions), device=policy.device)
            logits = policy.action_logits(obs, action_tokens)  # (B, 7, num_bins), teacher-forced
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            token_log_probs = log_probs.gather(-1, action_tokens[..., None]).squeeze(-1)  # log pi(a_i | o, a_<i)
            loss = -token_log_probs.mean()  # SFT's token cross-entropy
            self.sl_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            max_norm = self.config.sl_max_grad_norm if self.config.sl_max_grad_norm is not None else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(self.sl_parameters, max_norm)
            self.sl_optimizer.step()
            with torch.no_grad():
                token_accuracy = (logits.argmax(-1) == action_tokens).float().mean()
                entropy = -(log_probs.exp() * log_probs).sum(-1).mean()
            for name, value in (
                ("loss", loss.detach()), ("token_accuracy", token_accuracy), ("entropy", entropy), ("grad_norm", grad_norm),
            ):  # fmt: skip
                sums[name] = sums.get(name, 0.0) + float(value)
        policy.eval()
        metrics = {name: value / self.config.sl_steps_per_stage for name, value in sums.items()}
        metrics.update(num_transitions=float(len(data)), success_fraction=1.0 - num_demo_transitions / len(data))
        self.last_sl_metrics = metrics
        self.num_sl_stages += 1
        self._log_sl(metrics)
        return metrics

    # ------------------------------------------------------------------ logging
    def _log_rl(self, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            if name in ROLLOUT_METRICS or name.startswith("success_rate_task"):
                self.logger.record(f"rollout/{name}", value)
            elif name != "num_updates":
                self.logger.record(f"train/{name}", value)
        self._dump(RL_STAGE)

    def _log_sl(self, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.logger.record(f"sl/{name}", value)
        self._dump(SL_STAGE)

    def _dump(self, stage: int) -> None:
        self.logger.record("irevla/stage", stage)
        self.logger.record("irevla/success_buffer", len(self.success_buffer))
        elapsed = max(time.time() - self._start_time, 1e-9)
        self.logger.record("time/fps", (self.num_timesteps - self._start_step) / elapsed)
        self.logger.record("time/total_timesteps", self.num_timesteps, exclude="tensorboard")
        self.logger.dump(step=self.num_timesteps)

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | os.PathLike) -> None:
        """A directory: what :meth:`GRPO.save` writes for the RL stage (the policy checkpoint, ``grpo.json`` with the
        step counter, the head's optimizer, the RNG states), plus the supervised optimizer and ``irevla.json``.

        Assembled in a temporary sibling directory and renamed into place, so a crash while saving leaves the
        previous checkpoint (or none), never a half-written one. The success buffer persists through
        ``success_store``, not here."""
        path = os.path.abspath(os.fspath(path))
        parent, name = os.path.split(path)
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
        try:
            complete = os.path.join(staging, name)
            self.rl.save(complete)
            torch.save(self.sl_optimizer.state_dict(), os.path.join(complete, SL_OPTIMIZER_FILENAME))
            state = {
                **dataclasses.asdict(self.config),
                "num_rl_stages": self.num_rl_stages,
                "num_sl_stages": self.num_sl_stages,
                "num_rl_updates": self.num_rl_updates,
                "sl_rng_state": self._rng.bit_generator.state,
            }
            with open(os.path.join(complete, IREVLA_CONFIG_FILENAME), "w") as file:  # written last: marks it complete
                json.dump(state, file, indent=2)
            if os.path.exists(path):
                os.rename(path, os.path.join(staging, f"{name}.old"))
            os.rename(complete, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def load(cls, path: str | os.PathLike, env=None, demos: Any = None, device=None, **kwargs) -> IReVLA:
        """Rebuild from :meth:`save` -- weights, both configs, step counter, both optimizers, RNG states -- so
        ``learn(..., reset_num_timesteps=False)`` continues the run; ``kwargs`` override saved hyperparameters
        (or set tensorboard_log, verbose). With a ``success_store``, the success buffer is refilled from it."""
        irevla_path = os.path.join(path, IREVLA_CONFIG_FILENAME)
        if not os.path.exists(irevla_path):
            raise FileNotFoundError(f"{os.fspath(path)!r} is not an iRe-VLA checkpoint: it has no {IREVLA_CONFIG_FILENAME}")
        with open(irevla_path) as file:
            saved = json.load(file)
        with open(os.path.join(path, GRPO_CONFIG_FILENAME)) as file:
            saved_grpo = json.load(file)
        counters = {name: int(saved.pop(name)) for name in ("num_rl_stages", "num_sl_stages", "num_rl_updates")}
        sl_rng_state = saved.pop("sl_rng_state")
        num_timesteps, policy_version = int(saved_grpo.pop("num_timesteps")), int(saved_grpo.pop("policy_version", 0))
        model = cls(load_policy(path), env=env, demos=demos, device=device, **{**saved_grpo, **saved, **kwargs})
        model.num_timesteps, model.rl.policy_version = num_timesteps, policy_version
        for name, value in counters.items():
            setattr(model, name, value)
        model._rng.bit_generator.state = sl_rng_state
        for optimizer, filename, learning_rate in (
            (model.rl.optimizer, GRPO_OPTIMIZER_FILENAME, model.rl.config.learning_rate),
            (model.sl_optimizer, SL_OPTIMIZER_FILENAME, model.config.sl_learning_rate),
        ):
            optimizer.load_state_dict(torch.load(os.path.join(path, filename), map_location=model.policy.device))
            for group in optimizer.param_groups:
                group["lr"] = learning_rate
        rng = torch.load(os.path.join(path, GRPO_RNG_FILENAME), weights_only=False)
        model.rl._rng.bit_generator.state = rng["numpy"]
        torch.set_rng_state(rng["torch"])
        return model
