"""benchmarks/gradient_noise.py: the noise scale of GRPO's gradient, on groups run in the real simulator by a tiny
policy (chunks of 2 actions, the last cut short) and stored in a real episode store; the estimator on vectors whose
noise scale is known."""

from __future__ import annotations

import json

import gradient_noise  # benchmarks/ is on sys.path (conftest.py)
import gymnasium as gym
import numpy as np
import pytest
import torch

from gym_libero_vla.demos.generate import GenerateArgs, generate
from gym_libero_vla.episode_store import EpisodeStore
from gym_libero_vla.policies import CompactVLA, CompactVLAConfig, WordTokenizer, load_policy
from gym_libero_vla.rollouts import Start, run_group
from gym_libero_vla.wrappers.action_tokenizer import ActionBins

Args, main = gradient_noise.Args, gradient_noise.main


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A tiny policy's checkpoint and a store of its groups of 2 (5-action episodes): 4 tagged groups, one success
    each (outcomes set here: an untrained policy never succeeds), one all-fail group, and, as a synchronous GRPO
    wrote them before group ids, an episode of another start and then 2 untagged groups; a scripted-expert demo."""
    directory = tmp_path_factory.mktemp("gradient_noise")
    env = gym.make(
        "LiberoSpatial-v0",
        obs_mode="state",
        task_ids=(0, 1),
        max_episode_steps=10,
        num_settle_steps=2,
        action_chunk=2,
        max_env_steps=5,
    )  # chunks of 2 actions: 2 + 2 + 1 executed
    try:
        instructions = [env.reset(options={"task_id": task, "init_state_id": 0})[0]["instruction"] for task in (0, 1)]
        torch.manual_seed(0)
        bins = ActionBins.from_statistics({"q01": [-1.0] * 7, "q99": [1.0] * 7})
        config = CompactVLAConfig(cameras=(), hidden_size=16, num_layers=1, num_heads=2, chunk_size=2)
        policy = CompactVLA(config, bins, WordTokenizer.from_texts(instructions))
        policy.save_pretrained(directory / "policy")
        store = EpisodeStore(directory / "cache")
        groups = [run_group(policy, env, Start(i % 2, i, seed=i), 2)[0] for i in range(9)]
    finally:
        env.close()
    for index, group in enumerate(groups):
        if index != 4:  # group 4 stays all-fail
            group[index % 2].success = True
        if index >= 5:  # stored without group ids
            for episode in group:
                episode.group_id = None
    store.append_many(groups[5][:1])  # a lone episode: the next untagged one has another start
    for group in groups[:5] + groups[7:]:
        store.append_many(group)
    store.close()
    generate(GenerateArgs(suite="spatial", out=str(directory / "demos.hdf5"), task_ids=(0,), episodes_per_task=1,
                          progress=False))  # the scripted expert, for the offline term  # fmt: skip
    informative = [groups[i] for i in (0, 1, 2, 3, 7, 8)]
    env_steps = sum(episode.num_env_steps for group in groups[:5] + groups[7:] for episode in group)
    return str(directory / "policy"), str(directory / "cache"), informative, env_steps, str(directory / "demos.hdf5")


def by_hand(checkpoint: str, group) -> np.ndarray:
    """-d/dtheta of the token mean of A * log pi over the group's real tokens, A = +-1/sqrt(2) (rewards 1, 0)."""
    policy = load_policy(checkpoint)
    policy.train()
    policy.zero_grad()
    total, count = 0.0, 0
    for episode in group:
        advantage = 1 / np.sqrt(2) * (1 if episode.success else -1)
        obs = {key: value[: episode.num_steps] for key, value in episode.observations.items() if key != "instruction"}
        obs["instruction"] = (episode.instruction,) * episode.num_steps
        tokens = policy.encode_actions(episode.actions).reshape(episode.num_steps, -1)
        log_probs, _ = policy.log_prob(obs, torch.as_tensor(tokens))
        mask = torch.zeros_like(log_probs, dtype=torch.bool)
        for step, executed in enumerate(episode.executed):
            mask[step, : executed * 7] = True
        total = total - (advantage * log_probs * mask).sum()
        count += int(mask.sum())
    (total / count).backward()
    return torch.cat([p.grad.reshape(-1) for p in policy.parameters() if p.requires_grad]).numpy()


