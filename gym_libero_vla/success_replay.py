"""The policy's own successes, kept for learning from: GRPO's success replay and iRe-VLA's ``D_RL``.

Sparse binary rewards make every successful episode precious. GRPO replays the newest successes beside the
demonstrations in its offline term (importance-weighted by their behaviour log-probs); iRe-VLA trains its
supervised stage on demonstrations plus the successes its RL stages found. Both keep "the newest ``max_episodes``
successful episodes of some sources" and refill it from an :class:`~gym_libero_vla.episode_store.EpisodeStore`
when a run resumes, so this is one component:

    replay = SuccessReplay(500, policy.observation_keys, store="runs/cache")   # refilled from earlier runs
    replay.add(episodes)       # keeps the successful ones, newest last; returns them
    replay.episodes            # what the learner trains on
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Sequence

from gym_libero_vla.episode import Episode
from gym_libero_vla.episode_store import EpisodeStore


class SuccessReplay:
    """The newest ``max_episodes`` successful episodes whose ``source`` is one of ``sources``.

    Args:
        max_episodes: how many to keep (0: none; ``add`` still reports the successes).
        observation_keys: what the learner's policy reads; stored episodes without them are not refilled.
        sources: episode sources that count ("online" rollouts, "relabelled" hindsight successes).
        store: an :class:`EpisodeStore` (or its directory) to refill from on construction.
        write: also append every success ``add`` keeps to ``store`` (a store of its own; a learner whose cache
            already receives every episode leaves this off).
    """

    def __init__(
        self,
        max_episodes: int,
        observation_keys: Sequence[str],
        sources: Sequence[str] = ("online",),
        store: EpisodeStore | str | os.PathLike | None = None,
        write: bool = False,
    ):
        if max_episodes < 0:
            raise ValueError(f"max_episodes {max_episodes!r} must be >= 0")
        if write and store is None:
            raise ValueError("write=True needs a store to write to")
        self.max_episodes, self.observation_keys, self.sources = int(max_episodes), tuple(observation_keys), tuple(sources)
        if isinstance(store, (str, os.PathLike)):
            store = EpisodeStore(store, max_episodes=max_episodes or None)
        self.store, self.write = store, write
        self.episodes: list[Episode] = []
        if store is not None and max_episodes:
            self._refill()

    def _refill(self) -> None:
        """The newest successes earlier runs wrote into the store (those that hold what the policy reads)."""
        episode_ids = self.store.episode_ids(source=self.sources, success=True)[-self.max_episodes :]
        for episode_id in episode_ids:
            try:
                episode = self.store.load(episode_id)
            except KeyError:  # evicted or corrupt since the query
                continue
            if set(self.observation_keys) <= set(episode.observations):
                self.episodes.append(episode)

    def add(self, episodes: Iterable[Episode]) -> list[Episode]:
        """Keep the successful episodes of the counted sources (newest last, the oldest dropped past
        ``max_episodes``); returns them (none when ``max_episodes`` is 0)."""
        successes = [episode for episode in episodes if episode.success and episode.source in self.sources]
        if self.max_episodes == 0 or not successes:
            return []
        self.episodes = (self.episodes + successes)[-self.max_episodes :]
        if self.write:
            for episode in successes:
                self.store.append(copy.copy(episode))  # the store sets episode_id on its own copy
        return successes
