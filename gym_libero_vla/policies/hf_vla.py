"""HFVLAPolicy: a pretrained VLA checkpoint (OpenVLA-7B, or any HF image-text-to-text model) as a policy.

OpenVLA's recipe (Kim et al., 2024, ``prismatic/vla/action_tokenizer.py`` and ``predict_action``):

- the prompt is ``"In: What action should the robot take to {instruction}?\\nOut:"`` with the camera frame;
- the 256 *last* ids of the tokenizer's vocabulary are the action bins (bin ``k`` at ``vocab_size - 1 - k``);
- 7 tokens are decoded greedily and mapped to bin centres between the dataset's q01 and q99.

This adapter follows it for any model ``AutoModelForImageTextToText`` loads (LLaVA-style models insert the
processor's image token before the prompt) and for OpenVLA-7B's remote code (``trust_remote_code=True``;
its config maps ``AutoModelForVision2Seq``, which transformers 5 no longer has, so the class is resolved
from the checkpoint's own code). Only action tokens are scored (see :mod:`gym_libero_vla.policies.base`).

``chunk_size=k > 1`` follows OpenVLA-OFT's parallel decoding (Kim et al., 2025): ``k * 7`` placeholder positions
follow the prompt, their input embeddings zeroed, attending to the prompt and to each other (bidirectional), and
all ``k * 7`` tokens are read from one forward pass. The attention mask is passed as a 4-D mask, which needs a
model whose language sequence is its ``input_ids`` (LLaVA-style processors expand the image token); OpenVLA-7B's
remote code inserts its patches inside ``forward`` and is refused with an error.

Loading never downloads: ``local_files_only=True`` by default, so a hub id resolves from the local cache
and a directory from disk. LoRA goes through peft (:meth:`HFVLAPolicy.add_lora`); a LoRA checkpoint holds
only the adapter and names its base.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from gym_libero_vla.policies.base import (
    POLICY_CONFIG_FILENAME,
    VLAPolicy,
    action_logits_from_vocab,
    check_chunking,
    choose_token,
    image_batch,
    instructions_of,
    lora_config,
    read_policy_config,
    write_policy_config,
)
from gym_libero_vla.wrappers.action_tokenizer import BINS_FILENAME, ActionBins
from gym_libero_vla.wrappers.openvla_gripper import check_gripper_convention

OPENVLA_PROMPT = "In: What action should the robot take to {instruction}?\nOut:"
OPENVLA_EMPTY_TOKEN_ID = 29871  # OpenVLA-7B's predict_action appends Llama's "" token after the prompt


def _load_model(path: str, trust_remote_code: bool, local_files_only: bool, dtype):
    from transformers import AutoConfig, AutoModelForImageTextToText

    kwargs = dict(trust_remote_code=trust_remote_code, local_files_only=local_files_only)
    config = AutoConfig.from_pretrained(path, **kwargs)
    auto_map = getattr(config, "auto_map", None) or {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if trust_remote_code and "AutoModelForVision2Seq" in auto_map and "AutoModelForImageTextToText" not in auto_map:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        model_class = get_class_from_dynamic_module(
            auto_map["AutoModelForVision2Seq"], path, local_files_only=local_files_only
        )
        return model_class.from_pretrained(path, **kwargs)
    return AutoModelForImageTextToText.from_pretrained(path, **kwargs)


def _bins_from_model_config(model, unnorm_key: str | None) -> ActionBins | None:
    """OpenVLA keeps per-dataset action statistics in ``config.norm_stats[unnorm_key]["action"]``."""
    norm_stats = getattr(model.config, "norm_stats", None)
    if not norm_stats:
        return None
    if unnorm_key is None:
        if len(norm_stats) != 1:
            raise ValueError(
                f"the model has action statistics for several datasets: pass unnorm_key, one of {sorted(norm_stats)}"
            )
        unnorm_key = next(iter(norm_stats))
    if unnorm_key not in norm_stats:
        raise ValueError(f"unknown unnorm_key {unnorm_key!r}: valid {sorted(norm_stats)}")
    return ActionBins.from_statistics(norm_stats[unnorm_key]["action"])


class HFVLAPolicy(VLAPolicy):
    """A Hugging Face vision-language model used as a token-action policy.

    Args:
        model: an image-text-to-text model (``LlavaForConditionalGeneration``, OpenVLA-7B, ...).
        processor: its processor (tokenizer + image processor); padding is set to the left.
        action_bins: the q01/q99 bins the model's action tokens decode with.
        prompt_template: the prompt, with ``{instruction}``.
        camera: the observation frame the model sees.
        action_vocab_size: the vocabulary whose last ``num_bins`` ids are action bins (default: the
            tokenizer's ``vocab_size``, OpenVLA's choice; the embedding table may be larger).
        prompt_suffix_token_id: a token appended after the prompt (OpenVLA-7B: 29871), or None.
        base_model_path: where the base weights come from (a directory or hub id), for LoRA checkpoints.
        chunk_size: actions per query; ``> 1`` decodes the chunk's tokens in parallel (OpenVLA-OFT).
        execute_steps: actions of each chunk executed before the next query (None: all; fewer: receding horizon).
        gripper_convention: ``"libero"`` (the gripper token decodes to LIBERO's -1 open / +1 close) or
            ``"openvla"`` (OpenVLA's [0, 1], 1 open: envs made for it with ``env_kwargs_for_policy`` get
            ``gripper_convention="openvla"``, the conversion of
            :class:`~gym_libero_vla.wrappers.openvla_gripper.OpenVLAGripper`). ``from_pretrained`` picks
            ``"openvla"`` for raw checkpoints whose bins come from OpenVLA's ``norm_stats``.
    """

    def __init__(
        self,
        model,
        processor,
        action_bins: ActionBins,
        prompt_template: str = OPENVLA_PROMPT,
        camera: str = "agentview",
        action_vocab_size: int | None = None,
        prompt_suffix_token_id: int | None = None,
        base_model_path: str | None = None,
        trust_remote_code: bool = False,
        gripper_convention: str = "libero",
        chunk_size: int = 1,
        execute_steps: int | None = None,
    ):
        super().__init__()
        check_chunking(chunk_size, execute_steps)
        self._chunk_size, self._execute_steps = chunk_size, execute_steps
        self.gripper_convention = check_gripper_convention(gripper_convention)
        if "{instruction}" not in prompt_template:
            raise ValueError(f"prompt_template {prompt_template!r} has no '{{instruction}}' field")
        self.model, self.processor, self.action_bins = model, processor, action_bins
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.tokenizer.padding_side = "left"  # generation continues every row at the same last position
        if self.tokenizer.pad_token is None:
            raise ValueError("the tokenizer has no pad token: set processor.tokenizer.pad_token before batching prompts")
        self.prompt_template, self.camera = prompt_template, camera
        self.action_vocab_size = int(action_vocab_size or self.tokenizer.vocab_size)
        self.action_bins.to_vocab_ids([0] * action_bins.action_dim, self.action_vocab_size)  # validates the size
        num_embeddings = model.get_input_embeddings().num_embeddings
        if self.action_vocab_size > num_embeddings:
            raise ValueError(f"action_vocab_size {self.action_vocab_size} exceeds the model's {num_embeddings} embeddings")
        self.prompt_suffix_token_id = prompt_suffix_token_id
        self.base_model_path = base_model_path
        self.trust_remote_code = trust_remote_code
        self.observation_keys = ("instruction", camera)
        self.image_token = getattr(processor, "image_token", None)
        base_model = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel forwards **kwargs
        parameters = inspect.signature(base_model.forward).parameters
        self._accepts_position_ids = "position_ids" in parameters
        # transformers >= 5.2x names the KV cache ``cache``; older models and OpenVLA's remote code ``past_key_values``.
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self._lora_model = None

    @property
    def chunk_size(self) -> int:
        return self._chunk_size

    @property
    def execute_steps(self) -> int:
        return self._execute_steps or self._chunk_size

    def set_execute_steps(self, execute_steps: int | None) -> None:
        check_chunking(self._chunk_size, execute_steps)
        self._execute_steps = execute_steps

    # ------------------------------------------------------------------ inputs
    def prompts(self, instructions: Sequence[str]) -> list[str]:
        prompts = [self.prompt_template.format(instruction=text.lower().rstrip(".")) for text in instructions]
        if self.image_token and self.image_token not in self.prompt_template:
            prompts = [f"{self.image_token}\n{prompt}" for prompt in prompts]  # LLaVA-style models place the image here
        return prompts

    def _encode(self, obs_batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        instructions = instructions_of(obs_batch)
        frames = image_batch(obs_batch, self.camera)
        if len(frames) != len(instructions):
            raise ValueError(f"{len(frames)} {self.camera!r} frames for {len(instructions)} instructions")
        from PIL import Image

        images = [Image.fromarray(frame) for frame in frames]  # OpenVLA's remote processor takes PIL images only
        inputs = self.processor(text=self.prompts(instructions), images=images, return_tensors="pt", padding=True)
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        if self.prompt_suffix_token_id is not None and not bool((input_ids[:, -1] == self.prompt_suffix_token_id).all()):
            input_ids = torch.cat([input_ids, input_ids.new_full((len(input_ids), 1), self.prompt_suffix_token_id)], dim=1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(input_ids), 1)], dim=1)
        max_positions = getattr(getattr(self.model.config, "text_config", self.model.config), "max_position_embeddings", None)
        if max_positions is not None and input_ids.shape[1] + self.num_action_tokens > max_positions:
            raise ValueError(
                f"prompt of {input_ids.shape[1]} tokens plus {self.num_action_tokens} action tokens exceeds the model's "
                f"context of "
                f"{max_positions} positions: shorten the instruction"
            )
        device = self.device
        dtype = next(p for p in self.model.parameters() if p.is_floating_point()).dtype
        encoded = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
        encoded["pixel_values"] = inputs["pixel_values"].to(device=device, dtype=dtype)
        return encoded

    def _forward(self, input_ids, attention_mask, **kwargs):
        if self._accepts_position_ids:
            # With left padding, positions count real tokens only, so a padded row computes as it would alone.
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            kwargs["position_ids"] = position_ids[:, -input_ids.shape[1] :]
        elif not bool(attention_mask.all()):
            raise ValueError(
                f"{type(self.model).__name__} takes no position_ids, so prompts of different lengths cannot be batched: "
                "pass one observation at a time"
            )
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def _parallel_logits(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Parallel decoding: ``(B, num_action_tokens, num_bins)`` logits from one pass over the prompt and as many
        zero-embedded placeholders, causal over the prompt, bidirectional among the placeholders."""
        input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
        (batch_size, prompt_length), num_tokens = input_ids.shape, self.num_action_tokens
        length = prompt_length + num_tokens
        input_ids = torch.cat([input_ids, input_ids.new_full((batch_size, num_tokens), self.tokenizer.pad_token_id)], 1)
        keys = torch.cat([mask, mask.new_ones(batch_size, num_tokens)], dim=1).bool()
        allowed = torch.ones(length, length, dtype=torch.bool, device=keys.device).tril()
        allowed[prompt_length:, prompt_length:] = True  # the placeholders see each other
        allowed = allowed[None] & keys[:, None, :]  # and nobody sees padding
        dtype = inputs["pixel_values"].dtype
        attention = torch.zeros(batch_size, 1, length, length, dtype=dtype, device=keys.device)
        attention = attention.masked_fill(~allowed[:, None], torch.finfo(dtype).min)
        kwargs = {"position_ids": (keys.long().cumsum(-1) - 1).clamp(min=0)} if self._accepts_position_ids else {}
        placeholders = torch.arange(length, device=keys.device) >= prompt_length

        def zero_placeholders(module, args, output):  # OFT feeds the action positions empty (zero) embeddings
            return output.masked_fill(placeholders[:, None], 0) if output.shape[1] == length else output

        hook = self.model.get_input_embeddings().register_forward_hook(zero_placeholders)
        try:
            logits = self.model(
                input_ids=input_ids, attention_mask=attention, pixel_values=inputs["pixel_values"], **kwargs
            ).logits
        finally:
            hook.remove()
        if logits.shape[1] != length:
            raise ValueError(
                f"{type(self.model).__name__} adds {logits.shape[1] - length} positions inside forward (image patches), so "
                "the 4-D mask of parallel decoding cannot be passed to it: use chunk_size=1 with this model"
            )
        return action_logits_from_vocab(logits[:, prompt_length:], self.action_vocab_size, self.num_bins)

    # ------------------------------------------------------------------ the policy
    def action_logits(self, obs_batch: Mapping[str, Any], action_tokens: torch.Tensor) -> torch.Tensor:
        inputs = self._encode(obs_batch)
        tokens = self.check_action_tokens(action_tokens, inputs["input_ids"].shape[0])
        if self.chunk_size > 1:
            return self._parallel_logits(inputs)  # no token depends on another
        vocab_ids = self.action_vocab_size - 1 - tokens  # bin k -> id vocab_size - 1 - k
        input_ids = torch.cat([inputs["input_ids"], vocab_ids], dim=1)
        attention_mask = torch.cat([inputs["attention_mask"], torch.ones_like(vocab_ids)], dim=1)
        logits = self._forward(input_ids, attention_mask, pixel_values=inputs["pixel_values"]).logits
        # The image may add positions (OpenVLA inserts patch embeddings): count action positions from the end.
        logits = logits[:, logits.shape[1] - self.action_dim - 1 : logits.shape[1] - 1]
        return action_logits_from_vocab(logits, self.action_vocab_size, self.num_bins)

    def _sample_tokens(
        self, obs_batch: Mapping[str, Any], deterministic: bool, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self._encode(obs_batch)
        if self.chunk_size > 1:
            logits = self._parallel_logits(inputs)
            tokens, scaled = choose_token(logits.reshape(-1, logits.shape[-1]), deterministic, temperature)
            return tokens.reshape(logits.shape[:2]), scaled.reshape(logits.shape)
        attention_mask = inputs["attention_mask"]
        output = self._forward(inputs["input_ids"], attention_mask, pixel_values=inputs["pixel_values"], use_cache=True)
        tokens, step_logits = [], []
        for step in range(self.action_dim):
            logits = action_logits_from_vocab(output.logits[:, -1], self.action_vocab_size, self.num_bins)
            token, logits = choose_token(logits, deterministic, temperature)
            tokens.append(token)
            step_logits.append(logits)
            if step + 1 < self.action_dim:  # feed the token back, reusing the KV cache
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(token), 1)], dim=1)
                next_ids = (self.action_vocab_size - 1 - token)[:, None]
                cache = output.cache if self._cache_argument == "cache" else output.past_key_values
                output = self._forward(next_ids, attention_mask, use_cache=True, **{self._cache_argument: cache})
        return torch.stack(tokens, dim=1), torch.stack(step_logits, dim=1)

    def head_parameters(self) -> list[torch.nn.Parameter]:
        """The action head: the language model's output layer (``get_output_embeddings()``; the shared table if the
        model ties it to the input embeddings). Under a peft adapter with ``modules_to_save`` naming it, both the
        frozen original and the trainable copy."""
        head = self.model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(self.model).__name__} has no output embeddings (get_output_embeddings() is None)")
        return list(head.parameters())

    # ------------------------------------------------------------------ LoRA
    def add_lora(
        self,
        rank: int = 8,
        alpha: float = 16.0,
        target_modules: str | Sequence[str] = "all-linear",
        dropout: float = 0.0,
        modules_to_save: Sequence[str] | None = None,
    ) -> HFVLAPolicy:
        """Wrap the model in a peft LoRA model (base frozen); returns ``self``. ``"all-linear"`` adapts every
        linear layer but the output head, as OpenVLA's LoRA fine-tuning does."""
        from peft import get_peft_model

        if self.lora_enabled:
            raise ValueError("this policy already has a LoRA adapter")
        if self.base_model_path is None:
            self.base_model_path = getattr(self.model, "name_or_path", None) or None
        config = lora_config(rank, alpha, target_modules, dropout, list(modules_to_save) if modules_to_save else None)
        self.model = get_peft_model(self.model, config)
        self._lora_model = self.model
        return self

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Model (or only its LoRA adapter), processor, action bins and ``policy_config.json``."""
        os.makedirs(directory, exist_ok=True)
        if self.lora_enabled and not self.base_model_path:
            raise ValueError(
                "a LoRA policy saves only its adapter, but its base model has no path: load it with from_pretrained"
            )
        self.model.save_pretrained(directory)  # a PeftModel writes adapter_config.json + adapter_model.safetensors
        self.processor.save_pretrained(directory)
        self.action_bins.save(directory)
        write_policy_config(
            directory,
            {
                "policy_type": "HFVLAPolicy",
                "prompt_template": self.prompt_template,
                "camera": self.camera,
                "action_vocab_size": self.action_vocab_size,
                "prompt_suffix_token_id": self.prompt_suffix_token_id,
                "lora": self.lora_enabled,
                "base_model_path": self.base_model_path,
                "trust_remote_code": self.trust_remote_code,
                "gripper_convention": self.gripper_convention,
                "chunk_size": self.chunk_size,
                "execute_steps": self._execute_steps,
            },
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        action_bins: ActionBins | None = None,
        unnorm_key: str | None = None,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        trust_remote_code: bool = False,
        local_files_only: bool = True,
        **policy_kwargs,
    ) -> HFVLAPolicy:
        """Load a policy checkpoint (ours, possibly LoRA) or a raw HF model directory / cached hub id.

        Action bins come from ``action_bins``, else the checkpoint's ``action_bins.json``, else an
        OpenVLA config's ``norm_stats[unnorm_key]``; with none of these, ``FileNotFoundError``.
        """
        from peft import PeftModel
        from transformers import AutoProcessor

        path = os.fspath(path)
        is_policy_checkpoint = os.path.isfile(os.path.join(path, POLICY_CONFIG_FILENAME))
        saved = read_policy_config(path) if is_policy_checkpoint else {}
        if is_policy_checkpoint and saved.get("policy_type") != "HFVLAPolicy":
            raise ValueError(f"{path!r} holds a {saved.get('policy_type')!r} policy, not an HFVLAPolicy")
        trust_remote_code = trust_remote_code or saved.get("trust_remote_code", False)
        if saved.get("lora"):
            base_path = saved["base_model_path"]
            model = _load_model(base_path, trust_remote_code, local_files_only, dtype)
            model = PeftModel.from_pretrained(model, path, is_trainable=True)
        else:
            base_path = os.path.abspath(path) if os.path.isdir(path) else path
            model = _load_model(path, trust_remote_code, local_files_only, dtype)
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=local_files_only)
        if action_bins is None and os.path.isfile(os.path.join(path, BINS_FILENAME)):
            action_bins = ActionBins.load(path)
        bins_from_norm_stats = action_bins is None
        if action_bins is None:
            action_bins = _bins_from_model_config(model, unnorm_key)
        if action_bins is None:
            raise FileNotFoundError(
                f"checkpoint {path!r} has no {BINS_FILENAME} and its config no norm_stats: a VLA policy needs the action "
                "statistics (q01/q99 bins) it was trained with to decode its tokens; pass action_bins="
            )
        kwargs = {
            key: saved[key]
            for key in (
                "prompt_template",
                "camera",
                "action_vocab_size",
                "prompt_suffix_token_id",
                "gripper_convention",
                "chunk_size",
                "execute_steps",
            )
            if key in saved
        }
        if not saved and bins_from_norm_stats:  # OpenVLA's data keep the gripper in [0, 1], 1 = open
            kwargs["gripper_convention"] = "openvla"
        if not saved and getattr(model.config, "model_type", None) == "openvla":
            kwargs["prompt_suffix_token_id"] = OPENVLA_EMPTY_TOKEN_ID
        kwargs.update(policy_kwargs)
        policy = cls(model, processor, action_bins, base_model_path=base_path, trust_remote_code=trust_remote_code, **kwargs)
        if saved.get("lora"):
            policy._lora_model = model
        if device is not None:
            policy.to(device)
        return policy
