"""The tiny demo settings the benchmark tests share (tests/benchmarks/ is on sys.path: pytest's rootdir imports)."""

from __future__ import annotations

import dataclasses

from gym_libero_vla.demos.generate import DemoConfig

DEMO_FIELDS = {field.name for field in dataclasses.fields(DemoConfig)}


def tiny_demo_config(tmp_path, overrides: dict) -> DemoConfig:
    """Two demos of task 0 (init states 0 and 1) in ``tmp_path/demos.hdf5``; the DemoConfig fields among
    ``overrides`` (``extra_demos=...``, ``demo_init_state_end=...``) are taken out of it and applied here."""
    demo = dict(demos=str(tmp_path / "demos.hdf5"), episodes_per_task=2, demo_init_state_end=2)
    demo.update({name: overrides.pop(name) for name in list(overrides) if name in DEMO_FIELDS})
    return DemoConfig(**demo)
