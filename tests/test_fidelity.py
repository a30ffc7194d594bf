"""LIBERO fidelity: the MuJoCo pin and its guard, and every task's ``:init`` premise on the real simulator."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import warnings

import gymnasium as gym
import numpy as np
import pytest

from gym_libero_vla import fidelity
from gym_libero_vla.fidelity import (
    PINNED_MUJOCO_VERSION,
    STRICT_ENV_VAR,
    MujocoVersionError,
    MujocoVersionWarning,
    check_mujoco_version,
    init_predicates,
    installed_mujoco_version,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOWL_ON_RAMEKIN = ("on", "akita_black_bowl_1", "glazed_rim_porcelain_ramekin_1")


# ---------------------------------------------------------------------------------------------- the pin and its guard
def test_pyproject_pins_the_version_the_guard_checks_and_it_is_installed():
    with open(os.path.join(REPO, "pyproject.toml")) as file:
        pins = re.findall(r'"mujoco==([^"]+)"', file.read())
    assert pins == [PINNED_MUJOCO_VERSION]
    assert installed_mujoco_version() == PINNED_MUJOCO_VERSION
    assert check_mujoco_version(strict=True)  # the pinned version passes even the strict check


def test_another_version_warns_once_naming_both_versions(monkeypatch):
    monkeypatch.delenv(fidelity._WARNED_ENV_VAR, raising=False)
    monkeypatch.delenv(STRICT_ENV_VAR, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert check_mujoco_version(installed="3.17.0") is False
        assert check_mujoco_version(installed="3.17.0") is False
    mismatches = [w for w in caught if issubclass(w.category, MujocoVersionWarning)]
    assert len(mismatches) == 1
    message = str(mismatches[0].message)
    assert "MuJoCo 3.17.0 is installed" in message and f"mujoco=={PINNED_MUJOCO_VERSION}" in message
    assert STRICT_ENV_VAR in message and "comparable" in message


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_strict_mode_turns_the_mismatch_into_an_error(monkeypatch, how):
    monkeypatch.delenv(fidelity._WARNED_ENV_VAR, raising=False)
    strict = True if how == "argument" else None
    if how == "environment":
        monkeypatch.setenv(STRICT_ENV_VAR, "1")
    with pytest.raises(MujocoVersionError, match=rf"MuJoCo 4\.0\.0 is installed.*mujoco=={re.escape(PINNED_MUJOCO_VERSION)}"):
        check_mujoco_version(strict=strict, installed="4.0.0")


def test_an_unreadable_strict_variable_names_the_valid_values(monkeypatch):
    monkeypatch.setenv(STRICT_ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match=rf"{STRICT_ENV_VAR}='sometimes': valid .*'1'.*'0'"):
        check_mujoco_version(installed="3.17.0")


def _python_with_mujoco_metadata(tmp_path, version: str, code: str, **env) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter whose installed-package metadata says mujoco ``version`` (a
    ``mujoco-<version>.dist-info`` ahead of site-packages on the path: what another install looks like)."""
    dist_info = tmp_path / f"mujoco-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: mujoco\nVersion: {version}\n")
    environment = {key: value for key, value in os.environ.items() if not key.startswith("GYM_LIBERO_VLA_")}
    environment.update(PYTHONPATH=str(tmp_path), **env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=environment, capture_output=True, text=True, timeout=300
    )


def test_importing_the_package_under_another_mujoco_warns_and_strict_envs_refuse(tmp_path):
    result = _python_with_mujoco_metadata(
        tmp_path,
        "3.17.0",
        """
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import gymnasium as gym, gym_libero_vla
        print("warnings:", [w.category.__name__ for w in caught])
        from gym_libero_vla.fidelity import MujocoVersionError
        try:
            gym.make("LiberoSpatial-v0", strict_mujoco=True)
        except MujocoVersionError as error:
            print("refused:", error)
        """,
    )
    assert result.returncode == 0, result.stderr
    assert "warnings: ['MujocoVersionWarning']" in result.stdout
    assert f"refused: MuJoCo 3.17.0 is installed, but gym-libero-vla pins mujoco=={PINNED_MUJOCO_VERSION}" in result.stdout


