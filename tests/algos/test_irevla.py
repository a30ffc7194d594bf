"""iRe-VLA on the real simulator (state mode, 10-step episodes) with a tiny CompactVLA: RL stages move only the
action head, SL stages move the backbone on demos + online successes, the success buffer, SB3 surface,
logging, checkpoints and hyperparameter checks."""

from __future__ import annotations

import glob

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3.common.callbacks import BaseCallback

from gym_libero_vla.algos.irevla import IReVLA
from gym_libero_vla.episode import Episode
from gym_libero_vla.episode_store import EpisodeStore
from gym_libero_vla.policies import CompactVLA, CompactVLAConfig, WordTokenizer
from gym_libero_vla.wrappers.action_tokenizer import ActionBins

MAX_EPISODE_STEPS = 10
EPISODE_STEPS = 2 * MAX_EPISODE_STEPS  # one rollout: one group of two episodes


class SucceedAtTimeLimit(gym.Wrapper):
    """Reports success (reward 1) on the last step of every episode, so rollouts of a random policy succeed."""

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, 1.0 if truncated else reward, terminated, truncated, info


def make_policy(instruction: str, seed: int = 0) -> CompactVLA:
    torch.manual_seed(seed)
    bins = ActionBins.from_statistics({"q01": [-1.0] * 7, "q99": [1.0] * 7})
    config = CompactVLAConfig(cameras=(), hidden_size=32, num_layers=1, num_heads=2)
    return CompactVLA(config, bins, WordTokenizer.from_texts([instruction]))


def episode(instruction: str, success: bool, source: str = "online", seed: int = 0, num_steps: int = 5) -> Episode:
    rng = np.random.default_rng(seed)
    return Episode(
        observations={"instruction": instruction, "state": rng.normal(size=(num_steps, 8)).astype(np.float32)},
        actions=rng.uniform(-1, 1, (num_steps, 7)).astype(np.float32),
        rewards=np.eye(num_steps)[-1] * float(success),
        success=success,
        task_id=0,
        source=source,
    )


def snapshot(policy) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in policy.named_parameters()}


def changed(before: dict[str, torch.Tensor], policy) -> set[str]:
    return {name for name, parameter in policy.named_parameters() if not torch.equal(before[name], parameter)}


HEAD = {"lm_head.weight", "backbone.norm.weight"}


def test_rl_stage_trains_only_the_action_head(env, instruction):
    policy = make_policy(instruction)
    before = snapshot(policy)
    model = IReVLA(
        policy, env, demos=[episode(instruction, True, "offline")], group_size=2, num_groups=1, rl_updates_per_stage=2,
        sl_steps_per_stage=0, dynamic_sampling=False, entropy_coef=0.1, learning_rate=1e-2, seed=0,
    )  # fmt: skip
    head_ids = {id(p) for p in policy.head_parameters()}
    assert {id(p) for group in model.rl.optimizer.param_groups for p in group["params"]} == head_ids
    model.learn(2 * EPISODE_STEPS)
    assert model.num_timesteps == 2 * EPISODE_STEPS and (model.num_rl_stages, model.num_sl_stages) == (1, 0)
    assert changed(before, policy) == HEAD  # the entropy bonus moved the head; the backbone stayed frozen
    assert all(p.requires_grad for p in policy.parameters())  # unfrozen again after the stage
    assert model.success_buffer == [] and model.last_rl_metrics["rollout/success_rate"] == 0.0


