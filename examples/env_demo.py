"""A short, scripted tour of a LIBERO suite as a Gymnasium env: reset, act, success, a rollout video.

    python examples/env_demo.py                       # 3 LIBERO-Spatial tasks, scripted expert, video
    python examples/env_demo.py --policy random --episodes 2

Each episode prints the task's instruction, its outcome and its length; a success table and an mp4 of
the first episode (agentview camera, upright) are written to ``--out-dir``. The scripted expert acts
from privileged object poses, the same 7-dim delta actions a learned policy emits.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import gymnasium as gym
import imageio.v2 as imageio
import numpy as np
import tyro
from tqdm import tqdm

import gym_libero_vla  # noqa: F401


@dataclasses.dataclass
class Args:
    env_id: str = "LiberoSpatial-v0"
    """Suite to run: LiberoSpatial-v0, LiberoObject-v0, LiberoGoal-v0, Libero10-v0 or Libero90-v0."""
    episodes: int = 3
    """Episodes to run; episode k uses task k (mod the suite's tasks) and init state k."""
    policy: str = "expert"
    """'expert' (scripted, privileged object poses) or 'random' (uniform actions)."""
    video: bool = True
    """Record the first episode's agentview frames to an mp4 (rendering costs ~0.1 s a frame on CPU)."""
    video_size: int = 128
    """Side of the video frames in pixels."""
    out_dir: Path = Path("runs/env_demo")
    """Where the success table (JSON) and the video go."""
    seed: int = 0
    """Seed for the random policy and the env."""


class RandomPolicy:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def reset(self) -> None:
        pass

    def act(self, obs) -> np.ndarray:
        return self.rng.uniform(-1, 1, 7)


def make_policy(name: str, env: gym.Env, seed: int):
    if name == "expert":
        from gym_libero_vla.demos.scripted_expert import ScriptedExpert

        return ScriptedExpert(env.unwrapped, seed=seed)
    if name == "random":
        return RandomPolicy(seed)
    raise ValueError(f"unknown policy {name!r}: valid ('expert', 'random')")


def main(args: Args) -> list[dict]:
    env = gym.make(
        args.env_id,
        obs_mode="state",
        privileged_state=True,
        render_mode="rgb_array" if args.video else None,
        render_size=args.video_size,
    )
    policy = make_policy(args.policy, env, args.seed)
    num_tasks = len(env.unwrapped.tasks)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for episode in range(args.episodes):
        obs, info = env.reset(seed=args.seed, options={"task_id": episode % num_tasks, "init_state_id": episode})
        policy.reset()
        record = args.video and episode == 0
        frames = [env.render()] if record else []
        start, steps, done = time.perf_counter(), 0, False
        with tqdm(total=env.spec.max_episode_steps, desc=f"episode {episode}", leave=False) as progress:
            while not done:
                obs, reward, terminated, truncated, info = env.step(policy.act(obs))
                steps += 1
                done = terminated or truncated
                progress.update()
                if record:
                    frames.append(env.render())
        results.append(
            {
                "task_id": info["task_id"],
                "instruction": obs["instruction"],
                "success": bool(info["is_success"]),
                "steps": steps,
                "seconds": round(time.perf_counter() - start, 2),
            }
        )
        outcome = "success" if info["is_success"] else "failure"
        print(f"[{outcome}] task {info['task_id']}: {obs['instruction']} ({steps} steps)")
        if record:
            video = args.out_dir / f"episode{episode}_task{info['task_id']}.mp4"
            imageio.mimsave(video, frames, fps=env.metadata["render_fps"])
            print(f"video: {video}")
    env.close()
    success_rate = np.mean([r["success"] for r in results])
    print(f"\nsuccess rate {success_rate:.0%} over {len(results)} episodes ({args.policy} policy on {args.env_id})")
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
