"""benchmarks/demo_fit.py on a real demo file (scripted expert in the real simulator) and a tiny policy fitted to it:
per-dimension accuracy and bin error agree with a direct computation, and permuting an input shows what the
predictions rest on."""

from __future__ import annotations

import json

import demo_fit  # benchmarks/ is on sys.path (conftest.py)
import numpy as np
import pytest
import torch

from gym_libero_vla.algos.sft import SFT, Transitions
from gym_libero_vla.demos.generate import GenerateArgs, generate
from gym_libero_vla.demos.libero_hdf5 import load_episodes
from gym_libero_vla.policies import CompactVLA, CompactVLAConfig, TorchThreads

Args, main = demo_fit.Args, demo_fit.main


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Expert demos of LIBERO-Spatial tasks 0 and 1 (state mode), and a tiny chunking policy fitted to them."""
    directory = tmp_path_factory.mktemp("demo_fit")
    path = str(directory / "demos.hdf5")
    generate(GenerateArgs(suite="spatial", out=path, task_ids=(0, 1), episodes_per_task=1, progress=False))
    episodes = load_episodes(path)
    torch.manual_seed(0)
    config = CompactVLAConfig(cameras=(), hidden_size=32, num_heads=2, num_layers=1, chunk_size=2)
    policy = CompactVLA.from_demos(episodes, config, object_state=False)
    model = SFT(policy, demos=episodes, learning_rate=3e-3, batch_size=32, seed=0).learn(300, progress_bar=False)
    model.policy.save_pretrained(directory / "policy")
    return str(directory / "policy"), path, episodes


def test_fit_per_dimension_and_permuted_inputs(fitted, tmp_path):
    checkpoint, path, episodes = fitted
    report = main(Args(checkpoint=checkpoint, demos=(path,), threads=TorchThreads(1), json_out=str(tmp_path / "fit.json")))
    with open(tmp_path / "fit.json") as file:
        assert json.load(file)["files"] == json.loads(json.dumps(report["files"]))
    assert (tmp_path / "fit.md").read_text().startswith(f"## Demo fit of `{checkpoint}`")
    assert report["inputs"] == ["instruction", "state"]
    (entry,) = report["files"]
    fits = entry["fits"]
    assert list(fits) == ["none", "instruction", "state"] and entry["episodes"] == 2

    # The per-dimension numbers, computed here from the policy directly on every transition.
    policy = demo_fit.load_policy(checkpoint)
    demos = Transitions.from_episodes(episodes, policy.observation_keys, policy.action_dim, policy.chunk_size)
    assert fits["none"]["transitions"] == len(demos) <= 2048
    obs, actions = demos.batch(np.arange(len(demos)))
    with torch.no_grad():
        tokens = policy.encode_actions(actions).reshape(len(demos), 2, 7)
        predicted = policy.action_logits(obs, torch.as_tensor(tokens.reshape(len(demos), -1))).argmax(-1).numpy()
    predicted, real = predicted.reshape(len(demos), 2, 7), demos.action_mask
    accuracy = [(predicted[..., d] == tokens[..., d])[real].mean() for d in range(7)]
    error = [np.abs(predicted[..., d] - tokens[..., d])[real].mean() for d in range(7)]
    assert fits["none"]["token_accuracy_per_dimension"] == pytest.approx(accuracy)
    assert fits["none"]["bin_error_per_dimension"] == pytest.approx(error)
    assert fits["none"]["token_accuracy"] == pytest.approx(np.mean(accuracy))  # every dimension has as many tokens
    assert fits["none"]["token_accuracy"] > 0.25  # fitted (chance: 1/256 per token)

    # The fitted policy rests on its proprio state: taking it from another transition costs accuracy.
    assert fits["state"]["token_accuracy"] < fits["none"]["token_accuracy"] - 0.1
    assert fits["state"]["permuted"] == ["state"] and fits["none"]["permuted"] == []
    # The same seed draws the same other transitions.
    again = main(Args(checkpoint=checkpoint, demos=(path,), permute=("state",), threads=TorchThreads(1)))
    assert again["files"][0]["fits"]["state"] == fits["state"] and list(again["files"][0]["fits"]) == ["none", "state"]


def test_bad_input_names_the_problem(fitted, tmp_path):
    checkpoint, path, _ = fitted
    with pytest.raises(ValueError, match=r"permute: the policy reads no input \['wrist'\]: valid \['instruction', 'state'\]"):
        main(Args(checkpoint=checkpoint, demos=(path,), permute=("wrist",)))
    with pytest.raises(FileNotFoundError, match=r"demo file\(s\) \['.*nope.hdf5'\] do not exist"):
        main(Args(checkpoint=checkpoint, demos=(str(tmp_path / "nope.hdf5"),)))
    with pytest.raises(ValueError, match="give at least one demo file"):
        main(Args(checkpoint=checkpoint))
    with pytest.raises(FileNotFoundError, match="is not a policy checkpoint"):
        main(Args(checkpoint=str(tmp_path), demos=(path,)))
