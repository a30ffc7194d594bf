"""Train a stable-baselines3 PPO or SAC agent on LIBERO-Spatial from state, then save, reload and evaluate it.

A state-based baseline, not a VLA: the policy sees the robot's proprio state, the ground-truth object
poses (``privileged_state``) and the instruction as a vector (``LanguageEmbedding``), through SB3's
``MultiInputPolicy`` and its own vector envs. Sparse LIBERO rewards make a few thousand steps far too few
to learn a task; the defaults are sized to run in minutes on a 2-core CPU and exercise the whole path
(training, TensorBoard, save/load, evaluation). Scale ``--total-timesteps`` up for real runs.

    python examples/train_sb3.py --algo sac --total-timesteps 5000
    tensorboard --logdir runs
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import tyro
from stable_baselines3 import PPO, SAC
from stable_baselines3.common.logger import configure
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

import gym_libero_vla  # noqa: F401  (registers the env ids)
from gym_libero_vla.wrappers.language_embedding import LanguageEmbedding

ALGOS = {"ppo": PPO, "sac": SAC}


@dataclasses.dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run directory's name)"""
    seed: int = 1
    """seed of the algorithm, the envs and the evaluation"""
    algo: Literal["ppo", "sac"] = "ppo"
    """the SB3 algorithm: on-policy PPO or off-policy SAC"""
    env_id: str = "LiberoSpatial-v0"
    """the LIBERO suite to train on"""
    task_ids: tuple[int, ...] | None = None
    """train and evaluate on these tasks of the suite only; None means every task"""
    max_episode_steps: int | None = None
    """truncate episodes after this many steps; None keeps the suite's limit (220 for LIBERO-Spatial)"""
    privileged_state: bool = True
    """give the policy LIBERO's ground-truth object poses (without them a state policy cannot see the objects)"""
    encoder: Literal["hashed", "minilm"] = "hashed"
    """instruction encoder: a hashed bag of words (instant) or the pretrained all-MiniLM-L6-v2 sentence encoder"""
    num_envs: int = 1
    """the number of parallel envs"""
    vec_env: Literal["dummy", "subproc"] = "dummy"
    """SB3's vector env: DummyVecEnv (one process) or SubprocVecEnv (one process per env)"""
    total_timesteps: int = 4000
    """total env steps of training"""
    learning_rate: float = 3e-4
    """the optimizer's learning rate"""
    gamma: float = 0.99
    """the discount factor"""
    n_steps: int = 512
    """PPO: steps per env per rollout"""
    n_epochs: int = 10
    """PPO: epochs over each rollout"""
    ppo_batch_size: int = 64
    """PPO: minibatch size"""
    buffer_size: int = 20_000
    """SAC: replay buffer capacity (SB3's default of 1e6 would reserve gigabytes for these observations)"""
    learning_starts: int = 500
    """SAC: env steps of random actions before learning starts"""
    sac_batch_size: int = 256
    """SAC: minibatch size"""
    eval_episodes: int = 10
    """episodes of the deterministic policy evaluated after training"""
    runs_dir: str = "runs"
    """where the run directory (TensorBoard events, model.zip, results) is written"""
    device: str = "cpu"
    """torch device; small MLPs are fastest on the CPU"""
    num_threads: int = 1
    """torch CPU threads (1 leaves the other cores to the simulators)"""


def make_env(args: Args) -> gym.Env:
    env = gym.make(args.env_id, obs_mode="state", privileged_state=args.privileged_state, task_ids=args.task_ids,
                   max_episode_steps=args.max_episode_steps)  # fmt: skip
    env = LanguageEmbedding(env, encoder=args.encoder)
    return Monitor(env)  # episode return and length for SB3's logger (it reads info["is_success"] itself)


def make_vec_env(args: Args):
    vec_env_class = SubprocVecEnv if args.vec_env == "subproc" else DummyVecEnv
    # Each worker builds its own simulator (and GL context, if any) after it starts: nothing crosses a fork.
    return vec_env_class([lambda: make_env(args) for _ in range(args.num_envs)])


