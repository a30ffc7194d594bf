"""benchmarks/env_throughput.py runs end to end with tiny step counts and writes its JSON; the chunked rows render
the cameras once per chunk (a count, not a timing), and frames without reflections differ a little."""

from __future__ import annotations

import json

import env_throughput


def test_chunked_rows_render_once_per_chunk(tmp_path, capsys):
    args = env_throughput.Args(modes=(), chunks=(1, 4), chunk_rgb_steps=8,
                               policy_steps=8, out=tmp_path / "throughput.json")  # fmt: skip
    env_throughput.main(args)
    results = json.loads((tmp_path / "throughput.json").read_text())
    chunks = results["chunks"]
    assert chunks["1"]["frames_per_env_step"] == 2.0  # agentview + wrist, every step
    assert chunks["4"]["frames_per_env_step"] == 0.5  # both cameras once per chunk of 4
    for row in chunks.values():
        assert row["rgb_env_steps_per_s"] > 0 and row["policy_state_env_steps_per_s"] > 0
        assert row["policy_rgb_env_steps_per_s"] > 0
        assert row["rgb_no_reflections_env_steps_per_s"] > 0 and row["policy_rgb_no_reflections_env_steps_per_s"] > 0
    assert chunks["1"]["vs_first_chunk"]["rgb_env_steps_per_s"] == 1.0
    assert results["mujoco_version"] == "3.3.0" and results["machine"]["cpu_count"] >= 1
    changes = results["no_reflections_frame_difference"]  # the table's mirror image goes, the wrist view hardly changes
    assert 0 < changes["agentview"]["mean_abs"] < 3 and changes["wrist"]["mean_abs"] < changes["agentview"]["mean_abs"]
    out = capsys.readouterr().out
    assert "Action chunks" in out and "Without reflections" in out
