"""The LIBERO HDF5 reader: layout, orientation, statistics, no-op filtering and clear errors on bad files."""

from __future__ import annotations

import dataclasses
import json

import h5py
import numpy as np
import pytest

from gym_libero_vla.demos import (
    ActionStats,
    LiberoHDF5,
    action_stats,
    drop_noops,
    drop_stalls,
    load_episodes,
    noop_mask,
    stall_mask,
)
from gym_libero_vla.demos.generate import generator_config
from gym_libero_vla.demos.scripted_expert import EXPERT_VERSION


def test_official_layout_maps_to_env_observation_keys(tmp_path, write_official_file):
    path = write_official_file(tmp_path / "official.hdf5", [np.zeros((5, 7)), np.ones((3, 7)) * 0.5])
    with h5py.File(path, "r") as f:
        raw = {key: f["data/demo_0/obs"][key][()] for key in f["data/demo_0/obs"]}
    with LiberoHDF5(path, task_id=4) as demos:
        assert len(demos) == 2
        assert demos.instruction == "put the bowl away"
        assert demos.env_args["env_name"] == "Libero_Tabletop_Manipulation"
        episode = demos[0]
    assert len(episode) == 5
    assert episode.task_id == 4 and episode.init_state_id == -1
    np.testing.assert_allclose(
        episode.observations["state"], np.concatenate([raw["ee_pos"], raw["ee_ori"], raw["gripper_states"]], 1), rtol=1e-6
    )
    assert episode.observations["state"].dtype == np.float32
    # Official frames are raw OpenGL order: the reader rotates them 180 degrees, like the env.
    np.testing.assert_array_equal(episode.observations["agentview"], raw["agentview_rgb"][:, ::-1, ::-1])
    np.testing.assert_array_equal(episode.observations["wrist"], raw["eye_in_hand_rgb"][:, ::-1, ::-1])
    obs = episode.observation(2)
    assert set(obs) == {"instruction", "task_id", "state", "agentview", "wrist"}
    assert obs["instruction"] == "put the bowl away" and obs["task_id"] == 4 and obs["state"].shape == (8,)
    assert episode.success


def test_generated_file_reads_back_in_env_layout(spatial_demo_file):
    with LiberoHDF5(spatial_demo_file) as demos:
        assert len(demos) == 2
        episodes = list(demos)
    for episode in episodes:
        assert episode.task_id == 0 and episode.instruction.startswith("pick up the black bowl between")
        assert episode.actions.shape == (len(episode), 7) and episode.observations["state"].shape == (len(episode), 8)
        assert set(episode.observations) == {"instruction", "state"}  # state mode stores no images
        assert episode.success and episode.source == "offline"
        assert episode.rewards[-1] == 1.0 and not episode.rewards[:-1].any()  # the file's reward: 1 on the success step
    assert [e.init_state_id for e in episodes] == [0, 1]


def test_generator_config_says_how_a_file_was_made(spatial_demo_file, tmp_path, write_official_file):
    # Our files carry generate's config (the scripted expert's version among it); official ones carry none.
    with LiberoHDF5(spatial_demo_file, load_images=False) as demos:
        made = demos.generator_config
    assert made["expert_version"] == EXPERT_VERSION and made["suite"] == "libero_spatial"
    assert generator_config(spatial_demo_file) == made
    official = write_official_file(tmp_path / "official.hdf5", [np.zeros((5, 7))])
    assert LiberoHDF5(official).generator_config == {} and generator_config(official) == {}
    # Files made before the expert had versions were made by version 1.
    older = tmp_path / "older.hdf5"
    with h5py.File(spatial_demo_file, "r") as src, h5py.File(older, "w") as dst:
        src.copy("data", dst)
        config = json.loads(dst["data"].attrs["generator_config"])
        del config["expert_version"]
        dst["data"].attrs["generator_config"] = json.dumps(config)
    assert LiberoHDF5(older).generator_config.get("expert_version") is None
    assert generator_config(older)["expert_version"] == 1


def test_state_falls_back_to_robot_states(spatial_demo_file, tmp_path):
    """robot_states (gripper qpos, eef pos, eef quat) must give the same 8-number state as obs/ee_*."""
    copy = tmp_path / "no_obs.hdf5"
    with h5py.File(spatial_demo_file, "r") as src, h5py.File(copy, "w") as dst:
        src.copy("data", dst)
        for key in dst["data"]:
            del dst["data"][key]["obs"]
    with LiberoHDF5(spatial_demo_file) as demos:
        expected = demos[0].observations["state"]
    with LiberoHDF5(copy) as demos:
        np.testing.assert_allclose(demos[0].observations["state"], expected, atol=1e-5)


