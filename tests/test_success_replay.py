"""SuccessReplay: the newest successes of the counted sources, refilled from an episode store, written to one."""

from __future__ import annotations

import numpy as np
import pytest

from gym_libero_vla.episode import Episode
from gym_libero_vla.episode_store import EpisodeStore
from gym_libero_vla.success_replay import SuccessReplay


def episode(success: bool, source: str = "online", seed: int = 0, keys=("instruction", "state")) -> Episode:
    observations = {"instruction": "open the drawer", "state": np.full((3, 8), seed, np.float32)}
    return Episode({key: observations[key] for key in keys}, np.full((3, 7), seed, np.float32), [0, 0, float(success)],
                   success, task_id=0, source=source)  # fmt: skip


def test_keeps_the_newest_successes_of_its_sources():
    replay = SuccessReplay(2, ("instruction", "state"), sources=("online", "relabelled"))
    episodes = [episode(True, seed=1), episode(False, seed=2), episode(True, "offline", seed=3),
                episode(True, "relabelled", seed=4), episode(True, seed=5)]  # fmt: skip
    assert replay.add(episodes) == [episodes[0], episodes[3], episodes[4]]
    assert replay.episodes == [episodes[3], episodes[4]]
    assert SuccessReplay(0, ("state",)).add(episodes) == []  # nothing kept, nothing reported


def test_refills_from_a_store_and_writes_to_its_own(tmp_path):
    store = EpisodeStore(tmp_path / "cache")
    for index in range(4):
        store.append(episode(index % 2 == 1, seed=index))
    store.append(episode(True, seed=9, keys=("instruction",)))  # lacks what the policy reads: not refilled
    refilled = SuccessReplay(5, ("instruction", "state"), store=store)
    assert [float(ep.actions[0, 0]) for ep in refilled.episodes] == [1.0, 3.0]

    own = SuccessReplay(2, ("instruction", "state"), store=str(tmp_path / "successes"), write=True)
    own.add([episode(True, seed=5), episode(False, seed=6), episode(True, seed=7), episode(True, seed=8)])
    again = SuccessReplay(2, ("instruction", "state"), store=str(tmp_path / "successes"))
    assert [float(ep.actions[0, 0]) for ep in again.episodes] == [7.0, 8.0]  # the store is bounded too
    with pytest.raises(ValueError, match="write=True needs a store"):
        SuccessReplay(2, ("state",), write=True)
