"""benchmarks/sft_baseline.py runs end to end with tiny budgets (demos generated, SFT, evaluation, report) in the
real simulator, and a second run of the same command resumes: no SFT step and no episode is redone."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import h5py
import pytest
import sft_baseline  # benchmarks/ is on sys.path (conftest.py)
from tiny_demos import line_count, tiny_demo_config, tiny_eval_range

from gym_libero_vla.algos import SFT, SFTConfig
from gym_libero_vla.demos.scripted_expert import EXPERT_VERSION
from gym_libero_vla.policies import CompactVLAConfig

Args, main = sft_baseline.Args, sft_baseline.main


def tiny_args(tmp_path, **overrides) -> Args:
    """Task 0 of LIBERO-Spatial: 2 demos (init states 0, 1), 20 SFT steps of a width-32 policy, 2 short episodes."""
    values = dict(
        suite="spatial", task_ids=(0,), object_state=True,
        sft_steps=20, save_every=10, sft=SFTConfig(batch_size=8),
        policy=CompactVLAConfig(cameras=(), hidden_size=32, num_heads=2, num_layers=1),
        max_episode_steps=30, output_dir=str(tmp_path / "run"),
        json_out=str(tmp_path / "results" / "sft_baseline.json"), progress=False,
    )  # fmt: skip
    demo = tiny_demo_config(tmp_path, overrides)
    values.update(eval=tiny_eval_range(overrides, 2))
    values.update(overrides, demo=demo)
    return Args(**values)


def test_runs_end_to_end_then_resumes_without_redoing_work(tmp_path):
    args = tiny_args(tmp_path)
    report = main(args)

    with open(args.json_out) as file:
        saved = json.load(file)
    assert saved["overall"] == report["overall"]
    assert (tmp_path / "results" / "sft_baseline.md").read_text().startswith("## SFT baseline: LiberoSpatial-v0")
    assert saved["demos"]["generated_this_run"] and saved["demos"]["init_state_ids"] == {"0": [0, 1]}
    # Which scripted expert made the demos is in the report (demos from another expert score differently).
    assert saved["demos"]["generator_configs"][args.demo.demos]["expert_version"] == EXPERT_VERSION
    assert f"(expert v{EXPERT_VERSION})" in (tmp_path / "results" / "sft_baseline.md").read_text()
    assert saved["sft"]["steps"] == saved["sft"]["steps_this_run"] == 20 and saved["sft"]["seconds"] > 0
    assert 0.0 <= saved["sft"]["demo_fit"]["token_accuracy"] <= 1.0
    evaluation, overall = saved["eval"], saved["overall"]
    assert evaluation["held_out"] and evaluation["init_state_ids"] == [20, 21]
    assert overall["episodes"] == evaluation["episodes"] == len(saved["episodes"]) == 1 * 2 * 1  # tasks * init states * seeds
    assert [(row["task_id"], row["init_state_id"], row["seed"]) for row in saved["episodes"]] == [(0, 20, 0), (0, 21, 0)]
    assert all(row["length"] <= 30 for row in saved["episodes"]) and saved["eval"]["checkpoint_steps"] == 20
    for entry in [overall, *saved["per_task"].values()]:
        low, high = entry["ci95"]
        assert 0.0 <= low <= entry["success_rate"] <= high <= 1.0
        assert entry["success_rate"] == entry["successes"] / entry["episodes"]
    machine_keys = {"cpu_count", "platform", "torch_threads", "sft_torch_threads", "mujoco", "robosuite", "cpu_model"}
    assert set(saved["machine"]) >= machine_keys | {"numpy"}
    episodes_file = tmp_path / "run" / "episodes.jsonl"
    assert line_count(episodes_file) == 2

    # The same command again: SFT is skipped and every episode is read back from episodes.jsonl.
    checkpoint_mtime = os.path.getmtime(tmp_path / "run" / "sft" / "model.safetensors")
    again = main(args)
    assert again["sft"]["steps_this_run"] == 0 and again["eval"]["episodes_this_run"] == 0
    assert os.path.getmtime(tmp_path / "run" / "sft" / "model.safetensors") == checkpoint_mtime
    assert line_count(episodes_file) == 2
    assert again["overall"] == report["overall"] and again["sft"]["seconds"] == report["sft"]["seconds"]

    # More steps continue the checkpoint (its counter too); episodes of the older weights are not reused.
    longer = main(tiny_args(tmp_path, sft_steps=30))
    assert longer["sft"]["steps"] == 30 and longer["sft"]["steps_this_run"] == 10
    assert longer["sft"]["seconds"] > report["sft"]["seconds"]
    assert longer["eval"]["episodes_this_run"] == 2 and line_count(episodes_file) == 4

    # --init-from starts another output directory from that checkpoint, continuing its step counter; evaluating on
    # an init state a demo started from works but says loudly that it is not held out.
    with pytest.warns(UserWarning, match="not held out"):
        copied = main(
            tiny_args(tmp_path, init_from=str(tmp_path / "run" / "sft"), sft_steps=30, output_dir=str(tmp_path / "b"),
                      eval_init_state_start=1, eval_num_init_states=1)
        )  # fmt: skip
    assert copied["sft"]["steps"] == 30 and copied["sft"]["steps_this_run"] == 0
    assert copied["sft"]["seconds"] == longer["sft"]["seconds"]  # the wall-time record travels with the checkpoint
    assert copied["eval"]["checkpoint_sha"] == longer["eval"]["checkpoint_sha"]
    assert not copied["eval"]["held_out"] and copied["eval"]["held_out_note"].startswith("not held out")
    assert "NOT HELD OUT" in (tmp_path / "results" / "sft_baseline.md").read_text()

    # --extra-demos joins another file's episodes (here a copy of the same demos) to --demos'; --keep-checkpoints
    # keeps the checkpoint of step 1 beside the latest.
    extra = tmp_path / "extra.hdf5"
    shutil.copy(tmp_path / "demos.hdf5", extra)
    joined = main(tiny_args(tmp_path, extra_demos=(str(extra),), output_dir=str(tmp_path / "d"), sft_steps=2, save_every=2,
                            eval_num_init_states=1, keep_checkpoints=(1,)))  # fmt: skip
    assert SFT.load(tmp_path / "d" / "sft_step1").num_timesteps == 1 and joined["sft"]["steps"] == 2
    assert joined["demos"]["num_demos"] == 4 and joined["demos"]["extra_paths"] == [str(extra)]
    assert set(joined["demos"]["generator_configs"]) == {args.demo.demos, str(extra)}
    assert joined["demos"]["num_transitions"] == 2 * report["demos"]["num_transitions"]
    assert joined["demos"]["init_state_ids"] == {"0": [0, 0, 1, 1]}
    table = (tmp_path / "results" / "sft_baseline.md").read_text()
    assert "| task | instruction | demos | successes |" in table and "| all |  | 4 | " in table  # demos per task
    assert f"| 0 | {joined['per_task']['0']['instruction']} | 4 | " in table

    # Bad input named with the valid choices, before any work.
    without_object_state = tmp_path / "no_object_state.hdf5"
    shutil.copy(tmp_path / "demos.hdf5", without_object_state)
    with h5py.File(without_object_state, "a") as file:
        for demo in file["data"].values():
            del demo["obs/object_state"]
    with pytest.raises(ValueError, match="has no obs/object_state"):
        main(tiny_args(tmp_path, demos=str(without_object_state), output_dir=str(tmp_path / "c")))
    with pytest.raises(ValueError, match="reads object_state: add --object-state"):
        main(tiny_args(tmp_path, object_state=False))


def test_bad_input_names_the_valid_choices(tmp_path):
    with pytest.raises(ValueError, match="unknown LIBERO suite 'nope'.*short names"):
        main(tiny_args(tmp_path, suite="nope"))
    with pytest.raises(ValueError, match="unknown task_id 12 for LiberoSpatial-v0: valid 0..9"):
        main(tiny_args(tmp_path, task_ids=(12,)))
    with pytest.raises(ValueError, match=r"unknown obs_mode 'rgb': valid \('state', 'rgb\+state'\)"):
        main(tiny_args(tmp_path, obs_mode="rgb"))
    with pytest.raises(ValueError, match="unknown init_state_id 58 for task 0 of LiberoSpatial-v0: valid 0..49"):
        main(tiny_args(tmp_path, eval_init_state_start=58))
    with pytest.raises(ValueError, match="is not an SFT checkpoint directory"):
        main(tiny_args(tmp_path, init_from=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="extra demo file '.*nope.hdf5' does not exist: generate it first"):
        main(tiny_args(tmp_path, extra_demos=(str(tmp_path / "nope.hdf5"),)))
    with pytest.raises(ValueError, match=r"keep_checkpoints step 21 must be an int in 1..sft_steps \(20\)"):
        main(tiny_args(tmp_path, keep_checkpoints=(21,)))
    assert not os.path.exists(tmp_path / "demos.hdf5") and not os.path.exists(tmp_path / "run")


def test_the_vision_recipe_runs_from_pixels(tmp_path):
    # Issue #25's recipe at toy size: demos with both cameras (no privileged poses), frames rendered at 32 px and
    # encoded at 16, chunks of 4, random shifts; evaluation in worker processes. The policy reads pixels and proprio
    # only.
    args = tiny_args(
        tmp_path, obs_mode="rgb+state", image_size=32, object_state=False, episodes_per_task=1, demo_init_state_end=1,
        sft_steps=4, save_every=4, sft=SFTConfig(batch_size=4, random_shift=2), max_episode_steps=8,
        policy=CompactVLAConfig(cameras=("agentview", "wrist"), encoder_size=16, image_grid=2, chunk_size=4,
                                hidden_size=32, num_heads=2, num_layers=1),
    )  # fmt: skip
    report = main(args)
    assert report["image_size"] == 32 and report["eval"]["episodes"] == 2
    assert all(row["length"] <= 8 for row in report["episodes"])
    from gym_libero_vla.policies import load_policy

    policy = load_policy(tmp_path / "run" / "sft")
    assert policy.observation_keys == ("instruction", "agentview", "wrist", "state")
    assert (policy.config.image_size, policy.config.encoder_size, policy.chunk_size) == (32, 16, 4)
    with h5py.File(args.demo.demos) as file:
        frames = file["data/demo_0/obs/agentview_rgb"]
        assert frames.shape[1:] == (32, 32, 3) and "eye_in_hand_rgb" in file["data/demo_0/obs"]
    # Frames rendered otherwise than the demos' and the checkpoint's (with reflections) are refused, naming the flag.
    with pytest.raises(ValueError, match="rendered with reflections, and this run renders them without: pass --policy.refl"):
        main(dataclasses.replace(args, policy=dataclasses.replace(args.policy, reflections=False)))
    # A checkpoint that reads other cameras than asked for is refused before any work.
    with pytest.raises(ValueError, match=r"reads cameras \('agentview', 'wrist'\), but --obs-mode rgb\+state means"):
        main(dataclasses.replace(args, policy=dataclasses.replace(args.policy, cameras=("agentview",))))
