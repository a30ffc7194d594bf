"""GRPO's pure functions against hand-computed tensors, and the hyperparameter checks."""

from __future__ import annotations

import math

import pytest
import torch

from gym_libero_vla.algos.grpo import (
    GRPOConfig,
    adaptive_imitation_weight,
    clipped_surrogate,
    episode_mean_advantages,
    group_relative_advantages,
    importance_weights,
    k3_kl,
    zero_variance_groups,
)


def test_group_relative_advantages_mixed_all_success_all_fail():
    # groups of 2: mixed (1, 0), all success (1, 1), all fail (0, 0); unbiased std of (1, 0) is sqrt(0.5)
    advantages = group_relative_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0]), group_size=2, eps=0.0)
    half_root_two = 0.5 / math.sqrt(0.5)
    torch.testing.assert_close(advantages, torch.tensor([half_root_two, -half_root_two, 0.0, 0.0, 0.0, 0.0]))


def test_group_relative_advantages_one_success_in_four():
    # mean 0.25; unbiased variance (0.75^2 + 3 * 0.25^2) / 3 = 0.25, std 0.5
    advantages = group_relative_advantages(torch.tensor([0.0, 1.0, 0.0, 0.0]), group_size=4, eps=0.0)
    torch.testing.assert_close(advantages, torch.tensor([-0.5, 1.5, -0.5, -0.5]))
    assert abs(advantages.sum().item()) < 1e-6  # a group's advantages are centred


def test_episode_mean_advantages_balance_a_group_whatever_the_lengths():
    # one success in four: the success stopped at 144 steps, the failures ran to the 220-step limit
    advantages = group_relative_advantages(torch.tensor([0.0, 1.0, 0.0, 0.0]), group_size=4, eps=0.0)
    lengths = torch.tensor([220, 144, 220, 220])
    assert (advantages * lengths).sum().item() == pytest.approx(1.5 * 144 - 3 * 0.5 * 220)  # token-mean: net negative
    scaled = episode_mean_advantages(advantages, lengths)
    torch.testing.assert_close(scaled, advantages * 201.0 / lengths)  # mean length 201
    assert abs((scaled * lengths).sum().item()) < 1e-3  # every episode weighs A_j * 201: the group sums to zero
    with pytest.raises(ValueError, match="must be positive, one per advantage"):
        episode_mean_advantages(advantages, torch.tensor([220, 0, 220, 220]))


def test_group_relative_advantages_rejects_ragged_groups():
    with pytest.raises(ValueError, match=r"shape \(5,\): expected \(num_groups \* 2,\)"):
        group_relative_advantages(torch.zeros(5), group_size=2)


def test_zero_variance_groups():
    mask = zero_variance_groups(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0]), group_size=2)
    assert mask.tolist() == [False, True, True]


def test_clipped_surrogate_clips_asymmetrically():
    # ratios 1.5 (A=+1, clipped to 1.28), 0.5 (A=-1, clipped to 0.8), 1.1 (A=+1, inside), 1.25 (A=+1: inside
    # [0.8, 1.28] though outside a symmetric 0.2 clip), 1.5 (A=-1: the unclipped term is the pessimistic one)
    ratios = torch.tensor([[1.5, 0.5, 1.1, 1.25, 1.5]])
    log_probs = ratios.log().requires_grad_(True)
    advantages = torch.tensor([[1.0, -1.0, 1.0, 1.0, -1.0]])
    pg_loss, clip_fraction, approx_kl = clipped_surrogate(log_probs, torch.zeros(1, 5), advantages, 0.2, 0.28)
    torch.testing.assert_close(pg_loss, torch.tensor((-1.28 + 0.8 - 1.1 - 1.25 + 1.5) / 5))
    torch.testing.assert_close(clip_fraction, torch.tensor(3 / 5))  # 1.5, 0.5, 1.5 lie outside [0.8, 1.28]
    expected_kl = sum((r - 1) - math.log(r) for r in (1.5, 0.5, 1.1, 1.25, 1.5)) / 5
    torch.testing.assert_close(approx_kl, torch.tensor(expected_kl))
    pg_loss.backward()
    # d/d log_prob of -A * ratio is -A * ratio / 5 where unclipped; zero where the clip holds
    torch.testing.assert_close(log_probs.grad, torch.tensor([[0.0, 0.0, -1.1 / 5, -1.25 / 5, 1.5 / 5]]))


