"""Asynchronous GRPO on the real simulator (state mode, 10-step episodes) with a tiny CompactVLA: worker
processes feed the trajectory cache while the learner trains; a killed worker is restarted; a killed learner
resumes from its checkpoint and the cache; the same workers run as Ray actors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3.common.callbacks import BaseCallback

from gym_libero_vla.algos.async_grpo import AsyncGRPO
from gym_libero_vla.episode import SAMPLED_INIT_STATE, Episode
from gym_libero_vla.episode_store import EpisodeStore
from gym_libero_vla.policies import CompactVLA, CompactVLAConfig, WordTokenizer
from gym_libero_vla.rollout_worker import (
    WEIGHTS_DIRNAME,
    RolloutWorker,
    WorkerSpec,
    publish_weights,
    read_latest_weights,
    trainable_tensors,
)
from gym_libero_vla.wrappers.action_tokenizer import ActionBins

MAX_EPISODE_STEPS = 10
GROUP_STEPS = 2 * MAX_EPISODE_STEPS  # a group of 2 ten-step episodes (a random tiny policy never succeeds early)
ONE_GROUP = dict(group_size=2, num_groups=1, max_sampling_rounds=1)  # one group per update: no dynamic-sampling refill


def make_policy(instruction: str, seed: int = 0) -> CompactVLA:
    torch.manual_seed(seed)
    bins = ActionBins.from_statistics({"q01": [-1.0] * 7, "q99": [1.0] * 7})
    config = CompactVLAConfig(cameras=(), hidden_size=32, num_layers=1, num_heads=2)
    return CompactVLA(config, bins, WordTokenizer.from_texts([instruction]))


def demo(instruction: str) -> Episode:
    rng = np.random.default_rng(0)
    return Episode(
        observations={"instruction": instruction, "state": rng.normal(size=(6, 8)).astype(np.float32)},
        actions=rng.uniform(-1, 1, (5, 7)).astype(np.float32), rewards=np.zeros(5), success=True, task_id=0,
        source="offline",
    )  # fmt: skip


def assert_groups_whole(cache_dir, group_size: int = 2) -> list[dict]:
    """Every group in the store has all its online episodes, each loadable with behaviour log-probs."""
    store = EpisodeStore(cache_dir)
    groups = store.groups()
    for group in groups:
        assert group["num_online"] == group_size, group
        for episode_id in group["episode_ids"]:
            episode = store.load(episode_id)
            assert episode.log_probs.shape == (episode.num_steps, 7) and episode.group_id == group["group_id"]
    return groups


def online_episodes(store: EpisodeStore, policy_version: int) -> list[Episode]:
    """The store's online episodes sampled by ``policy_version``."""
    return [store.load(row["episode_id"]) for row in store.records(source="online")
            if row["policy_version"] == policy_version]  # fmt: skip


def assert_sampled_by(policy, episodes: list[Episode], temperature: float) -> None:
    """The episodes (there are some) carry the log-probs of ``policy`` at ``temperature``."""
    assert episodes
    for episode in episodes:
        batch = {key: value if key != "instruction" else [value] * episode.num_steps
                 for key, value in episode.observations.items()}  # fmt: skip
        with torch.no_grad():
            expected = policy.log_prob(batch, policy.action_bins.encode(episode.actions), temperature)[0].numpy()
        np.testing.assert_allclose(episode.log_probs, expected, atol=1e-5)


def learner_log(pipeline_dir) -> list[dict]:
    with open(os.path.join(pipeline_dir, "learner.jsonl")) as file:
        return [json.loads(line) for line in file]


