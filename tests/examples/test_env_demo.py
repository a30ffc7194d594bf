"""Smoke-run the README's main job (until the GRPO learner lands) like a user would, in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio

ROOT = Path(__file__).resolve().parents[2]


def test_env_demo_solves_a_task_and_writes_a_video(tmp_path):
    result = subprocess.run(
        [sys.executable, "examples/env_demo.py", "--episodes", "1", "--video-size", "64", "--out-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "[success] task 0" in result.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results[0]["success"] is True and results[0]["task_id"] == 0
    frames = [frame for frame in imageio.get_reader(str(tmp_path / "episode0_task0.mp4"))]  # noqa: C416 (len() is inf)
    assert len(frames) == results[0]["steps"] + 1 and frames[0].shape == (64, 64, 3)
