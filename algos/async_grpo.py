"""Asynchronous GRPO: rollout workers keep sampling groups while the learner trains on the groups they finished.

Synchronous GRPO (:mod:`gym_libero_vla.algos.grpo`) alternates: collect ``num_groups`` groups, then update, so
the envs wait for the learner and the learner for the slowest episode. Here (the decoupled actor-learner
layout of IMPALA / RLinf / AReaL) ``num_workers`` rollout workers -- processes, or Ray actors with
``backend="ray"`` -- step their own envs with the newest weights they have, and write each finished group
(``group_size`` episodes of one (task, init state), with the behaviour policy's token log-probs and its
``policy_version``) into the trajectory cache, an :class:`~gym_libero_vla.episode_store.EpisodeStore`, as one
unit. The learner takes complete groups from the cache in commit order, updates, and publishes its weights
(see :mod:`gym_libero_vla.rollout_worker`); workers load them between groups.

Staleness. A group sampled by policy version ``v`` and trained on at version ``k`` is ``k - v`` versions
stale. Groups more than ``max_staleness`` behind are skipped (and counted, ``async/groups_skipped_stale``);
the others are corrected, not silently mixed: GRPO's update takes the PPO ratio of every step whose episode
``policy_version`` differs from the learner's against the proximal policy (the current one), and weights it
by the truncated importance ratio ``min(pi_prox / mu, is_clip)`` (decoupled PPO, Hilton et al. 2022; see
:meth:`GRPO.train`). Workers wait while ``max_queued_groups`` groups are unconsumed (backpressure), which
keeps most groups within the bound.

Crash recovery. Groups enter the store in one transaction, so the learner never sees half a group. The
learner consumes them FIFO behind a watermark, ``consumed_through`` (the last episode id of the last group
trained on or skipped), which advances only after an update and is saved with every checkpoint. Killed and
restarted from its last checkpoint (:meth:`AsyncGRPO.load`), the learner takes up the groups after that
watermark again -- those its lost updates had used, and those finished meanwhile -- so no finished group is
lost and none is trained twice into the same weights. Workers exit when the learner dies; a worker that dies
is restarted, up to ``max_worker_restarts`` times, then the learner raises instead of waiting forever.
``pipeline_dir/learner.jsonl`` records which groups each update trained on and skipped.

The surface is GRPO's (stable-baselines3's): ``AsyncGRPO(policy, env, demos=None, **hyperparameters)``, where
``env`` is a ``gym.make`` env each worker rebuilds from its spec; ``learn`` starts the workers and stops them
when it returns. It logs GRPO's scalars plus ``async/learner_idle_fraction``, ``async/worker_idle_fraction``,
``async/staleness_mean``, ``async/groups_skipped_stale``, ``async/weight_transfer_seconds``,
``async/worker_restarts``, ``async/env_steps_per_second`` and where the workers' time goes
(``async/worker_reset_fraction``, ``async/worker_env_step_fraction``, ``async/worker_weight_load_fraction``,
``async/straggler_fraction``).

From the command line: ``python examples/train_grpo.py --async`` (``--sync`` runs plain GRPO on the same settings).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback

from gym_libero_vla.algos.base import check_ints, is_finite, is_int
from gym_libero_vla.algos.grpo import GRPO, GroupRollout, GRPOConfig
from gym_libero_vla.episode import Episode
from gym_libero_vla.rollout_worker import START_METHODS, ProcessWorkerPool, RayWorkerPool, WorkerSpec

logger = logging.getLogger(__name__)

BACKENDS = ("process", "ray")
ASYNC_STATE_FILENAME = "async_grpo.json"
LEARNER_LOG_FILENAME = "learner.jsonl"
POLL_INTERVAL_S = 0.05


@dataclasses.dataclass
class PipelineConfig:
    """The asynchronous pipeline's settings: what :class:`AsyncGRPOConfig` adds to :class:`GRPOConfig`."""

    pipeline_dir: str | None = None
    """Where the pipeline lives: ``cache/`` (the trajectory cache, unless ``cache_dir`` says otherwise),
    ``weights/`` (published by the learner), ``workers/`` (worker logs and time counters), ``learner.jsonl``."""
    num_workers: int = 2
    """Rollout workers (processes, or Ray actors)."""
    envs_per_worker: int = 1
    """Sub-envs per worker, stepped together with one batched policy call (``group_size`` must be a multiple)."""
    backend: str = "process"
    """``"process"``: worker processes on this machine; ``"ray"``: Ray actors (``ray.init`` first to join a cluster)."""
    max_staleness: int = 2
    """Skip groups sampled more than this many policy versions before the learner's (0: on-policy only)."""
    max_queued_groups: int | None = None
    """Workers wait while this many groups are unconsumed (None: ``num_groups * (max_staleness + 1)``)."""
    max_worker_restarts: int = 3
    """Restarts allowed per worker; one more death raises ``RuntimeError``."""
    group_timeout_s: float = 600.0
    """Raise if the learner waits this long without getting a group (a stuck pipeline, not a hang)."""
    start_method: str = "forkserver"
    """How worker processes start: ``"forkserver"`` (forked from a clean server that imported torch once) or
    ``"spawn"``; never a fork of the learner (a forked GL context hangs)."""

    def __post_init__(self):
        check_ints(self, num_workers=1, envs_per_worker=1, max_staleness=0, max_worker_restarts=0)
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}: valid {BACKENDS}")
        if self.start_method not in START_METHODS:
            raise ValueError(f"unknown start_method {self.start_method!r}: valid {START_METHODS}")
        if not (is_finite(self.group_timeout_s) and self.group_timeout_s > 0):
            raise ValueError(f"group_timeout_s {self.group_timeout_s!r} must be a number > 0")


