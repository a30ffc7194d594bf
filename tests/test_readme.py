"""The README's quickstart runs as written, with its budgets shrunk (the real simulator, tiny numbers)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the quickstart spends, and what this test spends instead; each must be in the README as written.
SHRINK = {
    "episodes_per_task=10": "episodes_per_task=1",
    "range(20, 30), max_episode_steps=160": "range(20, 21), max_episode_steps=8",
    "max_episode_steps=160": "max_episode_steps=8",
    ".learn(2000)": ".learn(3)",
    "model.learn(4000, progress_bar=True)": "model.learn(8)",
}


def test_quickstart_runs(tmp_path):
    with open(os.path.join(REPO, "README.md")) as file:
        readme = file.read()
    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", readme, re.S).group(1)
    for spent, shrunk in SHRINK.items():
        assert spent in code, f"the quickstart no longer says {spent!r}: update this test"
        code = code.replace(spent, shrunk)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    success_rate = float(result.stdout.strip().splitlines()[-1])
    assert 0.0 <= success_rate <= 1.0
    assert (tmp_path / "runs" / "quickstart" / "grpo" / "grpo.json").exists()
    assert (tmp_path / "data" / "spatial_task0.hdf5").exists()
