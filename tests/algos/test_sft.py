"""SFT (behaviour cloning on action tokens): learning, SB3 surface, logging, checkpoints, demo sources.

Demonstrations are recorded in the real simulator (state mode): a proportional controller that drives
the end effector towards a task-specific point, so the demo action depends on both the instruction and
the state.
"""

from __future__ import annotations

import glob

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3.common.callbacks import BaseCallback

from gym_libero_vla.algos.sft import SFT, StepColumn, Transitions, demo_token_log_probs
from gym_libero_vla.episode import Episode
from gym_libero_vla.episode_store import EpisodeStore
from gym_libero_vla.policies import CompactVLA, CompactVLAConfig, WordTokenizer
from gym_libero_vla.wrappers.action_tokenizer import ActionBins

TARGETS = {0: np.array([-0.1, 0.1, 1.0]), 1: np.array([0.1, -0.1, 1.1])}
STEPS_PER_EPISODE = 12


def controller(state: np.ndarray, task_id: int) -> np.ndarray:
    """Move the end effector towards the task's target point, gripper open on task 0, closed on task 1."""
    motion = np.clip(5.0 * (TARGETS[task_id] - state[:3]), -1.0, 1.0)
    return np.concatenate([motion, [0.0, 0.0, 0.0], [-1.0 if task_id == 0 else 1.0]]).astype(np.float32)


@pytest.fixture(scope="module")
def demos():
    """Four episodes (tasks 0 and 1, two init states each) as gym_libero_vla.episode.Episode."""
    env = gym.make("LiberoSpatial-v0", obs_mode="state", task_ids=(0, 1), num_settle_steps=2)
    episodes = []
    try:
        for task_id in (0, 1):
            for init_state_id in (0, 1):
                obs, _ = env.reset(options={"task_id": task_id, "init_state_id": init_state_id})
                states, actions = [obs["state"]], []
                for _ in range(STEPS_PER_EPISODE):
                    actions.append(controller(obs["state"], task_id))
                    obs, *_ = env.step(actions[-1])
                    states.append(obs["state"])
                episodes.append(
                    Episode(
                        observations={"instruction": obs["instruction"], "state": np.array(states)},
                        actions=np.array(actions),
                        rewards=np.zeros(STEPS_PER_EPISODE),
                        success=False,
                        task_id=task_id,
                        init_state_id=init_state_id,
                        source="offline",
                        env_id="LiberoSpatial-v0",
                    )
                )
    finally:
        env.close()
    return episodes


def make_policy(demos, seed=0, chunk_size=1) -> CompactVLA:
    torch.manual_seed(seed)
    bins = ActionBins.from_statistics({"q01": [-1.0] * 7, "q99": [1.0] * 7})
    tokenizer = WordTokenizer.from_texts(episode.observations["instruction"] for episode in demos)
    config = CompactVLAConfig(cameras=(), hidden_size=32, num_layers=1, num_heads=2, chunk_size=chunk_size)
    return CompactVLA(config, bins, tokenizer)


def demo_log_likelihood(policy, transitions) -> float:
    obs, actions = transitions.batch(np.arange(len(transitions)))
    with torch.no_grad():
        return policy.log_prob(obs, policy.action_bins.encode(actions))[0].sum(-1).mean().item()


def test_learn_reduces_loss_and_raises_demo_likelihood(demos):
    model = SFT(make_policy(demos), demos=demos, learning_rate=3e-3, batch_size=16, log_interval=10, seed=0)
    assert len(model.demos) == 4 * STEPS_PER_EPISODE
    before = demo_log_likelihood(model.policy, model.demos)
    model.learn(10, progress_bar=False)
    first_loss = model.last_metrics["train/loss"]
    model.learn(70, progress_bar=True, reset_num_timesteps=False)
    assert model.num_timesteps == 80
    assert model.last_metrics["train/loss"] < 0.7 * first_loss
    assert model.last_metrics["train/token_accuracy"] > 0.3
    assert demo_log_likelihood(model.policy, model.demos) > before + 10.0  # nats per action, 7 tokens


