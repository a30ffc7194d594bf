"""Discrete action tokens, OpenVLA's scheme: 256 uniform bins per action dimension.

OpenVLA (Kim et al., 2024) turns a continuous robot action into 7 tokens: each dimension is clipped to
the 1st..99th percentile of the training actions (q01, q99, robust to outlier demos), split into 256
uniform bins, and each bin is given one of the 256 *last* token ids of the language model's vocabulary,
so an LLM predicts actions as text. The gripper dimension is already in [-1, 1] (open / close) and is
binned over that range instead of its statistics.

:class:`ActionBins` holds the math (encode, decode to bin centres, token <-> vocabulary id) and needs no
env; :class:`ActionTokenizer` is the Gymnasium wrapper whose action space becomes
``MultiDiscrete([256] * 7)``. The bins are saved next to a checkpoint as ``action_bins.json``, so a policy
trained on them decodes its tokens with exactly the same bounds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

NUM_BINS = 256
GRIPPER_RANGE = (-1.0, 1.0)
BINS_FILENAME = "action_bins.json"
BINS_FORMAT_VERSION = 1


def _statistic(statistics: Any, name: str) -> np.ndarray:
    """``statistics[name]`` for a mapping, ``statistics.name`` for any other object (e.g. a dataclass)."""
    if isinstance(statistics, Mapping):
        if name not in statistics:
            raise ValueError(f"action statistics have no {name!r}: got keys {sorted(statistics)}")
        value = statistics[name]
    elif hasattr(statistics, name):
        value = getattr(statistics, name)
    else:
        raise ValueError(f"action statistics {type(statistics).__name__} have no attribute {name!r}")
    return np.asarray(value, dtype=np.float64)


class ActionBins:
    """Uniform bins between per-dimension bounds ``low`` and ``high``: continuous actions <-> integer tokens.

    Token ``k`` of dimension ``d`` stands for the interval ``[low + k w, low + (k + 1) w)`` with bin width
    ``w = (high - low) / num_bins`` and decodes to its centre, so a round trip moves an in-range action by
    at most ``w / 2``; actions outside ``[low, high]`` are clipped to the first or last bin.
    """

    def __init__(self, low, high, num_bins: int = NUM_BINS):
        low = np.asarray(low, dtype=np.float64)
        high = np.asarray(high, dtype=np.float64)
        if not (isinstance(num_bins, (int, np.integer)) and num_bins >= 2):
            raise ValueError(f"num_bins {num_bins!r} must be an int >= 2")
        if low.ndim != 1 or low.shape != high.shape:
            raise ValueError(f"low and high must be 1-D of the same length: got shapes {low.shape} and {high.shape}")
        if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
            raise ValueError(f"bounds must be finite: low {low.tolist()}, high {high.tolist()}")
        bad = np.flatnonzero(low >= high)
        if bad.size:
            d = int(bad[0])
            raise ValueError(f"action dim {d}: lower bound {low[d]} must be below upper bound {high[d]} (q01 < q99)")
        self.low, self.high, self.num_bins = low, high, int(num_bins)

    @classmethod
    def from_statistics(cls, statistics: Any, num_bins: int = NUM_BINS, gripper_dim: int | None = -1) -> ActionBins:
        """Bins from dataset statistics with ``q01`` and ``q99`` (a dict, or any object with those attributes).

        ``gripper_dim`` (default: the last dimension, as in LIBERO) is binned over [-1, 1] whatever its
        statistics say; ``None`` bins every dimension between its quantiles.
        """
        q01, q99 = _statistic(statistics, "q01"), _statistic(statistics, "q99")
        if q01.ndim != 1 or q01.shape != q99.shape:
            raise ValueError(f"q01 and q99 must be 1-D of the same length: got shapes {q01.shape} and {q99.shape}")
        low, high = q01.copy(), q99.copy()
        if gripper_dim is not None:
            if not -len(low) <= gripper_dim < len(low):
                raise ValueError(
                    f"gripper_dim {gripper_dim} out of range for {len(low)}-dim actions: valid -{len(low)}..{len(low) - 1}"
                )
            low[gripper_dim], high[gripper_dim] = GRIPPER_RANGE
        return cls(low, high, num_bins)

    @property
    def action_dim(self) -> int:
        return len(self.low)

    @property
    def bin_width(self) -> np.ndarray:
        return (self.high - self.low) / self.num_bins

    @property
    def bin_centers(self) -> np.ndarray:
        """``(num_bins, action_dim)`` array: the action each token decodes to."""
        return self.low + (np.arange(self.num_bins)[:, None] + 0.5) * self.bin_width

    def encode(self, actions) -> np.ndarray:
        """``(..., action_dim)`` continuous actions -> int64 tokens in ``[0, num_bins)``, clipping outliers."""
        actions = np.asarray(actions, dtype=np.float64)
        self._check_last_dim(actions, "actions")
        tokens = np.floor((actions - self.low) / self.bin_width)
        return np.clip(tokens, 0, self.num_bins - 1).astype(np.int64)

    def decode(self, tokens) -> np.ndarray:
        """``(..., action_dim)`` tokens -> float32 bin centres."""
        tokens = np.asarray(tokens)
        self._check_last_dim(tokens, "tokens")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be integers: got dtype {tokens.dtype}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.num_bins):
            raise ValueError(f"tokens must lie in 0..{self.num_bins - 1}: got min {tokens.min()}, max {tokens.max()}")
        return (self.low + (tokens + 0.5) * self.bin_width).astype(np.float32)

    def to_vocab_ids(self, tokens, vocab_size: int) -> np.ndarray:
        """Tokens -> ids among the last ``num_bins`` ids of an LLM vocabulary, in OpenVLA's order.

        OpenVLA maps bin ``k`` to ``vocab_size - 1 - k`` (the top bin gets the lowest of those ids); keeping
        its order lets a pretrained OpenVLA head keep the meaning of its action tokens.
        """
        if vocab_size < self.num_bins:
            raise ValueError(f"vocab_size {vocab_size} is smaller than num_bins {self.num_bins}")
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.num_bins):
            raise ValueError(f"tokens must lie in 0..{self.num_bins - 1}: got min {tokens.min()}, max {tokens.max()}")
        return vocab_size - 1 - tokens

    def from_vocab_ids(self, vocab_ids, vocab_size: int) -> np.ndarray:
        """Inverse of :meth:`to_vocab_ids`; ids outside the action range raise ``ValueError``."""
        tokens = vocab_size - 1 - np.asarray(vocab_ids, dtype=np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.num_bins):
            raise ValueError(
                f"vocab ids must lie in {vocab_size - self.num_bins}..{vocab_size - 1} (the action tokens of a "
                f"{vocab_size}-token vocabulary): got min {np.min(vocab_ids)}, max {np.max(vocab_ids)}"
            )
        return tokens

    def save(self, directory: str | os.PathLike) -> str:
        """Write ``directory/action_bins.json`` (created if needed); returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, BINS_FILENAME)
        content = {
            "format_version": BINS_FORMAT_VERSION,
            "num_bins": self.num_bins,
            "low": self.low.tolist(),  # Python floats print with repr precision: the round trip is exact
            "high": self.high.tolist(),
        }
        tmp_path = f"{path}.tmp-{os.getpid()}"
        with open(tmp_path, "w") as file:
            json.dump(content, file, indent=2)
        os.replace(tmp_path, path)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ActionBins:
        """Read the bins :meth:`save` wrote into ``directory``."""
        path = os.path.join(directory, BINS_FILENAME)
        with open(path) as file:
            content = json.load(file)
        if content.get("format_version") != BINS_FORMAT_VERSION:
            raise ValueError(
                f"{path} has format_version {content.get('format_version')!r}: this version reads {BINS_FORMAT_VERSION}"
            )
        return cls(content["low"], content["high"], content["num_bins"])

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, ActionBins)
            and self.num_bins == other.num_bins
            and np.array_equal(self.low, other.low)
            and np.array_equal(self.high, other.high)
        )

    def __repr__(self) -> str:
        return f"ActionBins(low={self.low.tolist()}, high={self.high.tolist()}, num_bins={self.num_bins})"

    def _check_last_dim(self, array: np.ndarray, name: str) -> None:
        if array.ndim == 0 or array.shape[-1] != self.action_dim:
            raise ValueError(f"{name} have shape {array.shape}: the last dimension must be action_dim {self.action_dim}")


