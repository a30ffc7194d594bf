"""The LIBERO suites we expose, their episode limits, and a quiet, lazy doorway into the `libero` package.

Everything here is metadata that is cheap to compute (task names, instructions, BDDL paths, object
counts); building a simulator is left to :mod:`gym_libero_vla.libero_env`. Importing `libero` and
`robosuite` is deferred until first use and done with their first-run chatter silenced: robosuite's
"No private macro file found!" warnings and LIBERO's "[info] Applying task order" prints tell a
newcomer nothing actionable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import os
import warnings

import numpy as np

from gym_libero_vla import rendering


@dataclasses.dataclass(frozen=True)
class SuiteSpec:
    env_id: str
    """Gymnasium id registered for the suite."""
    libero_name: str
    """Name in ``libero.libero.benchmark.get_benchmark_dict()``."""
    max_episode_steps: int
    """Step limit (policy steps, settle steps excluded) after which the episode is truncated."""


# Step limits follow OpenVLA's LIBERO evaluation (experiments/robot/libero/run_libero_eval.py), chosen
# there from the longest training demonstration of each suite. OpenVLA gives libero_90 400 steps
# ("longest training demo has 373 steps"); we use the same.
SUITES: dict[str, SuiteSpec] = {
    spec.env_id: spec
    for spec in (
        SuiteSpec("LiberoSpatial-v0", "libero_spatial", 220),
        SuiteSpec("LiberoObject-v0", "libero_object", 280),
        SuiteSpec("LiberoGoal-v0", "libero_goal", 300),
        SuiteSpec("Libero10-v0", "libero_10", 520),
        SuiteSpec("Libero90-v0", "libero_90", 400),
    )
}
LIBERO_NAMES = {spec.libero_name: spec for spec in SUITES.values()}
# Short names accepted by command lines ("spatial" -> "libero_spatial").
SHORT_NAMES = {name.removeprefix("libero_"): name for name in LIBERO_NAMES}


def resolve_suite(name: str) -> SuiteSpec:
    """Accept an env id ("LiberoSpatial-v0"), a LIBERO name ("libero_spatial") or a short name ("spatial")."""
    if name in SUITES:
        return SUITES[name]
    if name in LIBERO_NAMES:
        return LIBERO_NAMES[name]
    if name in SHORT_NAMES:
        return LIBERO_NAMES[SHORT_NAMES[name]]
    raise ValueError(
        f"unknown LIBERO suite {name!r}: valid env ids {sorted(SUITES)}, "
        f"LIBERO names {sorted(LIBERO_NAMES)} or short names {sorted(SHORT_NAMES)}"
    )


class _DropRobosuiteMacroWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "macro" not in message and "setup_macros" not in message


@contextlib.contextmanager
def quiet():
    """Silence LIBERO's prints and the warnings its dependencies raise while importing or building."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@functools.cache
def libero_modules():
    """Import LIBERO (after choosing a GL backend); return ``(benchmark, get_libero_path, env_wrapper)``."""
    rendering.select_backend()
    logging.getLogger("robosuite_logs").addFilter(_DropRobosuiteMacroWarnings())
    with quiet():
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs import env_wrapper
    return benchmark, get_libero_path, env_wrapper


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    task_id: int
    name: str
    instruction: str
    bddl_file: str
    init_states_file: str
    num_objects: int
    """Movable objects in the scene; LIBERO's object-state has 14 numbers for each."""


@functools.cache
def suite_tasks(libero_name: str) -> tuple[TaskInfo, ...]:
    """Task metadata of a suite, in LIBERO's default task order. Reads only the small BDDL files."""
    benchmark, get_libero_path, _ = libero_modules()
    from libero.libero.envs import bddl_utils

    with quiet():
        suite = benchmark.get_benchmark_dict()[libero_name]()
    tasks = []
    for task_id in range(suite.n_tasks):
        task = suite.get_task(task_id)
        bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
        problem = bddl_utils.robosuite_parse_problem(bddl)
        num_objects = sum(len(names) for names in problem["objects"].values())
        init_file = os.path.join(get_libero_path("init_states"), task.problem_folder, task.init_states_file)
        tasks.append(TaskInfo(task_id, task.name, task.language, bddl, init_file, num_objects))
    return tuple(tasks)


def resolve_task_ids(suite: str, task_ids=None) -> tuple[int, ...]:
    """The tasks ``task_ids`` names in ``suite`` (a short name, LIBERO name or env id), every task when None; an
    unknown id, or none at all, is refused naming the valid ones."""
    spec = resolve_suite(suite)
    num_tasks = len(suite_tasks(spec.libero_name))
    if task_ids is None:
        return tuple(range(num_tasks))
    ids = tuple(int(task_id) for task_id in task_ids)
    bad = [task_id for task_id in ids if not 0 <= task_id < num_tasks]
    if bad or not ids:
        raise ValueError(f"unknown task_id {bad[0] if bad else ids} for {spec.env_id}: valid 0..{num_tasks - 1}")
    return ids


def resolve_init_state_ids(suite: str, task_ids, init_state_ids) -> tuple[int, ...]:
    """The stored init states ``init_state_ids`` names, checked against every task of ``task_ids`` in ``suite``; a
    non-integer or unknown id, or none at all, is refused naming the valid ones."""
    spec = resolve_suite(suite)
    ids = tuple(init_state_ids)
    if not ids:
        raise ValueError(f"init_state_ids is empty: give at least one init state of {spec.env_id}")
    for task_id in resolve_task_ids(spec.env_id, task_ids):
        num_init_states = task_init_states(spec.libero_name, task_id).shape[0]
        for init_state_id in ids:
            valid = isinstance(init_state_id, (int, np.integer)) and not isinstance(init_state_id, bool)
            if not (valid and 0 <= init_state_id < num_init_states):
                raise ValueError(
                    f"unknown init_state_id {init_state_id!r} for task {task_id} of {spec.env_id}: "
                    f"valid 0..{num_init_states - 1}"
                )
    return tuple(int(init_state_id) for init_state_id in ids)


@functools.cache
def task_init_states(libero_name: str, task_id: int) -> np.ndarray:
    """The suite's fixed initial MuJoCo states for one task, shape (num_init_states, state_dim)."""
    benchmark, _, _ = libero_modules()
    with quiet():
        suite = benchmark.get_benchmark_dict()[libero_name]()
        states = suite.get_task_init_states(task_id)
    states = np.asarray(states, dtype=np.float64)
    states.setflags(write=False)
    return states
