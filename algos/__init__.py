"""Learners with a stable-baselines3 surface, one a file, sharing :mod:`gym_libero_vla.algos.base`::

    from gym_libero_vla.algos import GRPO, SFT, IReVLA, AsyncGRPO

Imports are lazy: ``import gym_libero_vla.algos`` loads no learner (nor torch) until one is named.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SFT": "sft", "SFTConfig": "sft",
    "GRPO": "grpo", "GRPOConfig": "grpo",
    "IReVLA": "irevla", "IReVLAConfig": "irevla",
    "AsyncGRPO": "async_grpo", "AsyncGRPOConfig": "async_grpo",
    "RolloutCheckpointCallback": "callbacks", "LiberoEvalCallback": "callbacks", "LatestCheckpointCallback": "callbacks",
    "BaseLearner": "base", "latest_checkpoint": "base", "resume_or_create": "base",
}  # fmt: skip
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
