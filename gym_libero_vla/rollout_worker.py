"""Rollout workers of the asynchronous GRPO pipeline: processes (or Ray actors) that keep sampling groups.

The learner (:class:`gym_libero_vla.algos.async_grpo.AsyncGRPO`) and its workers meet in two places on disk,
both written atomically, so either side can be killed at any moment:

- the trajectory cache, an :class:`~gym_libero_vla.episode_store.EpisodeStore`: a worker appends each finished
  group (``group_size`` episodes of one (task, init state), one ``group_id``, with the behaviour policy's
  token log-probs and its version) in one transaction; the learner consumes complete groups in commit order;
- the published weights: after every update the learner writes the policy's trainable tensors to a fresh
  ``policy-<version>-<id>.safetensors`` and then points ``latest.json`` at it (``os.replace``). A worker reads
  that small file between groups and loads the tensors only when they changed: no model is pickled per step.

A worker loop (:func:`worker_main`), one process each::

    while the learner lives:
        wait while the learner has max_queued_groups unconsumed groups (backpressure bounds staleness)
        load the newest published weights if they changed
        draw (task, init state); run group_size episodes with the weights it has (rollouts.run_group)
        append the group to the store as one unit; write its time counters to workers/worker<i>.json

Processes. :class:`ProcessWorkerPool` starts the workers from a clean ``forkserver`` process (which imported
torch and this module once), or by ``spawn``; never by forking the learner, since a forked child of a process
that used OpenGL hangs when it renders. It restarts a dead worker up to ``max_restarts`` times (logged) and
raises when they are spent. Workers exit by themselves when the learner dies (a pipe only the learner writes
to reaches end of file), so a killed learner leaves no orphans stepping envs.

Ray. :class:`RayWorkerPool` runs the same :class:`RolloutWorker` as Ray actors (``ray.remote``), so rollouts can
spread over a cluster. There the learner ``ray.put``\\ s the tensors once per update and hands the reference to
each task, and it appends the groups the actors return to its store itself (the store is a local SQLite
file, not shared storage).

Time counters per worker (for the learner's ``async/`` metrics): ``busy_s`` (in groups: policy + env),
``env_step_s`` and ``reset_s`` (the env's share of it), ``weight_load_s``, ``write_s`` (appending groups),
``idle_s`` (waiting: backpressure, or a Ray actor between tasks), ``cpu_s`` (CPU time: on a shared machine,
the share of the cores the worker actually got), and ``straggler_steps`` (sub-env steps wasted waiting for
the slowest episode of a vector env's batch) out of ``stepped_steps``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import multiprocessing
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch

from gym_libero_vla.episode import Episode
from gym_libero_vla.episode_store import EpisodeStore
from gym_libero_vla.rollouts import Start, draw_start, run_group

logger = logging.getLogger(__name__)

WEIGHTS_DIRNAME = "weights"
BASE_POLICY_DIRNAME = "base"
LATEST_WEIGHTS_FILENAME = "latest.json"
WORKERS_DIRNAME = "workers"
START_METHODS = ("forkserver", "spawn")
# Imported once by the forkserver, so that each worker forked from it starts without importing torch & co.
FORKSERVER_PRELOAD = ["gym_libero_vla.rollout_worker", "gym_libero_vla.policies"]
STOP_TIMEOUT_S = 20.0


@dataclasses.dataclass
class WorkerSpec:
    """What every worker needs to build its env and policy and to find the learner (picklable)."""

    env_spec: Any
    """The learner env's ``gym.envs.registration.EnvSpec``: a worker builds its env with ``gym.make(env_spec)``."""
    pipeline_dir: str
    """Holds ``weights/`` (published by the learner) and ``workers/`` (logs and time counters)."""
    cache_dir: str
    """The :class:`EpisodeStore` groups go into."""
    group_size: int
    """Episodes per group (the G of GRPO)."""
    envs_per_worker: int = 1
    """Sub-envs of the worker's synchronous vector env (``group_size`` must be a multiple): one batched policy
    call steps them all."""
    task_ids: tuple[int, ...] | None = None
    """Tasks to draw groups from (None: every task of the env)."""
    init_state_ids: tuple[int, ...] | None = None
    """Init states to draw groups from (None: all of each task's)."""
    init_states: Literal["suite", "sampled"] = "suite"
    """"suite" (the stored init states) or "sampled" (a new layout per group): GRPO's ``init_states``."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (GRPO's ``temperature``)."""
    cache_max_episodes: int | None = None
    """The store's bound (the writer evicts the oldest online episodes past it)."""
    max_queued_groups: int = 8
    """Wait while the store holds this many groups the learner has not consumed yet."""
    seed: int | None = None
    """With the worker id and its restart count, seeds the worker's draws and torch's sampling."""
    torch_threads: int = 1
    """Torch CPU threads per worker (more than the free cores slows small models down)."""
    poll_interval_s: float = 0.05
    """How often a waiting worker looks again."""


