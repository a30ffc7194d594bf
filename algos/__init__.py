"""Learners with a stable-baselines3 surface, one a file, sharing :mod:`gym_libero_vla.algos.base`::

    from gym_libero_vla.algos import GRPO, SFT, IReVLA, AsyncGRPO

Imports are lazy: ``import gym_libero_vla.algos`` loads no learner (nor torch) until one is named.
"""

from __future__ import annotations

from gym_libero_vla.lazy import lazy_exports

_EXPORTS = {
    "SFT": "sft", "SFTConfig": "sft",
    "GRPO": "grpo", "GRPOConfig": "grpo",
    "IReVLA": "irevla", "IReVLAConfig": "irevla",
    "AsyncGRPO": "async_grpo", "AsyncGRPOConfig": "async_grpo",
    "RolloutCheckpointCallback": "callbacks", "LiberoEvalCallback": "callbacks", "LatestCheckpointCallback": "callbacks",
    "BaseLearner": "base", "latest_checkpoint": "base", "resume_or_create": "base", "WeightEMA": "ema",
}  # fmt: skip
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
