"""The one Episode type: validation, the views learners take of it, and dict demonstrations turned into it."""

from __future__ import annotations

import numpy as np
import pytest

from gym_libero_vla.demos import Episode as DemoEpisode
from gym_libero_vla.episode import Episode, as_episode
from gym_libero_vla.episode_store import Episode as StoreEpisode


def episode(**overrides) -> Episode:
    values = dict(
        observations={"instruction": "open the drawer", "state": np.arange(5 * 8, dtype=np.float32).reshape(5, 8)},
        actions=np.arange(4 * 7, dtype=np.float32).reshape(4, 7), rewards=[0, 0, 0, 1], success=True, task_id=2,
        init_state_id=7, log_probs=np.zeros((4, 7)),
    )  # fmt: skip
    values.update(overrides)
    return Episode(**values)


def test_one_class_under_every_old_name():
    assert DemoEpisode is StoreEpisode is Episode


def test_observation_select_and_with_observations():
    ep = episode()
    assert len(ep) == ep.num_steps == 4 and ep.instruction == "open the drawer" and ep.total_reward == 1.0
    first = ep.observation(1)
    assert first["instruction"] == "open the drawer" and first["task_id"] == 2
    np.testing.assert_array_equal(first["state"], np.arange(8, 16))
    kept = ep.select(np.array([True, False, True, True]))
    assert kept.num_steps == 3 and kept.observations["state"].shape == (3, 8)  # the final observation dropped
    np.testing.assert_array_equal(kept.actions, ep.actions[[0, 2, 3]])
    assert kept.rewards.tolist() == [0, 0, 1] and kept.log_probs.shape == (3, 7) and kept.success
    only = ep.with_observations(("instruction",))
    assert set(only.observations) == {"instruction"} and set(ep.observations) == {"instruction", "state"}
    with pytest.raises(ValueError, match="has no observation 'agentview', which the policy reads"):
        ep.with_observations(("agentview",))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(rewards=[0, 1]), r"rewards have shape \(2,\): expected \(4,\)"),
        (dict(source="expert"), r"unknown episode source 'expert': valid \('online', 'offline', 'relabelled'\)"),
        (dict(actions=np.zeros((0, 7)), rewards=[]), "an episode needs at least one step"),
        (dict(log_probs=np.zeros((3, 7))), "log_probs have shape"),
    ],
)
def test_bad_episodes_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        episode(**overrides)


def test_dicts_become_successful_offline_episodes():
    flat = as_episode({"instruction": "open the drawer", "state": np.zeros((3, 8)), "actions": np.zeros((3, 7)), "task_id": 4})
    assert flat.source == "offline" and flat.success and flat.rewards.tolist() == [0, 0, 1] and flat.task_id == 4
    assert set(flat.observations) == {"instruction", "state"}
    nested = as_episode({"observations": {"instruction": "x", "state": np.zeros((2, 8))}, "actions": np.ones((2, 7)),
                         "success": False, "init_state_id": 3})  # fmt: skip
    assert not nested.success and nested.rewards.tolist() == [0, 0] and nested.init_state_id == 3 and nested.task_id == -1
    ep = episode()
    assert as_episode(ep) is ep
    with pytest.raises(ValueError, match="needs 'actions'"):
        as_episode({"state": np.zeros((2, 8))})
    with pytest.raises(TypeError, match="an episode must be an Episode or a dict"):
        as_episode([1, 2])
