"""examples/train_sft.py runs end to end on a generated demo file (subprocess, tiny budgets), and the
checkpoint it saves loads back in this process."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np

from gym_libero_vla.algos.sft import SFT

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "examples", "train_sft.py")


def test_trains_on_a_demo_file_and_prints_a_success_table(tmp_path):
    from gym_libero_vla.demos.generate import GenerateArgs, generate

    demos = tmp_path / "spatial.hdf5"
    generate(GenerateArgs(suite="spatial", out=str(demos), task_ids=(0,), episodes_per_task=1, progress=False))
    command = [
        sys.executable, SCRIPT, "--demos", str(demos), "--task-ids", "0", "--output-dir", str(tmp_path / "run"),
        "--total-steps", "6", "--sft.batch-size", "8", "--policy.hidden-size", "32", "--policy.num-heads", "2",
        "--eval-num-init-states", "1", "--max-eval-steps", "3", "--no-progress-bar",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| task | instruction | successes |" in result.stdout and "pick up the black bowl" in result.stdout
    with open(tmp_path / "run" / "eval.json") as file:
        results = json.load(file)
    assert set(results["success_rate"]) == {"0"} and np.isfinite(results["train"]["train/loss"])
    assert results["demos"]["path"] == str(demos) and results["demos"]["num_demos"] == 1
    assert (tmp_path / "run" / "success.md").exists() and (tmp_path / "run" / "success.png").exists()
    assert glob.glob(str(tmp_path / "run" / "tb" / "SFT_1" / "events.out.tfevents.*")), "no TensorBoard events"

    model = SFT.load(tmp_path / "run" / "final")
    assert model.num_timesteps == 6
    obs = {"instruction": "pick up the black bowl", "state": np.zeros(8, np.float32)}
    action, _ = model.predict(obs, deterministic=True)
    assert action.shape == (7,) and np.all(np.isfinite(action))


def test_help_documents_every_field():
    result = subprocess.run([sys.executable, SCRIPT, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for flag in ("--demos", "--extra-demos", "--filter-stalls", "--task-ids", "--obs-mode", "--lora-rank",
                 "--total-steps", "--sft.learning-rate", "--policy.hidden-size",
                 "--eval-num-init-states", "--torch-threads", "--sft-torch-threads"):  # fmt: skip
        assert flag in result.stdout
