"""Vision-language-action policies over discrete action tokens (OpenVLA's recipe), on transformers + peft.

- :mod:`gym_libero_vla.policies.base`: the interface (``act``, ``log_prob``, checkpoints) learners use.
- :mod:`gym_libero_vla.policies.compact_vla`: :class:`CompactVLA`, a small policy that trains on a CPU.
- :mod:`gym_libero_vla.policies.hf_vla`: :class:`HFVLAPolicy`, OpenVLA-7B or any HF image-text-to-text model.
"""

from gym_libero_vla.policies.base import (
    ThreadConfig,
    TorchThreads,
    VLAPolicy,
    batch_observation,
    load_policy,
    resolve_device,
    torch_threads,
)
from gym_libero_vla.policies.compact_vla import CompactVLA, CompactVLAConfig, WordTokenizer
from gym_libero_vla.policies.hf_vla import HFVLAPolicy

POLICY_CLASSES = {"CompactVLA": CompactVLA, "HFVLAPolicy": HFVLAPolicy}

__all__ = [
    "POLICY_CLASSES",
    "CompactVLA",
    "CompactVLAConfig",
    "HFVLAPolicy",
    "ThreadConfig",
    "TorchThreads",
    "VLAPolicy",
    "WordTokenizer",
    "batch_observation",
    "load_policy",
    "resolve_device",
    "torch_threads",
]
