"""Names that moved in the restructure still work, with a DeprecationWarning naming the replacement."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from gym_libero_vla.policies import CompactVLA, CompactVLAConfig, WordTokenizer
from gym_libero_vla.wrappers.action_tokenizer import ActionBins


def tiny_policy() -> CompactVLA:
    torch.manual_seed(0)
    bins = ActionBins.from_statistics({"q01": [-1.0] * 7, "q99": [1.0] * 7})
    return CompactVLA(CompactVLAConfig(cameras=(), hidden_size=16, num_layers=1, num_heads=2), bins,
                      WordTokenizer.from_texts(["pick up the black bowl"]))  # fmt: skip


def test_old_episode_loops_keep_their_signatures():
    with pytest.warns(DeprecationWarning, match="use gym_libero_vla.rollouts.run_episodes"):
        from gym_libero_vla.algos.grpo import run_episodes
    with pytest.warns(DeprecationWarning, match="use gym_libero_vla.rollouts.run_episodes"):
        from gym_libero_vla.evaluate import run_episodes_batched
    env = gym.make("LiberoSpatial-v0", obs_mode="state", task_ids=(0,), max_episode_steps=3, num_settle_steps=1)
    try:
        episodes, relabelled = run_episodes(tiny_policy(), env, {"task_id": 0, "init_state_id": 2}, 2, lambda n: True)
        assert [episode.num_steps for episode in episodes] == [3, 3] and relabelled == []
        assert run_episodes(tiny_policy(), env, {"task_id": 0, "init_state_id": 2}, 2, lambda n: False) == ([], [])
        (result,) = run_episodes_batched(tiny_policy(), [env], [(0, 2, 5)])
        assert (result.task_id, result.init_state_id, result.seed, result.length) == (0, 2, 5, 3) and not result.success
    finally:
        env.close()


def test_moved_helpers_resolve_and_unknown_names_still_fail():
    with pytest.warns(DeprecationWarning, match="use gym_libero_vla.algos.base.latest_checkpoint"):
        from gym_libero_vla.algos.grpo import latest_checkpoint
    from gym_libero_vla.algos import base

    assert latest_checkpoint is base.latest_checkpoint
    with pytest.warns(DeprecationWarning, match="Transitions.from_episodes"):
        from gym_libero_vla.algos.sft import load_demonstrations
    demo = {"instruction": "pick up the black bowl", "state": np.zeros((4, 8)), "actions": np.zeros((4, 7))}
    assert len(load_demonstrations([demo], ("instruction", "state"), 7)) == 4
    with pytest.raises(ImportError):
        from gym_libero_vla.algos.grpo import no_such_name  # noqa: F401