def test_noise_scale_of_stored_groups_matches_the_gradients_by_hand(stored, tmp_path):
    checkpoint, cache, informative, env_steps, demos = stored
    report = main(Args(checkpoint=checkpoint, cache=(cache,), demos=(demos,), group_size=2, batch_sizes=(1, 2), draws=20,
                       imitation_batch_size=16, imitation_batches=8, json_out=str(tmp_path / "noise.json")))  # fmt: skip
    (entry,) = report["stores"]
    # The lone untagged episode is skipped; the 2 untagged groups are paired; the all-fail group is not informative.
    assert (entry["groups"], entry["informative"], report["num_groups_measured"]) == (7, 6, 6)
    assert entry["env_steps"] == env_steps and report["env_steps_per_informative_group"] == env_steps / 6
    assert [g["successes"] for g in report["groups"]] == [1] * 6
    assert [(g["task_id"], g["init_state_id"]) for g in report["groups"]] == [(i % 2, i) for i in (0, 1, 2, 3, 7, 8)]

    assert [episode.executed.tolist() for episode in informative[0]] == [[2, 2, 1]] * 2  # the last chunk cut short
    gradients = np.stack([by_hand(checkpoint, group) for group in informative])
    gram = gradients.astype(np.float64) @ gradients.T.astype(np.float64)
    signal = (gram.sum() - np.trace(gram)) / (6 * 5)
    mean_square = np.trace(gram) / 6
    assert report["signal"] == pytest.approx(signal, rel=1e-4, abs=1e-9)
    assert report["mean_square"] == pytest.approx(mean_square, rel=1e-4)
    assert report["mean_gradient_norm"] == pytest.approx(np.linalg.norm(gradients.mean(0)), rel=1e-4)
    expected = (mean_square - signal) / signal if signal > 0 else float("inf")
    assert report["noise_scale"] == pytest.approx(expected, rel=1e-3)
    assert set(report["set_cosines"]) == {1, 2, 3}  # the sizes asked for, and half the groups
    assert all(-1 <= entry["mean"] <= 1 for entry in report["set_cosines"].values())

    # At an untrained policy the demos' NLL gradient points one way, batch after batch: little noise.
    imitation = report["imitation"]
    assert imitation["batches"] == 8 and imitation["demos"] == [demos] and imitation["gradient_norm"] > 0
    assert imitation["cosine_between_batches"] > 0.5 and imitation["noise_scale_batches"] < 1
    assert -1 <= imitation["cosine_with_policy_gradient"] <= 1

    with open(tmp_path / "noise.json") as file:
        assert json.load(file)["num_groups_measured"] == 6
    assert (tmp_path / "noise.md").read_text().startswith(f"## GRPO gradient noise of `{checkpoint}`")


def test_the_estimator_recovers_a_known_noise_scale():
    """g_i = G + noise, |G|^2 = 1, tr(Sigma) = 8: B = 8 groups; sets of n groups agree as 1 / (1 + 8 / n)."""
    rng = np.random.default_rng(0)
    true_gradient = np.zeros(64)
    true_gradient[0] = 1.0
    gradients = true_gradient + rng.normal(scale=np.sqrt(8 / 64), size=(2000, 64))
    gram = gradients @ gradients.T
    estimate = gradient_noise.noise_scale(gram)
    assert estimate["signal"] == pytest.approx(1.0, abs=0.05) and estimate["trace_sigma"] == pytest.approx(8.0, rel=0.05)
    assert estimate["noise_scale"] == pytest.approx(8.0, rel=0.1)
    cosines = gradient_noise.set_cosines(gram, (2, 8, 32), 300, rng)
    for n, entry in cosines.items():
        assert entry["mean"] == pytest.approx(1 / (1 + 8 / n), abs=0.04), n
    # A resample that draws every group once is the estimate itself; pure noise has no measurable signal.
    assert gradient_noise.noise_scale(gram, np.ones(len(gram)))["noise_scale"] == pytest.approx(estimate["noise_scale"])
    noise = rng.normal(size=(50, 64))
    assert gradient_noise.noise_scale(noise @ noise.T)["noise_scale"] == float("inf") or (
        gradient_noise.noise_scale(noise @ noise.T)["noise_scale"] > 50
    )


def test_bad_input_names_the_problem(stored, tmp_path):
    checkpoint, cache, _, _, _ = stored
    with pytest.raises(ValueError, match="give at least one episode store"):
        main(Args(checkpoint=checkpoint))
    with pytest.raises(FileNotFoundError, match="episode store .*nope.* does not exist"):
        main(Args(checkpoint=checkpoint, cache=(str(tmp_path / "nope"),)))
    with pytest.raises(ValueError, match="group_size 1 must be an int >= 2"):
        main(Args(checkpoint=checkpoint, cache=(cache,), group_size=1))
    with pytest.raises(ValueError, match=r"0 informative groups \(mixed outcomes, 3 episodes\) .* need at least 4"):
        main(Args(checkpoint=checkpoint, cache=(cache,), group_size=3))
