"""Where GRPO's groups start: uniform draws are draw_start's; learnability draws favour starts with mixed outcomes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gym_libero_vla.episode import SAMPLED_INIT_STATE
from gym_libero_vla.rollouts import draw_start
from gym_libero_vla.start_sampler import StartSampler, learnability


def fifty(task_id: int) -> int:
    return 50


def draw_many(sampler, count, init_state_ids=None, init_states="suite", seed=0):
    rng = np.random.default_rng(seed)
    return [sampler.draw(rng, (0, 1, 2), init_state_ids, fifty, init_states) for _ in range(count)]


def test_uniform_draws_are_draw_start_and_ignore_outcomes():
    sampler = StartSampler("uniform")
    sampler.record(0, 3, [True] * 8)
    rng = np.random.default_rng(7)
    expected = [draw_start(rng, (0, 1, 2), (3, 4), fifty) for _ in range(30)]
    assert draw_many(sampler, 30, (3, 4), seed=7) == expected
    assert np.allclose(sampler.task_probabilities((0, 1, 2)), 1 / 3)


def test_learnability_favours_tasks_and_starts_with_mixed_outcomes():
    sampler = StartSampler("learnability")
    assert np.allclose(sampler.task_probabilities((0, 1, 2)), 1 / 3)  # nothing seen: every task alike
    for _ in range(8):
        sampler.record(0, 0, [True, True, True, True])  # solved
        sampler.record(1, 5, [True, False, True, False])  # half
        sampler.record(2, 0, [False, False, False, False])  # never
    assert sampler.task_success_rate(1) == pytest.approx(0.5)
    assert sampler.task_success_rate(0) == pytest.approx(33 / 34)  # the window keeps the newest 32 outcomes
    counts = np.bincount([start.task_id for start in draw_many(sampler, 2000)], minlength=3)
    assert counts[1] > 0.75 * 2000  # the task whose groups carry signal
    assert counts[0] > 0 and counts[2] > 0  # solved and unsolved tasks keep min_weight: they are still checked
    weights = np.array([learnability(33 / 34), 0.25, learnability(1 / 34)])
    assert np.allclose(sampler.task_probabilities((0, 1, 2)), weights / weights.sum())
    assert np.allclose(counts / 2000, weights / weights.sum(), atol=0.02)
    # Within a task, a start with mixed outcomes outweighs starts known only through their (solved) task.
    sampler.record(0, 9, [True, False, False, True])
    assert sampler.start_success_rate(0, 9) == pytest.approx((2 + 2 * sampler.task_success_rate(0)) / 6)
    of_task0 = [start.init_state_id for start in draw_many(sampler, 3000, init_state_ids=(7, 8, 9)) if start.task_id == 0]
    assert of_task0.count(9) > 0.6 * len(of_task0) and {7, 8} <= set(of_task0)


def test_new_layouts_are_weighed_by_task_and_never_repeat():
    sampler = StartSampler("learnability")
    sampler.record(1, SAMPLED_INIT_STATE, [True, False])
    assert sampler.state_dict()["starts"] == {}  # a new layout is never drawn again: only its task learns
    starts = draw_many(sampler, 50, init_states="sampled")
    assert all(start.init_state_id == SAMPLED_INIT_STATE for start in starts)
    assert len({start.layout_seed for start in starts}) == 50


def test_outcomes_survive_a_checkpoint_as_json():
    sampler = StartSampler("learnability", window=4)
    sampler.record(2, 11, [True, False, True, True, False])
    state = json.loads(json.dumps(sampler.state_dict()))
    assert state == {"tasks": {"2": [0, 1, 1, 0]}, "starts": {"2:11": [0, 1, 1, 0]}}  # the newest 4
    restored = StartSampler("learnability", window=4)
    restored.load_state_dict(state)
    assert draw_many(restored, 20, (10, 11)) == draw_many(sampler, 20, (10, 11))


def test_learnability_is_p_times_one_minus_p():
    assert learnability(0.5) == 0.25 and learnability(0.0) == learnability(1.0) == 0.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="hardest"), r"unknown start_sampling 'hardest': valid \('uniform', 'learnability'\)"),
        (dict(window=0), "window 0 must be an int >= 1"),
        (dict(min_weight=0.5), r"min_weight 0.5 must be in \(0, 0.25\]"),
        (dict(prior=0), "prior 0 must be > 0"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StartSampler(**kwargs)
    with pytest.raises(ValueError, match="unknown init_states 'random'"):
        StartSampler("learnability").draw(np.random.default_rng(0), (0,), None, fifty, "random")
