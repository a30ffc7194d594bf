"""HFVLAPolicy on a tiny random LLaVA (SigLIP tower + Llama) built from configs: OpenVLA's recipe, offline."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from gym_libero_vla.evaluate import env_kwargs_for_policy
from gym_libero_vla.policies import HFVLAPolicy, load_policy
from gym_libero_vla.policies.base import POLICY_CONFIG_FILENAME


@pytest.fixture(scope="module")
def base_checkpoint(llava_and_processor, tmp_path_factory):
    """The tiny model saved as a raw HF model directory (no policy files), as a downloaded VLA would be."""
    model, processor = llava_and_processor
    directory = tmp_path_factory.mktemp("tiny_llava")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def test_prompt_follows_openvla(llava_and_processor, action_bins):
    policy = HFVLAPolicy(*llava_and_processor, action_bins)
    assert policy.prompts(["Open the top drawer."]) == [
        "<image>\nIn: What action should the robot take to open the top drawer?\nOut:"
    ]
    assert policy.action_vocab_size == len(policy.tokenizer)  # the last 256 ids of the vocabulary are the bins


def test_act_log_prob_consistency_and_batching(llava_and_processor, action_bins, make_obs):
    policy = HFVLAPolicy(*llava_and_processor, action_bins)
    obs = make_obs(3, cameras=("agentview",))
    torch.manual_seed(0)
    actions, tokens, token_log_probs = policy.act(obs)  # incremental decoding with the KV cache
    assert actions.shape == tokens.shape == token_log_probs.shape == (3, 7)
    np.testing.assert_allclose(actions.numpy(), action_bins.decode(tokens.numpy()))
    log_probs, entropy = policy.log_prob(obs, tokens)  # one teacher-forced pass
    torch.testing.assert_close(log_probs, token_log_probs, atol=1e-5, rtol=1e-5)
    assert entropy.shape == (3, 7) and bool((entropy > 0).all())
    log_probs.sum().backward()
    assert policy.model.lm_head.weight.grad is not None
    policy.model.zero_grad(set_to_none=True)  # the model is shared by the module's tests
    for row in range(3):  # left padding: each sample scores as it does alone
        alone = {key: value[row : row + 1] for key, value in obs.items()}
        torch.testing.assert_close(
            policy.log_prob(alone, tokens[row : row + 1])[0], log_probs[row : row + 1].detach(), atol=1e-5, rtol=1e-5
        )
    first, second = policy.act(obs, deterministic=True), policy.act(obs, deterministic=True)
    assert torch.equal(first[1], second[1])
    assert torch.equal(policy.action_logits(obs, first[1]).argmax(-1), first[1])
    # Tempered sampling (GRPO's temperature): the KV-cache decoding and the teacher-forced pass agree on it too.
    _, tokens, token_log_probs = policy.act(obs, temperature=1.7)
    with torch.no_grad():
        torch.testing.assert_close(policy.log_prob(obs, tokens, 1.7)[0], token_log_probs, atol=1e-5, rtol=1e-5)


def test_parallel_decoding_of_a_chunk_in_one_pass(base_checkpoint, action_bins, make_obs, tmp_path):
    """OpenVLA-OFT's parallel decoding on the tiny LLaVA: ``k * 7`` zero-embedded placeholders after the prompt,
    bidirectional among themselves; act and log_prob agree; padding changes nothing; the chunk survives a save."""
    policy = HFVLAPolicy.from_pretrained(base_checkpoint, action_bins=action_bins, chunk_size=2)
    obs = make_obs(3, cameras=("agentview",))
    calls = []
    hook = policy.model.register_forward_hook(lambda *args: calls.append(1))
    torch.manual_seed(0)
    actions, tokens, token_log_probs = policy.act(obs)
    hook.remove()
    assert len(calls) == 1 and actions.shape == (3, 2, 7) and tokens.shape == (3, 14)
    log_probs, entropy = policy.log_prob(obs, tokens)
    torch.testing.assert_close(log_probs, token_log_probs, atol=1e-5, rtol=1e-5)
    assert entropy.shape == (3, 14)
    for row in range(3):  # prompts of three lengths, left-padded
        alone = {key: value[row : row + 1] for key, value in obs.items()}
        torch.testing.assert_close(policy.log_prob(alone, tokens[row : row + 1])[0], log_probs[row : row + 1],
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
    # Reference: the first sample alone, placeholder embeddings written as zeros by hand, the mask entry by entry.
    inputs = policy._encode({key: value[:1] for key, value in obs.items()})
    prompt_length = inputs["input_ids"].shape[1]
    length = prompt_length + 14
    input_ids = torch.cat([inputs["input_ids"], torch.full((1, 14), policy.tokenizer.pad_token_id)], dim=1)
    model = policy.model
    embeds = model.get_input_embeddings()(input_ids).detach().clone()
    embeds[:, prompt_length:] = 0
    image_features = model.get_image_features(pixel_values=inputs["pixel_values"])
    image_features = torch.cat(list(getattr(image_features, "pooler_output", image_features)), dim=0)
    embeds[input_ids == model.config.image_token_id] = image_features.reshape(-1, embeds.shape[-1])
    allowed = torch.tensor([[j <= i or min(i, j) >= prompt_length for j in range(length)] for i in range(length)])
    bias = torch.zeros(1, 1, length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)
    logits = model.model.language_model(inputs_embeds=embeds, attention_mask=bias).last_hidden_state
    logits = model.lm_head(logits[:, prompt_length:])
    expected = torch.log_softmax(logits[..., policy.action_vocab_size - 256 : policy.action_vocab_size].flip(-1), -1)
    torch.testing.assert_close(log_probs[:1], expected.gather(-1, tokens[:1, :, None]).squeeze(-1), atol=1e-5, rtol=1e-5)
    policy.save_pretrained(tmp_path)
    loaded = load_policy(tmp_path)
    assert (loaded.chunk_size, loaded.execute_steps) == (2, 2)
    assert torch.equal(loaded.act(obs, deterministic=True)[1], policy.act(obs, deterministic=True)[1])
    with pytest.raises(ValueError, match="execute_steps 3 must be None or an int in 1..chunk_size"):
        HFVLAPolicy.from_pretrained(base_checkpoint, action_bins=action_bins, chunk_size=2, execute_steps=3)


def test_from_pretrained_offline_and_save_load(base_checkpoint, action_bins, make_obs, tmp_path):
    with pytest.raises(FileNotFoundError, match="action_bins.json"):
        HFVLAPolicy.from_pretrained(base_checkpoint)  # a raw model directory has no action statistics
    policy = HFVLAPolicy.from_pretrained(base_checkpoint, action_bins=action_bins)
    obs = make_obs(2, cameras=("agentview",))
    tokens = policy.act(obs, deterministic=True)[1]
    policy.save_pretrained(tmp_path)
    assert {"model.safetensors", "config.json", POLICY_CONFIG_FILENAME, "action_bins.json"} <= set(os.listdir(tmp_path))
    loaded = load_policy(tmp_path)
    assert isinstance(loaded, HFVLAPolicy) and loaded.action_bins == action_bins
    assert torch.equal(loaded.act(obs, deterministic=True)[1], tokens)
    torch.testing.assert_close(loaded.log_prob(obs, tokens)[0], policy.log_prob(obs, tokens)[0])


def test_openvla_norm_stats_give_bins_and_openvla_gripper(base_checkpoint, tmp_path):
    """A raw checkpoint with OpenVLA's ``norm_stats``: bins from them, and OpenVLA's [0, 1] gripper, which the
    env is told about (gym.make(..., gripper_convention="openvla")) and which a saved policy keeps."""
    directory = tmp_path / "openvla_like"
    shutil.copytree(base_checkpoint, directory)
    statistics = {"q01": [-0.7, -0.8, -0.9, -0.1, -0.15, -0.2, 0.0], "q99": [0.75, 0.85, 0.9, 0.12, 0.17, 0.25, 1.0]}
    with open(directory / "config.json") as file:
        config = json.load(file)
    config["norm_stats"] = {"libero_spatial_no_noops": {"action": statistics}, "bridge_orig": {"action": statistics}}
    with open(directory / "config.json", "w") as file:
        json.dump(config, file)
    with pytest.raises(ValueError, match=r"pass unnorm_key, one of \['bridge_orig', 'libero_spatial_no_noops'\]"):
        HFVLAPolicy.from_pretrained(directory)
    policy = HFVLAPolicy.from_pretrained(directory, unnorm_key="libero_spatial_no_noops")
    np.testing.assert_allclose(policy.action_bins.low[:6], statistics["q01"][:6])
    assert policy.gripper_convention == "openvla"
    assert env_kwargs_for_policy(policy)["gripper_convention"] == "openvla"
    policy.save_pretrained(tmp_path / "saved")
    assert load_policy(tmp_path / "saved").gripper_convention == "openvla"


def test_lora_round_trip_saves_only_the_adapter(base_checkpoint, action_bins, make_obs, tmp_path):
    policy = HFVLAPolicy.from_pretrained(base_checkpoint, action_bins=action_bins)
    obs = make_obs(2, cameras=("agentview",))
    tokens = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    base_log_probs = policy.log_prob(obs, tokens)[0].detach()
    policy.add_lora(rank=4, alpha=8, target_modules=("q_proj", "v_proj"))
    assert all("lora_" in name for name, p in policy.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    adapted = policy.log_prob(obs, tokens)[0].detach()
    assert not torch.allclose(adapted, base_log_probs)
    policy.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files and "model.safetensors" not in files
    with open(tmp_path / POLICY_CONFIG_FILENAME) as file:
        assert json.load(file)["base_model_path"] == os.path.abspath(base_checkpoint)
    reloaded = load_policy(tmp_path)
    assert reloaded.lora_enabled
    torch.testing.assert_close(reloaded.log_prob(obs, tokens)[0], adapted)
    with reloaded.disable_adapter():
        torch.testing.assert_close(reloaded.log_prob(obs, tokens)[0], base_log_probs)


def test_bad_inputs_raise_clear_errors(llava_and_processor, action_bins, make_obs):
    policy = HFVLAPolicy(*llava_and_processor, action_bins)
    obs = make_obs(2, cameras=("agentview",))
    with pytest.raises(ValueError, match="channels first"):
        policy.act({**obs, "agentview": np.ascontiguousarray(obs["agentview"].transpose(0, 3, 1, 2))})
    with pytest.raises(ValueError, match="exceeds the model's context of 128"):
        policy.act({**obs, "instruction": ("open the top drawer " * 30, "open the top drawer")})
    with pytest.raises(KeyError, match="'agentview'"):
        policy.act({key: value for key, value in obs.items() if key != "agentview"})
    with pytest.raises(ValueError, match="instruction"):
        HFVLAPolicy(*llava_and_processor, action_bins, prompt_template="What now?")
    with pytest.raises(ValueError, match=r"unknown gripper_convention 'bridge': valid \['libero', 'openvla'\]"):
        HFVLAPolicy(*llava_and_processor, action_bins, gripper_convention="bridge")


def test_hub_id_loads_only_from_local_files():
    with pytest.raises(OSError):  # not cached here: an error, never a download
        HFVLAPolicy.from_pretrained("openvla/openvla-7b", trust_remote_code=True)
