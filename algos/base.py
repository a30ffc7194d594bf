"""What every learner in ``algos/`` shares, written once: stable-baselines3's surface and crash-safe checkpoints.

SB3 keeps ``learn()``'s set-up in ``BaseAlgorithm._setup_learn`` and the save / load routine in ``BaseAlgorithm``;
a learner adds only its own loop and state. Here :class:`BaseLearner` holds:

- construction: hyperparameters validated into the learner's config dataclass (an unknown name lists the valid
  ones), a policy given as a :class:`~gym_libero_vla.policies.base.VLAPolicy` or a checkpoint directory, moved to
  ``device``, and an env checked against what the policy reads;
- ``learn()``'s set-up and tear-down (:meth:`BaseLearner._setup_learn`, :meth:`BaseLearner._finish_learn`): step
  counter, TensorBoard run folder (``<tensorboard_log>/<tb_log_name>_<n>``), callbacks, progress bar;
- logging: metrics are named by their final logger keys where they are made (``rollout/success_rate``,
  ``train/pg_loss``), so logging records them as they are (:meth:`BaseLearner._dump_logs`);
- ``predict``, ``get_env``, ``logger`` / ``set_logger``;
- a moving average of the weights where the learner keeps one (:class:`~gym_libero_vla.algos.ema.WeightEMA`): in the
  policy outside ``learn``, for ``predict`` and ``save``; the training weights inside;
- ``save(path)``: the policy (``save_pretrained``), the learner's own state (:meth:`BaseLearner._save_state`:
  optimizer, RNG, counters) and, written last, ``<config_filename>`` with the hyperparameters: assembled in a
  temporary directory and renamed into place, so a kill leaves the previous checkpoint or the new one, whole;
  ``Learner.load(path, env, demos)`` rebuilds it and ``learn(..., reset_num_timesteps=False)`` continues;
- :func:`latest_checkpoint` and :func:`resume_or_create`, which every script uses to continue a run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.logger import Logger, configure

from gym_libero_vla.algos.ema import EMA_FILENAME, WeightEMA
from gym_libero_vla.policies.base import VLAPolicy, batch_observation, load_policy


# ---------------------------------------------------------------------------------------------- validation
def is_int(value, minimum: int) -> bool:
    """An int (not a bool) >= ``minimum``."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum


def is_finite(value) -> bool:
    """A finite real number (not a bool)."""
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)


def check_positive(config, *names: str) -> None:
    """Each named field of ``config`` must be a finite number > 0."""
    for name in names:
        value = getattr(config, name)
        if not (is_finite(value) and value > 0):
            raise ValueError(f"{name} {value!r} must be a finite number > 0")


def check_ema_decay(config, name: str = "ema_decay") -> None:
    """A learner's ``ema_decay`` (or ``config``'s field ``name``) must lie in [0, 1) (0: no moving average)."""
    value = getattr(config, name)
    if not (is_finite(value) and 0 <= value < 1):
        raise ValueError(f"{name} {value!r} must be in [0, 1) (0: no moving average)")


def check_ints(config, **minimums: int) -> None:
    """Each named field of ``config`` must be an int >= its minimum."""
    for name, minimum in minimums.items():
        value = getattr(config, name)
        if not is_int(value, minimum):
            raise ValueError(f"{name} {value!r} must be an int >= {minimum}")


# ---------------------------------------------------------------------------------------------- checkpoint files
def replace_directory(source: str, path: str) -> None:
    """Move the complete directory ``source`` to ``path``, replacing what is there. A kill at any point leaves the
    old or the new directory at ``path``, or (between the two renames) the old one as ``.<name>.old``, which
    :func:`recover_directory` moves back."""
    old = _old_twin(path)
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(source, path)
    shutil.rmtree(old, ignore_errors=True)


def recover_directory(path: str) -> None:
    """Undo a kill between :func:`replace_directory`'s two renames."""
    old = _old_twin(path)
    if not os.path.exists(path) and os.path.isdir(old):
        os.rename(old, path)