def test_learn_alternates_stages_and_the_sl_stage_imitates_online_successes(env, instruction, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    policy = make_policy(instruction)
    before = snapshot(policy)
    demos = [episode(instruction, True, "offline")]
    model = IReVLA(
        policy, SucceedAtTimeLimit(env), demos=demos, group_size=2, num_groups=1, rl_updates_per_stage=1,
        sl_steps_per_stage=3, sl_batch_size=8, success_buffer_size=3, success_store=str(tmp_path / "successes"),
        max_sampling_rounds=1, seed=0, tensorboard_log=str(tmp_path / "tb"),
    )  # fmt: skip
    model.learn(2 * EPISODE_STEPS)
    assert (model.num_rl_stages, model.num_sl_stages) == (2, 2)  # RL, SL, RL, SL
    assert changed(before, policy) - HEAD  # the SL stages trained the backbone

    # D_RL: the newest 3 of the 4 online episodes (all successes here), with what the rollout recorded.
    assert len(model.success_buffer) == 3 and len(EpisodeStore(tmp_path / "successes")) == 3
    for success in model.success_buffer:
        assert success.success and success.source == "online" and success.task_id == 0
        assert success.actions.shape == (MAX_EPISODE_STEPS, 7) and success.observations["instruction"] == instruction
    sl_metrics = model.last_sl_metrics
    assert sl_metrics["sl/num_transitions"] == 5 + 3 * MAX_EPISODE_STEPS  # demos + successes
    assert sl_metrics["sl/success_fraction"] == pytest.approx(30 / 35) and np.isfinite(sl_metrics["sl/loss"])

    (run,) = glob.glob(str(tmp_path / "tb" / "IReVLA_*"))
    events = EventAccumulator(run)
    events.Reload()
    assert {"rollout/success_rate", "irevla/success_buffer", "sl/loss", "sl/token_accuracy"} <= set(events.Tags()["scalars"])
    stages = [(event.step, event.value) for event in events.Scalars("irevla/stage")]
    assert stages == [(20, 0.0), (20, 1.0), (40, 0.0), (40, 1.0)]

    # A new run refills its success buffer from the store.
    resumed = IReVLA(make_policy(instruction), env, success_store=str(tmp_path / "successes"), success_buffer_size=2)
    assert len(resumed.success_buffer) == 2 and all(success.success for success in resumed.success_buffer)


def test_success_buffer_keeps_the_newest_online_successes(instruction):
    model = IReVLA(make_policy(instruction), success_buffer_size=2, sl_steps_per_stage=20, sl_learning_rate=3e-3, seed=0)
    episodes = [
        episode(instruction, False, seed=1), episode(instruction, True, seed=2),
        episode(instruction, True, "offline", seed=3), episode(instruction, True, seed=4), episode(instruction, True, seed=5),
    ]  # fmt: skip
    assert model.train_sl_stage() == {}  # no demos, no successes yet: nothing to learn from
    assert model.successes.add(episodes) == [episodes[1], episodes[3], episodes[4]]  # online successes only
    assert model.success_buffer == [episodes[3], episodes[4]]

    def log_likelihood() -> float:
        obs = {"instruction": [instruction] * 5, "state": episodes[4].observations["state"]}
        tokens = model.policy.action_bins.encode(episodes[4].actions)
        with torch.no_grad():
            return model.policy.log_prob(obs, tokens)[0].sum(-1).mean().item()

    before = log_likelihood()
    metrics = model.train_sl_stage()
    assert metrics["sl/success_fraction"] == 1.0 and metrics["sl/num_transitions"] == 10
    assert log_likelihood() > before + 1.0  # the supervised stage imitates the policy's own successes


def test_predict_save_load_round_trip(env, instruction, tmp_path):
    demos = [episode(instruction, True, "offline")]
    model = IReVLA(
        make_policy(instruction), env, demos=demos, group_size=2, num_groups=1, rl_updates_per_stage=1,
        sl_steps_per_stage=2, sl_batch_size=4, entropy_coef=0.1, dynamic_sampling=False, seed=3,
    ).learn(EPISODE_STEPS)  # fmt: skip
    obs, _ = env.reset(options={"task_id": 0, "init_state_id": 1})
    action, state = model.predict(obs, deterministic=True)
    assert action.shape == (7,) and action.dtype == np.float32 and state is None
    model.save(tmp_path / "irevla")
    model.save(tmp_path / "irevla")  # overwriting a checkpoint replaces it
    loaded = IReVLA.load(tmp_path / "irevla", env=env, demos=demos)
    assert loaded.num_timesteps == EPISODE_STEPS and (loaded.num_rl_stages, loaded.num_sl_stages) == (1, 1)
    assert loaded.rl.num_optimizer_steps == model.rl.num_optimizer_steps > 0  # the RL stage's step-size warm-up count
    assert loaded.config == model.config and loaded.rl.config == model.rl.config
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], action)
    assert loaded.rl.optimizer.state_dict()["state"] and loaded.sl.optimizer.state_dict()["state"]  # Adam moments back
    assert len(loaded.rl.optimizer.param_groups[0]["params"]) == len(HEAD)  # the head-only optimizer again
    loaded.learn(EPISODE_STEPS, reset_num_timesteps=False)  # resumes: one more RL + SL stage
    assert loaded.num_timesteps == 2 * EPISODE_STEPS and (loaded.num_rl_stages, loaded.num_sl_stages) == (2, 2)
    with pytest.raises(FileNotFoundError, match="not a checkpoint of IReVLA: it has no irevla.json"):
        IReVLA.load(tmp_path)


