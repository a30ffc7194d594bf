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
- RL stage: ``GRPO.learn(..., max_updates=rl_updates_per_stage)`` of a :class:`GRPO` whose AdamW was built over the
  head alone, with ``requires_grad`` off everywhere but the head. GRPO gets no
  demonstrations and no success replay (``success_replay_size=0`` unless given): the stage is pure RL,
  imitation is the SL stage's job. GRPO's other hyperparameters (``group_size``, ``clip_high``, ``kl_coef``,
  ``entropy_coef``, ...) pass through and act on the head.
- ``D_RL``: the successful online episodes of the RL stages, a :class:`~gym_libero_vla.success_replay.SuccessReplay`
  of the newest ``success_buffer_size``, which with ``success_store=`` also goes to an :class:`EpisodeStore`
  directory that a later run reads back, so a resumed run keeps its successes.
- SL stage: ``SFT.learn(sl_steps_per_stage)`` of an :class:`SFT` on ``D_e ∪ D_RL`` (OpenVLA's token cross-entropy,
  shuffled epochs of ``sl_batch_size`` transitions),

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
- ``ema_decay`` (a :class:`GRPOConfig` field; 0 by default, as in the paper) keeps one moving average of every
  trainable weight, updated after each optimizer step of either stage (no warm-up: it starts at the warm-started
  policy); the stages train the training weights, and outside ``learn`` the policy holds the average, as
  :class:`GRPO`'s and :class:`SFT`'s ``ema_decay``. An average of one stage's steps alone would be undone by the
  next stage; from an SFT checkpoint that is itself an average, continuing without one costs what averaging gained.
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
import dataclasses
import os
from typing import Any

from stable_baselines3.common.callbacks import BaseCallback

from gym_libero_vla.algos.base import BaseLearner, check_ints, check_positive
from gym_libero_vla.algos.grpo import GRPO, GRPOConfig
from gym_libero_vla.algos.sft import SFT, episodes_of
from gym_libero_vla.episode import Episode
from gym_libero_vla.success_replay import SuccessReplay

RL_STAGE, SL_STAGE = 0, 1
"""The values logged as ``irevla/stage``."""


# ---------------------------------------------------------------------------------------------- hyperparameters
@dataclasses.dataclass
class IReVLAConfig:
    """iRe-VLA's own hyperparameters (GRPO's, for the RL stage, are :class:`GRPOConfig`'s); validated on construction."""

    rl_updates_per_stage: int = 2
    """GRPO iterations (one rollout of ``num_groups * group_size`` episodes, one update of the head) per RL stage."""
    sl_steps_per_stage: int = 100
    """Gradient steps of each supervised stage (0: no SL stages, head-only RL)."""
    sl_batch_size: int = 64
    """Transitions (demos and online successes) per supervised gradient step."""
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
        if not isinstance(self.rl_updates_per_stage, int) or self.rl_updates_per_stage < 1:
            raise ValueError(
                f"rl_updates_per_stage {self.rl_updates_per_stage!r} must be an int >= 1 "
                "(each RL stage runs at least one GRPO rollout and update)"
            )
        if not isinstance(self.sl_steps_per_stage, int) or self.sl_steps_per_stage < 0:
            raise ValueError(
                f"sl_steps_per_stage {self.sl_steps_per_stage!r} must be an int >= 0 (0 skips the supervised stages)"
            )
        check_ints(self, sl_batch_size=1, success_buffer_size=0)
        check_positive(self, "sl_learning_rate")
        if self.sl_max_grad_norm is not None:
            check_positive(self, "sl_max_grad_norm")
        if self.success_store is not None:
            self.success_store = os.fspath(self.success_store)


