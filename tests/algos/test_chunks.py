"""Learners on action chunks: demo windows, the masked losses (values computed by hand), and a chunked
SFT -> GRPO -> evaluate run on the real simulator with a tiny CompactVLA (state mode)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from gym_libero_vla.algos import GRPO, SFT
from gym_libero_vla.algos.grpo import GroupRollout, clipped_surrogate
from gym_libero_vla.algos.sft import Transitions
from gym_libero_vla.episode import Episode
from gym_libero_vla.evaluate import env_kwargs_for_policy, evaluate_policy
from gym_libero_vla.policies import CompactVLA, CompactVLAConfig, WordTokenizer, load_policy
from gym_libero_vla.wrappers.action_tokenizer import ActionBins

CHUNK = 4
MAX_ENV_STEPS = 10  # chunks of 4, 4 and the last one cut to 2 by the step limit
INSTRUCTION = "pick up the black bowl between the plate and the ramekin and place it on the plate"


def make_policy(chunk_size: int = CHUNK, seed: int = 0, **overrides) -> CompactVLA:
    torch.manual_seed(seed)
    bins = ActionBins.from_statistics({"q01": [-1.0] * 7, "q99": [1.0] * 7})
    config = CompactVLAConfig(cameras=(), hidden_size=32, num_layers=1, num_heads=2, chunk_size=chunk_size, **overrides)
    return CompactVLA(config, bins, WordTokenizer.from_texts([INSTRUCTION]))


def one_action_episode(num_steps: int = 3) -> Episode:
    actions = np.arange(num_steps * 7, dtype=np.float32).reshape(num_steps, 7) / 100  # distinct, easy to follow
    state = np.arange((num_steps + 1) * 8, dtype=np.float32).reshape(num_steps + 1, 8)
    return Episode({"instruction": INSTRUCTION, "state": state}, actions, np.zeros(num_steps), True, 0, source="offline")


def test_demo_steps_predict_the_next_k_actions_padded_and_masked_past_the_end():
    episode = one_action_episode(3)
    a = episode.actions
    steps = Transitions.from_episodes([episode], ("instruction", "state"), 7, chunk_size=2)
    zeros = np.zeros(7, np.float32)
    np.testing.assert_array_equal(steps.actions, np.stack([[a[0], a[1]], [a[1], a[2]], [a[2], zeros]]))
    assert steps.action_mask.tolist() == [[True, True], [True, True], [True, False]]
    assert steps.token_mask(np.array([2])).tolist() == [[True] * 7 + [False] * 7]
    np.testing.assert_array_equal(steps.observations["state"], episode.observations["state"][:3])
    # A chunking policy's own episode: its chunks as sampled, the actions the env did not execute masked.
    chunks = np.random.default_rng(0).uniform(-1, 1, (2, 2, 7)).astype(np.float32)
    rollout = Episode({"instruction": INSTRUCTION, "state": np.zeros((3, 8), np.float32)}, chunks, np.array([0.0, 1.0]),
                      True, 0, log_probs=-np.ones((2, 14), np.float32), executed=[2, 1])  # fmt: skip
    assert rollout.num_env_steps == 3
    steps = Transitions.from_episodes([rollout], ("instruction", "state"), 7, chunk_size=2)
    np.testing.assert_array_equal(steps.actions, chunks)
    assert steps.action_mask.tolist() == [[True, True], [True, False]]
    assert steps.behaviour_log_probs.shape == (2, 14)
    with pytest.raises(ValueError, match="holds chunks of 2 actions, but the policy predicts 4"):
        Transitions.from_episodes([rollout], ("instruction", "state"), 7, chunk_size=4)
    with pytest.raises(ValueError, match=r"executed must be \(2,\) counts in 1..2"):
        Episode({"instruction": INSTRUCTION, "state": np.zeros((3, 8), np.float32)}, chunks, np.zeros(2), False, 0,
                executed=[2, 3])  # fmt: skip


def test_sft_loss_is_the_nll_of_the_real_tokens_of_each_window():
    policy = make_policy(chunk_size=2)
    episode = one_action_episode(3)
    model = SFT(policy, demos=[episode], batch_size=3, seed=0)
    a, zeros = episode.actions, np.zeros(7, np.float32)
    windows = np.stack([[a[0], a[1]], [a[1], a[2]], [a[2], zeros]])
    obs = {"instruction": (INSTRUCTION,) * 3, "state": episode.observations["state"][:3]}
    with torch.no_grad():
        log_probs = policy.log_prob(obs, policy.encode_actions(windows))[0].numpy()
    real = np.ones((3, 14), bool)
    real[2, 7:] = False  # step 2's window runs one action past the episode's end
    expected = -log_probs[real].mean()  # 35 real tokens, not 42
    assert model.train_step()["train/loss"] == pytest.approx(float(expected), rel=1e-5)
    assert expected != pytest.approx(float(-log_probs.mean()), rel=1e-3)


def test_tokens_after_termination_carry_no_loss_and_no_gradient():
    """Four tokens, the last two belonging to actions the env never executed. On the two real tokens the ratio is 1:
    pg loss -A = -1 each, no clipping, KL 0. On the masked two the ratio is 1.5: unmasked they would add -1.28 each
    (clipped at 1 + 0.28) and a clip fraction of 1/2."""
    old = torch.zeros(1, 4)
    log_probs = torch.tensor([[0.0, 0.0, np.log(1.5), np.log(1.5)]], requires_grad=True)
    advantages = torch.ones(1, 1)
    mask = torch.tensor([[True, True, False, False]])
    pg_loss, clip_fraction, approx_kl = clipped_surrogate(log_probs, old, advantages, 0.2, 0.28, mask=mask)
    assert pg_loss.item() == pytest.approx(-1.0) and clip_fraction.item() == 0.0 and approx_kl.item() == pytest.approx(0.0)
    pg_loss.backward()
    assert log_probs.grad[0, 2:].tolist() == [0.0, 0.0] and log_probs.grad[0, :2].tolist() == pytest.approx([-0.5, -0.5])
    unmasked, clipped, _ = clipped_surrogate(log_probs.detach(), old, advantages, 0.2, 0.28)
    assert unmasked.item() == pytest.approx((-1 - 1 - 1.28 - 1.28) / 4) and clipped.item() == 0.5


@pytest.fixture(scope="module")
def env():
    policy = make_policy()
    env = gym.make("LiberoSpatial-v0", task_ids=(0,), num_settle_steps=2, **env_kwargs_for_policy(policy, MAX_ENV_STEPS))
    yield env
    env.close()


@pytest.fixture(scope="module")
def demos():
    """Two 12-step episodes of the real simulator, one action per step (as scripted or human demos are)."""
    env = gym.make("LiberoSpatial-v0", obs_mode="state", task_ids=(0,), num_settle_steps=2)
    rng = np.random.default_rng(0)
    episodes = []
    try:
        for init_state_id in (0, 1):
            obs, _ = env.reset(options={"task_id": 0, "init_state_id": init_state_id})
            states, actions = [obs["state"]], rng.uniform(-0.5, 0.5, (12, 7)).astype(np.float32)
            for action in actions:
                obs, *_ = env.step(action)
                states.append(obs["state"])
            episodes.append(Episode({"instruction": obs["instruction"], "state": np.array(states)}, actions,
                                    np.zeros(12), True, 0, init_state_id, source="offline"))  # fmt: skip
    finally:
        env.close()
    return episodes


def test_chunked_sft_then_grpo_then_evaluation_on_the_real_simulator(env, demos, tmp_path):
    assert env.action_space.shape == (CHUNK, 7)
    policy = make_policy()
    sft = SFT(policy, env, demos=demos, batch_size=24, learning_rate=3e-3, seed=0)
    first = sft.train_step()["train/loss"]
    sft.learn(30)
    assert sft.last_metrics["train/loss"] < first - 0.5  # the windows are learned

    model = GRPO(policy, env, demos=demos, group_size=2, num_groups=1, num_epochs=1, max_sampling_rounds=1,
                 imitation_batch_size=8, learning_rate=1e-3, seed=0)  # fmt: skip
    rollout = model.collect_rollouts()
    assert model.num_timesteps == 2 * MAX_ENV_STEPS  # env steps (actions), not policy queries
    for episode in rollout.episodes:
        assert episode.actions.shape == (3, CHUNK, 7) and episode.log_probs.shape == (3, CHUNK * 7)
        assert episode.executed.tolist() == [4, 4, 2] and episode.num_env_steps == MAX_ENV_STEPS
    assert rollout.action_tokens.shape == (6, CHUNK * 7)
    assert rollout.token_mask.sum(1).tolist() == [28, 28, 14] * 2  # the last chunk's last two actions never ran
    rollout.episode_rewards = np.array([1.0, 0.0], dtype=np.float32)  # pretend the first one succeeded
    with torch.no_grad():
        before = policy.log_prob(rollout.batch(np.arange(3)), rollout.action_tokens[:3])[0].numpy()
    metrics = model.train(rollout)
    assert metrics["rollout/ep_len_mean"] == MAX_ENV_STEPS and np.isfinite(metrics["train/pg_loss"])
    with torch.no_grad():
        after = policy.log_prob(rollout.batch(np.arange(3)), rollout.action_tokens[:3])[0].numpy()
    real = rollout.token_mask[:3]
    assert (after - before)[real].mean() > 0  # the success's executed tokens became more likely
    model.learn(4 * MAX_ENV_STEPS, reset_num_timesteps=True)
    assert model.num_timesteps == 4 * MAX_ENV_STEPS

    model.save(tmp_path / "grpo")
    loaded = GRPO.load(tmp_path / "grpo", env=env)
    assert loaded.policy.chunk_size == CHUNK
    actions, _ = loaded.predict(env.reset(seed=0)[0], deterministic=True)
    assert actions.shape == (CHUNK, 7)
    results = evaluate_policy(loaded.policy, "LiberoSpatial-v0", task_ids=(0,), init_state_ids=(20, 21),
                              max_episode_steps=MAX_ENV_STEPS, progress=False)  # fmt: skip
    assert [row["length"] for row in results["episodes"]] == [MAX_ENV_STEPS] * 2  # env steps, whatever the chunks
    single = gym.make("LiberoSpatial-v0", obs_mode="state", task_ids=(0,))
    try:
        with pytest.raises(ValueError, match="the env takes 1 action.* chunk of 4: make the env with action_chunk=4"):
            GRPO.load(tmp_path / "grpo", env=single)
    finally:
        single.close()


def test_a_receding_horizon_executes_the_first_m_actions_and_masks_the_rest(tmp_path):
    policy = make_policy(execute_steps=2)
    kwargs = env_kwargs_for_policy(policy, 6)
    assert kwargs["action_chunk"] == 2 and kwargs["max_env_steps"] == 6
    env = gym.make("LiberoSpatial-v0", task_ids=(0,), num_settle_steps=2, **kwargs)
    try:
        model = GRPO(policy, env, group_size=2, num_groups=1, max_sampling_rounds=1, seed=0)
        rollout = model.collect_rollouts()
        episode = rollout.episodes[0]
        assert episode.actions.shape == (3, CHUNK, 7) and episode.executed.tolist() == [2, 2, 2]
        assert rollout.token_mask[:3].tolist() == [[True] * 14 + [False] * 14] * 3
        policy.save_pretrained(tmp_path)
        assert load_policy(tmp_path).execute_steps == 2
    finally:
        env.close()


def test_group_rollout_masks_follow_the_episodes():
    chunks = np.zeros((2, 2, 7), np.float32)
    episode = Episode({"instruction": INSTRUCTION, "state": np.zeros((3, 8), np.float32)}, chunks, np.array([0.0, 1.0]),
                      True, 0, log_probs=np.zeros((2, 14), np.float32), executed=[2, 1])  # fmt: skip
    policy = make_policy(chunk_size=2)
    rollout = GroupRollout.from_episodes([episode], policy.action_bins, policy.observation_keys, chunk_size=2)
    assert rollout.token_mask.tolist() == [[True] * 14, [True] * 7 + [False] * 7]


def test_async_grpo_and_irevla_train_on_chunks(env, demos, tmp_path):
    from gym_libero_vla.algos import AsyncGRPO, IReVLA
    from gym_libero_vla.episode_store import EpisodeStore

    model = AsyncGRPO(make_policy(), env, group_size=2, num_groups=1, max_sampling_rounds=1, num_workers=1,
                      pipeline_dir=str(tmp_path / "pipeline"), seed=0)  # fmt: skip
    model.learn(2 * 2 * MAX_ENV_STEPS)
    assert model.num_timesteps == 4 * MAX_ENV_STEPS and model.policy_version == 2  # env steps of two groups
    store = EpisodeStore(tmp_path / "pipeline" / "cache")
    for record in store.records(source="online"):
        episode = store.load(record["episode_id"])
        assert record["num_steps"] == MAX_ENV_STEPS and episode.executed.tolist() == [4, 4, 2]
        assert episode.log_probs.shape == (3, CHUNK * 7)

    irevla = IReVLA(make_policy(), env, demos=demos, group_size=2, num_groups=1, rl_updates_per_stage=1,
                    sl_steps_per_stage=2, sl_batch_size=8, max_sampling_rounds=1, seed=0)  # fmt: skip
    irevla.learn(2 * MAX_ENV_STEPS)
    assert (irevla.num_timesteps, irevla.num_rl_stages, irevla.num_sl_stages) == (2 * MAX_ENV_STEPS, 1, 1)
    assert irevla.last_sl_metrics["sl/num_transitions"] == 2 * 12  # one window of 4 actions per demo step