class ActionTokenizer(gym.ActionWrapper, gym.utils.RecordConstructorArgs):
    """Makes the action space ``MultiDiscrete([num_bins] * action_dim)``: the env takes tokens, steps bin centres.
    On a chunked env (``action_chunk=k``, action space ``(k, action_dim)``) the tokens of a chunk are ``k *
    action_dim`` in a row, action by action, as a chunking policy decodes them.

    Args:
        env: an env with a ``Box`` action space of shape ``(action_dim,)`` or ``(k, action_dim)``.
        statistics: dataset action statistics with ``q01`` and ``q99`` (a dict, or any object with those
            attributes), or ready-made :class:`ActionBins` (e.g. ``ActionBins.load(checkpoint_dir)``).
        num_bins: bins per dimension (OpenVLA: 256).
        gripper_dim: dimension binned over [-1, 1] regardless of statistics (default the last); ``None``: none.

    Example::

        env = ActionTokenizer(gym.make("LiberoSpatial-v0"), {"q01": q01, "q99": q99})
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        env.bins.save(checkpoint_dir)
    """

    def __init__(self, env: gym.Env, statistics: Any, num_bins: int = NUM_BINS, gripper_dim: int | None = -1):
        gym.utils.RecordConstructorArgs.__init__(self, statistics=statistics, num_bins=num_bins, gripper_dim=gripper_dim)
        gym.ActionWrapper.__init__(self, env)
        if not (isinstance(env.action_space, spaces.Box) and len(env.action_space.shape) in (1, 2)):
            raise ValueError(
                "ActionTokenizer needs a Box action space of shape (action_dim,) or (chunk, action_dim): "
                f"got {env.action_space}"
            )
        if isinstance(statistics, ActionBins):
            self.bins = statistics
        else:
            self.bins = ActionBins.from_statistics(statistics, num_bins=num_bins, gripper_dim=gripper_dim)
        action_dim = env.action_space.shape[-1]
        if self.bins.action_dim != action_dim:
            raise ValueError(
                f"action statistics have {self.bins.action_dim} dimensions: "
                f"the env's action space {env.action_space} has {action_dim}"
            )
        self.action_space = spaces.MultiDiscrete([self.bins.num_bins] * int(np.prod(env.action_space.shape)))

    def action(self, action) -> np.ndarray:
        tokens = np.asarray(action)
        if tokens.shape != self.action_space.shape:
            raise ValueError(f"token action has shape {tokens.shape}: expected {self.action_space.shape}")
        return self.bins.decode(tokens.reshape(self.env.action_space.shape))