def build_model(args: Args, envs, logger):
    common = dict(learning_rate=args.learning_rate, gamma=args.gamma, seed=args.seed, device=args.device, verbose=1)
    if args.algo == "ppo":
        model = PPO("MultiInputPolicy", envs, n_steps=args.n_steps, n_epochs=args.n_epochs, batch_size=args.ppo_batch_size,
                    **common)  # fmt: skip
    else:
        model = SAC("MultiInputPolicy", envs, buffer_size=args.buffer_size, learning_starts=args.learning_starts,
                    batch_size=args.sac_batch_size, **common)  # fmt: skip
    model.set_logger(logger)
    return model


def evaluate(model, env: gym.Env, num_episodes: int, seed: int) -> tuple[float, list[dict]]:
    """Success rate of the deterministic policy; also returns each episode's first observation (probe inputs)."""
    successes, first_observations = [], []
    for episode in range(num_episodes):
        obs, info = env.reset(seed=seed + episode)  # the seed picks the task and the init state
        first_observations.append(obs)
        done = False
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, _, terminated, truncated, info = env.step(action)
            done = terminated or truncated
        successes.append(bool(info["is_success"]))
    return float(np.mean(successes)), first_observations


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.task_ids is not None:
        args.task_ids = tuple(args.task_ids)
    run_name = f"{args.env_id}__{args.exp_name}__{args.algo}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.runs_dir, run_name)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "args.json"), "w") as file:
        json.dump(dataclasses.asdict(args), file, indent=2)
    torch.set_num_threads(args.num_threads)
    logger = configure(run_dir, ["stdout", "tensorboard"])

    # ------------------------------------------------------------------ train
    envs = make_vec_env(args)
    model = build_model(args, envs, logger)
    start = time.time()
    model.learn(total_timesteps=args.total_timesteps)
    train_seconds = time.time() - start
    model_path = os.path.join(run_dir, "model.zip")
    model.save(model_path)
    envs.close()

    # ------------------------------------------------------------------ reload and evaluate
    eval_env = make_env(args)
    loaded = ALGOS[args.algo].load(model_path, device=args.device)
    success_rate, probe = evaluate(loaded, eval_env, args.eval_episodes, seed=args.seed + 10_000)
    eval_env.close()
    # The reloaded policy must act exactly as the trained one: same deterministic actions on the same inputs.
    probe_obs = {key: np.stack([obs[key] for obs in probe]) for key in probe[0]}
    trained_actions, _ = model.predict(probe_obs, deterministic=True)
    loaded_actions, _ = loaded.predict(probe_obs, deterministic=True)
    max_action_difference = float(np.abs(trained_actions - loaded_actions).max())
    np.savez(os.path.join(run_dir, "probe.npz"), actions=trained_actions, **{f"obs/{k}": v for k, v in probe_obs.items()})

    logger.record("eval/success_rate", success_rate)
    logger.record("eval/episodes", args.eval_episodes)
    logger.record("eval/reload_max_action_difference", max_action_difference)
    logger.record("time/train_seconds", train_seconds)
    logger.dump(model.num_timesteps)
    results = {
        "algo": args.algo,
        "env_id": args.env_id,
        "total_timesteps": int(model.num_timesteps),
        "train_seconds": train_seconds,
        "steps_per_second": model.num_timesteps / train_seconds,
        "eval_episodes": args.eval_episodes,
        "success_rate": success_rate,
        "reload_max_action_difference": max_action_difference,
        "model_path": model_path,
    }
    with open(os.path.join(run_dir, "results.json"), "w") as file:
        json.dump(results, file, indent=2)
    print(f"success rate over {args.eval_episodes} episodes: {success_rate:.2f}")
    print(f"save/load round trip: max |action difference| = {max_action_difference}")
    print(f"run directory: {run_dir}")
    logger.close()