def _old_twin(path: str) -> str:
    parent, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(parent, f".{name}.old")


def make_progress_bar(total: int, desc: str, initial: int = 0):
    """A rich progress bar (as SB3's ``progress_bar=True``), plain tqdm when not on a terminal; ``initial`` is where a
    resumed run starts."""
    if sys.stderr.isatty():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tqdm.rich is marked experimental
            from tqdm.rich import tqdm

            return tqdm(total=total, desc=desc, initial=initial)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, initial=initial, mininterval=1.0)


OPTIMIZER_FILENAME = "optimizer.pt"
RNG_FILENAME = "rng_state.pt"


# ---------------------------------------------------------------------------------------------- the base
class BaseLearner:
    """The SB3 surface of every learner here. Subclasses set ``config_class`` (a dataclass of hyperparameters that
    validates itself) and ``config_filename``, build their optimizer in ``__init__`` after calling this one, and
    implement ``learn`` (with :meth:`_setup_learn` / :meth:`_finish_learn`), :meth:`_save_state` and
    :meth:`_load_state`."""

    config_class: type
    config_filename: str
    state_keys: tuple[str, ...] = ()
    """Entries of the checkpoint's JSON that are counters, not hyperparameters (besides ``num_timesteps`` and
    ``train_seconds``, which every learner keeps)."""

    def __init__(
        self,
        policy: VLAPolicy | str | os.PathLike,
        env=None,
        tensorboard_log: str | None = None,
        verbose: int = 0,
        device: str | torch.device | None = None,
        **hyperparameters,
    ):
        self.config = self._make_config(hyperparameters)
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
        self.num_timesteps = 0
        self.train_seconds = 0.0
        """Wall seconds spent in ``learn`` over the run, resumes included (saved with the checkpoints)."""
        self.last_metrics: dict[str, float] = {}
        self.ema: WeightEMA | None = None
        """A moving average of the weights (a learner's ``ema_decay``): outside ``learn`` the policy holds it."""
        self._logger: Logger | None = None
        self._start_time, self._start_step = time.time(), 0  # of the current learn call, for time/fps
        self._learning_since: float | None = None

    @classmethod
    def _make_config(cls, hyperparameters: dict):
        valid = sorted(field.name for field in dataclasses.fields(cls.config_class))
        unknown = sorted(set(hyperparameters) - set(valid))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} hyperparameter(s) {unknown}: valid {valid}")
        return cls.config_class(**hyperparameters)

    def _check_env(self, env) -> None:
        """The env must give every observation the policy reads, and take its actions."""
        vector = hasattr(env, "num_envs")
        space = env.single_observation_space if vector else env.observation_space
        keys = set(getattr(space, "spaces", {}))
        missing = [key for key in self.policy.observation_keys if key not in keys]
        if missing:
            raise ValueError(
                f"the env's observations lack {missing}, which the policy reads: the env gives {sorted(keys)} "
                "(choose a matching obs_mode / cameras / privileged_state)"
            )
        shape = (env.single_action_space if vector else env.action_space).shape
        if shape[-1:] != (self.policy.action_dim,):
            raise ValueError(f"the env's action space has shape {shape}: the policy outputs {self.policy.action_dim} numbers")
        env_chunk, policy = (shape[0] if len(shape) == 2 else 1), self.policy
        if env_chunk != policy.execute_steps:
            raise ValueError(
                f"the env takes {env_chunk} action(s) per step, but the policy executes {policy.execute_steps} of each "
                f"chunk of {policy.chunk_size}: make the env with action_chunk={policy.execute_steps}"
            )

    def _make_ema(self, decay: float, warmup: bool = True) -> WeightEMA | None:
        """A :class:`WeightEMA` of the trainable weights (None for ``decay`` 0); ``warmup`` as it says."""
        if not decay:
            return None
        return WeightEMA([(name, p) for name, p in self.policy.named_parameters() if p.requires_grad], decay, warmup)

    @contextlib.contextmanager
    def averaged_weights(self):
        """Inside, the policy holds the averaged weights (as it does outside ``learn``); a no-op without EMA."""
        if self.ema is None or self.ema.holds_averaged:
            yield self.policy
            return
        self.ema.put_averaged()
        try:
            yield self.policy
        finally:
            self.ema.put_training()

    def _trainable_parameters(self) -> list[torch.nn.Parameter]:
        parameters = [p for p in self.policy.parameters() if p.requires_grad]
        if not parameters:
            raise ValueError("the policy has no trainable parameters")
        return parameters

    # ------------------------------------------------------------------ SB3's surface
    def get_env(self):
        return self.env

    def get_vec_normalize_env(self) -> None:
        """SB3's hook for ``VecNormalize`` statistics (``EvalCallback`` and ``CheckpointCallback`` ask): none here."""
        return None

    @property
    def logger(self) -> Logger:
        if self._logger is None:
            self._logger = Logger(folder=None, output_formats=[])
        return self._logger

    def set_logger(self, logger: Logger) -> None:
        self._logger = logger

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = False):
        """SB3's ``predict``: ``(actions, None)`` as numpy, ``(7,)`` for one env's observation, ``(B, 7)`` for a batch."""
        single = isinstance(observation.get("instruction"), str)
        was_training = self.policy.training
        self.policy.eval()
        with self.averaged_weights():
            actions, _, _ = self.policy.act(batch_observation(observation), deterministic=deterministic)
        self.policy.train(was_training)
        actions = actions.cpu().numpy()
        return (actions[0] if single else actions), None

    # ------------------------------------------------------------------ learn()'s set-up, once
    def _setup_learn(
        self, total_timesteps: int, callback, reset_num_timesteps: bool, tb_log_name: str, progress_bar: bool
    ) -> tuple[int, BaseCallback | None, Any]:
        """Validate the budget, reset or continue the step counter, open the logger, initialise the callbacks and
        the progress bar. Returns ``(the step count to reach, the callback, the bar or None)``; as in SB3,
        ``reset_num_timesteps=False`` continues the counter, so ``total_timesteps`` more steps are taken."""
        if not is_int(total_timesteps, 1):
            raise ValueError(f"total_timesteps {total_timesteps!r} must be an int >= 1")
        if reset_num_timesteps:
            self.num_timesteps = 0
        total_timesteps += 0 if reset_num_timesteps else self.num_timesteps
        self._setup_logger(tb_log_name)
        callback = CallbackList(callback) if isinstance(callback, list) else callback
        if callback is not None:
            callback.init_callback(self)
            callback.on_training_start(locals(), globals())
        bar = make_progress_bar(total_timesteps, tb_log_name, initial=self.num_timesteps) if progress_bar else None
        if self.ema is not None:
            self.ema.put_training()  # learn trains the training weights; _finish_learn puts the average back
        self._start_time, self._start_step = time.time(), self.num_timesteps
        self._learning_since = time.perf_counter()
        return total_timesteps, callback, bar

    def _finish_learn(self, callback: BaseCallback | None, bar) -> None:
        self.train_seconds = self._train_seconds_now()
        self._learning_since = None
        if self.ema is not None:
            self.ema.put_averaged()
        if bar is not None:
            bar.close()
        if callback is not None:
            callback.on_training_end()

    def _train_seconds_now(self) -> float:
        running = 0.0 if self._learning_since is None else time.perf_counter() - self._learning_since
        return self.train_seconds + running

    def _setup_logger(self, tb_log_name: str) -> None:
        if self._logger is not None and self.tensorboard_log is None:
            return
        formats = ["stdout"] if self.verbose else []
        folder = None
        if self.tensorboard_log is not None:
            run = 1
            if os.path.isdir(self.tensorboard_log):
                run += sum(name.startswith(f"{tb_log_name}_") for name in os.listdir(self.tensorboard_log))
            folder = os.path.join(self.tensorboard_log, f"{tb_log_name}_{run}")
            formats.append("tensorboard")
        self._logger = configure(folder, formats) if formats else Logger(folder=None, output_formats=[])

    def _dump_logs(self, metrics: dict[str, float]) -> None:
        """Record ``metrics`` (named by their logger keys) and the throughput, then write them at this step."""
        for name, value in metrics.items():
            self.logger.record(name, value)
        elapsed = max(time.time() - self._start_time, 1e-9)
        self.logger.record("time/fps", (self.num_timesteps - self._start_step) / elapsed)
        self.logger.record("time/total_timesteps", self.num_timesteps, exclude="tensorboard")
        self.logger.record("time/time_elapsed", int(elapsed), exclude="tensorboard")
        self.logger.dump(step=self.num_timesteps)

    # ------------------------------------------------------------------ checkpoints, once
    def save(self, path: str | os.PathLike) -> None:
        """A directory: the policy checkpoint (``save_pretrained``), the learner's state (optimizer, RNG, counters)
        and, written last, ``<config_filename>`` with the hyperparameters and counters. Assembled in a temporary
        sibling directory and renamed into place, so a crash while saving leaves the previous checkpoint (or none),
        never a half-written one."""
        path = os.path.abspath(os.fspath(path))
        parent, name = os.path.split(path)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
        try:
            with self.averaged_weights():  # the policy a checkpoint holds is what is evaluated and deployed
                self.policy.save_pretrained(tmp)
            if self.ema is not None:  # the training weights, to continue from
                torch.save(self.ema.state_dict(), os.path.join(tmp, EMA_FILENAME))
            state = {"num_timesteps": self.num_timesteps, "train_seconds": self._train_seconds_now(), **self._save_state(tmp)}
            with open(os.path.join(tmp, self.config_filename), "w") as file:  # written last: marks it complete
                json.dump({**self._hyperparameters(), **state}, file, indent=2)
            replace_directory(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _save_state(self, directory: str) -> dict[str, Any]:
        """Write the learner's own files into ``directory``; return counters for the checkpoint's JSON."""
        return {}

    def _load_state(self, directory: str, state: dict[str, Any]) -> None:
        """Restore what :meth:`_save_state` wrote (``state``: its counters)."""

    @classmethod
    def load(cls, path: str | os.PathLike, env=None, demos: Any = None, device=None, **kwargs):
        """Rebuild from :meth:`save` -- weights, hyperparameters, counters, optimizer and RNG states -- so that
        ``learn(..., reset_num_timesteps=False)`` continues the run; ``kwargs`` override saved hyperparameters (or set
        ``tensorboard_log``, ``verbose``)."""
        path = os.fspath(path)
        recover_directory(path)
        config_path = os.path.join(path, cls.config_filename)
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"{path!r} is not a checkpoint of {cls.__name__}: it has no {cls.config_filename}")
        with open(config_path) as file:
            saved = json.load(file)
        state = {key: saved.pop(key) for key in ("num_timesteps", "train_seconds", *cls.state_keys) if key in saved}
        known = cls._hyperparameter_names()
        unused = sorted(set(saved) - known)
        if unused:  # a checkpoint of a learner with more settings (AsyncGRPO's pipeline) resumes as one without them
            warnings.warn(f"{path!r}: {cls.__name__} does not use the saved setting(s) {unused}", stacklevel=2)
        hyperparameters = {key: value for key, value in saved.items() if key in known}
        model = cls(load_policy(path), env=env, demos=demos, device=device, **{**hyperparameters, **kwargs})
        model.num_timesteps = int(state.get("num_timesteps", 0))
        model.train_seconds = float(state.get("train_seconds", 0.0))
        model._load_state(path, state)
        ema_path = os.path.join(path, EMA_FILENAME)
        if model.ema is not None and os.path.exists(ema_path):
            model.ema.load_state_dict(torch.load(ema_path, map_location="cpu"))
        elif os.path.exists(ema_path):
            warnings.warn(f"{path!r} holds averaged (EMA) weights: without ema_decay, training continues from them, "
                          "not from its training weights", stacklevel=2)  # fmt: skip
        return model

    @classmethod
    def _hyperparameter_names(cls) -> set[str]:
        return {field.name for field in dataclasses.fields(cls.config_class)}

    def _hyperparameters(self) -> dict[str, Any]:
        """What :meth:`load` passes back to the constructor."""
        return dataclasses.asdict(self.config)

    # ------------------------------------------------------------------ shared state files
    def _save_optimizer_and_rng(self, directory: str, optimizer: torch.optim.Optimizer, rng: np.random.Generator) -> None:
        torch.save(optimizer.state_dict(), os.path.join(directory, OPTIMIZER_FILENAME))
        torch.save({"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}, os.path.join(directory, RNG_FILENAME))

    def _load_optimizer_and_rng(
        self, directory: str, optimizer: torch.optim.Optimizer, rng: np.random.Generator, learning_rate: float
    ) -> None:
        """Restore the optimizer (at the configured step size: ``load(..., learning_rate=...)`` may change it) and the
        RNG states, where the checkpoint has them."""
        optimizer_path = os.path.join(directory, OPTIMIZER_FILENAME)
        if os.path.exists(optimizer_path):
            optimizer.load_state_dict(torch.load(optimizer_path, map_location=self.policy.device))
            for group in optimizer.param_groups:
                group["lr"] = learning_rate
        rng_path = os.path.join(directory, RNG_FILENAME)
        if os.path.exists(rng_path):
            saved = torch.load(rng_path, weights_only=False)
            rng.bit_generator.state = saved["numpy"]
            torch.set_rng_state(saved["torch"])


# ---------------------------------------------------------------------------------------------- resuming runs
def latest_checkpoint(directory: str | os.PathLike, learner_class: type[BaseLearner] | None = None) -> str | None:
    """The complete checkpoint under ``directory`` (itself or a subdirectory) with the most steps, or None. A
    checkpoint is a directory holding ``learner_class.config_filename`` (any learner's, by default); temporary
    directories of an interrupted save are ignored."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return None
    classes = [learner_class] if learner_class is not None else _learner_classes()
    filenames = {cls.config_filename for cls in classes}
    candidates = [directory] + [os.path.join(directory, name) for name in os.listdir(directory) if not name.startswith(".")]
    for candidate in candidates:
        recover_directory(candidate)
    best, best_steps = None, -1
    for candidate in candidates:
        for filename in filenames:
            config_path = os.path.join(candidate, filename)
            if not os.path.isfile(config_path):
                continue
            try:
                with open(config_path) as file:
                    steps = int(json.load(file).get("num_timesteps", 0))
            except (OSError, ValueError):
                continue
            if steps > best_steps:
                best, best_steps = candidate, steps
    return best


def _learner_classes() -> list[type[BaseLearner]]:
    from gym_libero_vla.algos.grpo import GRPO
    from gym_libero_vla.algos.irevla import IReVLA
    from gym_libero_vla.algos.sft import SFT

    return [GRPO, IReVLA, SFT]


def resume_or_create(
    learner_class: type[BaseLearner], checkpoints: str | os.PathLike, create: Callable[[], BaseLearner], **load_kwargs
) -> tuple[BaseLearner, bool]:
    """The learner of the newest ``learner_class`` checkpoint under ``checkpoints`` (loaded with ``load_kwargs``:
    env, demos, device, overrides), or ``create()`` when there is none. Returns ``(learner, resumed)``; continue a
    resumed one with ``learn(..., reset_num_timesteps=False)``."""
    checkpoint = latest_checkpoint(checkpoints, learner_class)
    if checkpoint is None:
        return create(), False
    return learner_class.load(checkpoint, **load_kwargs), True
