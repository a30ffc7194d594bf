"""benchmarks/compare_evaluations.py: success and paired differences on the starts every report has, from the report
formats evaluations write (JSON with "episodes", an episodes.jsonl shared by several policies)."""

from __future__ import annotations

import json

import compare_evaluations  # benchmarks/ is on sys.path (conftest.py)
import pytest

Args, main = compare_evaluations.Args, compare_evaluations.main


def row(task_id, init_state_id, success, seed=0, **extra):
    return {"task_id": task_id, "init_state_id": init_state_id, "seed": seed, "success": success, "length": 10,
            "seconds": 1.0, **extra}  # fmt: skip


def test_paired_differences_on_the_common_starts(tmp_path):
    baseline = tmp_path / "baseline.json"
    # task 0: starts 20, 21 (21 under two seeds, averaged to 0.5); task 1: starts 20, 21; start (1, 22) only here
    baseline.write_text(json.dumps({"episodes": [row(0, 20, False), row(0, 21, True), row(0, 21, False, seed=1),
                                                 row(1, 20, True), row(1, 21, True), row(1, 22, True)]}))  # fmt: skip
    shared = tmp_path / "episodes.jsonl"  # two policies' evaluations in one file
    lines = [row(0, 20, True, policy_sha="new"), row(0, 21, True, policy_sha="new"), row(1, 20, True, policy_sha="new"),
             row(1, 21, False, policy_sha="new"), row(0, 20, False, policy_sha="old"), row(0, 21, False, policy_sha="old"),
             row(1, 20, False, policy_sha="old"), row(1, 21, False, policy_sha="old")]  # fmt: skip
    shared.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "out" / "comparison.json"
    result = main(Args(reports=(str(baseline), str(shared), str(shared)), names=("base", "new", "old"),
                       policy_sha=("", "new", "old"), json_out=str(out)))  # fmt: skip

    assert result["starts"] == 4 and result["task_ids"] == [0, 1]  # (1, 22) is not common
    base, new, old = (result["reports"][name] for name in ("base", "new", "old"))
    assert base["overall"]["success_rate"] == pytest.approx((0 + 0.5 + 1 + 1) / 4)
    assert new["overall"]["success_rate"] == 0.75 and old["overall"]["success_rate"] == 0.0
    assert new["per_task"]["0"]["success_rate"] == 1.0 and new["per_task"]["1"]["success_rate"] == 0.5
    assert "delta_vs_baseline" not in base
    assert new["delta_vs_baseline"]["overall"]["delta"] == pytest.approx(0.75 - 0.625)
    assert new["delta_vs_baseline"]["per_task"]["0"]["delta"] == pytest.approx(0.75)  # (1 - 0 + 1 - 0.5) / 2
    assert new["delta_vs_baseline"]["per_task"]["1"]["delta"] == pytest.approx(-0.5)
    assert old["delta_vs_baseline"]["overall"]["delta"] == pytest.approx(-0.625)
    for entry in (new["delta_vs_baseline"]["overall"], old["delta_vs_baseline"]["overall"]):
        low, high = entry["ci95"]
        assert -1.0 <= low <= entry["delta"] <= high <= 1.0 and entry["starts"] == 4
    # task 1 of "old" against the baseline: -1 at both starts, so the interval has no width
    assert old["delta_vs_baseline"]["per_task"]["1"]["ci95"] == [-1.0, -1.0]
    with open(out) as file:
        assert json.load(file)["inputs"] == {"base": str(baseline), "new": str(shared), "old": str(shared)}
    text = (tmp_path / "out" / "comparison.md").read_text()
    assert "| all | 0.62 | 0.75 | 0.00 | +0.12 [" in text and "new − base" in text


def test_new_layouts_pair_by_layout_and_never_with_stored_starts(tmp_path):
    """Episodes from new layouts (``evaluate --layouts``: init state -2, a layout seed each) pair layout by layout;
    an evaluation of stored init states shares no start with them."""
    layouts = [row(0, -2, success, layout_seed=2**31 + index) for index, success in enumerate((True, False, True))]
    before, after, stored = tmp_path / "before.json", tmp_path / "after.json", tmp_path / "stored.json"
    before.write_text(json.dumps({"episodes": layouts}))
    second_seed = {**layouts[1], "seed": 1, "success": True}  # layout 1 under two seeds: averaged to 0.5
    after.write_text(json.dumps({"episodes": [{**layouts[0], "success": False}, *layouts[1:], second_seed]}))
    stored.write_text(json.dumps({"episodes": [row(0, 20, True)]}))
    result = main(Args(reports=(str(before), str(after))))
    assert result["starts"] == 3  # three layouts, not one start (all three have init state -2)
    assert result["reports"]["after"]["overall"]["success_rate"] == pytest.approx((0 + 0.5 + 1) / 3)
    assert result["reports"]["after"]["delta_vs_baseline"]["overall"]["delta"] == pytest.approx((-1 + 0.5 + 0) / 3)
    with pytest.raises(ValueError, match=r"the reports share no start \(task, init state or layout\)"):
        main(Args(reports=(str(stored), str(before))))


