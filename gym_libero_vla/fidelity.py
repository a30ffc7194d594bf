"""LIBERO fidelity: run the scenes under the MuJoCo they were made for, and check each task's starting premise.

A LIBERO task is only the task its instruction describes if the scene starts the way its BDDL file says.
The suites' stored init states were recorded under an older MuJoCo, and from MuJoCo 3.4 (a box-box
collision change) some of them no longer settle into the premise: LIBERO-Spatial task 5, "pick up the
black bowl on the ramekin ...", starts with the bowl 6 cm beside the ramekin, and a published OpenVLA-OFT
checkpoint falls from ~98% to ~12% on it. Frameworks that reproduce published LIBERO numbers pin
``mujoco==3.3.0``, and so do we (``pyproject.toml``); ``benchmarks/init_state_fidelity.py`` shows every
task's premise holding under the pinned version and what breaks under newer ones.

Two things live here:

- :func:`check_mujoco_version`: importing :mod:`gym_libero_vla` warns once when the installed MuJoCo is
  not :data:`PINNED_MUJOCO_VERSION` (numbers measured then are not comparable with the literature);
  ``LiberoEnv(strict_mujoco=True)`` or ``GYM_LIBERO_VLA_STRICT_MUJOCO=1`` makes making an env an error.
- :func:`init_predicates`: evaluate a task's BDDL ``:init`` predicates with LIBERO's own predicate code
  in the env's current state (right after ``reset``): what rests on or in what, and which fixtures are open,
  closed, on or off, must hold for the episode to start from the scene its instruction describes.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import warnings

import numpy as np

# Keep equal to the pin in pyproject.toml (a test checks it).
PINNED_MUJOCO_VERSION = "3.3.0"
STRICT_ENV_VAR = "GYM_LIBERO_VLA_STRICT_MUJOCO"
# Set once this process warned; inherited by vector-env workers, so N workers do not repeat the warning.
_WARNED_ENV_VAR = "GYM_LIBERO_VLA_MUJOCO_WARNED"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


class MujocoVersionWarning(UserWarning):
    """The installed MuJoCo is not the one LIBERO's scenes are pinned to."""


class MujocoVersionError(RuntimeError):
    """The installed MuJoCo is not the pinned one and the caller asked for a hard guarantee."""


def installed_mujoco_version() -> str | None:
    """The installed ``mujoco`` distribution's version (read from its metadata, without importing it), or None."""
    try:
        return importlib.metadata.version("mujoco")
    except importlib.metadata.PackageNotFoundError:
        return None


def strict_from_environment() -> bool:
    """Whether ``GYM_LIBERO_VLA_STRICT_MUJOCO`` asks for a hard guarantee; an unreadable value is an error."""
    value = os.environ.get(STRICT_ENV_VAR, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{STRICT_ENV_VAR}={os.environ[STRICT_ENV_VAR]!r}: valid {_TRUE + _FALSE[1:]} or unset")


def mujoco_mismatch_message(installed: str) -> str:
    return (
        f"MuJoCo {installed} is installed, but gym-libero-vla pins mujoco=={PINNED_MUJOCO_VERSION}, the version "
        f"LIBERO's scenes settle correctly under. From MuJoCo 3.4 some stored init states no longer satisfy their "
        f"task's premise (LIBERO-Spatial task 5's bowl is not on the ramekin), so success rates measured now are "
        f"not comparable with published LIBERO numbers. Install the pinned version (pip install "
        f"mujoco=={PINNED_MUJOCO_VERSION}); python benchmarks/init_state_fidelity.py shows which tasks break. "
        f"Set {STRICT_ENV_VAR}=1 or make envs with strict_mujoco=True to turn this into an error."
    )


def check_mujoco_version(strict: bool | None = None, installed: str | None = None) -> bool:
    """Compare the installed MuJoCo with :data:`PINNED_MUJOCO_VERSION`; True when they match.

    On a mismatch: raise :class:`MujocoVersionError` when ``strict`` (None: read ``GYM_LIBERO_VLA_STRICT_MUJOCO``),
    else warn (:class:`MujocoVersionWarning`) once per process tree. ``installed`` defaults to the installed
    distribution's version; without MuJoCo there is nothing to compare (building a simulator will fail anyway).
    """
    installed = installed_mujoco_version() if installed is None else installed
    if installed is None or installed == PINNED_MUJOCO_VERSION:
        return True
    if strict is None:
        strict = strict_from_environment()
    message = mujoco_mismatch_message(installed)
    if strict:
        raise MujocoVersionError(message)
    if os.environ.get(_WARNED_ENV_VAR) != installed:
        os.environ[_WARNED_ENV_VAR] = installed
        warnings.warn(message, MujocoVersionWarning, stacklevel=3)
    return False


# ---------------------------------------------------------------------------------------------- premises
@dataclasses.dataclass(frozen=True)
class PredicateCheck:
    """One ``:init`` predicate of a task's BDDL, evaluated by LIBERO in the simulator's current state."""

    predicate: tuple[str, ...]
    """As parsed from the BDDL file, e.g. ("on", "akita_black_bowl_1", "glazed_rim_porcelain_ramekin_1")."""
    kind: str
    """"object-object" (the second argument is an object or fixture, or a site on one: a cabinet's top, a drawer's
    inside, a stove's cook region), "state" (a one-argument predicate on an articulated fixture: Open, Close,
    TurnOn, TurnOff) or "object-region" (the second argument is a placement region of the table or floor: a
    2 cm x 2 cm site at the centre of the area LIBERO sampled the object's start from)."""
    holds: bool
    horizontal_offset: float | None = None
    """Binary predicates: horizontal distance (m) from the second argument's origin (a body's, or a site's centre)
    to the first's. LIBERO's ``On`` wants it below 3 cm between two bodies, and within the site's half-width
    (1 cm for a table region) for a site."""

    @property
    def text(self) -> str:
        return "(" + " ".join(self.predicate) + ")"

    @property
    def is_premise(self) -> bool:
        """Whether the predicate is part of the task's premise: how objects rest on or in each other and the state
        of articulated fixtures. A region predicate only says where the start was sampled around; objects settle
        a centimetre or two away from that centre in LIBERO's own stored init states, so it is reported, not
        required."""
        return self.kind != "object-region"


def init_predicates(env) -> list[PredicateCheck]:
    """The current task's BDDL ``:init`` predicates, each evaluated with LIBERO's own ``_eval_predicate`` in the
    simulator's current state. Call it right after ``env.reset(...)`` (settle steps included): every premise
    predicate (:attr:`PredicateCheck.is_premise`) should hold there, or the episode does not start from the scene
    its instruction describes."""
    domain = env.unwrapped.libero_env.env
    bodies = {**domain.objects_dict, **domain.fixtures_dict}
    sites = domain.object_sites_dict

    def position(name: str) -> np.ndarray:
        if name in bodies:
            return domain.sim.data.body_xpos[domain.obj_body_id[name]]
        return domain.sim.data.get_site_xpos(name)

    checks = []
    for predicate in domain.parsed_problem["initial_state"]:
        predicate = tuple(str(part) for part in predicate)
        holds = bool(domain._eval_predicate(list(predicate)))
        if len(predicate) == 2:
            checks.append(PredicateCheck(predicate, "state", holds))
            continue
        on_a_body = predicate[2] in bodies or sites[predicate[2]].parent_name in bodies
        kind = "object-object" if on_a_body else "object-region"
        offset = float(np.linalg.norm(position(predicate[1])[:2] - position(predicate[2])[:2]))
        checks.append(PredicateCheck(predicate, kind, holds, offset))
    return checks
