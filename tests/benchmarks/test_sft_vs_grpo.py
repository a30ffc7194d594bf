"""benchmarks/sft_vs_grpo.py runs end to end with tiny budgets in the real simulator (demos generated, SFT, the four
fine-tuning variants, evaluation, report and plot), and the same command again trains and evaluates nothing."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
import time

import compare_evaluations
import numpy as np
import pytest
import sft_vs_grpo
import torch
from safetensors.torch import load_file  # benchmarks/ is on sys.path (conftest.py), as for `python benchmarks/...`
from tiny_demos import line_count, tiny_demo_config, tiny_eval_range

from gym_libero_vla.algos import GRPOConfig, IReVLAConfig, SFTConfig
from gym_libero_vla.policies import CompactVLA, CompactVLAConfig, WordTokenizer
from gym_libero_vla.run_lock import exclusive
from gym_libero_vla.wrappers.action_tokenizer import ActionBins

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

Args, main, VARIANTS = sft_vs_grpo.Args, sft_vs_grpo.main, sft_vs_grpo.ISSUE_VARIANTS


def tiny_args(tmp_path, **overrides) -> Args:
    """Task 0 of LIBERO-Spatial: 2 demos (``tmp_path/demos.hdf5``: the ``expert_demos`` fixture puts a copy there, else
    the run generates them), 10 SFT steps of a width-32 policy, 20 env steps per variant (one group of
    two 10-step episodes, side by side in a sync vector env unless ``vectorization_mode="async"``), one 10-step
    evaluation episode (held-out init state 20) per policy."""
    values = dict(
        suite="spatial", task_ids=(0,), seeds=(0,),
        sft_steps=10, sft_save_every=10, sft=SFTConfig(batch_size=8),
        policy=CompactVLAConfig(cameras=(), hidden_size=32, num_heads=2, num_layers=1), total_timesteps=20,
        grpo=GRPOConfig(num_groups=1, group_size=2, num_epochs=1, minibatch_size=16, max_sampling_rounds=1),
        irevla=IReVLAConfig(rl_updates_per_stage=1, sl_steps_per_stage=2, sl_batch_size=8), rollout_num_envs=2,
        checkpoint_every=10, max_episode_steps=10, curve_every=10,
        curve_num_init_states=1, output_dir=str(tmp_path / "run"), json_out=str(tmp_path / "results" / "sft_vs_grpo.json"),
        vectorization_mode="sync", videos=False, progress=False,
    )  # fmt: skip
    demo = tiny_demo_config(tmp_path, overrides)
    values.update(eval=tiny_eval_range(overrides, 1))
    values.update(overrides, demo=demo)
    return Args(**values)


def test_runs_every_variant_then_resumes_without_redoing_work(tmp_path):
    args = tiny_args(tmp_path, vectorization_mode="async")  # rollouts and evaluations in worker processes
    report = main(args)

    with open(args.json_out) as file:
        saved = json.load(file)
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    assert (tmp_path / "results" / "sft_vs_grpo.md").read_text().startswith("## SFT vs GRPO: LiberoSpatial-v0")
    assert (tmp_path / "results" / "sft_vs_grpo.png").stat().st_size > 0
    assert list(saved["results"]) == list(VARIANTS) and saved["seeds"] == [0] and saved["demos"]["generated_this_run"]
    assert saved["eval"]["held_out"] and saved["eval"]["init_state_ids"] == [20]
    sft = saved["results"]["sft"]["overall"]
    for variant, result in saved["results"].items():
        for entry in [result["overall"], *result["per_task"].values()]:
            low, high = entry["ci95"]
            assert 0.0 <= low <= entry["success_rate"] <= high <= 1.0
            assert entry["episodes"] == 1 and entry["success_rate"] == entry["successes"] / entry["episodes"]
        if variant != "sft":
            assert result["steps"][0] >= 20  # the budget, in whole rollouts
            delta = result["delta_vs_sft"]["overall"]
            assert delta["delta"] == result["overall"]["success_rate"] - sft["success_rate"]
            assert -1.0 <= delta["ci95"][0] <= delta["delta"] <= delta["ci95"][1] <= 1.0
            assert -1.0 <= delta["ci95_newcombe"][0] <= delta["delta"] <= delta["ci95_newcombe"][1] <= 1.0
            assert delta["starts"] == 1  # one held-out start, paired across the two policies
            assert result["entropy"]["start"] > 0 and result["entropy"]["end"] > 0
    assert saved["results"]["grpo_offline_relabel"]["relabelled_episodes"] == 0  # no Spatial task shares a scene
    assert "no relabelling can happen" in saved["setup"]["relabel_note"]
    assert set(saved["targets"]) == {"grpo_offline_beats_sft", "grpo_offline_ten_points_and_85", "grpo_offline_entropy_holds"}
    strong, offline = saved["targets"]["grpo_offline_ten_points_and_85"], saved["results"]["grpo_offline"]
    assert strong["success_rate"] == offline["overall"]["success_rate"]
    assert strong["met"] == (offline["delta_vs_sft"]["overall"]["delta"] >= 0.10 and strong["success_rate"] >= 0.85)
    assert (
        "- grpo_offline_ten_points_and_85: grpo_offline mean success >= sft + 0.10 and >= 0.85 (issue #25): "
        in (tmp_path / "results" / "sft_vs_grpo.md").read_text()
    )
    runs = {(run["variant"], run["seed"]): run for run in saved["runs"]}
    assert set(runs) == {(variant, 0) for variant in VARIANTS}
    for variant in VARIANTS[1:]:
        curve = runs[(variant, 0)]["curve"]
        # SFT start, a curve evaluation past 10 env steps (the first rollout took 20), the final evaluation
        assert [steps for steps, _ in curve["success"]] == [0, runs[(variant, 0)]["steps"], runs[(variant, 0)]["steps"]]
        assert all(0.0 <= rate <= 1.0 for _, rate in curve["success"])
        assert curve["entropy"] and all(math.isfinite(entropy) and entropy > 0 for _, entropy in curve["entropy"])
        [(task_id, init_state_id, success, steps)] = runs[(variant, 0)]["outcomes"]
        assert (task_id, init_state_id) == (0, 20) and success == saved["results"][variant]["overall"]["successes"]
        assert 1 <= steps <= 10
        assert runs[(variant, 0)]["steps_this_run"] == runs[(variant, 0)]["steps"]

    # The same command again: nothing is trained or evaluated, the report is the same.
    run_dir = tmp_path / "run"
    files = {path: (line_count(path), os.path.getmtime(path)) for path in run_dir.glob("*/*.jsonl")}
    final_mtimes = {path: os.path.getmtime(path / "model.safetensors") for path in run_dir.glob("*/checkpoints/final")}
    assert len(final_mtimes) == 4 and len(files) == 4 * 3 + 1  # updates, curve, episodes per variant; SFT's episodes
    again = main(args)
    assert all(run["steps_this_run"] == 0 and run["episodes_this_run"] == 0 for run in again["runs"])
    assert {path: (line_count(path), os.path.getmtime(path)) for path in files} == files
    assert {path: os.path.getmtime(path / "model.safetensors") for path in final_mtimes} == final_mtimes
    assert again["results"] == report["results"]

    # --report-only over more seeds than ran: the finished runs' report, the others missing, nothing run or written
    # but the report files.
    only = main(tiny_args(tmp_path, seeds=(0, 1), report_only=True, json_out=str(tmp_path / "only" / "report.json")))
    assert only["results"] == report["results"] and only["missing_runs"] == [f"{v} seed 1" for v in VARIANTS]
    assert all(run["steps_this_run"] == 0 and run["episodes_this_run"] == 0 for run in only["runs"])
    assert {path: (line_count(path), os.path.getmtime(path)) for path in run_dir.glob("*/*.jsonl")} == files
    assert sorted(os.listdir(run_dir)) == sorted(f"{variant}_seed0" for variant in VARIANTS)
    assert "--report-only" not in only["command"] and "--seeds 0 1" in only["command"]
    assert "**Partial report**" in (tmp_path / "only" / "report.md").read_text()
    with pytest.raises(ValueError, match=r"report_only: no finished run of seeds \[1\] in "):
        main(tiny_args(tmp_path, seeds=(1,), report_only=True))
    with pytest.raises(ValueError, match="report_only: no demos at .*missing.hdf5, so no run can have finished"):
        main(tiny_args(tmp_path, report_only=True, demos=str(tmp_path / "missing.hdf5")))

    # A larger budget continues each run from its final checkpoint (same SFT, SFT episodes reused). Rows a killed run
    # logged after that checkpoint (here planted at 30 env steps) describe discarded weights: the resumed run drops them.
    for name in ("updates.jsonl", "evaluations.jsonl"):
        with open(run_dir / "grpo_offline_seed0" / name) as file:
            last = json.loads(file.read().splitlines()[-1])
        with open(run_dir / "grpo_offline_seed0" / name, "a") as file:
            file.write(json.dumps({**last, "num_timesteps": 30}) + "\n")
    longer = main(tiny_args(tmp_path, total_timesteps=40, variants=("sft", "grpo_offline", "irevla")))
    for name in ("updates.jsonl", "evaluations.jsonl"):
        with open(run_dir / "grpo_offline_seed0" / name) as file:
            assert 30 not in [json.loads(line)["num_timesteps"] for line in file]
    for run in longer["runs"]:
        if run["variant"] == "sft":
            assert run["steps_this_run"] == 0 and run["episodes_this_run"] == 0
        else:
            assert run["steps"] >= 40 and run["steps_this_run"] == run["steps"] - runs[(run["variant"], 0)]["steps"]
            assert run["episodes_this_run"] == 1  # new weights: evaluated again
            assert [steps for steps, _ in run["curve"]["entropy"]] == [20, run["steps"]]


def test_worker_processes_run_the_same_episodes_as_one_process(tmp_path, expert_demos):
    """--vectorization-mode async (the default: simulators and renderers in worker processes) changes where the envs
    run, not what happens: the same rollouts, hence the same fine-tuned weights, and the same evaluation episodes."""
    reports = {}
    for mode in ("sync", "async"):
        args = tiny_args(tmp_path, variants=("sft", "grpo_offline"), vectorization_mode=mode,
                         output_dir=str(tmp_path / mode), json_out=str(tmp_path / mode / "report.json"))  # fmt: skip
        reports[mode] = main(args)
    weights = {mode: load_file(str(tmp_path / mode / "grpo_offline_seed0" / "checkpoints" / "final" / "model.safetensors"))
               for mode in reports}  # fmt: skip
    assert weights["sync"].keys() == weights["async"].keys()
    for name, tensor in weights["sync"].items():
        assert torch.equal(tensor, weights["async"][name]), name
    updates = {mode: sft_vs_grpo.read_episode_rows(str(tmp_path / mode / "grpo_offline_seed0" / "updates.jsonl"))
               for mode in reports}  # fmt: skip
    assert updates["sync"] == updates["async"] and updates["sync"]
    for mode, report in reports.items():
        assert report["setup"]["vectorization_mode"] == mode
    outcomes = {mode: [run["outcomes"] for run in report["runs"]] for mode, report in reports.items()}
    assert outcomes["sync"] == outcomes["async"]
    # the committed report alone compares its runs start by start (benchmarks/compare_evaluations.py)
    sync_report = str(tmp_path / "sync" / "report.json")
    pick = compare_evaluations.Args(reports=(f"{sync_report}:sft", f"{sync_report}:grpo_offline"))
    compared = compare_evaluations.main(pick)
    tuned = compared["reports"]["report:grpo_offline"]
    assert tuned["overall"]["success_rate"] == reports["sync"]["results"]["grpo_offline"]["overall"]["success_rate"]
    assert tuned["delta_vs_baseline"]["overall"]["starts"] == len(reports["sync"]["runs"][0]["outcomes"])


def test_bad_input_names_the_valid_choices(tmp_path):
    with pytest.raises(ValueError, match=r"unknown variant\(s\) \['ppo'\]: valid \('sft', 'grpo', 'grpo_offline', "):
        main(tiny_args(tmp_path, variants=("sft", "ppo")))
    with pytest.raises(ValueError, match="eval_init_state_start 10 lies inside the training init states 0..19"):
        main(tiny_args(tmp_path, demo_init_state_end=20, eval_init_state_start=10))
    with pytest.raises(ValueError, match="unknown task_id 12 for LiberoSpatial-v0: valid 0..9"):
        main(tiny_args(tmp_path, task_ids=(12,)))
    with pytest.raises(ValueError, match="unknown init_state_id 50 for task 0 of LiberoSpatial-v0: valid 0..49"):
        main(tiny_args(tmp_path, eval_init_state_start=45, eval_num_init_states=6))
    with pytest.raises(ValueError, match="group_size 1 must be an int >= 2"):
        main(tiny_args(tmp_path, grpo=GRPOConfig(group_size=1), rollout_num_envs=1))
    with pytest.raises(ValueError, match="rollout_num_envs 3 must be an int >= 1 that divides group_size 2"):
        main(tiny_args(tmp_path, rollout_num_envs=3))
    with pytest.raises(ValueError, match=r"irevla_ema_decay 1.0 must be in \[0, 1\)"):
        main(tiny_args(tmp_path, irevla_ema_decay=1.0))
    with pytest.raises(ValueError, match="device 'cuda:64' is not available on this machine"):
        main(tiny_args(tmp_path, device="cuda:64"))
    # --sft-checkpoint must read what --obs-mode gives: a state-mode policy is refused in rgb+state mode.
    state_policy = tmp_path / "state_policy"
    CompactVLA(
        CompactVLAConfig(cameras=(), object_state_dim=70, hidden_size=16, num_layers=1, num_heads=2),
        ActionBins(low=-np.ones(7, np.float32), high=np.ones(7, np.float32), num_bins=16),
        WordTokenizer.from_texts(["pick up the black bowl"]),
    ).save_pretrained(state_policy)
    with pytest.raises(ValueError, match=r"reads cameras \(\), but --obs-mode rgb\+state means \('agentview',\)"):
        main(tiny_args(tmp_path, obs_mode="rgb+state", image_size=32, sft_checkpoint=str(state_policy)))
    # ... and see frames rendered as its SFT's were: a policy trained without reflections needs --policy.no-reflections.
    pixel_policy = tmp_path / "pixel_policy"
    CompactVLA(
        CompactVLAConfig(cameras=("agentview",), image_size=32, reflections=False, hidden_size=16, num_layers=1, num_heads=2),
        ActionBins(low=-np.ones(7, np.float32), high=np.ones(7, np.float32), num_bins=16),
        WordTokenizer.from_texts(["pick up the black bowl"]),
    ).save_pretrained(pixel_policy)
    with pytest.raises(ValueError, match="sft_checkpoint was trained on frames without reflections: pass --policy.no-refl"):
        main(tiny_args(tmp_path, obs_mode="rgb+state", image_size=32, sft_checkpoint=str(pixel_policy)))
    with pytest.raises(FileNotFoundError, match="extra demo file '.*nope.hdf5' does not exist: generate it first"):
        main(tiny_args(tmp_path, extra_demos=(str(tmp_path / "nope.hdf5"),)))
    assert not os.path.exists(tmp_path / "demos.hdf5") and not os.path.exists(tmp_path / "run")


def test_report_after_every_run_compares_each_variant_with_sft_on_its_own_seeds(tmp_path, monkeypatch, expert_demos):
    """The report is rewritten as each fine-tuning run ends. Mid-run, a variant may lack a seed that SFT already has
    (here grpo_offline seed 1, after grpo seed 1): its Δ must then be against SFT on the same seeds."""
    written = []
    write_report = sft_vs_grpo.write_report

    def keep_a_copy(report, json_out):
        written.append(json.loads(json.dumps(report)))
        write_report(report, json_out)

    monkeypatch.setattr(sft_vs_grpo, "write_report", keep_a_copy)
    final = main(tiny_args(tmp_path, seeds=(0, 1), variants=("sft", "grpo", "grpo_offline")))
    assert [report["missing_runs"] for report in written] == [
        ["grpo_offline seed 0", "sft seed 1", "grpo seed 1", "grpo_offline seed 1"],
        ["sft seed 1", "grpo seed 1", "grpo_offline seed 1"],
        ["grpo_offline seed 1"],
        [],
    ]
    assert written[-1]["complete"] and not written[2]["complete"]
    assert "**Partial report**" in sft_vs_grpo.markdown(written[2]) and "Partial" not in sft_vs_grpo.markdown(final)
    middle = written[2]["results"]
    assert middle["sft"]["overall"]["seeds"] == [0, 1] and middle["grpo_offline"]["overall"]["seeds"] == [0]
    rate = {(run["variant"], run["seed"]): run["success_rate"] for run in written[2]["runs"]}
    assert middle["grpo_offline"]["delta_vs_sft"]["overall"]["delta"] == rate[("grpo_offline", 0)] - rate[("sft", 0)]
    assert middle["grpo_offline"]["delta_vs_sft"]["per_seed"] == [rate[("grpo_offline", 0)] - rate[("sft", 0)]]
    assert middle["grpo"]["delta_vs_sft"]["per_seed"] == [rate[("grpo", s)] - rate[("sft", s)] for s in (0, 1)]
    # (b) against (a) head to head, also on the seeds both have (seed 0 here), and said in the Markdown
    versus_grpo = middle["grpo_offline"]["delta_vs_grpo"]
    assert versus_grpo["per_seed"] == [rate[("grpo_offline", 0)] - rate[("grpo", 0)]]
    assert versus_grpo["overall"]["delta"] == pytest.approx(rate[("grpo_offline", 0)] - rate[("grpo", 0)])
    assert f"(b) vs (a): grpo_offline − grpo = {versus_grpo['overall']['delta']:+.2f}" in sft_vs_grpo.markdown(written[2])
    assert "delta_vs_grpo" not in middle["grpo"] and "delta_vs_offline_only" not in middle["grpo_offline"]
    assert final["results"]["grpo_offline"]["delta_vs_sft"]["per_seed"] == [
        rate[("grpo_offline", 0)] - rate[("sft", 0)],
        final["results"]["grpo_offline"]["overall"]["seed_rates"][1] - final["results"]["sft"]["overall"]["seed_rates"][1],
    ]
    assert not list((tmp_path / "results").glob("*.tmp*"))  # every report file renamed into place


def test_offline_only_ablation_trains_without_the_policy_gradient_term(tmp_path, expert_demos):
    args = tiny_args(tmp_path, variants=("sft", "grpo_offline", "offline_only"), videos=True)
    report = main(args)
    # --videos: each policy's first successful and first failed held-out episode, next to the report and linked
    videos = tmp_path / "results" / "sft_vs_grpo_videos"
    for run in report["runs"]:
        outcomes = {"success" if success else "failure" for _, _, success, _ in run["outcomes"]}
        name = f"{run['variant']}_seed0"
        assert run["videos"] == [f"sft_vs_grpo_videos/{name}_{outcome}.mp4" for outcome in ("success", "failure")
                                 if outcome in outcomes]  # fmt: skip
        for path in run["videos"]:
            assert (tmp_path / "results" / path).stat().st_size > 0
            assert f"[{os.path.basename(path)}]({path})" in (tmp_path / "results" / "sft_vs_grpo.md").read_text()
    recorded = {path: path.stat().st_mtime for path in videos.iterdir()}
    assert len(recorded) == 3 and not list(videos.glob("*.tmp"))
    assert main(args)["runs"][0]["videos"] == report["runs"][0]["videos"]  # kept, not recorded again
    assert {path: path.stat().st_mtime for path in videos.iterdir()} == recorded
    assert list(report["results"]) == ["sft", "grpo_offline", "offline_only"]
    text = sft_vs_grpo.markdown(report)
    assert "(e) ablation" in text
    # (b) against (e): the same paired comparison as against SFT, with (e) as the baseline
    results = report["results"]
    ablation = results["grpo_offline"]["delta_vs_offline_only"]["overall"]
    wanted = results["grpo_offline"]["overall"]["success_rate"] - results["offline_only"]["overall"]["success_rate"]
    assert ablation["delta"] == pytest.approx(wanted) and ablation["starts"] == 1
    assert f"Ablation (e): grpo_offline − offline_only = {ablation['delta']:+.2f}" in text
    assert "delta_vs_offline_only" not in results["offline_only"]
    with open(tmp_path / "run" / "offline_only_seed0" / "checkpoints" / "final" / "grpo.json") as file:
        saved = json.load(file)
    assert saved["pg_coef"] == 0.0 and saved["imitation_weight_max"] == 1.0 and saved["num_timesteps"] >= 20


def test_a_second_process_on_the_same_run_waits_for_it(tmp_path, expert_demos):
    """Two commands sharing an --output-dir must not train one run at once (interleaved checkpoints and curve): the
    second waits for the first's lock on the run directory, then trains (or reuses) alone. Here the test holds the
    lock of the grpo_offline run while a real sft_vs_grpo process gets there."""
    args = tiny_args(tmp_path, variants=("sft", "grpo_offline"))
    run_dir = tmp_path / "run" / "grpo_offline_seed0"
    runner = "import pickle, sys; sys.path.insert(0, 'benchmarks'); import sft_vs_grpo; " \
             "sft_vs_grpo.main(pickle.loads(bytes.fromhex(sys.argv[1])))"  # fmt: skip
    command = [sys.executable, "-c", runner, pickle.dumps(args).hex()]
    with exclusive(str(run_dir / "run.lock"), "the test"):
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen = []
        for line in process.stdout:
            seen.append(line)
            if "waiting for process" in line:
                break
        assert (
            seen and seen[-1] == f"grpo_offline seed 0: waiting for process {os.getpid()}, which holds {run_dir}/run.lock\n"
        ), "".join(seen)
        time.sleep(1.0)
        assert not (run_dir / "checkpoints").exists() and process.poll() is None  # blocked, nothing written
    rest, _ = process.communicate(timeout=600)
    assert process.returncode == 0, rest
    assert "grpo_offline seed 0: lock taken after" in rest and "grpo_offline seed 0: 0 -> 20 env steps" in rest
    with open(args.json_out) as file:
        runs = json.load(file)["runs"]
    assert [run["steps"] >= 20 for run in runs if run["variant"] == "grpo_offline"] == [True]


def test_every_variant_trains_on_the_starts_asked_for(tmp_path):
    """Groups start from the training init states (held out from the evaluation's), or from new layouts with
    --grpo.init-states sampled, for every variant; the report says which."""
    for init_states, expected in (("suite", (0, 1)), ("sampled", None)):
        grpo = GRPOConfig(num_groups=1, group_size=2, init_states=init_states)
        args = tiny_args(tmp_path, grpo=grpo)
        for variant in ("grpo", "grpo_offline", "grpo_offline_relabel", "irevla", "offline_only"):
            settings = sft_vs_grpo.variant_hyperparameters(variant, args, (0,), 0, str(tmp_path))
            assert (settings["init_states"], settings["init_state_ids"]) == (init_states, expected), variant
    # --grpo.ema-decay averages the GRPO variants' weights; iRe-VLA's average (over both its stages) is its own.
    for irevla_ema_decay in (0.0, 0.999):
        args = tiny_args(tmp_path, grpo=GRPOConfig(num_groups=1, group_size=2, ema_decay=0.99),
                         irevla_ema_decay=irevla_ema_decay)  # fmt: skip
        decays = {variant: sft_vs_grpo.variant_hyperparameters(variant, args, (0,), 0, str(tmp_path))["ema_decay"]
                  for variant in ("grpo", "grpo_offline", "grpo_offline_relabel", "irevla", "offline_only")}  # fmt: skip
        assert decays == {"grpo": 0.99, "grpo_offline": 0.99, "grpo_offline_relabel": 0.99, "irevla": irevla_ema_decay,
                          "offline_only": 0.99}  # fmt: skip
    setup = {"train_init_states": "sampled", "train_init_state_ids": [0, 1]}
    assert "a new layout per group" in sft_vs_grpo.train_starts_text(setup)
    assert sft_vs_grpo.train_starts_text({"train_init_state_ids": [0, 1]}) == "training init states 0, 1"