def test_layouts_of_different_layout_versions_never_pair(tmp_path):
    """One layout seed is a different scene under each layout version: rows without a version (version 1) pair with
    version-1 rows only, and reports whose only common seeds differ in version are refused by name."""
    old = [row(0, -2, success, layout_seed=2**31 + index) for index, success in enumerate((True, False))]
    new = [{**each, "layout_version": 2, "success": True} for each in old]
    paths = {name: tmp_path / f"{name}.json" for name in ("old", "old_explicit", "new", "mixed")}
    paths["old"].write_text(json.dumps({"episodes": old}))
    paths["old_explicit"].write_text(json.dumps({"episodes": [{**each, "layout_version": 1} for each in old]}))
    paths["new"].write_text(json.dumps({"episodes": new}))
    paths["mixed"].write_text(json.dumps({"episodes": [*old[:1], *new]}))  # layout 0 of version 1, both of version 2
    assert main(Args(reports=(str(paths["old"]), str(paths["old_explicit"]))))["starts"] == 2
    result = main(Args(reports=(str(paths["new"]), str(paths["mixed"]))))
    assert result["starts"] == 2 and result["reports"]["mixed"]["overall"]["success_rate"] == 1.0
    with pytest.raises(ValueError, match=r"drawn by different layout versions \(per report: \[1\], \[2\]; see "):
        main(Args(reports=(str(paths["old"]), str(paths["new"]))))


def test_bad_input_is_named(tmp_path):
    report = tmp_path / "a.json"
    report.write_text(json.dumps({"episodes": [row(0, 20, True)]}))
    other = tmp_path / "b.json"
    other.write_text(json.dumps({"episodes": [row(0, 21, True)]}))
    with pytest.raises(ValueError, match="give at least two reports to compare, got 1"):
        main(Args(reports=(str(report),)))
    with pytest.raises(ValueError, match=r"the reports share no start \(task, init state or layout\)"):
        main(Args(reports=(str(report), str(other))))
    with pytest.raises(FileNotFoundError, match="no evaluation report at .*missing.json"):
        main(Args(reports=(str(report), str(tmp_path / "missing.json"))))
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"success_rate": 0.5}))
    with pytest.raises(ValueError, match=r"has no 'episodes' rows: give an evaluation report \(valid keys found: "):
        main(Args(reports=(str(report), str(summary))))
    with pytest.raises(ValueError, match=r"names \['x', 'x'\] must be distinct, one per report \(2\)"):
        main(Args(reports=(str(report), str(report)), names=("x", "x")))
    with pytest.raises(ValueError, match="holds no episodes of policy nope"):
        main(Args(reports=(str(report), str(report)), names=("x", "y"), policy_sha=("", "nope")))


def test_a_variant_of_a_sft_vs_grpo_report_by_name_and_seed(tmp_path):
    """``report.json:VARIANT[:SEED]`` reads sft_vs_grpo.py's outcomes ([task, init state, success, steps] per run), so
    runs compare from their committed reports after their checkpoints and episode files are gone."""
    report = tmp_path / "sft_vs_grpo.json"
    runs = [{"variant": "sft", "seed": 0, "outcomes": [[0, 20, 0, 50], [0, 21, 1, 40]]},
            {"variant": "grpo_offline", "seed": 0, "outcomes": [[0, 20, 1, 45], [0, 21, 1, 41]]},
            {"variant": "grpo_offline", "seed": 1, "outcomes": [[0, 20, 0, 50], [0, 21, 1, 39]]}]  # fmt: skip
    report.write_text(json.dumps({"runs": runs, "results": {}}))
    result = main(Args(reports=(f"{report}:sft", f"{report}:grpo_offline", f"{report}:grpo_offline:1"),
                       names=("sft", "both", "seed1")))  # fmt: skip
    assert result["reports"]["sft"]["overall"]["success_rate"] == 0.5
    assert result["reports"]["both"]["overall"]["success_rate"] == 0.75  # start 20 averaged over the seeds: 0.5
    assert result["reports"]["both"]["delta_vs_baseline"]["overall"]["delta"] == pytest.approx(0.25)
    assert result["reports"]["seed1"]["overall"]["success_rate"] == 0.5
    default_names = main(Args(reports=(f"{report}:sft", f"{report}:grpo_offline:1")))["reports"]
    assert list(default_names) == ["sft_vs_grpo:sft", "sft_vs_grpo:grpo_offline:1"]
    with pytest.raises(ValueError, match=r"is a sft_vs_grpo.py report: give .*:VARIANT:SEED, one of \['grpo_offline:0', "):
        main(Args(reports=(f"{report}:sft", str(report))))
    with pytest.raises(ValueError, match=r"one of \[.*'sft:0'\]"):
        main(Args(reports=(f"{report}:sft", f"{report}:irevla")))
    episodes = tmp_path / "evaluation.json"
    episodes.write_text(json.dumps({"episodes": [row(0, 20, True)]}))
    with pytest.raises(ValueError, match=r"evaluation.json is not a sft_vs_grpo.py report: give it without ':sft'"):
        main(Args(reports=(f"{episodes}:sft", str(episodes))))