def test_noop_filter_matches_openvla_rule():
    actions = np.array(
        [
            [0, 0, 0, 0, 0, 0, -1],  # first action, no motion: no-op
            [0.1, 0, 0, 0, 0, 0, -1],  # motion: kept
            [0, 0, 0, 0, 0, 0, -1],  # no motion, same gripper: no-op
            [0, 0, 0, 0, 0, 0, 1],  # no motion but the gripper closes: kept
            [0, 0, 0, 0, 0, 0, 1],  # no-op
            [0, 0, 0, 0, 0, 5e-5, 1],  # below the 1e-4 threshold: no-op
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(noop_mask(actions), [True, False, True, False, True, True])


def _episode_with_states(actions, states):
    from gym_libero_vla.episode import Episode

    actions = np.asarray(actions, dtype=np.float32)
    return Episode(
        observations={"state": np.asarray(states, dtype=np.float32), "instruction": "open the drawer"},
        actions=actions, rewards=np.zeros(len(actions), np.float32), success=True, task_id=0,
    )  # fmt: skip


def test_stall_mask_finds_open_hand_steps_that_moved_nothing():
    down, still = [0, 0, -0.5, 0, 0, 0], [0, 0, 0, 0, 0, 0]
    flipped = np.pi - 1e-4  # a hand pointing down: its axis-angle flips sign between two nearly equal orientations
    pose = lambda z, yaw=0.0, finger=0.04, sign=1.0: [0.1, 0.2, z, 0.0, sign * flipped, yaw, finger, -finger]  # noqa: E731
    steps = [  # (action, state before it, whether it is a stall)
        (down + [-1], pose(1.20), False),  # moves 5 cm
        (down + [-1], pose(1.15), True),  # pressing: moved 0.5 mm
        (down + [-1], pose(1.1495, sign=-1.0), True),  # the same orientation written the other way round: a stall
        (down + [1], pose(1.1495), False),  # the gripper switches (nothing has moved yet): kept
        (down + [1], pose(1.1495), False),  # the closed hand holds still: not an open-hand stall
        (down + [-1], pose(1.1495), False),  # the gripper switches back
        (still + [-1], pose(1.1495), False),  # a no-op: noop_mask's, not a stall
        (down + [-1], pose(1.1495), False),  # turns by 0.02 rad: something moved
        (down + [-1], pose(1.1495, yaw=0.02), False),  # the last step: no state after it, kept
    ]
    episode = _episode_with_states([a for a, _, _ in steps], [s for _, s, _ in steps])
    expected = [stall for _, _, stall in steps]
    np.testing.assert_array_equal(stall_mask(episode), expected)
    kept = drop_stalls(episode)
    assert len(kept) == len(steps) - sum(expected)
    np.testing.assert_array_equal(kept.actions, episode.actions[~np.array(expected)])
    with pytest.raises(ValueError, match="one action per step"):
        stall_mask(_episode_with_states(np.zeros((3, 2, 7)), np.zeros((3, 8))))
    with pytest.raises(ValueError, match=r"a proprio state of 8 numbers a step, got \(3, 3\)"):
        stall_mask(_episode_with_states(np.zeros((3, 7)), np.zeros((3, 3))))
    without_state = dataclasses.replace(episode, observations={"instruction": "open the drawer"})
    with pytest.raises(ValueError, match=r"reads the proprio observation 'state'.*\['instruction'\]"):
        stall_mask(without_state)


def test_load_episodes_drops_noops_and_failed_demos(tmp_path, write_official_file):
    moving = np.tile([0.2, 0, 0, 0, 0, 0, -1.0], (4, 1))
    moving[1, :6] = 0.0  # a no-op in the middle
    failed = np.tile([0.2, 0, 0, 0, 0, 0, 1.0], (3, 1))
    path = write_official_file(tmp_path / "f.hdf5", [moving, failed], dones=[np.eye(4)[-1], np.zeros(3)])
    episodes = load_episodes(path)
    assert len(episodes) == 1
    assert len(episodes[0]) == 3
    assert episodes[0].observations["agentview"].shape[0] == 3
    assert len(load_episodes(path, filter_noops=False, drop_failed=False)) == 2
    assert len(drop_noops(load_episodes(path, filter_noops=False)[0])) == 3


def test_action_stats_values_and_json_roundtrip(tmp_path, write_official_file):
    actions = np.stack([np.linspace(-1, 1, 101)] * 7, axis=1)
    stats = ActionStats.from_actions(actions)
    np.testing.assert_allclose(stats.min, -1.0)
    np.testing.assert_allclose(stats.max, 1.0)
    np.testing.assert_allclose(stats.mean, 0.0, atol=1e-12)
    np.testing.assert_allclose(stats.q01, -0.98)
    np.testing.assert_allclose(stats.q99, 0.98)
    assert stats.num_transitions == 101
    stats.save(tmp_path / "stats.json")
    assert ActionStats.load(tmp_path / "stats.json") == stats
    assert set(json.loads((tmp_path / "stats.json").read_text())) >= {"min", "max", "mean", "std", "q01", "q99"}

    path = write_official_file(tmp_path / "f.hdf5", [np.full((2, 7), 0.25), np.full((2, 7), -0.25)])
    from_file = action_stats(load_episodes(path, filter_noops=False))
    np.testing.assert_allclose(from_file.std, 0.25)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.hdf5"):
        LiberoHDF5(tmp_path / "nowhere.hdf5")


def test_truncated_file_is_refused(tmp_path, write_official_file):
    path = write_official_file(tmp_path / "whole.hdf5", [np.zeros((5, 7))])
    data = path.read_bytes()
    truncated = tmp_path / "truncated.hdf5"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.hdf5.*(truncated|corrupt)"):
        LiberoHDF5(truncated)
    not_hdf5 = tmp_path / "notes.hdf5"
    not_hdf5.write_text("not an hdf5 file")
    with pytest.raises(ValueError, match="notes.hdf5.*not a readable HDF5"):
        LiberoHDF5(not_hdf5)


def test_hdf5_without_data_group_is_refused(tmp_path):
    path = tmp_path / "other.hdf5"
    with h5py.File(path, "w") as f:
        f.create_dataset("weights", data=np.zeros(3))
    with pytest.raises(ValueError, match="other.hdf5.*no 'data' group.*weights"):
        LiberoHDF5(path)


def test_wrong_action_dimension_is_refused(tmp_path, write_official_file):
    path = write_official_file(tmp_path / "six.hdf5", [np.zeros((5, 7)), np.zeros((5, 6))])
    with pytest.raises(ValueError, match=r"six.hdf5.*demo_1/actions has shape \(5, 6\).*\(T, 7\)"):
        LiberoHDF5(path)