@dataclasses.dataclass
class AsyncGRPOConfig(PipelineConfig, GRPOConfig):
    """:class:`GRPOConfig` plus the pipeline's settings (:class:`PipelineConfig`)."""

    def __post_init__(self):
        GRPOConfig.__post_init__(self)
        PipelineConfig.__post_init__(self)
        if self.pipeline_dir is None:
            raise ValueError("AsyncGRPO needs pipeline_dir: a directory for the trajectory cache, weights and worker logs")
        self.pipeline_dir = os.path.abspath(os.fspath(self.pipeline_dir))
        if self.cache_dir is None:
            self.cache_dir = os.path.join(self.pipeline_dir, "cache")
        if self.group_size % self.envs_per_worker:
            raise ValueError(f"group_size {self.group_size} must be a multiple of envs_per_worker {self.envs_per_worker}")
        if self.start_sampling != "uniform":
            raise ValueError(
                f"start_sampling {self.start_sampling!r}: AsyncGRPO's workers draw their groups' starts themselves, "
                "uniformly; use start_sampling='uniform', or GRPO (synchronous) for learnability sampling"
            )
        if self.max_queued_groups is not None and not is_int(self.max_queued_groups, self.num_groups):
            raise ValueError(f"max_queued_groups {self.max_queued_groups!r} must be an int >= num_groups {self.num_groups}")


