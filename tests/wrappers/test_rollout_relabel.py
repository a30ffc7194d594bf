"""RolloutRelabel turns failed real LIBERO-Goal rollouts into successes of the goals they reached; FailedGroupRescue
puts a demo into an all-fail GRPO group.

Goals are reached without a policy by editing the simulator mid-rollout: the middle drawer opens when its
slide joint is set to -0.15 m (task 0, "open the middle drawer of the cabinet"), the stove turns on when
its knob joint is set to 0.8 rad (task 7, "turn on the stove").
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from gym_libero_vla.episode_store import EpisodeStore
from gym_libero_vla.wrappers.language_embedding import LanguageEmbedding
from gym_libero_vla.wrappers.rollout_relabel import (
    FailedGroupRescue,
    RolloutRelabel,
    rescue_failed_group,
    same_start_first,
    scene_goals,
)
from gym_libero_vla.wrappers.trajectory_cache import TrajectoryCache

MAX_STEPS = 8
OPEN_MIDDLE_DRAWER, TURN_ON_STOVE, WINE_BOTTLE_ON_RACK = 0, 7, 9


@pytest.fixture(scope="module")
def goal_env():
    env = gym.make("LiberoGoal-v0", obs_mode="state", max_episode_steps=MAX_STEPS, max_cached_tasks=2)
    yield env
    env.close()


def open_middle_drawer(env):
    domain = env.unwrapped.libero_env.env
    domain.sim.data.set_joint_qpos("wooden_cabinet_1_middle_level", -0.15)
    domain.sim.forward()


def turn_on_stove(env):
    domain = env.unwrapped.libero_env.env
    domain.sim.data.set_joint_qpos("flat_stove_1_button", 0.8)
    domain.sim.forward()


def rollout(env, task_id, edits=None, init_state_id=0, seed=0, init_state=None):
    """Random actions until the episode ends; ``edits[k](env)`` edits the simulator before step ``k + 1``."""
    rng, edits = np.random.default_rng(seed), edits or {}
    options = (
        {"task_id": task_id, "init_state_id": init_state_id}
        if init_state is None
        else {"task_id": task_id, "init_state": init_state}
    )
    obs, info = env.reset(options=options)
    states, actions = [obs["state"]], []
    for step in range(MAX_STEPS):
        if step in edits:
            edits[step](env)
        action = rng.uniform(-0.3, 0.3, size=7).astype(np.float32)
        obs, _, terminated, truncated, info = env.step(action)
        states.append(obs["state"])
        actions.append(action)
        if terminated or truncated:
            return np.stack(states), np.stack(actions), terminated, truncated, info
    raise AssertionError("the episode did not end")


def test_scenes_follow_the_bddl_problems():
    assert [task_id for task_id, _ in scene_goals("libero_goal", WINE_BOTTLE_ON_RACK)] == list(range(9))
    assert dict(scene_goals("libero_goal", WINE_BOTTLE_ON_RACK))[OPEN_MIDDLE_DRAWER] == (
        ("open", "wooden_cabinet_1_middle_region"),
    )
    # Spatial tasks share objects and even the goal predicate, but not the layout the instruction refers to.
    assert scene_goals("libero_spatial", 0) == ()
    assert [task_id for task_id, _ in scene_goals("libero_90", 6)] == [7, 8, 9, 10]  # KITCHEN_SCENE1


def test_failed_rollout_is_relabelled_as_a_success_of_the_goal_it_reached(goal_env, tmp_path):
    env = RolloutRelabel(goal_env, store=tmp_path / "store", policy_version=3)
    states, actions, terminated, truncated, info = rollout(env, WINE_BOTTLE_ON_RACK, edits={3: open_middle_drawer})
    assert truncated and not terminated and not info["is_success"]
    (episode,) = info["relabelled_episodes"]
    task = goal_env.unwrapped.tasks[OPEN_MIDDLE_DRAWER]
    assert (episode.task_id, episode.source, episode.success, episode.init_state_id) == (
        OPEN_MIDDLE_DRAWER,
        "relabelled",
        True,
        -1,
    )
    assert episode.observations["instruction"] == task.instruction == "open the middle drawer of the cabinet"
    assert episode.num_steps == 4 and episode.policy_version == 3 and episode.log_probs is None
    np.testing.assert_array_equal(episode.rewards, [0, 0, 0, 1])
    np.testing.assert_array_equal(episode.actions, actions[:4])
    np.testing.assert_array_equal(episode.observations["state"], states[:5])
    np.testing.assert_array_equal(episode.observations["task_id"], np.full(5, OPEN_MIDDLE_DRAWER))
    assert info["relabel"]["goals_reached"] == 1 and info["relabel"]["episodes_relabelled"] == 1
    assert env.stats()["relabel/episodes_relabelled"] == 1 and env.stats()["relabel/failed_episodes"] == 1
    (stored,) = EpisodeStore(tmp_path / "store").sample(2)
    assert (stored.task_id, stored.source, stored.num_steps, stored.env_id) == (
        OPEN_MIDDLE_DRAWER,
        "relabelled",
        4,
        "LiberoGoal-v0",
    )
    env.close()


def test_several_goals_reached_emit_all_or_the_first(goal_env):
    edits = {1: open_middle_drawer, 4: turn_on_stove}
    env = RolloutRelabel(goal_env)
    *_, info = rollout(env, WINE_BOTTLE_ON_RACK, edits=edits)
    assert [(e.task_id, e.num_steps) for e in info["relabelled_episodes"]] == [(OPEN_MIDDLE_DRAWER, 2), (TURN_ON_STOVE, 5)]
    *_, info = rollout(RolloutRelabel(goal_env, multiple_goals="first"), WINE_BOTTLE_ON_RACK, edits=edits)
    assert [(e.task_id, e.num_steps) for e in info["relabelled_episodes"]] == [(OPEN_MIDDLE_DRAWER, 2)]
    assert info["relabel"]["goals_reached"] == 2 and info["relabel"]["episodes_relabelled"] == 1
    # Checking every 3 steps finds the drawer (opened before step 2) open at step 3 and stops the episode there.
    *_, info = rollout(
        RolloutRelabel(goal_env, check_every=3, target_task_ids=[OPEN_MIDDLE_DRAWER]), WINE_BOTTLE_ON_RACK, edits=edits
    )
    assert [(e.task_id, e.num_steps) for e in info["relabelled_episodes"]] == [(OPEN_MIDDLE_DRAWER, 3)]


def test_success_and_rollouts_that_reach_no_new_goal_emit_nothing(goal_env):
    env = RolloutRelabel(goal_env)
    # Task 7 succeeds after also opening the drawer: a success teaches task 7, nothing is relabelled.
    _, _, terminated, _, info = rollout(env, TURN_ON_STOVE, edits={1: open_middle_drawer, 2: turn_on_stove})
    assert terminated and info["is_success"] and info["relabelled_episodes"] == []
    _, _, _, truncated, info = rollout(env, WINE_BOTTLE_ON_RACK)
    assert truncated and info["relabelled_episodes"] == [] and info["relabel"]["goals_reached"] == 0
    # A goal that already holds at reset is not "reached" by the rollout.
    goal_env.reset(options={"task_id": WINE_BOTTLE_ON_RACK, "init_state_id": 0})
    open_middle_drawer(goal_env)
    drawer_open = goal_env.unwrapped.libero_env.get_sim_state().copy()
    *_, info = rollout(env, WINE_BOTTLE_ON_RACK, init_state=drawer_open)
    assert info["relabelled_episodes"] == [] and info["relabel"]["goals_reached"] == 0
    assert env.num_episodes == 3 and env.num_failed_episodes == 2 and env.num_episodes_relabelled == 0


def test_a_goal_reached_inside_a_chunk_is_caught_and_the_chunk_cut_there():
    """Chunks of 3 actions, 8 env steps (chunks 3, 3, 2). The drawer is opened after the 4th action and closed again
    after the 5th, inside the second chunk: a check at chunk ends only would never see it open."""
    base = gym.make("LiberoGoal-v0", obs_mode="state", action_chunk=3, max_env_steps=MAX_STEPS, max_cached_tasks=1)
    env = RolloutRelabel(base, target_task_ids=[OPEN_MIDDLE_DRAWER])
    counter = {"actions": 0}

    def edit_mid_chunk():
        counter["actions"] += 1
        domain = base.unwrapped.libero_env.env
        if counter["actions"] in (4, 5):  # open after action 4, closed again after action 5
            domain.sim.data.set_joint_qpos("wooden_cabinet_1_middle_level", -0.15 if counter["actions"] == 4 else 0.0)
            domain.sim.forward()

    base.unwrapped.action_hooks.append(edit_mid_chunk)  # before RolloutRelabel's own check, which reset adds
    try:
        obs, _ = env.reset(options={"task_id": WINE_BOTTLE_ON_RACK, "init_state_id": 0})
        rng, states, chunks, done = np.random.default_rng(0), [obs["state"]], [], False
        while not done:
            chunks.append(rng.uniform(-0.3, 0.3, (3, 7)).astype(np.float32))
            obs, _, terminated, truncated, info = env.step(chunks[-1])
            states.append(obs["state"])
            done = terminated or truncated
        assert [len(chunks), counter["actions"]] == [3, MAX_STEPS]
        (episode,) = info["relabelled_episodes"]
        assert episode.task_id == OPEN_MIDDLE_DRAWER and episode.actions.shape == (2, 3, 7)
        assert episode.executed.tolist() == [3, 1] and episode.num_env_steps == 4  # the goal held after action 4
        np.testing.assert_array_equal(episode.actions, np.stack(chunks[:2]))
        np.testing.assert_array_equal(episode.rewards, [0, 1])
        # No frame exists after action 4 (the env observes at chunk ends): the observations before each chunk.
        np.testing.assert_array_equal(episode.observations["state"], np.stack(states[:2]))
    finally:
        base.unwrapped.action_hooks.remove(edit_mid_chunk)
        env.close()


@pytest.fixture(scope="module")
def stove_episodes(goal_env, tmp_path_factory):
    """Three failed rollouts of task 7 from init state 0, one success (online), and one demo (offline)."""
    root = tmp_path_factory.mktemp("stores")
    online = TrajectoryCache(goal_env, EpisodeStore(root / "online"))
    for seed in range(3):
        rollout(online, TURN_ON_STOVE, seed=seed)
    rollout(online, TURN_ON_STOVE, edits={2: turn_on_stove}, seed=3)
    rollout(TrajectoryCache(goal_env, EpisodeStore(root / "demos"), source="offline"), TURN_ON_STOVE, edits={0: turn_on_stove})
    rollouts = online.store.sample(4)
    failed = sorted((e for e in rollouts if not e.success), key=lambda e: e.episode_id)
    (success,) = [e for e in rollouts if e.success]
    return failed, success, root


def test_all_fail_group_gets_a_demo_and_other_groups_are_untouched(stove_episodes):
    failed, success, root = stove_episodes
    rescue = FailedGroupRescue(EpisodeStore(root / "demos"), seed=0)
    group, rescued = rescue(failed)
    assert rescued and len(group) == 3
    assert [e.episode_id for e in group[:2]] == [e.episode_id for e in failed[:2]]
    assert (group[2].source, group[2].success, group[2].task_id) == ("offline", True, TURN_ON_STOVE)
    mixed = failed[:2] + [success]
    group, rescued = rescue(mixed)
    assert not rescued and group == mixed
    group, rescued = FailedGroupRescue(EpisodeStore(root / "demos"), mode="append")(failed)
    assert rescued and len(group) == 4 and group[3].source == "offline"
    # The online store holds a success of the task, but no offline demo: nothing to substitute.
    no_demo = FailedGroupRescue(EpisodeStore(root / "online"))
    group, rescued = no_demo(failed)
    assert not rescued and group == failed
    assert no_demo.stats()["relabel/groups_without_demo"] == 1 and no_demo.num_rescued == 0
    assert rescue.stats() == {
        "relabel/groups": 2,
        "relabel/groups_all_failed": 1,
        "relabel/groups_rescued": 1,
        "relabel/groups_without_demo": 0,
    }


def test_a_demo_from_the_groups_stored_start_is_preferred_and_other_starts_match_none():
    demos = [{"name": name, "init_state_id": start} for name, start in (("a", 3), ("b", 7), ("c", 3), ("d", -2))]
    start_of = lambda record: record["init_state_id"]  # noqa: E731
    assert [d["name"] for d in same_start_first(demos, 3, start_of)] == ["a", "c"]
    assert [d["name"] for d in same_start_first(demos, 5, start_of)] == ["a", "b", "c", "d"]  # none from 5: all
    # An unknown start (-1) and a sampled layout (-2) are each their own: a -2 demo is no closer to a -2 group.
    assert [d["name"] for d in same_start_first(demos, -2, start_of)] == ["a", "b", "c", "d"]
    assert [d["name"] for d in same_start_first(demos, -1, start_of)] == ["a", "b", "c", "d"]


def test_bad_configuration_names_the_valid_choices(goal_env, stove_episodes):
    failed, success, root = stove_episodes
    with pytest.raises(ValueError, match=r"unknown multiple_goals 'last': valid \('all', 'first'\)"):
        RolloutRelabel(goal_env, multiple_goals="last")
    with pytest.raises(ValueError, match=r"check_every 0 must be a positive int"):
        RolloutRelabel(goal_env, check_every=0)
    with pytest.raises(ValueError, match=r"unknown target task id 10: valid 0..9"):
        RolloutRelabel(goal_env, target_task_ids=[1, 10])
    with pytest.raises(ValueError, match=r"unknown observation key\(s\) \['wrist'\]"):
        RolloutRelabel(goal_env, observation_keys=["wrist"])
    with pytest.raises(ValueError, match="wrap RolloutRelabel inside wrappers that embed the instruction"):
        RolloutRelabel(LanguageEmbedding(goal_env, encoder="hashed"))
    with pytest.raises(ValueError, match=r"unknown rescue mode 'swap': valid \('replace', 'append'\)"):
        FailedGroupRescue(EpisodeStore(root / "demos"), mode="swap")
    with pytest.raises(ValueError, match=r"num_demos 0 must be a positive int"):
        FailedGroupRescue(EpisodeStore(root / "demos"), num_demos=0)
    with pytest.raises(ValueError, match=r"an empty group has nothing to rescue"):
        FailedGroupRescue(EpisodeStore(root / "demos"))([])
    with pytest.raises(ValueError, match=r"3 demos would replace the whole group of 3: at most 2"):
        rescue_failed_group(failed, [success] * 3)
    with pytest.raises(ValueError, match=r"one \(task_id, init_state_id\)"):
        other = EpisodeStore(root / "online").sample(1)[0]
        other.init_state_id = 5
        rescue_failed_group(failed + [other], [success])