def test_one_moving_average_spans_both_stages(env, instruction, tmp_path):
    """With ema_decay, every optimizer step of either stage (head-only RL, full SL) moves one average of all the
    weights, started at the policy; outside learn the policy holds it, checkpoints keep the training weights beside
    it and a resumed run continues them."""
    decay = 0.8
    demos = [episode(instruction, True, "offline")]
    model = IReVLA(
        make_policy(instruction), SucceedAtTimeLimit(env), demos=demos, group_size=2, num_groups=1,
        rl_updates_per_stage=1, sl_steps_per_stage=3, sl_batch_size=4, learning_rate=1e-2, sl_learning_rate=1e-2,
        dynamic_sampling=False, ema_decay=decay, seed=0,
    )  # fmt: skip
    assert model.rl.ema is model.ema and model.sl.ema is model.ema and len(model.ema.parameters) == len(model.sl_parameters)
    trained = []  # the training weights after each update of the average (the real update runs)
    update = model.ema.update

    def recording_update():
        update()
        trained.append([p.detach().clone() for p in model.ema.parameters])

    model.ema.update = recording_update
    start = [p.detach().clone() for p in model.ema.parameters]
    model.learn(EPISODE_STEPS)
    assert (model.num_rl_stages, model.num_sl_stages) == (1, 1)
    assert len(trained) == model.rl.num_optimizer_steps + 3 == model.ema.num_updates  # both stages' steps
    expected = start
    for weights in trained:
        expected = [decay * a + (1 - decay) * w for a, w in zip(expected, weights)]
    assert model.ema.holds_averaged
    for parameter, averaged in zip(model.ema.parameters, expected):
        torch.testing.assert_close(parameter.detach(), averaged)
    head = {id(p) for p in model.head_parameters}
    backbone = [i for i, p in enumerate(model.ema.parameters) if id(p) not in head]
    rl_steps = model.rl.num_optimizer_steps
    assert all(torch.equal(trained[rl_steps - 1][i], start[i]) for i in backbone)  # the RL stage left them alone
    assert not all(torch.equal(trained[-1][i], start[i]) for i in backbone)  # the SL stage moved them

    model.save(tmp_path / "ema")
    loaded = IReVLA.load(tmp_path / "ema", env=SucceedAtTimeLimit(env), demos=demos)
    assert loaded.rl.ema is loaded.ema and loaded.sl.ema is loaded.ema and loaded.ema.num_updates == len(trained)
    for parameter, averaged in zip(loaded.ema.parameters, expected):
        torch.testing.assert_close(parameter.detach(), averaged)
    for weight, last in zip(loaded.ema.training_weights(), trained[-1]):
        torch.testing.assert_close(weight, last)
    loaded.learn(EPISODE_STEPS, reset_num_timesteps=False)
    assert loaded.ema.num_updates == 2 * len(trained) and loaded.ema.holds_averaged


def test_callback_stops_training(env, instruction):
    class StopAfter(BaseCallback):
        def _on_step(self) -> bool:
            return self.n_calls < 5

    model = IReVLA(make_policy(instruction), env, demos=[episode(instruction, True, "offline")], group_size=2, num_groups=1)
    model.learn(1000, callback=[StopAfter()])
    assert model.num_timesteps == 5 and (model.num_rl_stages, model.num_sl_stages) == (0, 0)


def test_bad_hyperparameters_are_named(env, instruction, tmp_path):
    policy = make_policy(instruction)
    with pytest.raises(ValueError, match="rl_updates_per_stage 0 must be an int >= 1"):
        IReVLA(policy, env, rl_updates_per_stage=0)
    with pytest.raises(ValueError, match="sl_steps_per_stage -1 must be an int >= 0"):
        IReVLA(policy, env, sl_steps_per_stage=-1)
    with pytest.raises(ValueError, match="sl_learning_rate 0 must be a finite number > 0"):
        IReVLA(policy, env, sl_learning_rate=0)
    with pytest.raises(ValueError, match="success_buffer_size -1"):
        IReVLA(policy, env, success_buffer_size=-1)
    with pytest.raises(ValueError, match=r"unknown iRe-VLA hyperparameter\(s\) \['rl_steps'\]: valid .*GRPO's"):
        IReVLA(policy, env, rl_steps=3)
    with pytest.raises(ValueError, match="group_size 1"):  # GRPO's own checks still apply to the RL stage
        IReVLA(policy, env, group_size=1)
    with pytest.raises(ValueError, match="rescue_failed_groups"):
        IReVLA(policy, env, demos=[episode(instruction, True, "offline")], rescue_failed_groups=True)
    with pytest.raises(ValueError, match=r"ema_decay 1.0 must be in \[0, 1\)"):
        IReVLA(policy, env, ema_decay=1.0)
    with pytest.raises(ValueError, match="IReVLA has no env"):
        IReVLA(policy).learn(10)
    assert all(p.requires_grad for p in policy.parameters())  # a failed construction leaves nothing frozen

    class Headless(CompactVLA):
        def head_parameters(self):
            return []

    headless = Headless(policy.config, policy.action_bins, policy.tokenizer)
    with pytest.raises(ValueError, match=r"Headless.head_parameters\(\) is empty"):
        IReVLA(headless, env)
    policy.save_pretrained(tmp_path / "base")
    lora = CompactVLA.from_pretrained(tmp_path / "base").add_lora(rank=2, alpha=4)
    with pytest.raises(ValueError, match="the action head of the CompactVLA is frozen"):
        IReVLA(lora, env)