def test_predict_save_load_round_trip(demos, tmp_path):
    weights = (1, 1, 1, 1, 1, 1, 3)
    model = SFT(make_policy(demos), demos=demos, batch_size=8, seed=0, action_weights=weights).learn(5, progress_bar=False)
    obs = {"instruction": demos[0].observations["instruction"], "state": demos[0].observations["state"][0]}
    action, state = model.predict(obs, deterministic=True)
    assert action.shape == (7,) and action.dtype == np.float32 and state is None
    batch = {"instruction": (obs["instruction"],) * 2, "state": np.stack([obs["state"]] * 2)}
    assert model.predict(batch, deterministic=True)[0].shape == (2, 7)
    model.save(tmp_path / "sft")
    loaded = SFT.load(tmp_path / "sft", demos=demos)
    assert loaded.num_timesteps == 5 and loaded.config.batch_size == 8 and loaded.config.seed == 0
    assert loaded.config.action_weights == weights  # a tuple again, from the checkpoint's JSON list
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], action)
    assert loaded.optimizer.state_dict()["state"]  # Adam moments restored: training resumes, not restarts
    loaded.learn(2, progress_bar=False, reset_num_timesteps=False)
    assert loaded.num_timesteps == 7


def test_callback_stops_training(demos):
    class StopAfter(BaseCallback):
        def __init__(self, calls):
            super().__init__()
            self.calls = calls

        def _on_step(self) -> bool:
            assert "train/loss" in self.locals["metrics"] and self.model.num_timesteps == self.n_calls
            return self.n_calls < self.calls

    model = SFT(make_policy(demos), demos=demos, batch_size=8)
    callback = StopAfter(3)
    model.learn(100, callback=[callback], progress_bar=False)
    assert model.num_timesteps == 3 and callback.n_calls == 3


def test_tensorboard_logging(demos, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    SFT(make_policy(demos), demos=demos, batch_size=8, log_interval=2, tensorboard_log=str(tmp_path)).learn(
        4, progress_bar=False
    )
    (run,) = glob.glob(str(tmp_path / "SFT_*"))
    events = EventAccumulator(run)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/token_accuracy", "train/entropy", "train/action_l1", "time/fps"} <= tags
    assert [event.step for event in events.Scalars("train/loss")] == [2, 4]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(learning_rate=0.0), "learning_rate 0.0"),
        (dict(learning_rate=float("nan")), "learning_rate nan"),
        (dict(batch_size=0), "batch_size 0"),
        (dict(batch_size=2.5), "batch_size 2.5"),
        (dict(max_grad_norm=-1.0), "max_grad_norm -1.0"),
        (dict(log_interval=0), "log_interval 0"),
        (dict(ema_decay=1.0), r"ema_decay 1.0 must be in \[0, 1\)"),
        (dict(ema_decay=-0.5), r"ema_decay -0.5 must be in \[0, 1\)"),
        (dict(action_weights=(1.0,) * 6), "action_weights has 6 numbers, but the policy's actions have 7 dimensions"),
        (dict(action_weights=(1, 1, 1, 1, 1, 1, -1)), "must be finite numbers >= 0, one per action dimension"),
        (dict(action_weights=(0,) * 7), "are all 0: nothing would be learned"),
        (dict(action_weights=4.0), "must be a sequence: one number per action dimension"),
    ],
)
def test_hyperparameters_are_validated(demos, kwargs, message):
    with pytest.raises(ValueError, match=message):
        SFT(make_policy(demos), demos=demos, **kwargs)


@pytest.mark.parametrize("chunk_size", [1, 4])
def test_action_weights_weigh_each_dimensions_tokens(demos, chunk_size):
    """The loss is the weighted mean of the token NLLs: all weight on the gripper is the gripper tokens' NLL alone
    (over a chunk's real steps, not its padding); equal weights are the plain mean."""
    losses = {}
    for name, weights in {"gripper": (0, 0, 0, 0, 0, 0, 1), "equal": (2,) * 7, "none": None}.items():
        policy = make_policy(demos, seed=0, chunk_size=chunk_size)  # the same initial weights for each
        model = SFT(policy, demos=demos, batch_size=4 * STEPS_PER_EPISODE, action_weights=weights, seed=0)
        obs, actions = model.demos.batch(np.arange(len(model.demos)))  # the batch is every transition
        with torch.no_grad():
            _, token_log_probs, _ = demo_token_log_probs(policy, obs, actions)
        mask = model.demos.token_mask(np.arange(len(model.demos)))
        mask = np.ones(token_log_probs.shape, bool) if mask is None else mask
        assert (mask.sum() < mask.size) == (chunk_size > 1)  # chunks past an episode's end are padded
        losses[name] = (model.train_step()["train/loss"], token_log_probs.numpy(), mask)
    _, token_log_probs, mask = losses["gripper"]
    gripper = -token_log_probs[:, 6::7][mask[:, 6::7]].mean()
    plain = -token_log_probs[mask].mean()
    assert abs(gripper - plain) > 0.01  # the two differ, so the checks below tell them apart
    assert losses["gripper"][0] == pytest.approx(gripper, rel=1e-5)
    assert losses["equal"][0] == pytest.approx(plain, rel=1e-5)
    assert losses["none"][0] == pytest.approx(plain, rel=1e-5)


