"""The observation space of the language instruction, and a fix that lets it cross process boundaries.

Gymnasium 1.x's ``AsyncVectorEnv`` (shared-memory mode, its default) decodes a ``Text`` space's shared
buffer into strings once, when the vector env is built, and never again: every later observation
reports the same blank instruction. Box spaces are unaffected because their "decoded" form is a numpy
view onto the shared buffer. ``InstructionText`` is a ``Text`` space whose shared-memory reader returns
such a live view too: a sequence that decodes the buffer when it is read, and that deep-copies (as
``AsyncVectorEnv`` does with every observation it returns) into a plain tuple of strings.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

import numpy as np
from gymnasium.spaces import Text
from gymnasium.vector.utils import read_from_shared_memory

INSTRUCTION_CHARSET = string.ascii_letters + string.digits + " ,.;:'\"-_/()&!?"
MAX_INSTRUCTION_LENGTH = 256


class InstructionText(Text):
    """A ``Text`` space for natural-language instructions (letters, digits, spaces and punctuation)."""

    def __init__(self, max_length: int = MAX_INSTRUCTION_LENGTH, *, min_length: int = 1, charset: str = INSTRUCTION_CHARSET):
        super().__init__(max_length, min_length=min_length, charset=charset)


class SharedInstructions(Sequence):
    """Live, read-only view of the instructions of ``n`` envs held in a shared int32 buffer."""

    def __init__(self, space: InstructionText, codes: np.ndarray):
        self._characters = space.character_list
        self._codes = codes

    def __len__(self) -> int:
        return len(self._codes)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return tuple(self[i] for i in range(len(self))[index])
        row = self._codes[index]
        return "".join(self._characters[code] for code in row if code < len(self._characters))

    def __deepcopy__(self, memo) -> tuple[str, ...]:
        return tuple(self)

    def __eq__(self, other) -> bool:
        return tuple(self) == tuple(other)

    def __repr__(self) -> str:
        return f"SharedInstructions({tuple(self)!r})"


@read_from_shared_memory.register(InstructionText)
def _read_instructions(space: InstructionText, shared_memory, n: int = 1) -> SharedInstructions:
    codes = np.frombuffer(shared_memory.get_obj(), dtype=np.int32).reshape((n, space.max_length))
    return SharedInstructions(space, codes)