class AsyncGRPO(GRPO):
    """GRPO whose rollouts come from asynchronous workers through the trajectory cache.

    Args are :class:`GRPO`'s; ``env`` must be a single ``gym.make`` env (workers rebuild it from ``env.spec``,
    with ``envs_per_worker`` copies each), and the hyperparameters include :class:`AsyncGRPOConfig`'s.
    """

    config_class = AsyncGRPOConfig
    config: AsyncGRPOConfig

    def __init__(self, policy, env=None, demos: Any = None, tensorboard_log=None, verbose: int = 0, device=None, **kwargs):
        super().__init__(policy, env, demos, tensorboard_log=tensorboard_log, verbose=verbose, device=device, **kwargs)
        if env is not None:
            _check_rebuildable(env)
        self.consumed_through = 0  # every group whose episode ids are <= this was trained on or skipped
        self._taken_through = 0  # ... taken for the rollout being collected (committed by train)
        self._committed_timesteps = 0
        self._pool: ProcessWorkerPool | RayWorkerPool | None = None
        self.groups_skipped_stale = 0
        self.groups_incomplete = 0

    # ------------------------------------------------------------------ the pipeline
    def _start_pipeline(self) -> None:
        config = self.config
        os.makedirs(config.pipeline_dir, exist_ok=True)
        max_queued = config.max_queued_groups or config.num_groups * (config.max_staleness + 1)
        spec = WorkerSpec(
            env_spec=self.env.spec, pipeline_dir=config.pipeline_dir, cache_dir=config.cache_dir,
            group_size=config.group_size, envs_per_worker=config.envs_per_worker, task_ids=config.task_ids,
            init_state_ids=config.init_state_ids, init_states=config.init_states, temperature=config.temperature,
            cache_max_episodes=config.cache_max_episodes,
            max_queued_groups=max_queued,
            seed=None if config.seed is None else int(self._rng.integers(1 << 62)),  # a resumed run draws anew
        )  # fmt: skip
        if config.backend == "ray":
            pool = RayWorkerPool(spec, config.num_workers, self.cache, config.max_worker_restarts)
        else:
            pool = ProcessWorkerPool(spec, config.num_workers, config.max_worker_restarts, config.start_method)
        self._taken_through = self.consumed_through
        self._learn_start = time.perf_counter()
        self._idle_s = self._update_s = 0.0
        self._learner_log = open(os.path.join(config.pipeline_dir, LEARNER_LOG_FILENAME), "a")
        self._pool = pool  # before starting it: a start that fails half-way is still cleaned up
        pool.start(self.policy, self.policy_version, self.consumed_through)

    def _stop_pipeline(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if getattr(self, "_learner_log", None) is not None:
            self._learner_log.close()
            self._learner_log = None

    @property
    def worker_pool(self) -> ProcessWorkerPool | RayWorkerPool | None:
        """The running workers (during ``learn``), e.g. for their ``pids`` or ``restarts``."""
        return self._pool

    def _next_groups(self, count: int) -> list[dict[str, Any]]:
        """The next ``count`` complete, fresh-enough groups after the watermark, with their episodes; waits for
        the workers (checking on them) and raises if none arrives for ``group_timeout_s``."""
        config, taken = self.config, []
        deadline = time.monotonic() + config.group_timeout_s
        while True:
            self._pool.check()  # restarts dead workers; the Ray pool also stores the groups its actors returned
            for group in self.cache.groups(after_episode_id=self._taken_through):
                if len(taken) == count:
                    break
                self._taken_through = group["last_episode_id"]
                staleness = self.policy_version - group["policy_version"]
                episodes = self._load_group(group) if group["num_online"] == config.group_size else None
                if episodes is None:  # evicted in part: only possible when the cache bound is too small
                    self.groups_incomplete += 1
                elif staleness > config.max_staleness:
                    self.groups_skipped_stale += 1
                    self._skipped_groups.append(group["group_id"])
                else:
                    taken.append({**group, "episodes": episodes, "staleness": staleness})
                    deadline = time.monotonic() + config.group_timeout_s
            if len(taken) == count:
                return taken
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"no rollout group arrived for {config.group_timeout_s:.0f} s from {config.num_workers} "
                    f"{config.backend} workers ({self._pool.restarts} restarts so far); worker logs: "
                    f"{os.path.join(config.pipeline_dir, 'workers')}"
                )
            start = time.perf_counter()
            time.sleep(POLL_INTERVAL_S)
            self._idle_s += time.perf_counter() - start

    def _load_group(self, group: dict[str, Any]) -> list[Episode] | None:
        episodes = []
        for episode_id in group["episode_ids"]:
            try:
                episodes.append(self.cache.load(episode_id))
            except KeyError:
                return None
        return episodes

    # ------------------------------------------------------------------ rollout
    def _sample_groups(self, count: int, callback: BaseCallback | None) -> Iterator[tuple[list, list] | None]:
        """The next ``count`` complete, fresh-enough groups from the cache (rescue, dynamic sampling and success
        replay are :meth:`GRPO.collect_rollouts`'). ``num_timesteps`` counts the env steps of the groups taken, and a
        callback's ``on_step`` is called once per group."""
        for group in self._next_groups(count):
            self.num_timesteps += group["num_steps"]
            self._staleness.append(group["staleness"])
            self._trained_groups.append(group["group_id"])
            if callback is not None:
                callback.update_locals({"self": self})
                if not callback.on_step():
                    yield None
                    return
            online = [episode for episode in group["episodes"] if episode.source == "online"]
            yield online, [episode for episode in group["episodes"] if episode.source == "relabelled"]

    def collect_rollouts(self, callback: BaseCallback | None = None) -> GroupRollout | None:
        """:meth:`GRPO.collect_rollouts` on groups from the cache, plus how stale they were."""
        self._staleness: list[int] = []
        self._trained_groups: list[str] = []
        self._skipped_groups: list[str] = []
        rollout = super().collect_rollouts(callback)
        if rollout is not None:
            rollout.stats["async/staleness_mean"] = float(np.mean(self._staleness))
            rollout.stats["async/staleness_max"] = float(np.max(self._staleness))
        return rollout

    # ------------------------------------------------------------------ update
    def train(self, rollout: GroupRollout) -> dict[str, float]:
        """GRPO's update (stale steps IS-corrected), then commit the watermark and publish the new weights."""
        start = time.perf_counter()
        metrics = super().train(rollout)
        self.consumed_through = self._taken_through
        self._committed_timesteps = self.num_timesteps
        if self._pool is None:  # called outside learn: no workers to feed
            return metrics
        self._update_s += time.perf_counter() - start
        publish_s = self._pool.publish(self.policy, self.policy_version, self.consumed_through)
        metrics.update(self._pipeline_metrics(publish_s))
        entry = {
            "policy_version": self.policy_version, "consumed_through": self.consumed_through,
            "num_timesteps": self.num_timesteps, "trained_groups": self._trained_groups,
            "skipped_groups": self._skipped_groups, "time": time.time(),
        }  # fmt: skip
        self._learner_log.write(json.dumps(entry) + "\n")
        self._learner_log.flush()
        return metrics

    def _pipeline_metrics(self, publish_s: float) -> dict[str, float]:
        """Where the time goes, on both sides of the cache."""
        elapsed = max(time.perf_counter() - self._learn_start, 1e-9)
        workers = self._pool.worker_stats()

        def total(name: str) -> float:
            return float(sum(worker.get(name, 0.0) for worker in workers))

        worker_time = total("busy_s") + total("idle_s") + total("weight_load_s") + total("write_s")
        share = (lambda seconds: seconds / worker_time) if worker_time else (lambda seconds: 0.0)
        return {
            "async/learner_idle_fraction": self._idle_s / elapsed,
            "async/learner_update_fraction": self._update_s / elapsed,
            "async/worker_idle_fraction": share(total("idle_s")),
            "async/worker_reset_fraction": share(total("reset_s")),
            "async/worker_env_step_fraction": share(total("env_step_s")),
            "async/worker_weight_load_fraction": share(total("weight_load_s")),
            "async/straggler_fraction": total("straggler_steps") / max(total("stepped_steps"), 1.0),
            "async/weight_transfer_seconds": publish_s,
            "async/env_steps_per_second": total("env_steps") / elapsed,
            "async/worker_cpu_seconds": total("cpu_s"),
            "async/groups_skipped_stale": float(self.groups_skipped_stale),
            "async/groups_incomplete": float(self.groups_incomplete),
            "async/worker_restarts": float(self._pool.restarts),
        }

    # ------------------------------------------------------------------ the loop
    def learn(
        self,
        total_timesteps: int,
        callback: BaseCallback | list[BaseCallback] | None = None,
        log_interval: int = 1,
        tb_log_name: str = "AsyncGRPO",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
        max_updates: int | None = None,
    ) -> AsyncGRPO:
        """GRPO's ``learn`` with the workers running: they start once its set-up is done (:meth:`_setup_learn`) and
        are stopped when it returns or raises."""
        try:
            return super().learn(
                total_timesteps, callback, log_interval, tb_log_name, reset_num_timesteps, progress_bar, max_updates
            )
        finally:
            self._stop_pipeline()
            if self.ema is not None:
                self.ema.put_averaged()

    def _setup_learn(
        self, total_timesteps: int, callback, reset_num_timesteps: bool, tb_log_name: str, progress_bar: bool
    ) -> tuple[int, BaseCallback | None, Any]:
        """GRPO's set-up (the budget checked, the callbacks started, the training weights in place: the workers
        sample from them, as GRPO's own rollouts do), then the workers start: a set-up that fails starts none."""
        setup = super()._setup_learn(total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar)
        if reset_num_timesteps:
            self._committed_timesteps = 0
        self._start_pipeline()
        return setup

    # ------------------------------------------------------------------ checkpoints
    def _save_state(self, directory: str) -> dict[str, Any]:
        # The checkpoint holds the weights after the last update: its step count and watermark must match them,
        # even when a callback saves halfway through collecting the next rollout.
        with open(os.path.join(directory, ASYNC_STATE_FILENAME), "w") as file:
            json.dump({"consumed_through": self.consumed_through}, file)
        return {**super()._save_state(directory), "num_timesteps": self._committed_timesteps}

    def _load_state(self, directory: str, state: dict[str, Any]) -> None:
        """GRPO's state, plus the cache watermark: ``learn(..., reset_num_timesteps=False)`` resumes with the first
        group the checkpointed weights have not been trained on."""
        super()._load_state(directory, state)
        state_path = os.path.join(directory, ASYNC_STATE_FILENAME)
        if os.path.exists(state_path):
            with open(state_path) as file:
                self.consumed_through = int(json.load(file)["consumed_through"])
        self._taken_through = self.consumed_through
        self._committed_timesteps = self.num_timesteps


def _check_rebuildable(env) -> None:
    """Workers rebuild the env with ``gym.make(env.spec)``: it must be a single registered env whose wrappers
    record their arguments."""
    if hasattr(env, "num_envs"):
        raise ValueError(
            "AsyncGRPO takes a single env (gym.make), not a vector env: each worker builds envs_per_worker copies of it"
        )
    spec = getattr(env, "spec", None)
    if spec is None:
        raise ValueError("AsyncGRPO's env has no spec: make it with gym.make(env_id, ...) so that workers can rebuild it")
    opaque = [wrapper.name for wrapper in spec.additional_wrappers if wrapper.kwargs is None]
    if opaque:
        raise ValueError(
            f"the env's wrappers {opaque} do not record their arguments, so workers cannot rebuild the env: "
            "inherit gym.utils.RecordConstructorArgs in them"
        )