# ---------------------------------------------------------------------------------------------- weights
def trainable_tensors(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an update changes (the trainable parameters; only the adapter of a LoRA policy), on CPU."""
    return {name: p.detach().cpu().contiguous() for name, p in policy.named_parameters() if p.requires_grad}


def load_tensors(policy: torch.nn.Module, tensors: dict[str, Any]) -> None:
    """Copy published tensors into ``policy`` (names as :func:`trainable_tensors` gives them)."""
    tensors = {name: torch.as_tensor(value) for name, value in tensors.items()}
    missing_in_policy = sorted(set(tensors) - set(policy.state_dict()))
    if missing_in_policy:
        raise ValueError(f"published weights name tensors the worker's policy lacks: {missing_in_policy[:5]}")
    policy.load_state_dict(tensors, strict=False)


def publish_weights(pipeline_dir: str, policy: torch.nn.Module, version: int, consumed_through: int) -> float:
    """Write ``policy``'s trainable tensors as version ``version`` and point ``latest.json`` at them; returns the
    seconds it took. ``consumed_through`` (the learner's watermark) lets workers apply backpressure.

    The tensors go to a new file (temp name, then ``os.replace``) and ``latest.json`` is replaced after it, so
    a reader sees an old complete version or the new one. Older files are deleted, keeping the previous one
    for a worker that read ``latest.json`` just before; a worker that still misses its file reads again."""
    from safetensors.torch import save_file

    start = time.perf_counter()
    weights_dir = os.path.join(pipeline_dir, WEIGHTS_DIRNAME)
    os.makedirs(weights_dir, exist_ok=True)
    name = f"policy-{version:06d}-{uuid.uuid4().hex[:8]}.safetensors"
    tmp_path = os.path.join(weights_dir, f".tmp-{name}")
    save_file(trainable_tensors(policy), tmp_path)
    os.replace(tmp_path, os.path.join(weights_dir, name))
    previous = read_latest_weights(pipeline_dir)
    entry = {"version": int(version), "file": name, "consumed_through": int(consumed_through), "published_at": time.time()}
    write_json_atomically(os.path.join(weights_dir, LATEST_WEIGHTS_FILENAME), entry)
    keep = {name, previous["file"]} if previous else {name}
    for old in os.listdir(weights_dir):
        if old.endswith(".safetensors") and old not in keep:
            _unlink(os.path.join(weights_dir, old))
    return time.perf_counter() - start


def read_latest_weights(pipeline_dir: str) -> dict[str, Any] | None:
    """The learner's ``latest.json`` (version, file, consumed_through), or None before the first publish."""
    try:
        with open(os.path.join(pipeline_dir, WEIGHTS_DIRNAME, LATEST_WEIGHTS_FILENAME)) as file:
            return json.load(file)
    except FileNotFoundError:
        return None


def write_json_atomically(path: str, content: dict) -> None:
    tmp_path = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp_path, "w") as file:
        json.dump(content, file)
    os.replace(tmp_path, path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------------------------- the worker
class _Clock:
    """Adds up the seconds spent in ``reset`` (simulator builds, settle steps) and ``step`` (physics).

    A mixin for a Gymnasium wrapper (single or vector env); it has no ``__init__``, the wrapper's sets ``env``."""

    reset_s = 0.0
    step_s = 0.0

    def reset(self, **kwargs):
        start = time.perf_counter()
        try:
            return self.env.reset(**kwargs)
        finally:
            self.reset_s += time.perf_counter() - start

    def step(self, action):
        start = time.perf_counter()
        try:
            return self.env.step(action)
        finally:
            self.step_s += time.perf_counter() - start


class _EnvClock(_Clock, gym.Wrapper):
    """:class:`_Clock` for a single env."""


class _VectorEnvClock(_Clock, gym.vector.VectorWrapper):
    """:class:`_Clock` for a vector env."""


class RolloutWorker:
    """One worker's env and policy: :meth:`run_group` samples a group with the weights it holds.

    Args:
        spec: the shared :class:`WorkerSpec`.
        worker_id: 0..num_workers-1.
        incarnation: how many times this worker was restarted (varies its seed).
        policy: the policy to roll out; default: the learner's snapshot in ``weights/base``.
    """

    def __init__(self, spec: WorkerSpec, worker_id: int, incarnation: int = 0, policy=None):
        from gym_libero_vla.policies.base import load_policy

        start = time.perf_counter()
        torch.set_num_threads(spec.torch_threads)
        self.spec, self.worker_id, self.incarnation = spec, worker_id, incarnation
        seed = None if spec.seed is None else [spec.seed, worker_id, incarnation]
        self._rng = np.random.default_rng(seed)
        if seed is not None:
            torch.manual_seed(int(self._rng.integers(1 << 62)))
        if policy is None:
            policy = load_policy(os.path.join(spec.pipeline_dir, WEIGHTS_DIRNAME, BASE_POLICY_DIRNAME))
        self.policy = policy.cpu().eval()
        self.policy_version = -1
        self.weights_file: str | None = None
        if spec.envs_per_worker == 1:
            self._base_env = gym.make(spec.env_spec)
            self.env = _EnvClock(self._base_env)
        else:
            self._base_env = gym.vector.SyncVectorEnv([lambda: gym.make(spec.env_spec)] * spec.envs_per_worker)
            self.env = _VectorEnvClock(self._base_env)
        self.stats: dict[str, Any] = {
            "worker_id": worker_id, "incarnation": incarnation, "pid": os.getpid(), "groups": 0, "episodes": 0,
            "env_steps": 0, "stepped_steps": 0, "straggler_steps": 0, "busy_s": 0.0, "env_step_s": 0.0, "reset_s": 0.0,
            "weight_load_s": 0.0, "weight_loads": 0, "write_s": 0.0, "idle_s": 0.0, "startup_s": 0.0, "cpu_s": 0.0,
        }  # fmt: skip
        self.stats["startup_s"] = time.perf_counter() - start

    def set_weights(self, tensors: dict[str, Any], version: int) -> None:
        start = time.perf_counter()
        load_tensors(self.policy, tensors)
        self.policy_version = int(version)
        self.stats["weight_load_s"] += time.perf_counter() - start
        self.stats["weight_loads"] += 1

    def load_published_weights(self) -> bool:
        """Load the learner's newest weights file if it is not the one held; True if it loaded one."""
        from safetensors.torch import load_file

        for _ in range(10):  # the learner may replace the file between our two reads
            entry = read_latest_weights(self.spec.pipeline_dir)
            if entry is None or entry["file"] == self.weights_file:
                return False
            try:
                tensors = load_file(os.path.join(self.spec.pipeline_dir, WEIGHTS_DIRNAME, entry["file"]))
            except FileNotFoundError:
                continue
            self.set_weights(tensors, entry["version"])
            self.weights_file = entry["file"]
            return True
        raise RuntimeError(f"worker {self.worker_id}: the published weights kept changing under it")

    def _draw_group_start(self) -> Start:
        vector = self.spec.envs_per_worker > 1
        task_ids = self.spec.task_ids
        if task_ids is None:
            task_ids = tuple(self._base_env.get_attr("task_ids")[0] if vector else self._base_env.unwrapped.task_ids)

        def num_init_states(task_id: int) -> int:
            if vector:
                return int(self._base_env.call("num_init_states", task_id)[0])
            return int(self._base_env.unwrapped.num_init_states(task_id))

        return draw_start(self._rng, task_ids, self.spec.init_state_ids, num_init_states, self.spec.init_states)

    def run_group(self, keep_going: Callable[[], bool] = lambda: True) -> list[Episode] | None:
        """``group_size`` episodes from one drawn (task, init state), then any hindsight-relabelled ones, all
        with one new ``group_id``; None if ``keep_going()`` turned False on the way (the group is dropped)."""
        start = time.perf_counter()
        reset_before, step_before = self.env.reset_s, self.env.step_s
        stats = self.stats
        batched_steps = 0  # steps of the (vector) env: each steps all envs_per_worker sub-envs

        def on_step(num_steps: int) -> bool:
            nonlocal batched_steps
            stats["env_steps"] += num_steps
            batched_steps += 1
            return keep_going()

        group = run_group(self.policy, self.env, self._draw_group_start(), self.spec.group_size,
                          temperature=self.spec.temperature, policy_version=self.policy_version, on_step=on_step)  # fmt: skip
        stats["reset_s"] += self.env.reset_s - reset_before
        stats["env_step_s"] += self.env.step_s - step_before
        stats["busy_s"] += time.perf_counter() - start
        if group is None:
            return None
        episodes, relabelled = group
        # Sub-envs step together: one with no episode left waits (stepped, not recorded) for the slowest.
        stepped = batched_steps * self.spec.envs_per_worker
        stats["stepped_steps"] += stepped
        stats["straggler_steps"] += stepped - sum(episode.num_steps for episode in episodes)
        stats["groups"] += 1
        stats["episodes"] += len(episodes)
        stats["cpu_s"] = time.process_time()  # CPU seconds of this process: how many cores it actually got
        return episodes + relabelled

    def close(self) -> None:
        self.env.close()


# ---------------------------------------------------------------------------------------------- processes
def worker_stats_path(pipeline_dir: str, worker_id: int) -> str:
    return os.path.join(pipeline_dir, WORKERS_DIRNAME, f"worker{worker_id}.json")


def worker_log_path(pipeline_dir: str, worker_id: int) -> str:
    return os.path.join(pipeline_dir, WORKERS_DIRNAME, f"worker{worker_id}.log")


def worker_main(spec: WorkerSpec, worker_id: int, incarnation: int, lifeline) -> None:
    """A worker process: sample groups into the store until the learner closes ``lifeline`` (the read end of a
    pipe whose only write end the learner holds) -- on purpose, or by dying."""
    log = open(worker_log_path(spec.pipeline_dir, worker_id), "a", buffering=1)
    os.dup2(log.fileno(), 1)  # C-level output (MuJoCo, robosuite) too
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    logging.basicConfig(level=logging.INFO, stream=log, format=f"%(asctime)s worker{worker_id} %(message)s", force=True)
    logger.info("starting (pid %d, incarnation %d)", os.getpid(), incarnation)

    def keep_going() -> bool:
        return not lifeline.poll()  # readable means end of file: the learner closed its end or died

    store = EpisodeStore(spec.cache_dir, max_episodes=spec.cache_max_episodes)
    worker = RolloutWorker(spec, worker_id, incarnation)
    stats_path = worker_stats_path(spec.pipeline_dir, worker_id)
    while keep_going():
        waited = time.perf_counter()
        while keep_going() and _queue_is_full(store, spec):  # backpressure: the learner is behind
            time.sleep(spec.poll_interval_s)
        worker.stats["idle_s"] += time.perf_counter() - waited
        if not keep_going():
            break
        worker.load_published_weights()
        group = worker.run_group(keep_going)
        if group is None:
            break
        start = time.perf_counter()
        store.append_many(group)  # all G episodes or none: the learner never sees half a group
        worker.stats["write_s"] += time.perf_counter() - start
        write_json_atomically(stats_path, {**worker.stats, "updated_at": time.time()})
    write_json_atomically(stats_path, {**worker.stats, "updated_at": time.time()})
    logger.info("stopping (the learner closed the lifeline: stop requested, or it died)")
    worker.close()


def _queue_is_full(store: EpisodeStore, spec: WorkerSpec) -> bool:
    latest = read_latest_weights(spec.pipeline_dir)
    consumed_through = latest["consumed_through"] if latest else 0
    return len(store.groups(after_episode_id=consumed_through)) >= spec.max_queued_groups


class ProcessWorkerPool:
    """``num_workers`` :func:`worker_main` processes, supervised.

    :meth:`check` (the learner calls it while it waits for groups) restarts a dead worker, logging it, until
    one worker has been restarted ``max_restarts`` times; the next death raises ``RuntimeError``."""

    def __init__(self, spec: WorkerSpec, num_workers: int, max_restarts: int = 3, start_method: str = "forkserver"):
        if start_method not in START_METHODS:
            raise ValueError(f"unknown start_method {start_method!r}: valid {START_METHODS}")
        self.spec, self.num_workers, self.max_restarts = spec, num_workers, max_restarts
        self._context = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            self._context.set_forkserver_preload(FORKSERVER_PRELOAD)  # no effect once the server runs
        self._lifeline = None  # (read end, write end): workers stop when the write end closes
        self._processes: list[Any] = [None] * num_workers
        self._incarnations = [0] * num_workers
        self.restarts = 0

    def start(self, policy, version: int, consumed_through: int) -> None:
        """Snapshot ``policy`` (architecture, tokenizer, bins), publish its weights as ``version`` -- replacing
        what an earlier run published, so that no worker loads that -- and start the workers."""
        os.makedirs(os.path.join(self.spec.pipeline_dir, WORKERS_DIRNAME), exist_ok=True)
        for worker_id in range(self.num_workers):  # counters of an earlier run describe that run
            _unlink(worker_stats_path(self.spec.pipeline_dir, worker_id))
        base_dir = os.path.join(self.spec.pipeline_dir, WEIGHTS_DIRNAME, BASE_POLICY_DIRNAME)
        policy.save_pretrained(base_dir)
        self.publish(policy, version, consumed_through)
        self._lifeline = self._context.Pipe(duplex=False)
        for worker_id in range(self.num_workers):
            self._start(worker_id)

    def _start(self, worker_id: int) -> None:
        process = self._context.Process(
            target=worker_main,
            args=(self.spec, worker_id, self._incarnations[worker_id], self._lifeline[0]),
            name=f"rollout-worker-{worker_id}",
            daemon=True,
        )
        process.start()
        self._processes[worker_id] = process

    def publish(self, policy, version: int, consumed_through: int) -> float:
        return publish_weights(self.spec.pipeline_dir, policy, version, consumed_through)

    def check(self) -> None:
        """Restart dead workers (bounded); raise once a worker has used up its restarts."""
        for worker_id, process in enumerate(self._processes):
            if process is None or process.is_alive():
                continue
            exit_code = process.exitcode
            log_path = worker_log_path(self.spec.pipeline_dir, worker_id)
            if self._incarnations[worker_id] >= self.max_restarts:
                raise RuntimeError(
                    f"rollout worker {worker_id} died (exit code {exit_code}) and was already restarted "
                    f"{self._incarnations[worker_id]} times (max_worker_restarts={self.max_restarts}); its log: {log_path}"
                )
            self._incarnations[worker_id] += 1
            self.restarts += 1
            logger.warning(
                "rollout worker %d (pid %s) died with exit code %s: restarting it (restart %d of %d; log %s)",
                worker_id, process.pid, exit_code, self._incarnations[worker_id], self.max_restarts, log_path,
            )  # fmt: skip
            self._start(worker_id)

    @property
    def pids(self) -> list[int | None]:
        return [process.pid if process is not None else None for process in self._processes]

    def worker_stats(self) -> list[dict[str, Any]]:
        stats = []
        for worker_id in range(self.num_workers):
            try:
                with open(worker_stats_path(self.spec.pipeline_dir, worker_id)) as file:
                    stats.append(json.load(file))
            except (FileNotFoundError, json.JSONDecodeError):
                continue
        return stats

    def close(self) -> None:
        """Ask the workers to stop (they finish the env step they are in), then end any that do not."""
        if self._lifeline is not None:
            self._lifeline[1].close()
            self._lifeline[0].close()
            self._lifeline = None
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in self._processes:
            if process is not None:
                process.join(timeout=max(0.0, deadline - time.monotonic()))
        for process in self._processes:
            if process is not None and process.is_alive():
                process.kill()
                process.join()
        self._processes = [None] * self.num_workers


# ---------------------------------------------------------------------------------------------- Ray
class _RayRolloutWorker(RolloutWorker):
    """The actor: a :class:`RolloutWorker` that takes its weights by Ray object reference with each task."""

    def __init__(self, spec: WorkerSpec, worker_id: int, incarnation: int, policy):
        super().__init__(spec, worker_id, incarnation, policy)
        self._last_return: float | None = None

    def sample_group(self, version: int, weights: list) -> tuple[list[Episode], dict[str, Any]]:
        """One group with weights ``version``; ``weights`` is ``[ObjectRef]`` (wrapped, so Ray hands over the
        reference and the tensors are fetched only when the version changed)."""
        import ray

        if self._last_return is not None:
            self.stats["idle_s"] += time.perf_counter() - self._last_return
        if version != self.policy_version:
            start = time.perf_counter()
            tensors = ray.get(weights[0])
            self.stats["weight_load_s"] += time.perf_counter() - start
            self.set_weights(tensors, version)
        group = self.run_group()
        self._last_return = time.perf_counter()
        return group, dict(self.stats)


class RayWorkerPool:
    """The same workers as Ray actors; the learner drives them and writes their groups to its store.

    Each actor always has ``tasks_per_worker`` ``sample_group`` calls queued (Ray runs an actor's calls in
    order), so it never waits for the learner; each call carries the newest weights reference when it was
    submitted. A Ray instance is started (and shut down at :meth:`close`) unless one is running already."""

    def __init__(
        self,
        spec: WorkerSpec,
        num_workers: int,
        store: EpisodeStore,
        max_restarts: int = 3,
        tasks_per_worker: int = 2,
        actor_options: dict[str, Any] | None = None,
    ):
        self.spec, self.num_workers, self.store, self.max_restarts = spec, num_workers, store, max_restarts
        self.tasks_per_worker = tasks_per_worker
        self.actor_options = {"num_cpus": 1, **(actor_options or {})}
        self._actors: list[Any] = [None] * num_workers
        self._incarnations = [0] * num_workers
        self._tasks: dict[Any, int] = {}  # in-flight ObjectRef -> worker id
        self._stats: dict[int, dict[str, Any]] = {}
        self._weights: tuple[int, Any] | None = None
        self._consumed_through = 0
        self._started_ray = False
        self.restarts = 0

    def start(self, policy, version: int, consumed_through: int) -> None:
        """Start the actors from a copy of ``policy`` and queue their first tasks with its weights as ``version``."""
        import ray

        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
            self._started_ray = True
        self._actor_class = ray.remote(_RayRolloutWorker).options(**self.actor_options)
        self._policy_ref = ray.put(copy.deepcopy(policy).cpu())  # once: each actor builds its copy from it
        for worker_id in range(self.num_workers):
            self._start(worker_id)
        self.publish(policy, version, consumed_through)

    def _start(self, worker_id: int) -> None:
        self._actors[worker_id] = self._actor_class.remote(
            self.spec, worker_id, self._incarnations[worker_id], self._policy_ref
        )

    def publish(self, policy, version: int, consumed_through: int) -> float:
        import ray

        start = time.perf_counter()
        tensors = {name: tensor.numpy() for name, tensor in trainable_tensors(policy).items()}
        self._weights = (int(version), ray.put(tensors))  # once per update, shared by every actor's next tasks
        self._consumed_through = consumed_through
        seconds = time.perf_counter() - start
        self._submit()
        return seconds

    def _submit(self) -> None:
        queued = len(self.store.groups(after_episode_id=self._consumed_through)) + len(self._tasks)
        for worker_id, actor in enumerate(self._actors):
            in_flight = sum(1 for owner in self._tasks.values() if owner == worker_id)
            while in_flight < self.tasks_per_worker and queued < self.spec.max_queued_groups:
                version, ref = self._weights
                self._tasks[actor.sample_group.remote(version, [ref])] = worker_id
                in_flight, queued = in_flight + 1, queued + 1

    def check(self) -> None:
        """Append finished groups to the store, restart failed actors (bounded), keep every actor busy."""
        import ray

        if self._tasks:
            ready, _ = ray.wait(list(self._tasks), num_returns=len(self._tasks), timeout=0)
            for ref in ready:
                worker_id = self._tasks.pop(ref, None)
                if worker_id is None:
                    continue  # a call of an actor restarted above
                try:
                    group, stats = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as error:
                    self._restart(worker_id, error)
                    continue
                if group:
                    start = time.perf_counter()
                    self.store.append_many(group)
                    stats["write_s"] += time.perf_counter() - start
                self._stats[worker_id] = stats
        self._submit()

    def _restart(self, worker_id: int, error: Exception) -> None:
        import ray

        if self._incarnations[worker_id] >= self.max_restarts:
            raise RuntimeError(
                f"Ray rollout worker {worker_id} failed and was already restarted {self._incarnations[worker_id]} times "
                f"(max_worker_restarts={self.max_restarts}): {type(error).__name__}: {error}"
            )
        self._incarnations[worker_id] += 1
        self.restarts += 1
        logger.warning("Ray rollout worker %d failed (%s): restarting it", worker_id, type(error).__name__)
        ray.kill(self._actors[worker_id])
        for ref in [ref for ref, owner in self._tasks.items() if owner == worker_id]:
            del self._tasks[ref]  # its queued calls die with it
        self._start(worker_id)

    @property
    def actors(self) -> Sequence[Any]:
        return list(self._actors)

    def worker_stats(self) -> list[dict[str, Any]]:
        return list(self._stats.values())

    def close(self) -> None:
        import ray

        for actor in self._actors:
            if actor is not None:
                ray.kill(actor)
        self._actors = [None] * self.num_workers
        self._tasks.clear()
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
