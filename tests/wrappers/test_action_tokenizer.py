"""ActionBins math and the ActionTokenizer wrapper on the real LIBERO simulator."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.utils.env_checker import check_env

from gym_libero_vla.wrappers.action_tokenizer import BINS_FILENAME, ActionBins, ActionTokenizer

# Bounds of a LIBERO-like dataset: translations and rotations use only part of [-1, 1].
Q01 = np.array([-0.7, -0.8, -0.9, -0.1, -0.15, -0.2, -1.0])
Q99 = np.array([0.75, 0.85, 0.9, 0.12, 0.17, 0.25, 1.0])


@pytest.fixture
def bins() -> ActionBins:
    return ActionBins.from_statistics({"q01": Q01, "q99": Q99})


def test_round_trip_error_at_most_half_a_bin(bins):
    rng = np.random.default_rng(0)
    actions = rng.uniform(bins.low, bins.high, size=(10_000, 7))
    tokens = bins.encode(actions)
    assert tokens.dtype == np.int64 and tokens.shape == (10_000, 7)
    assert tokens.min() >= 0 and tokens.max() <= 255
    decoded = bins.decode(tokens)
    assert decoded.dtype == np.float32
    error = np.abs(decoded - actions)
    assert np.all(error <= bins.bin_width / 2 + 1e-6)
    # The bound is tight: some actions sit close to a bin edge.
    assert np.any(error > 0.45 * bins.bin_width)
    # Bin centres decode to themselves.
    centre_tokens = np.tile(np.arange(256)[:, None], (1, 7))
    np.testing.assert_array_equal(bins.encode(bins.decode(centre_tokens)), centre_tokens)


def test_uniform_bins_between_quantiles_and_gripper_on_full_range(bins):
    np.testing.assert_allclose(bins.bin_width[:6], (Q99[:6] - Q01[:6]) / 256)
    assert bins.low[6] == -1.0 and bins.high[6] == 1.0
    np.testing.assert_allclose(bins.bin_centers[0], Q01 + bins.bin_width / 2)
    np.testing.assert_allclose(bins.bin_centers[-1], Q99 - bins.bin_width / 2)
    # Gripper: fully open and fully closed land in the first and last bins.
    assert bins.encode(np.array([0, 0, 0, 0, 0, 0, -1.0]))[6] == 0
    assert bins.encode(np.array([0, 0, 0, 0, 0, 0, 1.0]))[6] == 255


def test_out_of_range_actions_clip_to_edge_bins(bins):
    tokens = bins.encode(np.stack([np.full(7, -5.0), np.full(7, 5.0)]))
    np.testing.assert_array_equal(tokens[0], np.zeros(7))
    np.testing.assert_array_equal(tokens[1], np.full(7, 255))
    decoded = bins.decode(tokens)
    assert np.all(decoded[0] >= bins.low) and np.all(decoded[1] <= bins.high)


def test_vocab_ids_are_the_last_ids_of_the_vocabulary_and_round_trip(bins):
    vocab_size = 32_000  # Llama 2's vocabulary, as OpenVLA
    tokens = np.random.default_rng(1).integers(0, 256, size=(5, 7))
    ids = bins.to_vocab_ids(tokens, vocab_size)
    assert ids.min() >= vocab_size - 256 and ids.max() <= vocab_size - 1
    np.testing.assert_array_equal(bins.from_vocab_ids(ids, vocab_size), tokens)
    # OpenVLA's order: bin 0 -> the last id, bin 255 -> the first action id.
    assert bins.to_vocab_ids(np.array([0]), vocab_size)[0] == vocab_size - 1
    assert bins.to_vocab_ids(np.array([255]), vocab_size)[0] == vocab_size - 256
    with pytest.raises(ValueError, match="31744..31999"):
        bins.from_vocab_ids(np.array([100]), vocab_size)


def test_save_load_round_trip(bins, tmp_path):
    path = bins.save(tmp_path / "checkpoint")
    assert path.endswith(BINS_FILENAME)
    loaded = ActionBins.load(tmp_path / "checkpoint")
    assert loaded == bins
    actions = np.random.default_rng(2).uniform(-1, 1, size=(100, 7))
    np.testing.assert_array_equal(loaded.encode(actions), bins.encode(actions))
    with open(path) as file:
        content = json.load(file)
    content["format_version"] = 99
    with open(path, "w") as file:
        json.dump(content, file)
    with pytest.raises(ValueError, match="format_version 99"):
        ActionBins.load(tmp_path / "checkpoint")


def test_statistics_as_object_with_attributes():
    @dataclass
    class Stats:  # shaped like the demo reader's ActionStats
        q01: np.ndarray
        q99: np.ndarray

    assert ActionBins.from_statistics(Stats(Q01, Q99)) == ActionBins.from_statistics({"q01": Q01, "q99": Q99})


def test_bad_statistics_raise_clear_errors():
    bad_q01 = Q01.copy()
    bad_q01[2] = Q99[2]
    with pytest.raises(ValueError, match="action dim 2"):
        ActionBins.from_statistics({"q01": bad_q01, "q99": Q99})
    with pytest.raises(ValueError, match="same length"):
        ActionBins.from_statistics({"q01": Q01[:6], "q99": Q99})
    with pytest.raises(ValueError, match="'q99'"):
        ActionBins.from_statistics({"q01": Q01})
    with pytest.raises(ValueError, match="finite"):
        ActionBins(np.full(7, np.nan), Q99)
    with pytest.raises(ValueError, match="0..255"):
        ActionBins.from_statistics({"q01": Q01, "q99": Q99}).decode(np.full(7, 256))


def test_wrapper_rejects_statistics_of_the_wrong_dimension(spatial_env):
    with pytest.raises(ValueError, match="6 dimensions.*has 7"):
        ActionTokenizer(spatial_env, {"q01": Q01[:6], "q99": Q99[:6]})


def test_wrapper_steps_the_real_env_with_token_actions(spatial_env):
    # Bounds from actions collected here: random exploration actions, as a dataset's quantiles.
    rng = np.random.default_rng(3)
    collected = np.clip(rng.normal(0.0, 0.3, size=(2_000, 7)), -1, 1)
    statistics = {"q01": np.quantile(collected, 0.01, axis=0), "q99": np.quantile(collected, 0.99, axis=0)}
    env = ActionTokenizer(spatial_env, statistics)
    assert env.action_space == spaces.MultiDiscrete([256] * 7)
    env.action_space.seed(0)
    obs, info = env.reset(options={"task_id": 0, "init_state_id": 0})
    start = obs["state"][:3].copy()
    # Bin 255 of dim 0 decodes to a large +x command: the end effector moves along +x.
    tokens = np.array([255, 128, 128, 128, 128, 128, 0])
    np.testing.assert_allclose(env.action(tokens)[0], statistics["q99"][0] - env.bins.bin_width[0] / 2, rtol=1e-6)
    for _ in range(5):
        obs, reward, terminated, truncated, info = env.step(tokens)
    assert obs["state"][0] > start[0] + 0.01
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert spatial_env.observation_space.contains(obs)
    assert isinstance(reward, float) and not truncated
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(6, dtype=np.int64))


def test_wrapper_accepts_saved_bins(spatial_env, tmp_path):
    bins = ActionBins.from_statistics({"q01": Q01, "q99": Q99})
    bins.save(tmp_path)
    env = ActionTokenizer(spatial_env, ActionBins.load(tmp_path))
    assert env.bins == bins
    assert isinstance(env.unwrapped, gym.Env)


def test_wrapped_env_passes_check_env(spatial_env):
    env = ActionTokenizer(spatial_env.unwrapped, {"q01": Q01, "q99": Q99})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env, skip_render_check=True)
    assert [str(w.message) for w in caught if "different from the unwrapped" not in str(w.message)] == []


def test_a_chunk_is_k_times_7_tokens_action_by_action(chunked_env):
    env = ActionTokenizer(chunked_env, {"q01": Q01, "q99": Q99})
    assert env.action_space == spaces.MultiDiscrete([256] * 14)
    tokens = np.arange(14) * 10
    np.testing.assert_array_equal(env.action(tokens), env.bins.decode(tokens.reshape(2, 7)))
    env.reset(options={"task_id": 0, "init_state_id": 0})
    *_, info = env.step(tokens)
    assert info["executed_actions"] == 2
    with pytest.raises(ValueError, match=r"token action has shape \(7,\): expected \(14,\)"):
        env.step(tokens[:7])