# ---------------------------------------------------------------------------------------------- the learner
class IReVLA(BaseLearner):
    """iRe-VLA: RL stages on the action head (GRPO, backbone frozen) alternating with supervised stages (SFT) on
    demonstrations plus online successes, with stable-baselines3's surface.

    Args:
        policy: a :class:`VLAPolicy` implementing ``head_parameters()`` (``CompactVLA``, ``HFVLAPolicy``), or a
            checkpoint directory. Warm-start it with :class:`SFT` on the demonstrations first.
        env: a LIBERO env (``gym.make``) or a vector env of them, as :class:`GRPO` takes; needed by ``learn``.
        demos: the expert demonstrations ``D_e`` of the supervised stage (anything :class:`SFT` takes). None: the
            supervised stages train on online successes alone (and are skipped while there are none).
        tensorboard_log: directory for TensorBoard runs (None: no TensorBoard).
        verbose: 1 prints the logged scalars.
        device: move the policy here (default: leave it where it is).
        **hyperparameters: the fields of :class:`IReVLAConfig` and of :class:`GRPOConfig` (the RL stage's).
    """

    config_class = IReVLAConfig
    config_filename = "irevla.json"
    state_keys = (*GRPO.state_keys, "num_rl_stages", "num_sl_stages", "num_rl_updates")  # GRPO's: the RL stage's
    config: IReVLAConfig

    def __init__(self, policy, env=None, demos: Any = None, tensorboard_log=None, verbose: int = 0, device=None, **kwargs):
        unknown = sorted(set(kwargs) - self._hyperparameter_names())
        if unknown:
            raise ValueError(
                f"unknown iRe-VLA hyperparameter(s) {unknown}: valid {sorted(_field_names(IReVLAConfig))} "
                f"and GRPO's (the RL stage's) {sorted(_field_names(GRPOConfig))}"
            )
        own = {name: value for name, value in kwargs.items() if name in _field_names(IReVLAConfig)}
        rl_hyperparameters = {name: value for name, value in kwargs.items() if name not in own}
        super().__init__(policy, env, tensorboard_log=tensorboard_log, verbose=verbose, device=device, **own)
        policy, config = self.policy, self.config
        # Which parameters each stage trains: SL everything trainable now, RL the head's share of it.
        self.sl_parameters = self._trainable_parameters()
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
        if rl_hyperparameters.get("rescue_failed_groups"):
            raise ValueError(
                "rescue_failed_groups=True is not available in iRe-VLA: its RL stage is pure RL (GRPO gets no "
                "demonstrations to rescue groups with); the demonstrations train the policy in the SL stage"
            )
        rl_hyperparameters.setdefault("success_replay_size", 0)  # successes go to the SL stage, not GRPO's offline term
        with self._head_only():  # GRPO's AdamW takes the parameters that require grad: the head's
            self.rl = GRPO(policy, env, demos=None, **rl_hyperparameters)
        self.sl = SFT(
            policy, learning_rate=config.sl_learning_rate, batch_size=config.sl_batch_size,
            max_grad_norm=config.sl_max_grad_norm, log_interval=max(config.sl_steps_per_stage, 1), seed=self.rl.config.seed,
        )  # fmt: skip
        # One moving average of every trainable weight, over both stages' steps (GRPO's ema_decay; started at the
        # policy, no warm-up): both stages update it and swap it as their own; outside learn the policy holds it.
        self.ema = self._make_ema(self.rl.config.ema_decay, warmup=False)
        self.rl.ema = self.sl.ema = self.ema
        self.demo_episodes: list[Episode] = episodes_of(demos, policy.observation_keys) if demos is not None else []
        self.successes = SuccessReplay(  # D_RL
            config.success_buffer_size, policy.observation_keys, sources=("online",), store=config.success_store,
            write=config.success_store is not None,
        )  # fmt: skip
        self.num_rl_stages, self.num_sl_stages, self.num_rl_updates = 0, 0, 0
        self.last_rl_metrics: dict[str, float] = {}
        self.last_sl_metrics: dict[str, float] = {}

    @classmethod
    def _hyperparameter_names(cls) -> set[str]:
        return _field_names(IReVLAConfig) | _field_names(GRPOConfig)

    def _hyperparameters(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.rl.config), **dataclasses.asdict(self.config)}

    @property
    def success_buffer(self) -> list[Episode]:
        """``D_RL``: the successful online episodes the supervised stages train on."""
        return self.successes.episodes

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
        if self.env is None:
            raise ValueError("IReVLA has no env: pass env= to IReVLA(...) or IReVLA.load(..., env=...)")
        total_timesteps, callback, bar = self._setup_learn(
            total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar
        )
        self.rl.num_timesteps = self.num_timesteps
        rl_stage = _RLStage(self, callback, bar, log_interval)
        while self.num_timesteps < total_timesteps:
            with self._head_only():  # stage 1: GRPO on the action head, the backbone frozen
                self.rl.learn(total_timesteps - self.num_timesteps, callback=rl_stage, reset_num_timesteps=False,
                              max_updates=self.config.rl_updates_per_stage)  # fmt: skip
            if rl_stage.stopped:
                break
            self.num_rl_stages += 1
            self.train_sl_stage()  # stage 2: SFT on D_e and D_RL, everything trainable
        self._finish_learn(callback, bar)
        return self

    def train_sl_stage(self) -> dict[str, float]:
        """iRe-VLA's stage 2 (``learn`` runs one after every RL stage): ``sl_steps_per_stage`` supervised steps on
        demos + online successes, everything trainable. Returns the stage's mean scalars; skipped (``{}``) when
        there are no steps to take or no data."""
        data = self.demo_episodes + self.successes.episodes  # D_e ∪ D_RL
        if self.config.sl_steps_per_stage == 0 or not data:
            return {}
        self.sl.set_demos(data)
        self.sl.learn(self.config.sl_steps_per_stage, reset_num_timesteps=False)
        demo_steps = sum(episode.num_steps for episode in self.demo_episodes)
        metrics = {"sl/" + name.split("/", 1)[1]: value for name, value in self.sl.last_metrics.items()}
        metrics.update({"sl/num_transitions": float(len(self.sl.demos)),
                        "sl/success_fraction": 1.0 - demo_steps / len(self.sl.demos)})  # fmt: skip
        self.last_sl_metrics = metrics
        self.last_metrics = {**self.last_rl_metrics, **metrics}
        self.num_sl_stages += 1
        self._dump_logs({**metrics, "irevla/stage": SL_STAGE, "irevla/success_buffer": len(self.successes.episodes)})
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def _save_state(self, directory: str) -> dict[str, Any]:
        """GRPO's state (the head's optimizer, the RNG states) in ``rl/``, SFT's (the supervised optimizer) in ``sl/``.
        The success buffer persists through ``success_store``, not here."""
        counters = {}
        for stage, learner in (("rl", self.rl), ("sl", self.sl)):
            os.makedirs(os.path.join(directory, stage))
            counters[stage] = learner._save_state(os.path.join(directory, stage))
        return {**counters["rl"], "num_rl_stages": self.num_rl_stages, "num_sl_stages": self.num_sl_stages,
                "num_rl_updates": self.num_rl_updates}  # fmt: skip

    def _load_state(self, directory: str, state: dict[str, Any]) -> None:
        self.rl.num_timesteps = self.num_timesteps
        self.sl._load_state(os.path.join(directory, "sl"), {})
        self.rl._load_state(os.path.join(directory, "rl"), state)  # last: its RNG states are the run's
        for name in ("num_rl_stages", "num_sl_stages", "num_rl_updates"):
            setattr(self, name, int(state.get(name, 0)))