def test_clipped_surrogate_broadcasts_an_episode_advantage_over_its_tokens():
    log_probs = torch.zeros(2, 7)
    pg_loss, clip_fraction, approx_kl = clipped_surrogate(log_probs, log_probs, torch.tensor([[2.0], [-1.0]]), 0.2, 0.28)
    torch.testing.assert_close(pg_loss, torch.tensor(-0.5))  # ratio 1: -(7 * 2 - 7 * 1) / 14
    assert clip_fraction.item() == 0.0 and approx_kl.item() == 0.0


def test_importance_weights_are_truncated_and_detached():
    log_probs = torch.tensor([3.0, 0.5, 1.5]).log().requires_grad_(True)
    weights = importance_weights(log_probs, torch.zeros(3), is_clip=2.0)
    torch.testing.assert_close(weights, torch.tensor([2.0, 0.5, 1.5]))
    assert not weights.requires_grad


def test_adaptive_imitation_weight():
    assert adaptive_imitation_weight(0.0, 0.1, 0.9) == pytest.approx(0.9)  # every rollout fails: imitate most
    assert adaptive_imitation_weight(1.0, 0.1, 0.9) == pytest.approx(0.1)
    assert adaptive_imitation_weight(0.25, 0.1, 0.9) == pytest.approx(0.9 * 0.75 + 0.1 * 0.25)
    with pytest.raises(ValueError, match=r"success_rate 1.5 must lie in \[0, 1\]"):
        adaptive_imitation_weight(1.5, 0.1, 0.9)


def test_k3_kl():
    torch.testing.assert_close(k3_kl(torch.zeros(3), torch.zeros(3)), torch.zeros(3))
    # pi = 0.5, pi_ref = 1: exp(log 2) - log 2 - 1
    torch.testing.assert_close(k3_kl(torch.tensor([math.log(0.5)]), torch.zeros(1)), torch.tensor([1.0 - math.log(2.0)]))


def test_defaults_are_valid():
    config = GRPOConfig()
    assert (config.clip_low, config.clip_high, config.kl_coef) == (0.2, 0.28, 0.0)
    assert GRPOConfig(task_ids=[0, 3]).task_ids == (0, 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(group_size=1), "group_size 1 must be an int >= 2"),
        (dict(group_size=2.0), "group_size 2.0 must be an int >= 2"),
        (dict(num_groups=0), "num_groups 0"),
        (dict(num_epochs=0), "num_epochs 0"),
        (dict(minibatch_size=0), "minibatch_size 0"),
        (dict(imitation_batch_size=0), "imitation_batch_size 0"),
        (dict(learning_rate=0.0), "learning_rate 0.0 must be a finite number > 0"),
        (dict(learning_rate=float("nan")), "learning_rate nan"),
        (dict(clip_low=0.0), "clip_low 0.0"),
        (dict(clip_low=1.0), "clip_low 1.0 must be < 1"),
        (dict(clip_high=-0.1), "clip_high -0.1"),
        (dict(kl_coef=-1.0), "kl_coef -1.0 must be a finite number >= 0"),
        (dict(entropy_coef=float("inf")), "entropy_coef inf"),
        (dict(imitation_weight_min=0.5, imitation_weight_max=0.2), "imitation_weight_min 0.5 must be <="),
        (dict(is_clip=0.5), "is_clip 0.5 must be a finite number >= 1"),
        (dict(max_grad_norm=0.0), "max_grad_norm 0.0"),
        (dict(task_ids=()), "task_ids is empty"),
        (dict(loss_aggregation="sum"), "loss_aggregation 'sum' is not one of token-mean, episode-mean"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(**kwargs)
