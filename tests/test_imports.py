"""The public names import from the packages, as users of SB3 and Gymnasium expect, and lazily."""

from __future__ import annotations

import subprocess
import sys


def test_learners_and_wrappers_import_from_their_packages_lazily():
    code = """
import sys
import gym_libero_vla, gym_libero_vla.algos, gym_libero_vla.wrappers
assert "torch" not in sys.modules and "libero" not in sys.modules, "importing the packages pulled in torch or LIBERO"
from gym_libero_vla.algos import GRPO, SFT, IReVLA, AsyncGRPO, GRPOConfig, SFTConfig, IReVLAConfig, resume_or_create
from gym_libero_vla.wrappers import ActionTokenizer, TrajectoryCache, RolloutRelabel, LanguageEmbedding, OpenVLAGripper
from gym_libero_vla.algos.grpo import GRPO as direct
assert GRPO is direct and issubclass(AsyncGRPO, GRPO)
try:
    from gym_libero_vla.algos import PPO
except ImportError as error:
    print("refused:", error)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "refused: cannot import name 'PPO'" in result.stdout
