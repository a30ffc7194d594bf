"""The tiny demo and evaluation settings and the file helpers the benchmark tests share (tests/benchmarks/ is on
sys.path: pytest's rootdir imports)."""

from __future__ import annotations

import dataclasses

from gym_libero_vla.demos.generate import DemoConfig
from gym_libero_vla.evaluate import EvalRange

DEMO_FIELDS = {field.name for field in dataclasses.fields(DemoConfig)}
EVAL_FIELDS = {field.name for field in dataclasses.fields(EvalRange)}


def tiny_eval_range(overrides: dict, num_init_states: int) -> EvalRange:
    """Held-out init states 20 .. 20 + ``num_init_states`` - 1; the EvalRange fields among ``overrides``
    (``eval_init_state_start=...``, ``eval_num_init_states=...``) are taken out of it and applied here."""
    values = dict(eval_num_init_states=num_init_states)  # EvalRange's start: 20
    values.update({name: overrides.pop(name) for name in list(overrides) if name in EVAL_FIELDS})
    return EvalRange(**values)


def tiny_demo_config(tmp_path, overrides: dict) -> DemoConfig:
    """Two demos of task 0 (init states 0 and 1) in ``tmp_path/demos.hdf5``; the DemoConfig fields among
    ``overrides`` (``extra_demos=...``, ``demo_init_state_end=...``) are taken out of it and applied here."""
    demo = dict(demos=str(tmp_path / "demos.hdf5"), episodes_per_task=2, demo_init_state_end=2)
    demo.update({name: overrides.pop(name) for name in list(overrides) if name in DEMO_FIELDS})
    return DemoConfig(**demo)


def line_count(path) -> int:
    """Lines in the file at ``path`` (a resumable run's ``episodes.jsonl``, ``curve.jsonl``: one record a line)."""
    with open(path) as file:
        return sum(1 for _ in file)