class _RLStage(BaseCallback):
    """GRPO's callback during an RL stage: keeps iRe-VLA's step counter and progress bar current, forwards the events
    to iRe-VLA's own callback (whose model is the iRe-VLA learner), collects ``D_RL`` and logs each RL update."""

    def __init__(self, learner: IReVLA, callback: BaseCallback | None, bar, log_interval: int):
        super().__init__()
        self.learner, self.outer, self.bar, self.log_interval = learner, callback, bar, log_interval
        self.stopped = False

    def _on_step(self) -> bool:
        learner = self.learner
        if self.bar is not None:
            self.bar.update(learner.rl.num_timesteps - learner.num_timesteps)
        learner.num_timesteps = learner.rl.num_timesteps
        if self.outer is not None:
            self.outer.update_locals({"self": learner})
            self.stopped = not self.outer.on_step()
        return not self.stopped

    def _on_rollout_start(self) -> None:
        if self.outer is not None:
            self.outer.on_rollout_start()

    def _on_rollout_end(self) -> None:
        learner = self.learner
        learner.num_timesteps = learner.rl.num_timesteps
        learner.successes.add(self.locals["rollout"].episodes)  # D_RL
        learner.last_rl_metrics = learner.rl.last_metrics
        learner.last_metrics = {**learner.last_rl_metrics, **learner.last_sl_metrics}
        learner.num_rl_updates += 1
        if self.outer is not None:  # after the update: a checkpoint saved here holds this rollout's learning
            self.outer.update_locals({"self": learner})
            self.outer.on_rollout_end()
        if learner.num_rl_updates % self.log_interval == 0:
            metrics = {"irevla/stage": RL_STAGE, "irevla/success_buffer": len(learner.successes.episodes)}
            learner._dump_logs({**learner.rl.last_metrics, **metrics})


def _field_names(config_class) -> set[str]:
    return {field.name for field in dataclasses.fields(config_class)}
