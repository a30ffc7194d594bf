"""Where GRPO's groups start: uniformly, or where the policy's outcomes are still mixed (learnability sampling).

A group of episodes from one (task, init state) carries a policy gradient only when its outcomes differ: a start
the policy always solves (or never does) costs a group's env steps and gives zero advantage everywhere. A policy
that SFT made good (78% held out on LIBERO-Object) succeeds at most starts, and most uniformly drawn groups are
all-success (~70% of them measured, ``docs/benchmarks.md``). Learnability sampling (Tzannetos et al., 2023,
"Proximal Curriculum"; Foster et al., 2025, "Learning to Reason at the Frontier of Learnability") draws starts in
proportion to ``p (1 - p)``, half the chance that two outcomes from the start differ, with ``p`` the start's
estimated success rate:

- a task's ``p`` is the posterior mean ``(successes + 1) / (outcomes + 2)`` of its last ``window`` outcomes
  (a task never tried reads 0.5, the largest weight, so every task is tried early);
- a stored init state's ``p`` shrinks its own outcomes towards its task's: ``(successes + prior * p_task) /
  (outcomes + prior)``; new layouts (``init_states="sampled"``) are never seen twice, so only tasks are weighed;
- weights are at least ``min_weight`` (the largest is 0.25), so a solved task is still drawn now and then, and one
  the policy starts to forget is noticed and drawn more again.

Measured on the LIBERO-Object pixel recipe (two seeds, ``docs/benchmarks.md``): the groups carrying a gradient rose
from 28% to 38-47%; greedy success on the held-out starts did not move (+0.3 points over SFT, -0.7 against uniform).

The task is drawn by its weight, then the init state within it by its own. ``"uniform"`` is
:func:`~gym_libero_vla.rollouts.draw_start` (the same draws for the same RNG). Both record every group's outcomes, and
:meth:`StartSampler.state_dict` puts them into the learner's checkpoint, so a resumed run weighs starts as before.

    sampler = StartSampler("learnability")
    start = sampler.draw(rng, task_ids, init_state_ids, num_init_states, init_states)
    sampler.record(start.task_id, start.init_state_id, [episode.success for episode in group])
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from gym_libero_vla.episode import SAMPLED_INIT_STATE
from gym_libero_vla.rollouts import Start, draw_start

START_SAMPLING = ("uniform", "learnability")


def learnability(success_rate: float) -> float:
    """``p (1 - p)``: the probability that two outcomes of a start with success rate ``p`` differ, halved."""
    return success_rate * (1.0 - success_rate)


class StartSampler:
    """Draws the (task, init state) of each group and keeps the recent outcomes of every task and stored start.

    Args:
        mode: "uniform" or "learnability" (see the module's docstring).
        window: outcomes kept per task and per start (the newest; older ones describe an older policy).
        min_weight: the least weight of a task or start (of at most 0.25).
        prior: how many outcomes a start's own estimate weighs its task's estimate as.
    """

    def __init__(self, mode: str = "uniform", window: int = 32, min_weight: float = 0.02, prior: float = 2.0):
        if mode not in START_SAMPLING:
            raise ValueError(f"unknown start_sampling {mode!r}: valid {START_SAMPLING}")
        if not (isinstance(window, int) and window >= 1):
            raise ValueError(f"window {window!r} must be an int >= 1")
        if not 0.0 < min_weight <= 0.25:
            raise ValueError(f"min_weight {min_weight!r} must be in (0, 0.25]: p (1 - p) is at most 0.25")
        if not prior > 0:
            raise ValueError(f"prior {prior!r} must be > 0")
        self.mode, self.window, self.min_weight, self.prior = mode, window, min_weight, prior
        self._tasks: dict[int, collections.deque] = {}
        self._starts: dict[tuple[int, int], collections.deque] = {}

    # ------------------------------------------------------------------ outcomes
    def record(self, task_id: int, init_state_id: int, successes: Iterable[bool]) -> None:
        """Add a group's outcomes (its online episodes) to its task's history and its stored start's."""
        outcomes = [bool(success) for success in successes]
        self._history(self._tasks, int(task_id)).extend(outcomes)
        if init_state_id != SAMPLED_INIT_STATE:
            self._history(self._starts, (int(task_id), int(init_state_id))).extend(outcomes)

    def _history(self, table: dict, key) -> collections.deque:
        if key not in table:
            table[key] = collections.deque(maxlen=self.window)
        return table[key]

    def task_success_rate(self, task_id: int) -> float:
        """The task's estimated success rate: ``(successes + 1) / (outcomes + 2)`` over its last ``window``."""
        outcomes = self._tasks.get(int(task_id), ())
        return (sum(outcomes) + 1.0) / (len(outcomes) + 2.0)

    def start_success_rate(self, task_id: int, init_state_id: int) -> float:
        """A stored start's estimated success rate, its own outcomes shrunk towards its task's estimate."""
        outcomes = self._starts.get((int(task_id), int(init_state_id)), ())
        return (sum(outcomes) + self.prior * self.task_success_rate(task_id)) / (len(outcomes) + self.prior)

    def _weight(self, success_rate: float) -> float:
        return max(learnability(success_rate), self.min_weight)

    def task_probabilities(self, task_ids: Sequence[int]) -> np.ndarray:
        """The probability of drawing each of ``task_ids`` next."""
        if self.mode == "uniform":
            return np.full(len(task_ids), 1.0 / len(task_ids))
        weights = np.array([self._weight(self.task_success_rate(task_id)) for task_id in task_ids])
        return weights / weights.sum()

    # ------------------------------------------------------------------ drawing
    def draw(
        self,
        rng: np.random.Generator,
        task_ids: Sequence[int],
        init_state_ids: Sequence[int] | None,
        num_init_states: Callable[[int], int],
        init_states: str = "suite",
    ) -> Start:
        """The next group's start: of ``task_ids``; a stored init state of ``init_state_ids`` (all of the task's,
        ``num_init_states(task)``, when None), or a new layout with ``init_states="sampled"``."""
        if self.mode == "uniform":
            return draw_start(rng, task_ids, init_state_ids, num_init_states, init_states)

        def state_weights(task_id: int, states: list[int]) -> list[float]:
            return [self._weight(self.start_success_rate(task_id, state)) for state in states]

        task_weights = self.task_probabilities(task_ids)
        return draw_start(rng, task_ids, init_state_ids, num_init_states, init_states, task_weights, state_weights)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The outcome histories, as JSON (a learner's checkpoint keeps them)."""
        starts = {f"{task_id}:{state}": outcomes for (task_id, state), outcomes in self._starts.items()}
        return {
            "tasks": {str(task_id): [int(o) for o in outcomes] for task_id, outcomes in self._tasks.items()},
            "starts": {key: [int(o) for o in outcomes] for key, outcomes in starts.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._tasks, self._starts = {}, {}
        for task_id, outcomes in state.get("tasks", {}).items():
            self._history(self._tasks, int(task_id)).extend(bool(o) for o in outcomes)
        for key, outcomes in state.get("starts", {}).items():
            task_id, init_state_id = key.split(":")
            self._history(self._starts, (int(task_id), int(init_state_id))).extend(bool(o) for o in outcomes)
