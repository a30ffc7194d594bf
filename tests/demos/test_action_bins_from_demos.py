"""The action tokenizer's bounds come from a generated demo file's statistics (issue #4's round-trip test)."""

from __future__ import annotations

import numpy as np

from gym_libero_vla.demos.libero_hdf5 import LiberoHDF5, action_stats
from gym_libero_vla.wrappers.action_tokenizer import ActionBins


def test_demo_actions_round_trip_within_half_a_bin(spatial_demo_file, tmp_path):
    with LiberoHDF5(spatial_demo_file) as demos:
        episodes = list(demos)
    stats = action_stats(episodes)
    stats.save(tmp_path / "stats.json")
    bins = ActionBins.from_statistics(type(stats).load(tmp_path / "stats.json"))
    np.testing.assert_allclose(bins.low[:6], stats.q01[:6], rtol=1e-6)
    np.testing.assert_allclose(bins.high[:6], stats.q99[:6], rtol=1e-6)
    assert (bins.low[6], bins.high[6]) == (-1.0, 1.0)  # the gripper keeps its full range

    actions = np.concatenate([episode.actions for episode in episodes])
    inside = np.all((actions >= bins.low) & (actions <= bins.high), axis=1)
    assert inside.mean() > 0.9  # q01..q99 per dimension keeps most actions whole
    error = np.abs(bins.decode(bins.encode(actions[inside])) - actions[inside])
    assert np.all(error <= bins.bin_width / 2 + 1e-6)