def test_two_worker_async_run_trains_and_checkpoints(env, instruction, tmp_path):
    policy = make_policy(instruction)
    before = [p.detach().clone() for p in policy.parameters()]
    start = make_policy(instruction)  # the same weights, kept as they were
    model = AsyncGRPO(
        policy, env, demos=[demo(instruction)], **ONE_GROUP, imitation_batch_size=8, num_workers=2,
        pipeline_dir=str(tmp_path / "pipeline"), seed=0, temperature=1.5, ema_decay=0.5,
    )  # fmt: skip
    model.learn(3 * GROUP_STEPS)
    assert model.num_timesteps == 3 * GROUP_STEPS and model.policy_version == 3 and model.worker_pool is None
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    metrics = model.last_metrics
    for name in ("learner_idle_fraction", "worker_idle_fraction", "worker_reset_fraction", "worker_env_step_fraction"):
        assert 0.0 <= metrics[f"async/{name}"] <= 1.0, name
    assert metrics["async/learner_idle_fraction"] > 0.5  # tiny model: the learner waits for the envs
    assert metrics["async/env_steps_per_second"] > 0 and metrics["async/worker_restarts"] == 0
    assert 0 <= metrics["async/staleness_max"] <= 2 and metrics["async/weight_transfer_seconds"] > 0
    # Each update trained on one whole group; the watermark sits on the last one.
    log = learner_log(tmp_path / "pipeline")
    assert [entry["policy_version"] for entry in log] == [1, 2, 3]
    trained = [group_id for entry in log for group_id in entry["trained_groups"]]
    groups = {group["group_id"]: group for group in assert_groups_whole(tmp_path / "pipeline" / "cache")}
    assert len(set(trained)) == 3 and set(trained) <= set(groups)
    assert model.consumed_through == groups[trained[-1]]["last_episode_id"]
    # The workers sampled at the learner's temperature: version-0 episodes carry the starting policy's tempered
    # log-probs.
    store = EpisodeStore(tmp_path / "pipeline" / "cache")
    assert_sampled_by(start, online_episodes(store, 0), temperature=1.5)
    published = read_latest_weights(str(tmp_path / "pipeline"))
    assert published["version"] == 3 and published["consumed_through"] == model.consumed_through
    # A checkpoint keeps the watermark; the loaded learner continues after it.
    model.save(tmp_path / "ckpt")
    loaded = AsyncGRPO.load(tmp_path / "ckpt", env=env)
    assert (loaded.consumed_through, loaded.policy_version, loaded.num_timesteps) == (model.consumed_through, 3, 60)
    assert loaded.config.num_workers == 2 and loaded.config.pipeline_dir == str(tmp_path / "pipeline")
    # With a moving average of the weights (outside learn the policy holds it), the workers sample the training
    # weights, from the first publish of a resumed run on.
    assert loaded.ema.holds_averaged
    training = dict(zip(loaded.ema.names, loaded.ema.training_weights()))
    first_published = {}

    class FirstPublished(BaseCallback):  # learn's start: the pipeline is up and has published once
        def _on_training_start(self) -> None:
            from safetensors.torch import load_file

            latest = read_latest_weights(str(tmp_path / "pipeline"))
            first_published.update(load_file(str(tmp_path / "pipeline" / WEIGHTS_DIRNAME / latest["file"])))

        def _on_step(self) -> bool:
            return True

    loaded.learn(GROUP_STEPS, callback=FirstPublished(), reset_num_timesteps=False)
    assert set(first_published) == set(training)
    for name, weight in training.items():
        torch.testing.assert_close(first_published[name], weight.cpu())


def test_a_worker_samples_at_its_specs_temperature(env, instruction, tmp_path):
    """A worker's episodes carry the log-probs of the tempered policy that sampled them (GRPO's ratio is taken
    against them at the same temperature), and start where its spec says."""
    policy = make_policy(instruction)
    spec = WorkerSpec(env_spec=env.spec, pipeline_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"), group_size=2,
                      temperature=2.0, seed=0, init_states="sampled")  # fmt: skip
    worker = RolloutWorker(spec, worker_id=0, policy=policy)
    try:
        episodes = worker.run_group()
    finally:
        worker.close()
    assert len(episodes) == 2
    # init_states="sampled" (AsyncGRPO passes GRPO's): the group started from a new layout.
    assert {episode.init_state_id for episode in episodes} == {SAMPLED_INIT_STATE}
    assert_sampled_by(policy, episodes, temperature=2.0)


class KillWorkerOnce(BaseCallback):
    """SIGKILLs worker 0 half a second after the learner takes its first group: mid-episode of its next group."""

    def __init__(self):
        super().__init__()
        self.killed_pid = None

    def _on_step(self) -> bool:
        if self.killed_pid is None:
            time.sleep(0.5)
            self.killed_pid = self.model.worker_pool.pids[0]
            os.kill(self.killed_pid, signal.SIGKILL)
        return True


