"""Gymnasium wrappers for LIBERO envs, one concern per file::

    from gym_libero_vla.wrappers import ActionTokenizer, TrajectoryCache, RolloutRelabel, LanguageEmbedding, OpenVLAGripper

Imports are lazy: a wrapper's module (and what it pulls in) loads when the wrapper is named.
"""

from __future__ import annotations

from gym_libero_vla.lazy import lazy_exports

_EXPORTS = {
    "ActionTokenizer": "action_tokenizer", "ActionBins": "action_tokenizer",
    "LanguageEmbedding": "language_embedding",
    "OpenVLAGripper": "openvla_gripper",
    "RolloutRelabel": "rollout_relabel", "FailedGroupRescue": "rollout_relabel",
    "TrajectoryCache": "trajectory_cache",
}  # fmt: skip
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
