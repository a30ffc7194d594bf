"""Gymnasium wrappers for LIBERO envs, one concern per file::

    from gym_libero_vla.wrappers import ActionTokenizer, TrajectoryCache, RolloutRelabel, LanguageEmbedding, OpenVLAGripper

Imports are lazy: a wrapper's module (and what it pulls in) loads when the wrapper is named.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ActionTokenizer": "action_tokenizer", "ActionBins": "action_tokenizer",
    "LanguageEmbedding": "language_embedding",
    "OpenVLAGripper": "openvla_gripper",
    "RolloutRelabel": "rollout_relabel", "FailedGroupRescue": "rollout_relabel",
    "TrajectoryCache": "trajectory_cache",
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