def test_the_strict_environment_variable_refuses_to_make_an_env(tmp_path):
    result = _python_with_mujoco_metadata(
        tmp_path,
        "3.17.0",
        "import gymnasium as gym, gym_libero_vla; gym.make('LiberoSpatial-v0')",
        **{STRICT_ENV_VAR: "1"},
    )
    assert result.returncode != 0
    assert "MujocoVersionError: MuJoCo 3.17.0 is installed" in result.stderr


# ---------------------------------------------------------------------------------------------- premises
def _check(checks, predicate):
    matches = [check for check in checks if check.predicate == predicate]
    assert len(matches) == 1, [check.predicate for check in checks]
    return matches[0]


@pytest.mark.parametrize("init_state_id", [0, 17, 49])
def test_spatial_task_5_starts_with_the_bowl_on_the_ramekin(spatial_env, init_state_id):
    """'pick up the black bowl on the ramekin ...': under MuJoCo >= 3.4 the bowl settles 6 cm beside the ramekin."""
    spatial_env.reset(options={"task_id": 5, "init_state_id": init_state_id})
    check = _check(init_predicates(spatial_env), BOWL_ON_RAMEKIN)
    assert check.kind == "object-object" and check.is_premise
    assert check.holds, f"bowl {100 * check.horizontal_offset:.1f} cm from the ramekin's centre"
    assert check.horizontal_offset < 0.03


def test_the_premise_check_sees_a_bowl_moved_off_the_ramekin(spatial_env):
    spatial_env.reset(options={"task_id": 5, "init_state_id": 0})
    domain = spatial_env.unwrapped.libero_env.env
    joint = domain.get_object("akita_black_bowl_1").joints[-1]  # the bowl's free joint: position, then quaternion
    qpos = np.array(domain.sim.data.get_joint_qpos(joint))
    qpos[0] += 0.06  # where MuJoCo 3.17 leaves it
    domain.sim.data.set_joint_qpos(joint, qpos)
    domain.sim.forward()
    check = _check(init_predicates(spatial_env), BOWL_ON_RAMEKIN)
    assert not check.holds and check.horizontal_offset > 0.03


# One task per suite with premise predicates of each kind there is: a bowl in an open drawer and on the cabinet
# (Spatial 4), on a cookie box (Spatial 3), an open drawer (LIBERO-10 3), a stove turned on (LIBERO-10 8), an open
# microwave (LIBERO-90 33); Object and Goal have only region placements, checked for their kind.
SWEEP = [
    ("LiberoSpatial-v0", 4, {"object-object": 2, "state": 1}),
    ("LiberoSpatial-v0", 3, {"object-object": 2}),
    ("LiberoObject-v0", 0, {}),
    ("LiberoGoal-v0", 0, {}),
    ("Libero10-v0", 3, {"state": 1}),
    ("Libero10-v0", 8, {"state": 1}),
    ("Libero90-v0", 33, {"state": 1}),
]


@pytest.mark.parametrize(("env_id", "task_id", "premise_kinds"), SWEEP)
def test_premise_holds_after_reset(env_id, task_id, premise_kinds):
    env = gym.make(env_id, obs_mode="state", task_ids=[task_id], max_cached_tasks=1)
    try:
        env.reset(options={"task_id": task_id, "init_state_id": 0})
        checks = init_predicates(env)
    finally:
        env.close()
    premise = [check for check in checks if check.is_premise]
    kinds = {kind: sum(check.kind == kind for check in premise) for kind in {check.kind for check in premise}}
    assert kinds == premise_kinds
    assert [check.text for check in premise if not check.holds] == []
    regions = [check for check in checks if not check.is_premise]
    assert regions and {check.kind for check in regions} == {"object-region"}
