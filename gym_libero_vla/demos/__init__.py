"""Offline demonstrations: LIBERO HDF5 reading and a scripted expert that generates them.

- :mod:`gym_libero_vla.demos.libero_hdf5`: read official LIBERO / robomimic HDF5 files (and ours) in
  the observation layout of our envs; action statistics; OpenVLA-style no-op and failure filtering;
  stalled open-hand steps (``stall_mask``).
- :mod:`gym_libero_vla.demos.scripted_expert`: a privileged-state expert for LIBERO tasks.
- :mod:`gym_libero_vla.demos.generate`: ``python -m gym_libero_vla.demos generate|replay``; ``prepare_demos`` (the
  demos a run needs, generated when missing).

Nothing heavy is imported here.
"""

from gym_libero_vla.demos.libero_hdf5 import (
    ActionStats,
    Episode,
    LiberoHDF5,
    action_stats,
    drop_noops,
    drop_stalls,
    load_episodes,
    noop_mask,
    replay,
    replay_success,
    stall_mask,
)

__all__ = [
    "ActionStats",
    "Episode",
    "LiberoHDF5",
    "action_stats",
    "drop_noops",
    "drop_stalls",
    "load_episodes",
    "noop_mask",
    "replay",
    "replay_success",
    "stall_mask",
]
