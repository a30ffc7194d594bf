"""Pick MuJoCo's headless OpenGL backend (EGL, then OSMesa) before robosuite is imported.

robosuite chooses its GL context class once, at import time, from ``MUJOCO_GL``; a wrong or missing
choice surfaces much later as an obscure crash inside a render call. This module probes the
backends in a short-lived subprocess (so a failed probe leaves no half-initialised GL state in this
process), records the winner in ``MUJOCO_GL``/``PYOPENGL_PLATFORM`` so that vector-env workers
inherit it, and turns "nothing works" into an error that names the Debian packages to install.
"""

from __future__ import annotations

import os
import subprocess
import sys

BACKENDS = ("egl", "osmesa")
# What to apt-get install when a backend's shared libraries are missing (Debian/Ubuntu names).
SYSTEM_PACKAGES = {
    "egl": "libegl1 libgl1 libegl-mesa0 libgl1-mesa-dri",
    "osmesa": "libosmesa6",
}
# Values of MUJOCO_GL that mean "no rendering at all" to robosuite.
DISABLED = ("disable", "disabled", "off", "false", "0")

_PROBE = """
import mujoco
from mujoco.{backend} import GLContext
ctx = GLContext(16, 16)
ctx.make_current()
ctx.free()
"""

# Set once a backend has been proven to work; inherited by vector-env workers so they skip the probe.
_VERIFIED = "GYM_LIBERO_VLA_GL_VERIFIED"
_selected: str | None = None
_errors: dict[str, str] = {}
_gl_in_use = False  # this process has created an OpenGL context
_gl_inherited = False  # this process was forked from one that had


def mark_gl_in_use() -> None:
    global _gl_in_use
    _gl_in_use = True


def _after_fork_in_child() -> None:
    global _gl_inherited
    egl = sys.modules.get("robosuite.renderers.context.egl_context")
    if _gl_in_use or (egl is not None and getattr(egl, "EGL_DISPLAY", None) is not None):
        _gl_inherited = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def probe_backend(backend: str, timeout: float = 60.0) -> str | None:
    """Try to create a tiny offscreen GL context with ``backend``; return None on success, else the error text."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown rendering backend {backend!r}: valid {BACKENDS}")
    env = dict(os.environ, MUJOCO_GL=backend, PYOPENGL_PLATFORM=backend)
    try:
        result = subprocess.run(
            [sys.executable, "-c", _PROBE.format(backend=backend)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return f"probe timed out after {timeout:.0f}s"
    if result.returncode == 0:
        return None
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {result.returncode}"


def select_backend() -> str:
    """Set ``MUJOCO_GL`` to a working headless backend and return it.

    A backend already named in ``MUJOCO_GL`` is kept (the user's choice wins). When neither EGL nor
    OSMesa works, ``MUJOCO_GL`` is set to "disable": physics and state observations still work, and
    :func:`require_rendering` raises the explanatory error the first time a frame is needed.
    """
    global _selected
    if _selected is not None:
        return _selected
    requested = os.environ.get("MUJOCO_GL", "").strip().lower()
    if requested:
        _selected = requested
        if requested in BACKENDS:
            os.environ.setdefault("PYOPENGL_PLATFORM", requested)
        return _selected
    for backend in BACKENDS:
        error = probe_backend(backend)
        if error is None:
            os.environ["MUJOCO_GL"] = backend
            os.environ["PYOPENGL_PLATFORM"] = backend
            os.environ[_VERIFIED] = backend
            _selected = backend
            return backend
        _errors[backend] = error
    os.environ["MUJOCO_GL"] = "disable"
    _selected = "disable"
    return _selected


def require_rendering() -> str:
    """Return the active backend, or raise a RuntimeError naming the system packages to install."""
    if _gl_inherited:
        raise RuntimeError(
            "This process was forked from one that had already used OpenGL (an rgb env, a render call, raw "
            "LIBERO); rendering here would hang inside the GL driver. Start workers with a fresh interpreter: "
            "gym.make_vec(env_id, num_envs=N) (our vector entry point uses 'forkserver'), or "
            "vector_kwargs={'context': 'forkserver'} with vectorization_mode='async'."
        )
    backend = select_backend()
    if backend in BACKENDS and os.environ.get(_VERIFIED) != backend:
        # Chosen by the user through MUJOCO_GL: check it once, rather than crash later inside a render call.
        error = probe_backend(backend)
        if error is not None:
            raise RuntimeError(
                f"MUJOCO_GL={backend} cannot create an OpenGL context ({error}). "
                f"Install it (apt-get install {SYSTEM_PACKAGES[backend]}) or unset MUJOCO_GL to let gym-libero-vla choose."
            )
        os.environ[_VERIFIED] = backend
    if backend not in DISABLED:
        return backend
    if _errors:
        details = "; ".join(f"{name}: {error}" for name, error in _errors.items())
        reason = f"neither EGL nor OSMesa could create an OpenGL context ({details})"
    else:
        reason = f"rendering is disabled by MUJOCO_GL={os.environ.get('MUJOCO_GL')!r}"
    raise RuntimeError(
        f"Camera images need MuJoCo offscreen rendering, but {reason}. Install EGL "
        f"(apt-get install {SYSTEM_PACKAGES['egl']}) or OSMesa (apt-get install {SYSTEM_PACKAGES['osmesa']}), "
        "or set MUJOCO_GL=egl|osmesa explicitly. obs_mode='state' without render_mode needs no rendering."
    )
