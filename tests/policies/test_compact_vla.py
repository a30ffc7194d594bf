"""CompactVLA: the policy interface (act / log_prob), checkpoints, LoRA and input checks, on tiny real models."""

from __future__ import annotations

import os

import gymnasium as gym
import numpy as np
import pytest
import torch

from gym_libero_vla.policies import CompactVLA, CompactVLAConfig, WordTokenizer, load_policy
from gym_libero_vla.policies.base import POLICY_CONFIG_FILENAME
from gym_libero_vla.policies.compact_vla import ImageEncoder, spatial_softmax

INSTRUCTIONS = (
    "pick up the black bowl between the plate and the ramekin and place it on the plate",
    "pick up the black bowl on the stove and place it on the plate",
    "open the top drawer",
)

CONFIGS = {
    "rgb+state": dict(cameras=("agentview", "wrist"), image_size=64, image_grid=2),
    "state": dict(cameras=()),
    "privileged": dict(cameras=(), object_state_dim=6),
    "keypoints": dict(cameras=("agentview", "wrist"), image_size=64, image_grid=2, image_pooling="spatial_softmax"),
}


def make_policy(action_bins, seed=0, **overrides) -> CompactVLA:
    torch.manual_seed(seed)
    config = CompactVLAConfig(**{"hidden_size": 32, "num_layers": 2, "num_heads": 2, **overrides})
    return CompactVLA(config, action_bins, WordTokenizer.from_texts(INSTRUCTIONS))


def batch_for(name: str, batch_size: int = 3, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    obs = {
        "instruction": tuple(INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(batch_size)),
        "state": rng.normal(size=(batch_size, 8)).astype(np.float32),
    }
    for camera in CONFIGS[name].get("cameras", ()):
        obs[camera] = rng.integers(0, 256, (batch_size, 64, 64, 3), dtype=np.uint8)
    if name == "privileged":
        obs["object_state"] = np.random.default_rng(seed).normal(size=(batch_size, 6)).astype(np.float32)
    return obs


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_act_shapes_and_log_prob_of_sampled_tokens(action_bins, name):
    policy = make_policy(action_bins, **CONFIGS[name])
    obs = batch_for(name)
    actions, tokens, token_log_probs = policy.act(obs)
    assert actions.shape == tokens.shape == token_log_probs.shape == (3, 7)
    assert actions.dtype == torch.float32 and tokens.dtype == torch.int64
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 256
    np.testing.assert_allclose(actions.numpy(), action_bins.decode(tokens.numpy()))
    log_probs, entropy = policy.log_prob(obs, tokens)
    torch.testing.assert_close(log_probs, token_log_probs, atol=1e-5, rtol=1e-5)
    assert entropy.shape == (3, 7) and bool((entropy > 0).all()) and bool((entropy <= np.log(256) + 1e-4).all())


def test_log_prob_is_differentiable_and_batch_independent(action_bins):
    policy = make_policy(action_bins, **CONFIGS["rgb+state"])
    obs = batch_for("rgb+state", batch_size=3)
    tokens = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(0))
    log_probs, entropy = policy.log_prob(obs, tokens)
    (log_probs.sum() + entropy.sum()).backward()
    assert policy.lm_head.weight.grad is not None and policy.image_encoders["wrist"].project.weight.grad.abs().sum() > 0
    # Instructions of different lengths are padded: each sample must score as it does alone.
    for row in range(3):
        alone = {key: value[row : row + 1] for key, value in obs.items()}
        torch.testing.assert_close(
            policy.log_prob(alone, tokens[row : row + 1])[0], log_probs[row : row + 1], atol=1e-5, rtol=1e-5
        )


def test_deterministic_act_is_greedy_and_repeatable(action_bins):
    policy = make_policy(action_bins, **CONFIGS["state"])
    obs = batch_for("state", batch_size=4)
    first, second = policy.act(obs, deterministic=True), policy.act(obs, deterministic=True)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)
    logits = policy.action_logits(obs, first[1])
    assert torch.equal(logits.argmax(-1), first[1])  # each token is the argmax given the previous ones


