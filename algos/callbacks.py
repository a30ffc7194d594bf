"""SB3 callbacks for learners whose checkpoints are directories and whose data comes in rollouts (GRPO, iRe-VLA).

SB3's own callbacks work with our learners (``CheckpointCallback``, ``EvalCallback`` with a
:class:`gym_libero_vla.sb3_vec_env.TextDummyVecEnv`, ``StopTrainingOnMaxEpisodes``, ...). These two fit
LIBERO training better:

- :class:`RolloutCheckpointCallback`: SB3's ``CheckpointCallback``, but it saves at the end of a rollout
  (after the update, so a resumed run loses no collected data and repeats no update), names checkpoints
  ``<prefix>_<steps>_steps/`` without ".zip", and keeps only the newest ``keep_last``.
- :class:`LiberoEvalCallback`: SB3's ``EvalCallback`` on LIBERO's fixed evaluation protocol: every
  ``eval_freq`` env steps, deterministic episodes on given (task, init state, seed) triples (held out from
  training), ``eval/success_rate`` and per-task rates logged, the best policy saved.
- :class:`LatestCheckpointCallback`: for learners without rollouts (SFT): save to one directory every ``save_freq``
  steps, replacing the previous save, so that a kill loses at most that many steps.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence

from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback


class RolloutCheckpointCallback(CheckpointCallback):
    """Save ``model`` to ``<save_path>/<name_prefix>_<num_timesteps>_steps/`` at the first rollout end after
    every ``save_freq`` env steps; delete all but the newest ``keep_last`` (None: keep all). A resumed run counts
    the checkpoints of this prefix already in ``save_path`` up to the step it resumes at among them, so they are
    pruned too; any past that step (a run resumed from an older checkpoint) are left alone."""

    def __init__(self, save_freq: int, save_path: str, name_prefix: str = "model", keep_last: int | None = 3, verbose=0):
        if not (isinstance(save_freq, int) and save_freq >= 1):
            raise ValueError(f"save_freq {save_freq!r} must be an int >= 1 (env steps between checkpoints)")
        if keep_last is not None and not (isinstance(keep_last, int) and keep_last >= 1):
            raise ValueError(f"keep_last {keep_last!r} must be an int >= 1 or None")
        super().__init__(save_freq, save_path, name_prefix, verbose=verbose)
        self.keep_last = keep_last
        self.saved: list[str] = []
        self._last_save_step: int | None = None

    def _init_callback(self) -> None:
        super()._init_callback()
        self._last_save_step = self.model.num_timesteps  # a resumed run counts from where it restarted
        pattern = re.compile(rf"{re.escape(self.name_prefix)}_(\d+)_steps")
        earlier = []
        for name in os.listdir(self.save_path):
            match = pattern.fullmatch(name)
            path = os.path.join(self.save_path, name)
            if match and int(match.group(1)) <= self.model.num_timesteps and path not in self.saved:
                earlier.append((int(match.group(1)), path))
        self.saved = [path for _, path in sorted(earlier)] + self.saved

    def _checkpoint_path(self, checkpoint_type: str = "", extension: str = "") -> str:
        return os.path.join(self.save_path, f"{self.name_prefix}_{checkpoint_type}{self.num_timesteps}_steps")

    def _on_step(self) -> bool:
        return True  # checkpoints are taken between rollouts, in _on_rollout_end

    def _on_rollout_end(self) -> None:
        if self.model.num_timesteps - self._last_save_step < self.save_freq:
            return
        self.num_timesteps = self.model.num_timesteps
        path = self._checkpoint_path()
        self.model.save(path)
        self._last_save_step = self.model.num_timesteps
        self.saved.append(path)
        if self.verbose >= 1:
            print(f"Saving model checkpoint to {path}")
        while self.keep_last is not None and len(self.saved) > self.keep_last:
            shutil.rmtree(self.saved.pop(0), ignore_errors=True)


class LiberoEvalCallback(BaseCallback):
    """Every ``eval_freq`` env steps (at a rollout end), evaluate the policy deterministically on every
    (task, init state, seed) -- or on exactly ``starts``, a subset such as one init state per task for a cheap
    learning curve -- with :func:`gym_libero_vla.evaluate.evaluate_policy` (``num_envs`` side by side, in this
    process or in worker processes: ``vectorization_mode``);
    log ``eval/success_rate`` and ``eval/success_rate_task<t>``, append a row (steps, successes, episodes, success
    rate, per task, seconds) to ``<log_path>/evaluations.jsonl``, and save the best model to ``best_model_save_path``.
    ``last_success_rate`` / ``best_success_rate`` hold the results. Rows of that file past the model's step count when
    training starts are removed then: a run resumed from a checkpoint redoes those steps with other weights."""

    def __init__(
        self,
        env_id: str,
        task_ids: Sequence[int] | None,
        init_state_ids: Sequence[int],
        eval_freq: int,
        seeds: Sequence[int] = (0,),
        max_episode_steps: int | None = None,
        log_path: str | None = None,
        best_model_save_path: str | None = None,
        num_envs: int = 1,
        verbose: int = 0,
        starts: Sequence | None = None,
        vectorization_mode: str = "sync",
    ):
        super().__init__(verbose)
        from gym_libero_vla.evaluate import VECTORIZATION_MODES

        if vectorization_mode not in VECTORIZATION_MODES:
            raise ValueError(f"unknown vectorization_mode {vectorization_mode!r}: valid {VECTORIZATION_MODES}")
        self.vectorization_mode = vectorization_mode
        if not (isinstance(eval_freq, int) and eval_freq >= 1):
            raise ValueError(f"eval_freq {eval_freq!r} must be an int >= 1 (env steps between evaluations)")
        if not init_state_ids and not starts:
            raise ValueError("init_state_ids is empty: give the held-out init states to evaluate on")
        self.env_id, self.eval_freq, self.max_episode_steps = env_id, eval_freq, max_episode_steps
        self.task_ids = None if task_ids is None else tuple(task_ids)
        self.init_state_ids, self.seeds = tuple(init_state_ids), tuple(seeds)
        self.starts = None if starts is None else list(starts)
        self.log_path, self.best_model_save_path, self.num_envs = log_path, best_model_save_path, num_envs
        self.last_success_rate: float | None = None
        self.best_success_rate = -1.0
        self._last_eval_step: int | None = None

    def _init_callback(self) -> None:
        from gym_libero_vla.evaluate import drop_rows_after

        self._last_eval_step = self.model.num_timesteps
        for path in (self.log_path, self.best_model_save_path):
            if path is not None:
                os.makedirs(path, exist_ok=True)
        if self.log_path is not None:
            drop_rows_after(os.path.join(self.log_path, "evaluations.jsonl"), self.model.num_timesteps)

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        if self.model.num_timesteps - self._last_eval_step < self.eval_freq:
            return
        from gym_libero_vla.evaluate import evaluate_policy

        self._last_eval_step = self.model.num_timesteps
        with self.model.averaged_weights() as policy:  # a learner's moving average of its weights, where it has one
            results = evaluate_policy(
                policy, self.env_id, self.task_ids, self.init_state_ids, seeds=self.seeds,
                max_episode_steps=self.max_episode_steps, progress=False, num_envs=self.num_envs, starts=self.starts,
                vectorization_mode=self.vectorization_mode,
            )  # fmt: skip
        self.last_success_rate = results["success_rate"]
        self.logger.record("eval/success_rate", results["success_rate"])
        for task_id, task in results["per_task"].items():
            self.logger.record(f"eval/success_rate_task{task_id}", task["success_rate"])
        if self.verbose >= 1:
            print(f"Eval num_timesteps={self.model.num_timesteps}, success_rate={results['success_rate']:.2f}")
        if self.log_path is not None:
            successes = sum(episode["success"] for episode in results["episodes"])
            record = {"num_timesteps": self.model.num_timesteps, "success_rate": results["success_rate"],
                      "successes": int(successes), "episodes": len(results["episodes"]), "seconds": results["seconds"],
                      "per_task": {str(t): task["success_rate"] for t, task in results["per_task"].items()}}  # fmt: skip
            with open(os.path.join(self.log_path, "evaluations.jsonl"), "a") as file:
                file.write(json.dumps(record) + "\n")
        if results["success_rate"] > self.best_success_rate:
            self.best_success_rate = results["success_rate"]
            if self.best_model_save_path is not None:
                self.model.save(os.path.join(self.best_model_save_path, "best_model"))


class LatestCheckpointCallback(BaseCallback):
    """Save ``model`` to ``path`` every ``save_freq`` steps (``on_step`` calls; SFT's gradient steps), replacing the
    previous save (``save`` is atomic: a kill leaves the previous checkpoint or the new one). At each step of
    ``keep_at`` it also saves a copy that later saves leave alone, ``<path>_step<N>``, so a long run can be evaluated
    at its intermediate steps afterwards."""

    def __init__(self, save_freq: int, path: str, verbose: int = 0, keep_at: tuple[int, ...] = ()):
        super().__init__(verbose)
        if not (isinstance(save_freq, int) and save_freq >= 1):
            raise ValueError(f"save_freq {save_freq!r} must be an int >= 1 (steps between saves)")
        for step in keep_at:
            if not (isinstance(step, int) and not isinstance(step, bool) and step >= 1):
                raise ValueError(f"keep_at step {step!r} must be an int >= 1 (the steps whose checkpoint to keep)")
        self.save_freq, self.path, self.keep_at = save_freq, path, frozenset(keep_at)

    def _on_step(self) -> bool:
        if self.model.num_timesteps in self.keep_at:  # before the latest: a kill between the two repeats this step
            self.model.save(kept_checkpoint_path(self.path, self.model.num_timesteps))
        if self.model.num_timesteps % self.save_freq == 0:
            self.model.save(self.path)
            if self.verbose >= 1:
                print(f"Saved {self.path} at {self.model.num_timesteps} steps")
        return True


def kept_checkpoint_path(path: str, step: int) -> str:
    """Where :class:`LatestCheckpointCallback` keeps the checkpoint of ``path`` at ``step``."""
    return f"{os.fspath(path)}_step{step}"