def test_a_killed_worker_is_restarted_and_the_cache_stays_intact(env, instruction, tmp_path):
    model = AsyncGRPO(make_policy(instruction), env, **ONE_GROUP, num_workers=2,
                      pipeline_dir=str(tmp_path / "pipeline"), seed=0)  # fmt: skip
    killer = KillWorkerOnce()
    model.learn(4 * GROUP_STEPS, callback=killer)
    assert model.policy_version == 4 and model.last_metrics["async/worker_restarts"] == 1
    with pytest.raises(ProcessLookupError):
        os.kill(killer.killed_pid, 0)  # gone
    with open(tmp_path / "pipeline" / "workers" / "worker0.log") as file:
        assert "incarnation 1" in file.read()  # restarted, and said so
    assert_groups_whole(tmp_path / "pipeline" / "cache")  # no half-written group; every episode loads

    # A worker that keeps dying raises once its restarts are spent (no hang).
    model = AsyncGRPO(make_policy(instruction), env, **ONE_GROUP, num_workers=1, max_worker_restarts=0,
                      pipeline_dir=str(tmp_path / "pipeline2"), seed=0)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"rollout worker 0 died .*max_worker_restarts=0"):
        model.learn(4 * GROUP_STEPS, callback=KillWorkerOnce())


# A training script as a user writes one: resume the newest checkpoint or start anew, checkpoint after every update.
LEARNER = f"""
import os, sys
import gymnasium as gym, torch
from stable_baselines3.common.callbacks import BaseCallback
import gym_libero_vla
from gym_libero_vla.algos import AsyncGRPO
from gym_libero_vla.algos.base import resume_or_create

policy_dir, output = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
env = gym.make("LiberoSpatial-v0", obs_mode="state", task_ids=(0,), max_episode_steps={MAX_EPISODE_STEPS}, num_settle_steps=2)
checkpoints = os.path.join(output, "checkpoints")


class SaveEveryUpdate(BaseCallback):
    def _on_step(self):
        return True

    def _on_rollout_end(self):
        self.model.save(os.path.join(checkpoints, f"update_{{self.model.policy_version:06d}}"))


def create():
    return AsyncGRPO(policy_dir, env, **{ONE_GROUP!r}, num_workers=1, pipeline_dir=os.path.join(output, "pipeline"), seed=0)


model, resumed = resume_or_create(AsyncGRPO, checkpoints, create, env=env)
if resumed:
    print(f"resumed from policy_version={{model.policy_version}}", flush=True)
model.learn({8 * GROUP_STEPS} - model.num_timesteps, callback=SaveEveryUpdate(), reset_num_timesteps=False)
print(f"done: num_timesteps={{model.num_timesteps}} policy_version={{model.policy_version}}")
"""