def test_temperature_scales_the_logits_of_sampling_and_log_prob(action_bins):
    policy = make_policy(action_bins, **CONFIGS["state"])
    obs = batch_for("state", batch_size=64)
    torch.manual_seed(0)
    _, tokens, token_log_probs = policy.act(obs, temperature=2.5)
    logits = policy.action_logits(obs, tokens).float()
    expected = torch.log_softmax(logits / 2.5, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(token_log_probs, expected, atol=1e-5, rtol=1e-5)
    log_probs, entropy = policy.log_prob(obs, tokens, temperature=2.5)
    torch.testing.assert_close(log_probs, expected, atol=1e-5, rtol=1e-5)
    assert bool((entropy > policy.log_prob(obs, tokens)[1]).all())  # flatter than the policy itself
    # A very low temperature samples the greedy tokens; greedy decoding ignores the temperature.
    greedy = policy.act(obs, deterministic=True)[1]
    assert torch.equal(policy.act(obs, temperature=1e-4)[1], greedy)
    assert torch.equal(policy.act(obs, deterministic=True, temperature=5.0)[1], greedy)
    for bad in (0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="must be a finite number > 0"):
            policy.act(obs, temperature=bad)
        with pytest.raises(ValueError, match="must be a finite number > 0"):
            policy.log_prob(obs, tokens, temperature=bad)


def test_save_load_gives_identical_outputs(action_bins, tmp_path):
    policy = make_policy(action_bins, **CONFIGS["rgb+state"])
    obs = batch_for("rgb+state")
    policy.save_pretrained(tmp_path)
    assert {"model.safetensors", POLICY_CONFIG_FILENAME, "action_bins.json", "tokenizer.json"} <= set(os.listdir(tmp_path))
    loaded = load_policy(tmp_path)
    assert isinstance(loaded, CompactVLA) and loaded.config == policy.config and loaded.action_bins == action_bins
    tokens = policy.act(obs, deterministic=True)[1]
    assert torch.equal(loaded.act(obs, deterministic=True)[1], tokens)
    torch.testing.assert_close(loaded.log_prob(obs, tokens)[0], policy.log_prob(obs, tokens)[0])


def test_lora_saves_only_the_adapter_and_reloads_on_its_base(action_bins, tmp_path):
    make_policy(action_bins, **CONFIGS["state"]).save_pretrained(tmp_path / "base")
    base = CompactVLA.from_pretrained(tmp_path / "base")
    obs = batch_for("state")
    tokens = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(1))
    base_log_probs = base.log_prob(obs, tokens)[0].detach()

    policy = base.add_lora(rank=4, alpha=8, target_modules=("q_proj", "v_proj"))
    trainable = [name for name, parameter in policy.named_parameters() if parameter.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    with torch.no_grad():  # LoRA starts as the identity (B = 0): move it so the round trip means something
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    adapted = policy.log_prob(obs, tokens)[0].detach()
    assert not torch.allclose(adapted, base_log_probs)
    policy.save_pretrained(tmp_path / "lora")
    files = set(os.listdir(tmp_path / "lora"))
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    assert (
        os.path.getsize(tmp_path / "lora" / "adapter_model.safetensors")
        < os.path.getsize(tmp_path / "base" / "model.safetensors") / 4
    )

    reloaded = load_policy(tmp_path / "lora")
    assert reloaded.lora_enabled
    torch.testing.assert_close(reloaded.log_prob(obs, tokens)[0], adapted)
    with reloaded.disable_adapter():  # the frozen reference policy of KL-regularised RL
        torch.testing.assert_close(reloaded.log_prob(obs, tokens)[0], base_log_probs)


def test_lora_needs_a_saved_base(action_bins, tmp_path):
    policy = make_policy(action_bins, **CONFIGS["state"]).add_lora(rank=2)
    with pytest.raises(ValueError, match="base checkpoint"):
        policy.save_pretrained(tmp_path)


def test_bad_inputs_raise_clear_errors(action_bins, tmp_path):
    policy = make_policy(action_bins, **CONFIGS["rgb+state"])
    obs = batch_for("rgb+state", batch_size=2)
    with pytest.raises(ValueError, match="channels first"):
        policy.act({**obs, "agentview": np.ascontiguousarray(obs["agentview"].transpose(0, 3, 1, 2))})
    with pytest.raises(ValueError, match="built for 64x64"):
        policy.act({**obs, "agentview": np.zeros((2, 32, 32, 3), np.uint8)})
    with pytest.raises(ValueError, match="uint8"):
        policy.act({**obs, "agentview": obs["agentview"].astype(np.float32)})
    with pytest.raises(ValueError, match="max_instruction_tokens=32"):
        policy.act({**obs, "instruction": ("pick up the bowl " * 10, "open the drawer")})
    with pytest.raises(KeyError, match="'wrist'"):
        policy.act({key: value for key, value in obs.items() if key != "wrist"})
    with pytest.raises(ValueError, match=r"action_tokens have shape \(2, 6\)"):
        policy.log_prob(obs, torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="0..255"):
        policy.log_prob(obs, torch.full((2, 7), 256))
    policy.save_pretrained(tmp_path)
    os.remove(tmp_path / "action_bins.json")
    with pytest.raises(FileNotFoundError, match="action_bins.json"):
        load_policy(tmp_path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(cameras=("top",)), "unknown camera 'top'"),
        (dict(hidden_size=30, num_heads=4), "divisible"),
        (dict(cameras=(), use_state=False), "reads nothing"),
        (dict(image_size=16, image_grid=4), "image_grid 4"),
        (dict(chunk_size=0), "chunk_size 0 must be an int >= 1"),
        (dict(instruction_encoder="bert"), r"unknown instruction_encoder 'bert': valid \('words', 'minilm'\)"),
        (dict(chunk_size=4, execute_steps=5), r"execute_steps 5 must be None or an int in 1..chunk_size \(4\)"),
        (dict(image_size=128, encoder_size=48), "encoder_size 48 must be an int that divides image_size 128"),
        (dict(image_size=64, encoder_size=16, image_grid=4), r"image_grid 4 is finer than the conv feature map \(2 cells"),
        (dict(image_pooling="max"), r"unknown image_pooling 'max': valid \('average', 'spatial_softmax'\)"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        CompactVLAConfig(**overrides)


def test_spatial_softmax_gives_where_each_feature_map_peaks():
    # One map peaks at row 1, column 3 of a 4 x 5 grid, one is flat, one has two equal peaks: the keypoints are the
    # peak's position on the -1..1 scale of pixel centres, the centre, and the peaks' midpoint.
    features = torch.zeros(2, 3, 4, 5)
    features[:, 0, 1, 3] = 50.0
    features[:, 2, 0, 0] = features[:, 2, 3, 4] = 50.0
    keypoints = spatial_softmax(features)
    assert keypoints.shape == (2, 3, 2)
    torch.testing.assert_close(keypoints[:, 0], torch.tensor([[0.5, -1 / 3]] * 2))
    torch.testing.assert_close(keypoints[:, 1], torch.zeros(2, 2))
    torch.testing.assert_close(keypoints[:, 2], torch.zeros(2, 2), rtol=0, atol=1e-5)
    # A high temperature flattens the softmax: the peaked map's keypoint moves towards the centre.
    warm = spatial_softmax(features, temperature=100.0)
    assert 0 < warm[0, 0, 0] < 0.5 and -1 / 3 < warm[0, 0, 1] < 0


def test_keypoint_tokens_follow_an_object_across_the_frame(action_bins):
    # A spatial-softmax encoder's tokens say where things are: a bright square moved right and down across a dark
    # frame moves the keypoints (already at initialization: the maps are standardized before the softmax) so the
    # tokens change with its position; the same frame gives the same tokens.
    torch.manual_seed(0)
    encoder = ImageEncoder(hidden_size=16, grid=2, pooling="spatial_softmax")
    assert encoder.keypoint_maps.out_channels == 4 and not hasattr(encoder, "pool")
    frames = np.zeros((3, 64, 64, 3), np.uint8)
    frames[0, 8:16, 8:16] = frames[1, 8:16, 8:16] = frames[2, 44:52, 40:48] = 255
    with torch.no_grad():
        tokens, keypoints = encoder(torch.as_tensor(frames)), encoder.pooled(torch.as_tensor(frames))
    assert tokens.shape == (3, 4, 16)
    torch.testing.assert_close(tokens[0], tokens[1])
    assert keypoints.shape == (3, 4, 2) and keypoints.abs().max() <= 1
    shift = (keypoints[2] - keypoints[0]).mean(0)  # the square moved right and down: so do the keypoints, on average
    assert shift[0] > 0.1 and shift[1] > 0.1, shift
    assert not torch.allclose(tokens[0], tokens[2])


def test_encoder_size_encodes_the_area_average_of_the_frames(action_bins, tmp_path):
    # Frames rendered at 128 px and encoded at 64 px: the encoder sees each 2x2 block's mean, so two frames that
    # differ only inside blocks (same block means) give the same action distribution, and another frame does not.
    policy = make_policy(action_bins, cameras=("agentview",), image_size=128, encoder_size=64, image_grid=2)
    obs = batch_for("state", batch_size=2)
    rng = np.random.default_rng(0)
    coarse = rng.integers(1, 255, (2, 64, 64, 3))
    frames = np.repeat(np.repeat(coarse, 2, axis=1), 2, axis=2)
    checker = np.tile(np.array([[1, -1], [-1, 1]])[:, :, None], (64, 64, 1))  # +-1 inside each 2x2 block
    swapped = (frames + checker).astype(np.uint8)  # same block means, every pixel different
    frames, coarse = frames.astype(np.uint8), coarse.astype(np.uint8)
    tokens = torch.as_tensor(np.zeros((2, 7), dtype=np.int64))
    policy.eval()
    with torch.no_grad():
        same = policy.log_prob({**obs, "agentview": frames}, tokens)
        also_same = policy.log_prob({**obs, "agentview": swapped}, tokens)
        other = policy.log_prob({**obs, "agentview": frames[::-1].copy()}, tokens)
    torch.testing.assert_close(same, also_same, rtol=0, atol=1e-5)
    assert not torch.allclose(same[0], other[0])
    with pytest.raises(ValueError, match="frames are 64x64: this policy was built for 128x128"):
        policy.act({**obs, "agentview": coarse})
    policy.save_pretrained(tmp_path)
    reloaded = load_policy(tmp_path)
    assert reloaded.config.encoder_size == 64
    with torch.no_grad():
        torch.testing.assert_close(reloaded.log_prob({**obs, "agentview": frames}, tokens), same)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_chunk_is_decoded_in_one_pass_and_scored_as_sampled(action_bins, name):
    policy = make_policy(action_bins, chunk_size=3, **CONFIGS[name])
    assert (policy.chunk_size, policy.execute_steps, policy.num_action_tokens) == (3, 3, 21)
    obs = batch_for(name)
    calls = []
    hook = policy.backbone.register_forward_hook(lambda *args: calls.append(1))
    actions, tokens, token_log_probs = policy.act(obs)
    hook.remove()
    assert len(calls) == 1  # parallel decoding: one pass for all 21 tokens
    assert actions.shape == (3, 3, 7) and tokens.shape == token_log_probs.shape == (3, 21)
    np.testing.assert_allclose(actions.numpy(), action_bins.decode(tokens.numpy().reshape(3, 3, 7)))
    np.testing.assert_array_equal(policy.encode_actions(actions.numpy()), tokens.numpy())
    log_probs, entropy = policy.log_prob(obs, tokens)
    torch.testing.assert_close(log_probs, token_log_probs, atol=1e-5, rtol=1e-5)
    assert entropy.shape == (3, 21) and bool((entropy > 0).all())
    # No token conditions on another: the logits are those of the observation alone.
    other = torch.randint(0, 256, (3, 21), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(policy.action_logits(obs, other), policy.action_logits(obs, tokens))
    greedy = policy.act(obs, deterministic=True)[1]
    assert torch.equal(policy.action_logits(obs, greedy).argmax(-1), greedy)


def test_parallel_decoding_matches_a_reference_computation(action_bins):
    """Each sample alone, no padding, the mask written out entry by entry: causal over the prefix, the action
    queries seeing the whole prefix and each other. The batched, padded implementation must agree."""
    policy = make_policy(action_bins, chunk_size=2, **CONFIGS["rgb+state"])
    obs = batch_for("rgb+state", batch_size=3)  # three instruction lengths: padding in the batch
    tokens = torch.randint(0, 256, (3, 14), generator=torch.Generator().manual_seed(0))
    log_probs, _ = policy.log_prob(obs, tokens)
    for row in range(3):
        prefix, mask = policy._prefix({key: value[row : row + 1] for key, value in obs.items()})
        assert bool(mask.all())
        embeds = torch.cat([prefix, policy.action_queries[None]], dim=1)
        length, prefix_length = embeds.shape[1], prefix.shape[1]
        bias = torch.zeros(1, 1, length, length)
        for i in range(length):
            for j in range(length):
                if not (j <= i or (i >= prefix_length and j >= prefix_length)):
                    bias[0, 0, i, j] = torch.finfo(torch.float32).min
        hidden = policy.backbone(inputs_embeds=embeds, attention_mask=bias,
                                 position_ids=torch.arange(length)[None]).last_hidden_state  # fmt: skip
        vocab_logits = policy.lm_head(hidden[:, prefix_length:])[..., policy.vocab_size - 256 :].flip(-1)
        expected = torch.log_softmax(vocab_logits, -1).gather(-1, tokens[row : row + 1, :, None]).squeeze(-1)
        torch.testing.assert_close(log_probs[row : row + 1], expected, atol=1e-5, rtol=1e-5)
    # Bidirectional: the first token's distribution moves when only the last query changes.
    before = policy.action_logits(obs, tokens)[:, 0]
    with torch.no_grad():
        policy.action_queries[-1] += 1.0
    assert not torch.allclose(policy.action_logits(obs, tokens)[:, 0], before)


def test_a_chunking_policy_round_trips_its_chunk(action_bins, tmp_path):
    policy = make_policy(action_bins, chunk_size=4, execute_steps=2, **CONFIGS["state"])
    policy.save_pretrained(tmp_path)
    loaded = load_policy(tmp_path)
    assert (loaded.chunk_size, loaded.execute_steps) == (4, 2)
    obs = batch_for("state")
    assert torch.equal(loaded.act(obs, deterministic=True)[1], policy.act(obs, deterministic=True)[1])


def test_a_sentence_encoder_instruction_reads_unseen_phrasings(action_bins, tmp_path):
    """instruction_encoder="minilm": one token from the frozen pretrained MiniLM. A paraphrase no word vocabulary
    holds gets a distribution near the instruction it means, not one as far as another task's."""
    policy = make_policy(action_bins, instruction_encoder="minilm", **CONFIGS["state"])
    assert policy.num_prefix_tokens == 1 + 1 + 1  # BOS, the sentence token, the state token
    obs = batch_for("state", batch_size=3)
    actions, tokens, token_log_probs = policy.act(obs)
    torch.testing.assert_close(policy.log_prob(obs, tokens)[0], token_log_probs, atol=1e-5, rtol=1e-5)
    texts = (
        "open the top drawer",
        "pull the uppermost drawer open",
        "pick up the black bowl on the stove and place it on the plate",
    )
    with torch.no_grad():
        token = policy.sentence_token(policy._sentence_batch(texts))[:, 0]  # the instruction's token in the prefix
    paraphrase, unrelated = (token[1] - token[0]).norm(), (token[2] - token[0]).norm()
    assert paraphrase < 0.7 * unrelated, (paraphrase, unrelated)
    assert WordTokenizer.from_texts(INSTRUCTIONS).encode("pull the uppermost drawer open").count(1) == 2  # <unk> x2
    # The MiniLM weights are not the policy's: only the projection is trained and saved.
    assert not any("minilm" in name.lower() for name in policy.state_dict())
    assert sum(p.numel() for p in policy.sentence_token.parameters()) == 384 * 32 + 32 + 32 * 32 + 32
    policy.save_pretrained(tmp_path)
    loaded = load_policy(tmp_path)
    assert loaded.config.instruction_encoder == "minilm"
    assert torch.equal(loaded.act(obs, deterministic=True)[1], policy.act(obs, deterministic=True)[1])


def test_acts_in_a_real_vector_env(action_bins):
    """Batched observations straight from a (sync) vector env of the real simulator drive the policy."""
    envs = gym.make_vec("LiberoSpatial-v0", num_envs=2, vectorization_mode="sync", obs_mode="state")
    try:
        from gym_libero_vla.suites import suite_tasks

        tokenizer = WordTokenizer.from_texts(task.instruction for task in suite_tasks("libero_spatial"))
        torch.manual_seed(0)
        policy = CompactVLA(CompactVLAConfig(cameras=(), hidden_size=32, num_heads=2), action_bins, tokenizer)
        obs, _ = envs.reset(seed=0)
        for _ in range(2):
            actions, tokens, log_probs = policy.act(obs)
            assert actions.shape == (2, 7)
            torch.testing.assert_close(policy.log_prob(obs, tokens)[0], log_probs, atol=1e-5, rtol=1e-5)
            obs, *_ = envs.step(actions.numpy())
        assert len(set(obs["instruction"])) == 2  # consecutive seeds: two tasks, two instructions
        assert all(tokenizer.ids["<unk>"] not in tokenizer.encode(text) for text in obs["instruction"])
    finally:
        envs.close()


def test_from_demos_reads_bins_sizes_and_instructions_from_the_demos():
    from gym_libero_vla.episode import Episode

    rng = np.random.default_rng(0)

    def demo(instruction, frames=True):
        observations = {"instruction": instruction, "state": np.zeros((6, 8), np.float32),
                        "object_state": np.zeros((6, 28), np.float32)}  # fmt: skip
        if frames:
            observations["agentview"] = np.zeros((6, 32, 32, 3), np.uint8)
        return Episode(observations, rng.uniform(-0.5, 0.5, (6, 7)).astype(np.float32), np.eye(6)[-1], True, 0,
                       source="offline")  # fmt: skip

    demos = [demo("open the drawer"), demo("close the drawer")]
    policy = CompactVLA.from_demos(demos, CompactVLAConfig(cameras=("agentview",), hidden_size=16, num_layers=1,
                                                           num_heads=2, image_grid=2))  # fmt: skip
    assert policy.config.image_size == 32 and policy.config.object_state_dim == 28
    assert policy.observation_keys == ("instruction", "agentview", "state", "object_state")
    assert set(policy.tokenizer.words) >= {"open", "close", "drawer"}
    actions = np.concatenate([d.actions for d in demos])
    np.testing.assert_allclose(policy.action_bins.low[:6], np.quantile(actions, 0.01, axis=0)[:6], rtol=1e-5)
    assert policy.action_bins.low[6] == -1.0  # the gripper's bins span [-1, 1] whatever the demos did
    state_only = CompactVLA.from_demos(demos, object_state=False)  # default config: state only
    assert state_only.observation_keys == ("instruction", "state")
    with pytest.raises(ValueError, match=r"the demos hold no \['wrist'\] frames"):
        CompactVLA.from_demos(demos, CompactVLAConfig(cameras=("wrist",)))
    no_poses = Episode({"instruction": "x", "state": np.zeros((2, 8))}, np.zeros((2, 7)), [0, 1], True, 0)
    with pytest.raises(ValueError, match="the demos hold no object_state"):
        CompactVLA.from_demos([no_poses], object_state=True)
