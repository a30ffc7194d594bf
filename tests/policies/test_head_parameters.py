"""``head_parameters()``: the light action head iRe-VLA's RL stage trains alone. With everything else frozen, a
loss on the action tokens puts gradients on exactly those parameters, for both policy classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gym_libero_vla.policies import CompactVLA, CompactVLAConfig, HFVLAPolicy, VLAPolicy, WordTokenizer

INSTRUCTIONS = (
    "pick up the black bowl between the plate and the ramekin and place it on the plate",
    "pick up the black bowl on the stove and place it on the plate",
    "open the top drawer",
)


def gradients_with_only_the_head_trainable(policy: VLAPolicy, obs: dict) -> tuple[set[str], set[str]]:
    """(names of the head parameters, names of the parameters that got a nonzero gradient)."""
    head = {id(p) for p in policy.head_parameters()}
    names = {name for name, p in policy.named_parameters() if id(p) in head}
    for parameter in policy.parameters():
        parameter.requires_grad_(id(parameter) in head)
        parameter.grad = None
    tokens = torch.as_tensor(np.arange(3 * 7).reshape(3, 7) % policy.num_bins)
    log_probs, _ = policy.log_prob(obs, tokens)
    (-log_probs.mean()).backward()
    with_gradient = {name for name, p in policy.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    for parameter in policy.parameters():
        parameter.requires_grad_(True)
        parameter.grad = None
    return names, with_gradient


def test_compact_vla_head_is_lm_head_and_final_norm(action_bins, make_obs):
    torch.manual_seed(0)
    config = CompactVLAConfig(cameras=("agentview",), image_size=64, image_grid=2, hidden_size=32, num_layers=2, num_heads=2)
    policy = CompactVLA(config, action_bins, WordTokenizer.from_texts(INSTRUCTIONS))
    names, with_gradient = gradients_with_only_the_head_trainable(policy, make_obs(3, cameras=("agentview",)))
    assert names == {"lm_head.weight", "backbone.norm.weight"}
    assert with_gradient == names


def test_hf_vla_head_is_the_output_embeddings(llava_and_processor, action_bins, make_obs):
    model, processor = llava_and_processor
    policy = HFVLAPolicy(model, processor, action_bins)
    (head,) = policy.head_parameters()
    assert head is model.get_output_embeddings().weight
    names, with_gradient = gradients_with_only_the_head_trainable(policy, make_obs(3, cameras=("agentview",)))
    assert len(names) == 1 and with_gradient == names


def test_a_policy_without_a_head_says_so():
    with pytest.raises(NotImplementedError, match="VLAPolicy does not say which parameters form its action head"):
        VLAPolicy().head_parameters()
