"""Tiny real models for the policy tests, built from configs (nothing is downloaded)."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch

from gym_libero_vla.wrappers.action_tokenizer import ActionBins

INSTRUCTIONS = (
    "pick up the black bowl between the plate and the ramekin and place it on the plate",
    "pick up the black bowl on the stove and place it on the plate",
    "open the top drawer",
)


@pytest.fixture
def action_bins():
    return ActionBins.from_statistics(
        {"q01": [-0.9, -0.8, -0.7, -0.2, -0.2, -0.3, -1.0], "q99": [0.9, 0.8, 0.9, 0.2, 0.25, 0.3, 1.0]}
    )


@pytest.fixture
def make_obs():
    """Factory: ``make_obs(batch_size, image_size=64, seed=0, cameras=(...))`` -> a batched observation dict."""
    return observation_batch


@pytest.fixture(scope="module")
def llava_and_processor():
    """A tiny random LLaVA and its processor (module-scoped: tests must not modify the model)."""
    torch.manual_seed(0)
    return tiny_llava()


def observation_batch(batch_size: int, image_size: int = 64, seed: int = 0, cameras=("agentview", "wrist")) -> dict:
    """A batch shaped like a vector env's rgb+state observations, instructions of different lengths."""
    rng = np.random.default_rng(seed)
    obs = {
        "instruction": tuple(INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(batch_size)),
        "task_id": np.arange(batch_size) % len(INSTRUCTIONS),
        "state": rng.normal(size=(batch_size, 8)).astype(np.float32),
    }
    for camera in cameras:
        obs[camera] = rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
    return obs


def tiny_llava(instructions=INSTRUCTIONS, image_size: int = 32):
    """A randomly initialised LLaVA (SigLIP tower + Llama) and its processor, OpenVLA-shaped: the last 256
    ids of the tokenizer's vocabulary are free for the action bins."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
        SiglipVisionConfig,
    )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import CLIPImageProcessor

    vocab = {"<unk>": 0, "<pad>": 1, "<s>": 2, "<image>": 3}
    for text in ("In: What action should the robot take to ?\nOut:",) + tuple(instructions):
        for word in re.findall(r"\w+|[^\w\s]+", text.lower() if text in instructions else text):
            vocab.setdefault(word, len(vocab))
    for k in range(256):  # stand-ins for the rarely used tokens OpenVLA overwrites with action bins
        vocab[f"<unused_{k}>"] = len(vocab)
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+|[^\w\s]+, as the vocabulary above
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        extra_special_tokens={"image_token": "<image>"},
    )
    patch_size = 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        image_token="<image>",
    )
    config = LlavaConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch_size,
        ),
        text_config=LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=1,
        ),  # fmt: skip
        image_token_index=3,
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    return LlavaForConditionalGeneration(config).eval(), processor