def run_command(policy_dir, output_dir) -> subprocess.Popen:
    command = [sys.executable, "-c", LEARNER, str(policy_dir), str(output_dir)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_killed_learner_resumes_from_its_checkpoint_and_the_cache(instruction, tmp_path):
    make_policy(instruction).save_pretrained(tmp_path / "policy")
    output, pipeline = tmp_path / "run", tmp_path / "run" / "pipeline"
    learner = run_command(tmp_path / "policy", output)
    deadline = time.monotonic() + 240
    while not (output / "checkpoints" / "update_000003").exists():
        assert learner.poll() is None and time.monotonic() < deadline, learner.stdout.read()
        time.sleep(0.05)
    learner.kill()  # SIGKILL, right after a checkpoint: maybe mid-update, mid-save or mid-wait
    learner.communicate()
    with open(pipeline / "workers" / "worker0.log") as file:
        worker_pid = int(file.read().split("(pid ")[1].split(",")[0])
    deadline = time.monotonic() + 30
    while _alive(worker_pid):  # the orphaned worker notices and exits by itself
        assert time.monotonic() < deadline, "the worker outlived its learner"
        time.sleep(0.1)
    done_before_kill = {group["group_id"]: group for group in EpisodeStore(pipeline / "cache").groups()}
    killed_log = learner_log(pipeline)

    resumed = run_command(tmp_path / "policy", output)  # the same command
    stdout, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stdout
    resumed_at = int(stdout.split("resumed from ")[1].split("policy_version=")[1].split()[0])
    assert resumed_at >= 3 and "done: num_timesteps=160 policy_version=8" in stdout
    # The resumed learner started at the checkpoint's watermark: the groups the lost updates had used come again.
    with open(output / "checkpoints" / f"update_{resumed_at:06d}" / "async_grpo.json") as file:
        watermark = json.load(file)["consumed_through"]
    log = learner_log(pipeline)
    resumed_log = log[len(killed_log) :]
    assert [entry["policy_version"] for entry in resumed_log] == list(range(resumed_at + 1, 9))
    lineage = [entry for entry in killed_log if entry["policy_version"] <= resumed_at] + resumed_log
    used = {group_id for entry in lineage for group_id in entry["trained_groups"] + entry["skipped_groups"]}
    groups = {group["group_id"]: group for group in assert_groups_whole(pipeline / "cache")}
    final_watermark = resumed_log[-1]["consumed_through"]
    for group_id, group in done_before_kill.items():  # no finished group lost: trained on, skipped, or still queued
        assert group_id in used or group["first_episode_id"] > final_watermark, group
    assert min(groups[group_id]["first_episode_id"] for group_id in resumed_log[0]["trained_groups"]) > watermark
    assert len(used) == len(set(used) & set(groups))  # nothing trained on that is not a whole stored group


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as file:  # a zombie awaiting its reaper has exited
        return file.read().split(")")[1].split()[0] != "Z"


def test_ray_backend_runs_a_short_job(env, instruction, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        model = AsyncGRPO(make_policy(instruction), env, **ONE_GROUP, num_workers=2, backend="ray",
                          pipeline_dir=str(tmp_path / "pipeline"), seed=0)  # fmt: skip
        model.learn(2 * GROUP_STEPS)
        assert model.policy_version == 2 and model.num_timesteps == 2 * GROUP_STEPS
        assert model.last_metrics["async/env_steps_per_second"] > 0
        assert len(assert_groups_whole(tmp_path / "pipeline" / "cache")) >= 2  # the learner stored the actors' groups
        assert ray.is_initialized()  # the instance it found is left running
    finally:
        ray.shutdown()


def test_weights_are_published_atomically_and_old_files_pruned(instruction, tmp_path):
    from safetensors.torch import load_file

    policy = make_policy(instruction)
    for version in range(4):
        with torch.no_grad():
            next(policy.parameters()).add_(1.0)
        publish_weights(str(tmp_path), policy, version, consumed_through=10 * version)
    latest = read_latest_weights(str(tmp_path))
    assert latest["version"] == 3 and latest["consumed_through"] == 30
    assert len([name for name in os.listdir(tmp_path / "weights") if name.endswith(".safetensors")]) == 2
    tensors = load_file(tmp_path / "weights" / latest["file"])
    expected = trainable_tensors(policy)
    assert tensors.keys() == expected.keys() and all(torch.equal(tensors[k], expected[k]) for k in tensors)


def test_bad_arguments_are_named(env, instruction, tmp_path):
    policy = make_policy(instruction)
    with pytest.raises(ValueError, match="AsyncGRPO needs pipeline_dir"):
        AsyncGRPO(policy, env)
    with pytest.raises(ValueError, match=r"unknown backend 'dask': valid \('process', 'ray'\)"):
        AsyncGRPO(policy, env, pipeline_dir=str(tmp_path), backend="dask")
    with pytest.raises(ValueError, match="group_size 3 must be a multiple of envs_per_worker 2"):
        AsyncGRPO(policy, env, pipeline_dir=str(tmp_path), group_size=3, envs_per_worker=2)
    with pytest.raises(ValueError, match=r"unknown AsyncGRPO hyperparameter\(s\) \['workers'\]"):
        AsyncGRPO(policy, env, pipeline_dir=str(tmp_path), workers=2)
    with pytest.raises(ValueError, match="start_sampling 'learnability': AsyncGRPO's workers draw"):
        AsyncGRPO(policy, env, pipeline_dir=str(tmp_path), start_sampling="learnability")
    vector_env = gym.make_vec("LiberoSpatial-v0", num_envs=2, vectorization_mode="sync", obs_mode="state")
    with pytest.raises(ValueError, match="takes a single env"):
        AsyncGRPO(policy, vector_env, pipeline_dir=str(tmp_path), group_size=2)
    vector_env.close()
    assert np.isfinite(AsyncGRPO(policy, env, pipeline_dir=str(tmp_path)).config.group_timeout_s)

    class RefuseToStart(BaseCallback):
        def _on_training_start(self) -> None:
            raise RuntimeError("this callback refuses to start")

        def _on_step(self) -> bool:
            return True

    # learn's set-up comes first: a bad budget or a failing callback starts no worker (none wrote its log, no learner log)
    model = AsyncGRPO(policy, env, pipeline_dir=str(tmp_path / "pipeline"), group_size=2, num_workers=1)
    with pytest.raises(ValueError, match="total_timesteps 0 must be an int >= 1"):
        model.learn(0)
    with pytest.raises(RuntimeError, match="this callback refuses to start"):
        model.learn(4, callback=RefuseToStart())
    assert model.worker_pool is None
    assert not os.path.exists(tmp_path / "pipeline" / "workers") and not os.path.exists(
        tmp_path / "pipeline" / "learner.jsonl"
    )
