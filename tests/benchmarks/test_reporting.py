"""benchmarks/reporting.py: the reproducing command of a report parses back to the same arguments."""

from __future__ import annotations

import shlex

import sft_baseline
import tyro
from reporting import command_line, demo_files_text

from gym_libero_vla.algos.sft import SFTConfig
from gym_libero_vla.demos.generate import DemoConfig
from gym_libero_vla.policies import CompactVLAConfig


def test_command_line_spells_nested_configs_as_tyro_does_and_parses_back():
    args = sft_baseline.Args(
        object_state=True, progress=False, task_ids=(0, 3),
        demo=DemoConfig(demos="data/spatial_state.hdf5", extra_demos=("a.hdf5", "b.hdf5"), filter_noops=False),
        sft=SFTConfig(batch_size=32, random_shift=4), policy=CompactVLAConfig(cameras=(), chunk_size=8, use_state=False,
                                                                             object_state_dim=3),
    )  # fmt: skip
    command = command_line(args, "benchmarks/sft_baseline.py")
    assert command == (
        "python benchmarks/sft_baseline.py --object-state --task-ids 0 3 --demos data/spatial_state.hdf5 "
        "--extra-demos a.hdf5 b.hdf5 --no-filter-noops --sft.batch-size 32 --sft.random-shift 4 --policy.no-use-state "
        "--policy.object-state-dim 3 --policy.chunk-size 8 --no-progress"
    )
    assert tyro.cli(sft_baseline.Args, args=shlex.split(command)[2:]) == args
    assert command_line(sft_baseline.Args(), "benchmarks/sft_baseline.py") == "python benchmarks/sft_baseline.py"


def test_demo_files_text_names_each_files_expert_and_layouts():
    demos = {
        "path": "data/a.hdf5",
        "extra_paths": ["data/b.hdf5", "data/official.hdf5"],
        "generator_configs": {
            "data/a.hdf5": {"expert_version": 2},
            "data/b.hdf5": {"expert_version": 1, "init_states": "sampled", "layout_version": 2, "robot_init_noise": 0.0},
            "data/official.hdf5": {},
        },
    }
    assert demo_files_text(demos) == (
        "data/a.hdf5 (expert v2) + data/b.hdf5 (expert v1, layouts v2, robot noise 0.0) + data/official.hdf5"
    )
    # Reports written before the key: the paths alone.
    assert demo_files_text({"path": "data/a.hdf5", "extra_paths": []}) == "data/a.hdf5"
