"""examples/train_grpo.py runs end to end (demos, SFT, evaluation, GRPO, evaluation) with tiny budgets in a
subprocess; its results.json holds success before and after, and its GRPO checkpoint loads back."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from gym_libero_vla.algos.base import latest_checkpoint
from gym_libero_vla.algos.grpo import GRPO
from gym_libero_vla.algos.irevla import IReVLA
from gym_libero_vla.demos import LiberoHDF5
from gym_libero_vla.demos.generate import DemoConfig
from gym_libero_vla.evaluate import EvalRange

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "examples", "train_grpo.py")


def test_runs_end_to_end_with_tiny_budgets(tmp_path):
    run = tmp_path / "run"
    command = [
        sys.executable, SCRIPT, "--demos", str(tmp_path / "demos.hdf5"), "--output-dir", str(run),
        "--task-ids", "0", "--episodes-per-task", "2", "--sft-steps", "5",
        "--policy.hidden-size", "32", "--policy.num-heads", "2",
        "--total-timesteps", "10", "--grpo.num-groups", "1", "--grpo.group-size", "2", "--max-episode-steps", "5",
        "--eval-num-init-states", "1", "--checkpoint-freq", "5", "--no-progress-bar",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "before grpo 0.00, after grpo" in result.stdout

    with open(run / "results.json") as file:
        results = json.load(file)
    assert 0.0 <= results["success_rate_before"] <= 1.0 and 0.0 <= results["success_rate_after"] <= 1.0
    assert set(results["per_task_before"]) == set(results["per_task_after"]) == {"0"}
    assert results["eval_init_state_ids"] == [20] and results["grpo_timesteps"] >= 10
    for stage in ("before", "after"):
        assert (run / f"eval_{stage}" / "success.json").exists() and (run / f"eval_{stage}" / "success.png").exists()
        assert glob.glob(str(run / f"eval_{stage}" / "videos" / "*.mp4"))
    assert glob.glob(str(run / "tb" / "GRPO_1" / "events.out.tfevents.*")), "no TensorBoard events"
    assert os.listdir(run / "checkpoints") == ["grpo_10_steps"]  # saved after the update of the first rollout

    model = GRPO.load(run / "final")
    assert model.num_timesteps == results["grpo_timesteps"]
    obs = {"instruction": "pick up the black bowl", "state": np.zeros(8, np.float32), "object_state": np.zeros(70, np.float32)}
    action, _ = model.predict(obs, deterministic=True)
    assert action.shape == (7,) and np.all(np.isfinite(action))

    # The same command with a larger budget resumes: SFT reused, GRPO continued from its checkpoint.
    command[command.index("--total-timesteps") + 1] = "20"
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resuming grpo from" in result.stdout and "at 10 env steps" in result.stdout
    with open(run / "results.json") as file:
        assert json.load(file)["grpo_timesteps"] == 20
    assert GRPO.load(run / "final").policy_version == 2


def tiny_command(tmp_path, *flags: str) -> list[str]:
    """The main job on task 0 (its demos at ``tmp_path/demos.hdf5``: the shared ``expert_demos``, or one generated),
    a width-32 policy, one group of two episodes, one evaluation episode."""
    return [
        sys.executable, SCRIPT, *flags, "--demos", str(tmp_path / "demos.hdf5"), "--output-dir", str(tmp_path / "run"),
        "--task-ids", "0", "--episodes-per-task", "1", "--policy.hidden-size", "32", "--policy.num-heads", "2",
        "--grpo.num-groups", "1", "--grpo.group-size", "2", "--eval-num-init-states", "1", "--no-progress-bar",
    ]  # fmt: skip


def test_irevla_runs_on_the_same_pipeline_with_action_chunks(tmp_path, expert_demos):
    run = tmp_path / "run"
    command = tiny_command(
        tmp_path, "--algo", "irevla", "--sft-steps", "2", "--policy.chunk-size", "2", "--total-timesteps", "10",
        "--max-episode-steps", "5", "--irevla.rl-updates-per-stage", "1", "--irevla.sl-steps-per-stage", "3",
        "--video-episodes", "0", "--checkpoint-freq", "5",
    )  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "before irevla 0.00, after irevla" in result.stdout
    with open(run / "results.json") as file:
        results = json.load(file)
    assert results["algo"] == "irevla" and results["grpo_timesteps"] in (10, 20)  # one or two sampling rounds
    assert glob.glob(str(run / "tb" / "IReVLA_1" / "events.out.tfevents.*")), "no TensorBoard events"
    assert IReVLA.load(run / "final").policy.chunk_size == 2
    with open(run / "eval_after" / "success.json") as file:
        episodes = json.load(file)["episodes"]
    assert episodes and all(row["length"] == 5 for row in episodes)  # env steps, the last chunk cut to 1 action

    # Resuming its output dir as a GRPO run is refused before anything is loaded or written.
    checkpoints_before = sorted(os.listdir(run / "checkpoints"))
    command[command.index("--algo") + 1] = "grpo"
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "is a checkpoint of --algo irevla, but this run has --algo grpo" in result.stderr
    assert sorted(os.listdir(run / "checkpoints")) == checkpoints_before


def test_rgb_mode_trains_a_policy_that_sees(tmp_path):
    """--obs-mode rgb: demos with both cameras' frames, a policy that reads them and the proprio (no object poses),
    chunked; SFT, evaluation and GRPO from pixels. The vision recipe's defaults apply unless a flag overrides them."""
    run = tmp_path / "run"
    command = tiny_command(tmp_path, "--obs-mode", "rgb", "--sft-steps", "3", "--policy.image-size", "64",
                           "--total-timesteps", "16", "--max-episode-steps", "8", "--checkpoint-freq", "0")  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(run / "results.json") as file:
        results = json.load(file)
    assert results["args"]["obs_mode"] == "rgb" and results["args"]["sft"]["random_shift"] == 8  # the recipe's
    assert results["grpo_timesteps"] >= 16
    model = GRPO.load(run / "final")
    config = model.policy.config
    assert config.cameras == ("agentview", "wrist") and config.chunk_size == 8 and config.encoder_size == 64  # recipe
    assert config.reflections is False  # the recipe's faster frames, in its demos too
    assert (config.image_size, config.hidden_size) == (64, 32)  # the flags'
    assert set(model.policy.observation_keys) == {"instruction", "agentview", "wrist", "state"}
    with h5py.File(tmp_path / "demos.hdf5", "r") as file:
        keys = set(file["data"]["demo_0"]["obs"])
    assert {"agentview_rgb", "eye_in_hand_rgb"} <= keys and "object_state" not in keys
    with LiberoHDF5(tmp_path / "demos.hdf5", load_images=False) as demos:
        assert demos.reflections is False
    assert glob.glob(str(run / "eval_after" / "videos" / "*.mp4"))