def test_bad_demonstrations_and_envs_are_named(demos):
    policy = make_policy(demos)
    with pytest.raises(ValueError, match="no observation 'state'"):
        SFT(policy, demos=[{"observations": {"instruction": "open the drawer"}, "actions": np.zeros((3, 7))}])
    with pytest.raises(ValueError, match=r"actions have shape \(3, 6\)"):
        SFT(policy, demos=[{"instruction": "open the drawer", "state": np.zeros((3, 8)), "actions": np.zeros((3, 6))}])
    with pytest.raises(ValueError, match="no episodes"):
        SFT(policy, demos=[])
    with pytest.raises(ValueError, match="no demonstrations"):
        SFT(policy).learn(1, progress_bar=False)
    with pytest.raises(ValueError, match="total_steps 0"):
        SFT(policy, demos=demos).learn(0)
    rgb_env = gym.make("LiberoSpatial-v0", obs_mode="rgb", cameras=("agentview",))  # built lazily: no simulator yet
    with pytest.raises(ValueError, match=r"lack \['state'\]"):
        SFT(policy, env=rgb_env, demos=demos)


def test_demos_from_an_episode_store_and_a_generated_hdf5_file(demos, tmp_path):
    from gym_libero_vla.demos.generate import GenerateArgs, generate

    store = EpisodeStore(tmp_path / "store")
    for episode in demos:
        store.append(episode)
    from_store = Transitions.from_episodes(str(tmp_path / "store"), ("instruction", "state"), 7)
    assert len(from_store) == 4 * STEPS_PER_EPISODE and set(from_store.task_ids) == {0, 1}

    path = tmp_path / "spatial.hdf5"
    generate(GenerateArgs(suite="spatial", out=str(path), task_ids=(0,), episodes_per_task=1, progress=False))
    model = SFT(make_policy(demos), demos=str(path), batch_size=8, seed=0)
    assert len(model.demos) > 20 and set(model.demos.task_ids) == {0}
    assert model.demos.observations["state"].shape[1:] == (8,)
    model.learn(3, progress_bar=False)
    assert np.isfinite(model.last_metrics["train/loss"])


def test_lora_fine_tuning_trains_and_saves_only_the_adapter(demos, tmp_path):
    make_policy(demos).save_pretrained(tmp_path / "base")
    policy = CompactVLA.from_pretrained(tmp_path / "base").add_lora(rank=4, alpha=8)
    model = SFT(policy, demos=demos, learning_rate=1e-2, batch_size=8, seed=0)
    optimized = {id(p) for group in model.optimizer.param_groups for p in group["params"]}
    assert optimized and all("lora_" in name for name, p in policy.named_parameters() if id(p) in optimized)
    model.learn(4, progress_bar=False)
    model.save(tmp_path / "lora")
    files = {path.name for path in (tmp_path / "lora").iterdir()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    obs = {"instruction": demos[1].observations["instruction"], "state": demos[1].observations["state"][3]}
    loaded = SFT.load(tmp_path / "lora")
    assert loaded.policy.lora_enabled and loaded.num_timesteps == 4
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0])


