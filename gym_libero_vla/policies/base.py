"""The interface every VLA policy implements: token actions, their log-probabilities, checkpoints.

A vision-language-action policy (OpenVLA, Kim et al., 2024) predicts a robot action as ``action_dim``
discrete tokens, autoregressively, from a prefix of image, instruction (and state) tokens. Seen as an RL
policy, the action is the token sequence ``a = (a_1, ..., a_7)`` with

    log pi(a | o) = sum_i log pi(a_i | o, a_<i)

so this interface hands out *per-token* log-probabilities, which is what PPO/GRPO-style token-level
ratios need:

- :meth:`VLAPolicy.act` samples (or, deterministically, takes the argmax of) the tokens one at a time
  and returns the continuous actions they decode to, the tokens and their log-probabilities;
- :meth:`VLAPolicy.log_prob` re-scores given tokens in one teacher-forced forward pass, differentiably,
  and returns the per-token entropy too.

Only the ``num_bins`` action tokens are scored: the logits of the rest of the vocabulary are dropped
before the softmax (the distribution is over action bins), so every sampled token decodes to an action
and ``act``'s log-probabilities equal ``log_prob``'s for the same tokens.

Observations come as a dict of batched arrays, as a Gymnasium vector env returns them ("instruction"
a sequence of ``B`` str, "state" ``(B, 8)``, "agentview" ``(B, H, W, 3)`` uint8, ...);
:func:`batch_observation` adds the batch dimension to one env's observation.

Checkpoints are directories, as in Hugging Face: ``policy_config.json`` (which class, its config),
weights as safetensors (or only the LoRA adapter, on top of a base checkpoint the config names) and
the action bins (``action_bins.json``) beside them. :func:`load_policy` opens any of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from gym_libero_vla.wrappers.action_tokenizer import BINS_FILENAME, ActionBins

POLICY_CONFIG_FILENAME = "policy_config.json"
POLICY_FORMAT_VERSION = 1


def action_logits_from_vocab(logits: torch.Tensor, vocab_size: int, num_bins: int) -> torch.Tensor:
    """``(..., V)`` language-model logits -> ``(..., num_bins)`` logits of the action tokens, bin order.

    OpenVLA's bins are the last ``num_bins`` ids of a ``vocab_size`` vocabulary, bin ``k`` at id
    ``vocab_size - 1 - k`` (:meth:`ActionBins.to_vocab_ids`); ``logits`` may be wider than ``vocab_size``
    (embedding tables padded to a multiple of 64, as OpenVLA-7B's), the padding is ignored.
    """
    if logits.shape[-1] < vocab_size:
        raise ValueError(f"logits have {logits.shape[-1]} entries: fewer than the action vocab_size {vocab_size}")
    return logits[..., vocab_size - num_bins : vocab_size].flip(-1)


def check_temperature(temperature: float) -> float:
    """A sampling temperature must be a finite number > 0 (1: the policy's own distribution)."""
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, numbers.Real)  # numpy scalars too
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ValueError(f"temperature {temperature!r} must be a finite number > 0 (1 samples the policy as it is)")
    return float(temperature)


def choose_token(logits: torch.Tensor, deterministic: bool, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step: ``(B, num_bins)`` logits -> ``(token (B,), logits / temperature as float32)``. Greedy
    (argmax, which no temperature changes) or a sample of ``softmax(logits / temperature)``."""
    scaled = logits.float() / temperature
    token = scaled.argmax(-1) if deterministic else torch.distributions.Categorical(logits=scaled).sample()
    return token, scaled


def every_core() -> int:
    """The cores this process may run on (what ``torch_threads(None)`` and ``ThreadConfig`` mean by every core): the
    machine's, unless its CPU affinity narrows them (``taskset``, a container's cpuset, a pinned test worker)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_thread_count(name: str, value, every_core_allowed: bool = False) -> None:
    """A clear error unless ``value`` is an int >= 1 (or None, where ``every_core_allowed``)."""
    if value is None and every_core_allowed:
        return
    if not (type(value) is int and value >= 1):
        choices = " (or omitted for every core)" if every_core_allowed else ""
        raise ValueError(f"{name} {value!r} must be an int >= 1{choices}")


@dataclasses.dataclass
class TorchThreads:
    """Torch's CPU threads of a command: ``--torch-threads``, declared here once for every CLI (validated on
    construction). A CLI with another default says so in its field's ``default_factory``."""

    torch_threads: int = 1
    """Torch CPU threads while simulators run (rollouts, evaluation); more than the free cores slows small models
    down a lot."""

    def __post_init__(self):
        check_thread_count("torch_threads", self.torch_threads)

    def apply(self) -> None:
        """Set this process's torch threads to ``torch_threads``."""
        torch.set_num_threads(self.torch_threads)


@dataclasses.dataclass
class ThreadConfig(TorchThreads):
    """Torch's CPU threads of a command that trains a policy by SFT and also runs simulators: ``--torch-threads``
    while simulators run, ``--sft-torch-threads`` for SFT, the same two flags on every such CLI."""

    sft_torch_threads: int | None = None
    """Torch CPU threads for SFT, when no simulator runs (default: every core; on 2 cores an SFT step is ~1.8x faster
    than on one for the pixel recipe, ~1.5x for the state one)."""

    @property
    def sft_threads(self) -> int:
        """The thread count SFT runs with (``sft_torch_threads``, or every core)."""
        return every_core() if self.sft_torch_threads is None else self.sft_torch_threads

    def __post_init__(self):
        super().__post_init__()
        check_thread_count("sft_torch_threads", self.sft_torch_threads, every_core_allowed=True)


@contextlib.contextmanager
def torch_threads(count: int | None):
    """Torch's CPU threads set to ``count`` inside the block (``None``: every core, for work that runs while no
    simulator does, such as SFT), and restored after it."""
    threads = every_core() if count is None else count
    if threads < 1:
        raise ValueError(f"torch threads {count} must be >= 1 (or None for every core)")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(previous)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:<index>"``, ``"mps"`` or ``"auto"`` (the first GPU if there is one, else the
    CPU) -> a ``torch.device`` that exists on this machine; anything else is a clear error naming the choices."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except (RuntimeError, ValueError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {name!r}: valid 'cpu', 'cuda', 'cuda:<index>', 'mps' or 'auto'")
    available = ["cpu"] + [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        available.append("mps")
    if resolved.type == "cuda" and (not torch.cuda.is_available() or (resolved.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {name!r} is not available on this machine: valid here {available} (or 'auto')")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} is not available on this machine: valid here {available} (or 'auto')")
    return resolved


def batch_observation(obs: Mapping[str, Any]) -> dict[str, Any]:
    """One env's observation -> a batch of one; a batched observation (tuple of instructions) is returned as is."""
    if isinstance(obs.get("instruction"), str):
        return {key: [value] if isinstance(value, str) else np.asarray(value)[None] for key, value in obs.items()}
    return dict(obs)


def stack_observations(observations: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Single-env observations (e.g. of several envs stepped in one process) -> one batch: instructions as a
    list, every array stacked on a new first axis."""
    if not observations:
        raise ValueError("no observations to stack")
    return {
        key: [obs[key] for obs in observations] if isinstance(value, str) else np.stack([obs[key] for obs in observations])
        for key, value in observations[0].items()
    }


def instructions_of(obs_batch: Mapping[str, Any]) -> list[str]:
    """The batch's instructions as a list of str, with a clear error for anything else."""
    if "instruction" not in obs_batch:
        raise KeyError(f"observation has no 'instruction': got keys {sorted(obs_batch)}")
    instructions = obs_batch["instruction"]
    if isinstance(instructions, str):
        raise ValueError("'instruction' is a single str: pass a batch (a sequence of str) or use batch_observation(obs)")
    instructions = [str(text) if isinstance(text, np.str_) else text for text in instructions]
    bad = [text for text in instructions if not isinstance(text, str)]
    if bad:
        raise ValueError(f"'instruction' must be a sequence of str: got an item of type {type(bad[0]).__name__}")
    return instructions


def image_batch(obs_batch: Mapping[str, Any], key: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """``obs_batch[key]`` checked to be ``(B, H, W, 3)`` uint8 frames (of ``size`` = (H, W) if given)."""
    if key not in obs_batch:
        raise KeyError(
            f"observation has no {key!r} camera frame: got keys {sorted(obs_batch)} (make the env with an rgb obs_mode)"
        )
    images = np.asarray(obs_batch[key])
    if images.ndim != 4:
        raise ValueError(f"{key!r} frames have shape {images.shape}: expected a batch (B, H, W, 3)")
    if images.shape[-1] != 3:
        hint = " (channels first? frames must be HWC, as the env returns them)" if images.shape[1] == 3 else ""
        raise ValueError(f"{key!r} frames have shape {images.shape}: expected (B, H, W, 3) with 3 RGB channels last{hint}")
    if images.dtype != np.uint8:
        raise ValueError(f"{key!r} frames have dtype {images.dtype}: expected uint8 in 0..255")
    if size is not None and tuple(images.shape[1:3]) != tuple(size):
        raise ValueError(
            f"{key!r} frames are {images.shape[1]}x{images.shape[2]}: this policy was built for {size[0]}x{size[1]} "
            "(make the env with the matching image_size)"
        )
    return images


def vector_batch(obs_batch: Mapping[str, Any], key: str, dim: int) -> np.ndarray:
    """``obs_batch[key]`` checked to be ``(B, dim)`` numbers, as float32."""
    if key not in obs_batch:
        raise KeyError(f"observation has no {key!r}: got keys {sorted(obs_batch)}")
    values = np.asarray(obs_batch[key], dtype=np.float32)
    if values.ndim != 2 or values.shape[1] != dim:
        raise ValueError(f"{key!r} has shape {values.shape}: expected (B, {dim})")
    return values


def weights_fingerprint(module: nn.Module) -> str:
    """SHA-256 (16 hex digits) of a module's parameters and buffers, by name: the same weights give the same
    fingerprint in any process, whether built, trained or loaded (resumable evaluations reuse episodes by it)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes() if tensor.dtype != torch.bfloat16
                      else tensor.detach().cpu().float().numpy().tobytes())  # fmt: skip
    return digest.hexdigest()[:16]


def load_action_bins(directory: str | os.PathLike) -> ActionBins:
    """The action bins saved in a checkpoint directory, with an error that says what is missing."""
    path = os.path.join(directory, BINS_FILENAME)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"checkpoint {os.fspath(directory)!r} has no {BINS_FILENAME}: a VLA policy needs the action statistics "
            "(q01/q99 bins) it was trained with to decode its tokens; save them with ActionBins.save(directory) "
            "or pass action_bins= when loading"
        )
    return ActionBins.load(directory)


def read_policy_config(directory: str | os.PathLike) -> dict:
    path = os.path.join(directory, POLICY_CONFIG_FILENAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{os.fspath(directory)!r} is not a policy checkpoint: it has no {POLICY_CONFIG_FILENAME}")
    with open(path) as file:
        content = json.load(file)
    if content.get("format_version") != POLICY_FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {content.get('format_version')!r}: this version reads {POLICY_FORMAT_VERSION}"
        )
    return content


def write_policy_config(directory: str | os.PathLike, content: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, POLICY_CONFIG_FILENAME), "w") as file:
        json.dump({"format_version": POLICY_FORMAT_VERSION, **content}, file, indent=2)


def check_chunking(chunk_size, execute_steps) -> None:
    """``chunk_size`` an int >= 1; ``execute_steps`` None or an int in ``1..chunk_size``."""
    if not (isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size >= 1):
        raise ValueError(f"chunk_size {chunk_size!r} must be an int >= 1")
    if execute_steps is not None and not (
        isinstance(execute_steps, int) and not isinstance(execute_steps, bool) and 1 <= execute_steps <= chunk_size
    ):
        raise ValueError(f"execute_steps {execute_steps!r} must be None or an int in 1..chunk_size ({chunk_size})")


class VLAPolicy(nn.Module):
    """A policy over action tokens: ``action_dim`` (7) per action, ``chunk_size`` actions per query
    (``num_action_tokens`` in all); subclasses implement :meth:`action_logits` and :meth:`_sample_tokens` (and
    checkpoints). Everything else is shared."""

    action_bins: ActionBins
    observation_keys: tuple[str, ...] = ("instruction",)
    """The observation entries the policy reads; learners check datasets and envs against it."""

    @property
    def action_dim(self) -> int:
        return self.action_bins.action_dim

    @property
    def num_bins(self) -> int:
        return self.action_bins.num_bins

    @property
    def chunk_size(self) -> int:
        """Actions predicted per query (an action chunk, decoded in one forward pass when > 1)."""
        return 1

    @property
    def execute_steps(self) -> int:
        """Actions of each chunk to execute before querying again (``chunk_size``, or fewer: receding horizon)."""
        return self.chunk_size

    def set_execute_steps(self, execute_steps: int | None) -> None:
        """Execute this many actions of each chunk before querying again (None: the whole chunk): a receding horizon
        re-plans from a fresh frame more often, at a frame per query. The weights are unchanged; a saved checkpoint
        keeps the setting."""
        check_chunking(self.chunk_size, execute_steps)  # a one-action policy: only None or 1

    @property
    def num_action_tokens(self) -> int:
        return self.chunk_size * self.action_dim

    def encode_actions(self, actions) -> np.ndarray:
        """``(B, action_dim)`` actions, or ``(B, chunk_size, action_dim)`` chunks -> ``(B, num_action_tokens)`` tokens."""
        tokens = self.action_bins.encode(actions)
        return tokens.reshape(len(tokens), -1)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------ to implement
    def action_logits(self, obs_batch: Mapping[str, Any], action_tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``(B, num_action_tokens, num_bins)``: entry ``i`` is the distribution of token ``i``
        given the observation and ``action_tokens[:, :i]`` (a chunking policy decodes its tokens in parallel: given
        the observation alone). One forward pass; differentiable."""
        raise NotImplementedError

    def _sample_tokens(
        self, obs_batch: Mapping[str, Any], deterministic: bool, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoding, each token chosen by :func:`choose_token`: ``(tokens (B, num_action_tokens) int64, logits
        (B, num_action_tokens, num_bins))``, the logits divided by ``temperature``."""
        raise NotImplementedError

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **kwargs) -> VLAPolicy:
        raise NotImplementedError

    def head_parameters(self) -> list[nn.Parameter]:
        """The parameters of the light action head on top of the backbone: the output layer that turns the
        last hidden state into action-token logits (and what sits right under it). iRe-VLA's RL stage trains
        only these, with the backbone frozen. Whatever their ``requires_grad``; learners set it."""
        raise NotImplementedError(
            f"{type(self).__name__} does not say which parameters form its action head: implement head_parameters() "
            "(iRe-VLA's head-only RL stage needs it; CompactVLA and HFVLAPolicy implement it)"
        )

    # ------------------------------------------------------------------ shared
    @torch.no_grad()
    def act(
        self, obs_batch: Mapping[str, Any], deterministic: bool = False, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Choose actions for a batch of observations.

        Returns ``(actions, action_tokens, token_log_probs)``: float32 bin centres, ``(B, action_dim)`` or, for a
        chunking policy, ``(B, chunk_size, action_dim)``; int64 ``(B, num_action_tokens)`` tokens in
        ``0..num_bins-1`` and their float32 log-probabilities ``(B, num_action_tokens)`` under the policy, all on
        the policy's device. ``deterministic`` takes the most
        likely token at each step (greedy decoding, as OpenVLA's ``predict_action``); otherwise tokens are
        sampled from ``softmax(logits / temperature)`` with torch's global RNG, and the log-probabilities are
        those of that tempered distribution (what :meth:`log_prob` gives at the same ``temperature``).
        """
        check_temperature(temperature)
        tokens, logits = self._sample_tokens(obs_batch, deterministic, temperature)
        token_log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
        shape = (len(tokens), self.chunk_size, self.action_dim) if self.chunk_size > 1 else tokens.shape
        actions = torch.as_tensor(self.action_bins.decode(tokens.cpu().numpy().reshape(shape)), device=tokens.device)
        return actions, tokens, token_log_probs

    def log_prob(
        self, obs_batch: Mapping[str, Any], action_tokens, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token ``log pi(a_i | o, a_<i)`` and entropy ``H(pi(. | o, a_<i))``, both ``(B, num_action_tokens)``,
        differentiable, in one forward pass, of ``softmax(logits / temperature)`` (1: the policy itself).
        ``action_tokens``: ``(B, num_action_tokens)`` ints in ``0..num_bins-1``."""
        check_temperature(temperature)
        action_tokens = self.check_action_tokens(action_tokens, len(instructions_of(obs_batch)))
        log_probs = torch.log_softmax(self.action_logits(obs_batch, action_tokens).float() / temperature, dim=-1)
        token_log_probs = log_probs.gather(-1, action_tokens[..., None]).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        return token_log_probs, entropy

    def check_action_tokens(self, action_tokens, batch_size: int) -> torch.Tensor:
        tokens = torch.as_tensor(action_tokens, device=self.device)
        if tokens.shape != (batch_size, self.num_action_tokens):
            raise ValueError(
                f"action_tokens have shape {tuple(tokens.shape)}: expected ({batch_size}, {self.num_action_tokens})"
            )
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(f"action_tokens must be integers: got dtype {tokens.dtype}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.num_bins):
            raise ValueError(
                f"action_tokens must lie in 0..{self.num_bins - 1}: got {tokens.min().item()}..{tokens.max().item()}"
            )
        return tokens.long()

    # ------------------------------------------------------------------ LoRA
    @property
    def lora_enabled(self) -> bool:
        return getattr(self, "_lora_model", None) is not None

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model without its LoRA adapter (the frozen reference policy of KL-regularised RL)."""
        if not self.lora_enabled:
            raise ValueError("this policy has no LoRA adapter to disable: call add_lora(...) first")
        with self._lora_model.disable_adapter():
            yield


def lora_config(rank: int, alpha: float, target_modules: str | Sequence[str], dropout: float, modules_to_save=None):
    """A ``peft.LoraConfig`` from the few numbers users set, validated."""
    from peft import LoraConfig

    if not (isinstance(rank, (int, np.integer)) and rank >= 1):
        raise ValueError(f"LoRA rank {rank!r} must be an int >= 1")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha {alpha!r} must be > 0")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout {dropout!r} must lie in [0, 1)")
    if not target_modules:
        raise ValueError(
            "LoRA target_modules is empty: name the linear layers to adapt, e.g. ('q_proj', 'v_proj'), or 'all-linear'"
        )
    target = target_modules if isinstance(target_modules, str) else list(target_modules)
    return LoraConfig(
        r=int(rank),
        lora_alpha=alpha,
        target_modules=target,
        lora_dropout=dropout,
        modules_to_save=modules_to_save,
        bias="none",
    )


def load_policy(directory: str | os.PathLike, **kwargs) -> VLAPolicy:
    """Open any policy checkpoint written by ``save_pretrained`` (the class is read from its config)."""
    from gym_libero_vla.policies import POLICY_CLASSES

    policy_type = read_policy_config(directory).get("policy_type")
    if policy_type not in POLICY_CLASSES:
        raise ValueError(
            f"{os.fspath(directory)!r} holds an unknown policy_type {policy_type!r}: valid {sorted(POLICY_CLASSES)}"
        )
    return POLICY_CLASSES[policy_type].from_pretrained(directory, **kwargs)