def test_obs_mode_and_policy_must_agree(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "examples"))
    try:
        import train_grpo
    finally:
        sys.path.remove(os.path.join(REPO, "examples"))
    args = train_grpo.Args(
        obs_mode="rgb", output_dir=str(tmp_path / "run"), demo=DemoConfig(demos=str(tmp_path / "demos.hdf5"))
    )
    with pytest.raises(ValueError, match="obs_mode 'rgb' needs a policy that reads cameras: pass --policy.cameras"):
        train_grpo.main(args)
    state_with_cameras = dataclasses.replace(train_grpo.default_args("rgb"), obs_mode="state", output_dir=args.output_dir)
    with pytest.raises(ValueError, match=r"obs_mode 'state' renders no frames, but --policy.cameras is \('agentview', "):
        train_grpo.main(state_with_cameras)
    with pytest.raises(ValueError, match=r"unknown obs_mode 'pixels': valid \('state', 'rgb'\)"):
        train_grpo.default_args("pixels")
    no_threads = subprocess.run([sys.executable, SCRIPT, "--sft-torch-threads", "0"], cwd=REPO, capture_output=True,
                                text=True, timeout=120)  # fmt: skip
    assert no_threads.returncode != 0 and "sft_torch_threads 0 must be an int >= 1 (or omitted" in no_threads.stderr
    past_the_states = dataclasses.replace(train_grpo.default_args("state"), eval=EvalRange(eval_init_state_start=48,
                                          eval_num_init_states=5), output_dir=args.output_dir)  # fmt: skip
    with pytest.raises(ValueError, match="unknown init_state_id 50 for task 0 of LiberoSpatial-v0: valid 0..49"):
        train_grpo.main(past_the_states)
    assert not os.listdir(tmp_path)  # refused before any work
    # --help after --obs-mode rgb shows the recipe's defaults
    result = subprocess.run([sys.executable, SCRIPT, "--obs-mode", "rgb", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0 and "runs/grpo_rgb" in result.stdout and "agentview wrist" in result.stdout


def test_help_documents_every_field():
    result = subprocess.run([sys.executable, SCRIPT, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for flag in ("--task-ids", "--episodes-per-task", "--extra-demos", "--init-from", "--sft-steps", "--total-timesteps",
                 "--grpo.group-size", "--grpo.num-groups", "--eval-init-state-start", "--max-episode-steps", "--torch-threads",
                 "--sft-torch-threads"):  # fmt: skip
        assert flag in result.stdout


def test_unavailable_device_is_refused_before_any_work(tmp_path):
    command = [sys.executable, SCRIPT, "--device", "cuda:64", "--output-dir", str(tmp_path / "run"),
               "--demos", str(tmp_path / "demos.hdf5")]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "device 'cuda:64' is not available on this machine: valid here ['cpu'" in result.stderr
    assert os.listdir(tmp_path) == []


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, expert_demos):
    run = tmp_path / "run"
    command = [
        sys.executable, SCRIPT, "--demos", str(tmp_path / "demos.hdf5"), "--output-dir", str(run),
        "--task-ids", "0", "--episodes-per-task", "1", "--sft-steps", "2",
        "--policy.hidden-size", "32", "--policy.num-heads", "2",
        "--total-timesteps", "60", "--grpo.num-groups", "1", "--grpo.group-size", "2", "--max-episode-steps", "5",
        "--eval-num-init-states", "1", "--video-episodes", "0", "--checkpoint-freq", "10", "--no-progress-bar",
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not glob.glob(str(run / "checkpoints" / "grpo_*_steps" / "grpo.json")):
            assert process.poll() is None and time.time() < deadline, "no checkpoint before the run ended"
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)  # mid-run: between or during rollouts, maybe mid-save
    finally:
        process.kill()
        process.wait()
    saved = latest_checkpoint(run / "checkpoints")
    steps_at_kill = GRPO.load(saved).num_timesteps
    assert 10 <= steps_at_kill < 60

    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resuming grpo from {saved} at {steps_at_kill} env steps" in result.stdout
    with open(run / "results.json") as file:
        assert json.load(file)["grpo_timesteps"] >= 60
    assert not glob.glob(str(run / "checkpoints" / ".*"))  # no half-written checkpoint left behind


def test_async_run_trains_and_resumes(tmp_path, expert_demos):
    run = tmp_path / "run"
    command = [
        sys.executable, SCRIPT, "--async", "--pipeline.num-workers", "1", "--demos", str(tmp_path / "demos.hdf5"),
        "--output-dir", str(run), "--task-ids", "0", "--episodes-per-task", "1", "--sft-steps", "2",

        "--policy.hidden-size", "32", "--policy.num-heads", "2", "--total-timesteps", "20",
        "--grpo.num-groups", "1", "--grpo.group-size", "2",
        "--max-episode-steps", "5", "--eval-num-init-states", "1", "--video-episodes", "0", "--checkpoint-freq", "10",
        "--no-progress-bar",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(run / "results.json") as file:
        assert json.load(file)["grpo_timesteps"] >= 20
    assert os.path.isdir(run / "pipeline") and glob.glob(str(run / "tb" / "AsyncGRPO_1" / "events.out.tfevents.*"))

    command[command.index("--total-timesteps") + 1] = "30"
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resuming grpo from" in result.stdout
    with open(run / "results.json") as file:
        assert json.load(file)["grpo_timesteps"] >= 30

    # The switch's other position, --sync, continues the same run with the synchronous learner.
    command[command.index("--async")] = "--sync"
    command[command.index("--total-timesteps") + 1] = "40"
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resuming grpo from" in result.stdout
    assert glob.glob(str(run / "tb" / "GRPO_1" / "events.out.tfevents.*")), "--sync did not run the synchronous GRPO"
    with open(run / "results.json") as file:
        assert json.load(file)["grpo_timesteps"] >= 40