def test_learns_from_camera_frames(demos):
    """Demos with frames (here dicts, frames drawn at random) train a policy that reads agentview."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    bins = ActionBins.from_statistics({"q01": [-1.0] * 7, "q99": [1.0] * 7})
    config = CompactVLAConfig(cameras=("agentview",), image_size=32, image_grid=2, hidden_size=32, num_layers=1, num_heads=2)
    policy = CompactVLA(config, bins, WordTokenizer.from_texts(["open the drawer"]))
    frames = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    episode = {"instruction": "open the drawer", "agentview": frames, "state": np.zeros((5, 8)), "actions": np.zeros((5, 7))}
    model = SFT(policy, demos=[episode], batch_size=4, seed=0, random_shift=4).learn(2, progress_bar=False)
    assert model.demos.observations["agentview"].shape == (5, 32, 32, 3) and np.isfinite(model.last_metrics["train/loss"])
    np.testing.assert_array_equal(model.demos.observations["agentview"], frames)  # augmented copies, demos untouched
    with pytest.raises(ValueError, match="built for 32x32"):
        model.predict({"instruction": "open the drawer", "agentview": frames[0, :16], "state": np.zeros(8)})


def test_frames_are_flattened_without_a_copy():
    # Transitions of episodes with frames keep each episode's frame array (a pixel demo set is not held twice) and
    # gather a batch's steps from them: equal to indexing the concatenation, whatever the index form.
    rng = np.random.default_rng(0)
    episodes = [
        {"instruction": "open the drawer", "agentview": rng.integers(0, 256, (length, 8, 8, 3), dtype=np.uint8),
         "state": rng.normal(size=(length, 8)), "actions": rng.uniform(-1, 1, (length, 7))}
        for length in (3, 1, 5)
    ]  # fmt: skip
    transitions = Transitions.from_episodes(episodes, ("instruction", "agentview", "state"), action_dim=7)
    column = transitions.observations["agentview"]
    assert isinstance(column, StepColumn) and column.shape == (9, 8, 8, 3) and len(transitions) == 9
    assert all(np.shares_memory(part, episode["agentview"]) for part, episode in zip(column.parts, episodes))
    flat = np.concatenate([episode["agentview"] for episode in episodes])
    for indices in ([8, 0, 3, 3, 4], np.arange(9)[::-1], [-1], slice(2, 7), flat[:, 0, 0, 0] > 128, []):
        np.testing.assert_array_equal(column[indices], flat[indices])
    np.testing.assert_array_equal(np.asarray(column), flat)
    obs, actions = transitions.batch(np.array([4, 2]))
    np.testing.assert_array_equal(obs["agentview"], flat[[4, 2]])
    assert obs["instruction"] == ("open the drawer",) * 2 and actions.shape == (2, 7)
    with pytest.raises(IndexError, match="out of range for 9 steps"):
        column[[9]]
    with pytest.raises(IndexError, match="boolean mask of a StepColumn has 9 entries"):
        column[np.ones(4, bool)]


def test_random_shift_moves_each_frame_within_its_padding():
    from gym_libero_vla.algos.sft import random_shift

    frames = np.random.default_rng(0).integers(0, 256, (16, 12, 12, 3), dtype=np.uint8)
    shifted = random_shift(frames, 2, np.random.default_rng(1))
    assert shifted.shape == frames.shape and shifted.dtype == np.uint8
    moved = 0
    for original, frame in zip(frames, shifted):
        # Some offset (dy, dx) in -2..2 maps the frame's interior onto the original's.
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if np.array_equal(frame[2:-2, 2:-2], original[2 + dy : 10 + dy, 2 + dx : 10 + dx])]  # fmt: skip
        assert matches
        moved += matches[0] != (0, 0)
    assert moved >= 8  # 24 of 25 offsets move the frame
    np.testing.assert_array_equal(random_shift(frames, 0, np.random.default_rng(1)), frames)
    with pytest.raises(ValueError, match=r"\(B, H, W, C\) frames"):
        random_shift(frames[0], 2, np.random.default_rng(0))


def test_continue_sft_resumes_its_checkpoint_with_the_same_batches(demos, tmp_path):
    """Trained in two calls with a save in between, SFT ends with the weights of one uninterrupted run (batch order
    and optimizer state are saved), and its wall seconds add up across the calls."""
    from gym_libero_vla.algos.sft import continue_sft

    def create():
        return SFT(make_policy(demos), demos=demos, batch_size=8, seed=0)

    straight, steps = continue_sft(str(tmp_path / "straight"), create, 6, save_every=2)
    assert steps == 6 and straight.num_timesteps == 6
    first, _ = continue_sft(str(tmp_path / "split"), create, 3, save_every=2)
    resumed, steps = continue_sft(str(tmp_path / "split"), create, 6, save_every=2, demos=demos)
    assert steps == 3 and resumed.num_timesteps == 6
    assert resumed.train_seconds > first.train_seconds > 0
    for a, b in zip(straight.policy.parameters(), resumed.policy.parameters()):
        torch.testing.assert_close(a, b)
    again, steps = continue_sft(str(tmp_path / "split"), create, 6, demos=demos)
    assert steps == 0 and again.num_timesteps == 6  # done: nothing trained


def test_ema_averages_the_training_weights_and_resumes_exactly(demos, tmp_path):
    """With ema_decay, outside learn the policy holds the moving average of the weights each step trained (recomputed
    here from the weights a callback sees, warm-up included); predict and save use it; the checkpoint also holds the
    training weights, so training on after a save and a load ends exactly where an uninterrupted run does."""
    from gym_libero_vla.algos.sft import continue_sft

    decay, seen = 0.6, []

    class Record(BaseCallback):
        def _on_step(self) -> bool:
            seen.append([p.detach().clone() for p in self.model.policy.parameters()])
            return True

    def create():
        return SFT(make_policy(demos), demos=demos, batch_size=8, seed=0, learning_rate=1e-2, ema_decay=decay)

    model = create()
    start = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(5, callback=Record())
    expected = start
    for t, weights in enumerate(seen):
        d = min(decay, (1 + t) / (10 + t))
        expected = [d * a + (1 - d) * w for a, w in zip(expected, weights)]
    assert model.ema.holds_averaged and model.ema.num_updates == 5
    for averaged, parameter in zip(expected, model.policy.parameters()):
        torch.testing.assert_close(parameter.detach(), averaged)
    assert not all(torch.equal(p.detach(), w) for p, w in zip(model.policy.parameters(), seen[-1]))
    obs = {"instruction": demos[0].observations["instruction"], "state": demos[0].observations["state"][0]}
    plain = SFT(make_policy(demos), demos=demos)
    with torch.no_grad():
        for target, averaged in zip(plain.policy.parameters(), expected):
            target.copy_(averaged)
    np.testing.assert_array_equal(model.predict(obs, deterministic=True)[0], plain.predict(obs, deterministic=True)[0])
    with model.averaged_weights() as policy:  # already in place outside learn: nothing changes
        assert policy is model.policy and model.ema.holds_averaged

    model.save(tmp_path / "ema")
    from gym_libero_vla.policies import load_policy

    for saved, averaged in zip(load_policy(tmp_path / "ema").parameters(), expected):
        torch.testing.assert_close(saved.detach(), averaged)  # the checkpoint's policy is the average
    # Split at 3 steps with a save and load in between = straight to 6 steps: training and averaged weights.
    straight, _ = continue_sft(str(tmp_path / "straight"), create, 6, save_every=100)
    continue_sft(str(tmp_path / "split"), create, 3, save_every=100)
    resumed, steps = continue_sft(str(tmp_path / "split"), create, 6, save_every=100, demos=demos)
    assert steps == 3 and resumed.config.ema_decay == decay and resumed.ema.num_updates == 6
    for a, b in zip(straight.policy.parameters(), resumed.policy.parameters()):
        torch.testing.assert_close(a, b)
    for a, b in zip(straight.ema.training_weights(), resumed.ema.training_weights()):
        torch.testing.assert_close(a, b)
    with pytest.warns(UserWarning, match="holds averaged"):
        SFT.load(tmp_path / "split", demos=demos, ema_decay=0.0)


def test_latest_checkpoint_callback_saves_every_n_steps(demos, tmp_path):
    from gym_libero_vla.algos.callbacks import LatestCheckpointCallback

    saved_at = []

    class Spy(LatestCheckpointCallback):
        def _on_step(self) -> bool:
            result = super()._on_step()
            if (tmp_path / "ckpt" / "sft.json").exists():
                saved_at.append(SFT.load(tmp_path / "ckpt").num_timesteps)
            return result

    callback = Spy(2, str(tmp_path / "ckpt"), keep_at=(3, 4))
    SFT(make_policy(demos), demos=demos, batch_size=8, seed=0).learn(5, callback=callback)
    assert sorted(set(saved_at)) == [2, 4]
    # kept checkpoints stay at their steps while the latest moves on
    assert [SFT.load(tmp_path / f"ckpt_step{step}").num_timesteps for step in (3, 4)] == [3, 4]
    assert not (tmp_path / "ckpt_step2").exists() and SFT.load(tmp_path / "ckpt").num_timesteps == 4
    with pytest.raises(ValueError, match="save_freq 0 must be an int >= 1"):
        LatestCheckpointCallback(0, str(tmp_path))
    with pytest.raises(ValueError, match=r"keep_at step 0 must be an int >= 1 \(the steps whose checkpoint to keep\)"):
        LatestCheckpointCallback(2, str(tmp_path), keep_at=(0,))
