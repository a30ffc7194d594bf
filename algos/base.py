"""What the learners in ``algos/`` share, kept out of the algorithm files so those read top to bottom."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

from stable_baselines3.common.logger import Logger, configure

from gym_libero_vla.policies.base import batch_observation


def progress_bar(total: int, desc: str, initial: int = 0):
    """A rich progress bar (as SB3's ``progress_bar=True``), plain tqdm when not on a terminal; ``initial``
    is where a resumed run starts."""
    if sys.stderr.isatty():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tqdm.rich is marked experimental
            from tqdm.rich import tqdm

            return tqdm(total=total, desc=desc, initial=initial)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, initial=initial, mininterval=1.0)


class BaseLearner:
    """The plumbing SFT and GRPO share with SB3's ``BaseAlgorithm``: ``get_env``, ``predict``, ``logger``/``set_logger``, and
    a TensorBoard run folder per ``learn`` call (``<tensorboard_log>/<tb_log_name>_<n>``, as SB3 names them).

    Subclasses set ``self.policy``, ``self.env``, ``self.tensorboard_log``, ``self.verbose`` and ``self._logger = None``.
    """

    policy: Any
    env: Any
    tensorboard_log: str | None
    verbose: int
    _logger: Logger | None

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

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = False):
        """SB3's ``predict``: ``(actions, None)`` as numpy, ``(7,)`` for one env's observation, ``(B, 7)`` for a batch."""
        single = isinstance(observation.get("instruction"), str)
        was_training = self.policy.training
        self.policy.eval()
        actions, _, _ = self.policy.act(batch_observation(observation), deterministic=deterministic)
        self.policy.train(was_training)
        actions = actions.cpu().numpy()
        return (actions[0] if single else actions), None
