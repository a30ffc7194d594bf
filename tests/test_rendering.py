"""GL backend selection: a working backend is found here, and a missing one gives an actionable error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gym_libero_vla import rendering


def _run(code: str, **env_overrides) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM", "GYM_LIBERO_VLA_GL_VERIFIED")}
    env.update(env_overrides)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_a_headless_backend_is_selected_automatically():
    code = "from gym_libero_vla import rendering; import os; print(rendering.select_backend(), os.environ['MUJOCO_GL'])"
    result = _run(code)
    assert result.returncode == 0, result.stderr
    backend, exported = result.stdout.split()
    assert backend in rendering.BACKENDS and exported == backend


def test_probe_reports_a_broken_egl_instead_of_crashing(monkeypatch):
    # With no EGL vendor library, libglvnd cannot create a display: the probe must say so, not hang or crash.
    monkeypatch.setenv("__EGL_VENDOR_LIBRARY_FILENAMES", "/nonexistent.json")
    error = rendering.probe_backend("egl")
    assert error is not None and error.strip() != ""


def test_a_broken_backend_named_by_the_user_is_reported_before_rendering():
    code = (
        "import gymnasium as gym, gym_libero_vla\n"
        "env = gym.make('LiberoSpatial-v0', obs_mode='rgb')\n"
        "try:\n"
        "    env.reset(seed=0)\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
    )
    result = _run(code, MUJOCO_GL="egl", __EGL_VENDOR_LIBRARY_FILENAMES="/nonexistent.json")
    assert result.returncode == 0, result.stderr
    assert "MUJOCO_GL=egl cannot create an OpenGL context" in result.stdout and "libegl1" in result.stdout


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown rendering backend 'vulkan': valid"):
        rendering.probe_backend("vulkan")


def test_rgb_env_without_rendering_names_the_system_packages():
    code = (
        "import gymnasium as gym, gym_libero_vla, numpy as np\n"
        "state_env = gym.make('LiberoSpatial-v0'); state_env.reset(seed=0); state_env.step(np.zeros(7))\n"
        "env = gym.make('LiberoSpatial-v0', obs_mode='rgb')\n"
        "try:\n"
        "    env.reset(seed=0)\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
    )
    result = _run(code, MUJOCO_GL="disable")
    assert result.returncode == 0, result.stderr
    assert "libegl1" in result.stdout and "libosmesa6" in result.stdout and "obs_mode='state'" in result.stdout
