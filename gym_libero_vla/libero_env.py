"""LIBERO tasks as a Gymnasium environment: a thin adapter over LIBERO's own simulator.

What the adapter does, and nothing more:
- translates LIBERO's old 4-tuple ``step`` into Gymnasium's 5-tuple with a sparse binary reward
  (1.0 on the step the task's BDDL goal holds, then ``terminated``); truncation comes from the
  registered ``max_episode_steps`` (Gymnasium's ``TimeLimit``);
- starts every episode from one of the suite's fixed initial states (``init_state_id``), then runs
  ``num_settle_steps`` no-op steps with the gripper open, as LIBERO's and OpenVLA's evaluations do,
  because objects settle after ``set_init_state``. Settle steps do not count towards the step limit;
- builds the observation dict (instruction, task index, 8-number proprio state as OpenVLA-OFT uses,
  upright camera frames) and validates actions.

Speed on CPU: physics costs ~18 ms a step, a camera frame ~90 ms. So cameras are rendered by this
adapter only when an observation needs them (never during settle steps), the simulator is built
without an offscreen renderer in pure state mode, and robosuite's soft reset (``hard_reset=False``)
replaces its default XML reload (seconds) with a state reset (~35 ms). Building a task's simulator
takes seconds, so the last ``max_cached_tasks`` simulators are kept (each ~0.3 GB, ~1 GB with a renderer).
"""

from __future__ import annotations

import collections
import contextlib
import os
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from gym_libero_vla import rendering
from gym_libero_vla.episode import SAMPLED_INIT_STATE
from gym_libero_vla.fidelity import check_mujoco_version, init_predicates
from gym_libero_vla.instruction_space import InstructionText
from gym_libero_vla.suites import (
    libero_modules,
    quiet,
    resolve_init_state_ids,
    resolve_suite,
    resolve_task_ids,
    suite_tasks,
    task_init_states,
)
from gym_libero_vla.wrappers.openvla_gripper import check_gripper_convention, openvla_gripper_to_libero

OBS_MODES = ("state", "rgb", "rgb+state")
# Our camera names -> robosuite camera names.
CAMERAS = {"agentview": "agentview", "wrist": "robot0_eye_in_hand"}
ACTION_DIM = 7
STATE_DIM = 8  # eef position (3), eef axis-angle (3), gripper joint positions (2): OpenVLA-OFT's proprio.
# Finite bounds that hold by construction: positions are metres in the world or gripper frame (the arm
# reaches ~1 m, objects fall no further than the floor), axis-angle components lie in [-2pi, 2pi],
# Panda finger joints in [-0.05, 0.05], quaternion components in [-1, 1].
STATE_BOUND = np.array([5, 5, 5, 2 * np.pi, 2 * np.pi, 2 * np.pi, 0.1, 0.1], dtype=np.float32)
OBJECT_STATE_BOUND = np.float32(10.0)
OBJECT_STATE_PER_OBJECT = 14  # LIBERO's object-state: position, quaternion, both relative to the gripper too.
NUM_SETTLE_STEPS = 10  # OpenVLA's LIBERO evaluation waits 10 steps for objects to settle.
SETTLE_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)  # no motion, gripper open.
RESET_OPTIONS = ("task_id", "init_state_id", "init_state", "layout_seed")
MAX_LAYOUT_DRAWS = 20  # draws of a new layout (reset option "layout_seed") while a premise of the BDDL :init fails
# Gaussian noise (radians) on the robot's joints at a new layout's start: robosuite's "default" initialization noise,
# which LIBERO drew its stored init states with (their joint angles spread 0.019-0.022 rad about the Panda's nominal
# pose on every joint of all four suites) and which LIBERO's evaluation env turns off (the robot then starts from one
# pose on every layout).
ROBOT_INIT_NOISE = 0.02
# How new layouts are drawn, recorded with what starts from them (evaluation rows, demo files) so that nothing drawn
# another way is taken for the same start: 1 drew the objects from the layout seed alone (the same draws for every task)
# with the robot at its nominal pose; 2 draws from the layout seed and the task, the robot spread by ROBOT_INIT_NOISE.
LAYOUT_VERSION = 2


def _quat2axisangle(quat: np.ndarray) -> np.ndarray:
    """(x, y, z, w) quaternion -> axis-angle, as robosuite's and OpenVLA-OFT's ``quat2axisangle``."""
    w = float(np.clip(quat[3], -1.0, 1.0))
    den = np.sqrt(1.0 - w * w)
    if np.isclose(den, 0.0):
        return np.zeros(3)
    return quat[:3] * 2.0 * np.arccos(w) / den


def _check_cameras(obs_mode: str, cameras) -> tuple[str, ...]:
    cameras = (cameras,) if isinstance(cameras, str) else tuple(cameras)
    for camera in cameras:
        if camera not in CAMERAS:
            raise ValueError(f"unknown camera {camera!r}: valid {tuple(CAMERAS)}")
    if "rgb" in obs_mode and not cameras:
        raise ValueError(f"obs_mode {obs_mode!r} needs at least one camera from {tuple(CAMERAS)}")
    if len(set(cameras)) != len(cameras):
        raise ValueError(f"cameras {cameras} name a camera twice")
    return cameras


def _check_image_size(image_size) -> tuple[int, int]:
    height, width = (image_size, image_size) if np.isscalar(image_size) else tuple(image_size)
    if not (int(height) == height > 0 and int(width) == width > 0):
        raise ValueError(f"image_size {image_size!r} must be a positive int or (height, width)")
    return int(height), int(width)


@contextlib.contextmanager
def _global_numpy_seed(seed: int):
    """Seed numpy's global RNG, which LIBERO's placement samplers use, and restore the caller's state after."""
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(saved)


class LiberoEnv(gym.Env[dict, np.ndarray]):
    """One LIBERO suite (all its tasks, or a subset) as a Gymnasium env.

    Args:
        suite: LIBERO suite, e.g. "libero_spatial" (set by the registered ids ``LiberoSpatial-v0``...).
        obs_mode: "state" (proprio only), "rgb" (camera frames only) or "rgb+state" (both). The
            instruction and task index are always present.
        cameras: which cameras the rgb modes return, from ("agentview", "wrist").
        image_size: side of the square camera frames (or (height, width)); rendering cost on CPU
            hardly depends on it, policy cost does.
        task_ids: restrict episodes to these task indices (default: every task of the suite).
        privileged_state: add "object_state", LIBERO's ground-truth object poses (zero-padded to the
            suite's largest scene), for state-based baselines and scripted experts.
        render_mode: "rgb_array" makes ``render()`` return an upright agentview frame.
        render_size: side of the frame ``render()`` returns.
        num_settle_steps: no-op steps run inside ``reset`` after ``set_init_state``.
        max_cached_tasks: simulators kept alive for fast task switches.
        gripper_convention: "libero" (the action's gripper is LIBERO's: -1 open, +1 close) or "openvla"
            (OpenVLA's [0, 1] with 1 = open, binarised and inverted as OpenVLA's LIBERO evaluation does; see
            :mod:`gym_libero_vla.wrappers.openvla_gripper`). Real OpenVLA LIBERO checkpoints need "openvla".
        action_chunk: actions per ``step``: 1 (default) takes one ``(7,)`` action; ``k > 1`` takes a ``(k, 7)`` chunk,
            executes its actions in order (stopping early when the task succeeds or the step limit is reached) and
            renders the cameras once, for the observation it returns; ``info["executed_actions"]`` says how many ran.
        max_env_steps: truncate the episode once this many actions were executed (an env step is one action, chunked
            or not). Default: none of its own for ``action_chunk=1`` (Gymnasium's ``max_episode_steps`` counts steps,
            which are actions then), the suite's limit (``max_episode_steps`` of the registration) for chunks, whose
            ``step`` calls Gymnasium's ``TimeLimit`` counts instead.
        strict_mujoco: raise :class:`gym_libero_vla.fidelity.MujocoVersionError` when the installed MuJoCo is not
            the pinned one (LIBERO's scenes change with it); False warns instead; None (default) reads the
            environment variable ``GYM_LIBERO_VLA_STRICT_MUJOCO``.
        reflections: render the reflections of LIBERO's reflective surfaces (the table, the floor), as LIBERO does
            (default). False skips MuJoCo's reflection pass: a frame costs ~40% less on a CPU renderer and differs by
            ~1 of 255 on average in agentview (the faint mirror image in the table), ~0 in the wrist view. Train and
            evaluate a pixel policy with the same choice (:class:`~gym_libero_vla.policies.CompactVLAConfig` carries
            it; published checkpoints were trained on LIBERO's look).
        robot_init_noise: radians of Gaussian noise on the robot's joints at the start of a new layout (reset option
            ``layout_seed``): :data:`ROBOT_INIT_NOISE` (default) spreads them as LIBERO's stored starts are; 0 starts
            the robot at its nominal pose on every layout, as LIBERO's evaluation env does. Stored init states keep
            the robot where LIBERO stored it.

    Episode start: ``reset(options={"task_id": i, "init_state_id": j})`` picks both explicitly; with
    only a seed, ``task_id = task_ids[seed % len(task_ids)]`` and ``init_state_id =
    (seed // len(task_ids)) % num_init_states``, so a vector env seeded with consecutive seeds spreads
    its workers over consecutive tasks; with neither, both are drawn from ``np_random``. Passing
    ``options={"task_id": i, "init_state": state}`` starts from an arbitrary flattened MuJoCo state
    (demo replay); ``info["init_state_id"]`` is then -1. ``options={"task_id": i, "layout_seed": k}`` starts from a
    new layout, none of the suite's stored ones: LIBERO's placement sampler draws it from ``k``
    (:meth:`sample_init_state`, the robot's joints spread by ``robot_init_noise`` radians: by default
    :data:`ROBOT_INIT_NOISE`, as in the stored starts; 0 starts it at one pose, as LIBERO's evaluation env does),
    redrawn while a premise of the task's BDDL ``:init`` fails after the settle steps
    (a bowl that must rest on the ramekin); the same ``k`` and seed give the same scene, and
    ``info["init_state_id"]`` is ``SAMPLED_INIT_STATE`` (-2).

    Actions outside [-1, 1] are clipped (LIBERO's OSC controller scales that range); an action of the
    wrong shape or with NaN/inf raises ``ValueError``.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(
        self,
        suite: str = "libero_spatial",
        obs_mode: str = "state",
        cameras: tuple[str, ...] | list[str] = ("agentview", "wrist"),
        image_size: int | tuple[int, int] = 128,
        task_ids: tuple[int, ...] | list[int] | None = None,
        privileged_state: bool = False,
        render_mode: str | None = None,
        render_size: int = 256,
        num_settle_steps: int = NUM_SETTLE_STEPS,
        max_cached_tasks: int = 3,
        gripper_convention: str = "libero",
        action_chunk: int = 1,
        max_env_steps: int | None = None,
        strict_mujoco: bool | None = None,
        reflections: bool = True,
        robot_init_noise: float = ROBOT_INIT_NOISE,
    ):
        check_mujoco_version(strict_mujoco)
        self.suite_spec = resolve_suite(suite)
        self.gripper_convention = check_gripper_convention(gripper_convention)
        self.suite = self.suite_spec.libero_name
        if obs_mode not in OBS_MODES:
            raise ValueError(f"unknown obs_mode {obs_mode!r}: valid {OBS_MODES}")
        cameras = _check_cameras(obs_mode, cameras)
        height, width = _check_image_size(image_size)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"unknown render_mode {render_mode!r}: valid {self.metadata['render_modes']} or None")
        if not (isinstance(render_size, (int, np.integer)) and render_size > 0):
            raise ValueError(f"render_size {render_size!r} must be a positive int")
        if num_settle_steps < 0:
            raise ValueError(f"num_settle_steps {num_settle_steps} must be >= 0")
        if max_cached_tasks < 1:
            raise ValueError(f"max_cached_tasks {max_cached_tasks} must be >= 1")
        if not (isinstance(action_chunk, (int, np.integer)) and not isinstance(action_chunk, bool) and action_chunk >= 1):
            raise ValueError(f"action_chunk {action_chunk!r} must be an int >= 1 (actions per step)")
        if max_env_steps is not None and not (isinstance(max_env_steps, (int, np.integer)) and max_env_steps >= 1):
            raise ValueError(f"max_env_steps {max_env_steps!r} must be an int >= 1 or None")
        if not isinstance(reflections, (bool, np.bool_)):
            raise ValueError(f"reflections {reflections!r} must be True (LIBERO's look) or False (faster frames)")
        if not (isinstance(robot_init_noise, (int, float, np.integer, np.floating)) and robot_init_noise >= 0):
            raise ValueError(
                f"robot_init_noise {robot_init_noise!r} must be a number >= 0 (radians of noise on the robot's joints at "
                f"a new layout's start; {ROBOT_INIT_NOISE}: as LIBERO's stored starts, 0: one pose)"
            )

        self.tasks = suite_tasks(self.suite)
        self.task_ids = resolve_task_ids(self.suite_spec.env_id, task_ids)
        self.obs_mode = obs_mode
        self.cameras = cameras if "rgb" in obs_mode else ()
        self.image_size = (int(height), int(width))
        self.privileged_state = privileged_state
        self.render_mode = render_mode
        self.render_size = int(render_size)
        self.reflections = bool(reflections)
        self.robot_init_noise = float(robot_init_noise)
        self.num_settle_steps = int(num_settle_steps)
        self.max_cached_tasks = int(max_cached_tasks)
        self.max_episode_steps = self.suite_spec.max_episode_steps
        self.action_chunk = int(action_chunk)
        self.max_env_steps = int(max_env_steps) if max_env_steps is not None else (
            self.max_episode_steps if self.action_chunk > 1 else None
        )  # fmt: skip
        self.action_hooks: list = []
        """Called with no arguments after every executed action (e.g. RolloutRelabel's goal checks)."""
        self.object_state_dim = OBJECT_STATE_PER_OBJECT * max(task.num_objects for task in self.tasks)

        obs_spaces: dict[str, spaces.Space] = {
            "instruction": InstructionText(),
            "task_id": spaces.Discrete(len(self.tasks)),
        }
        if "state" in obs_mode:
            obs_spaces["state"] = spaces.Box(-STATE_BOUND, STATE_BOUND, (STATE_DIM,), np.float32)
        for camera in self.cameras:
            obs_spaces[camera] = spaces.Box(0, 255, (*self.image_size, 3), np.uint8)
        if privileged_state:
            obs_spaces["object_state"] = spaces.Box(
                -OBJECT_STATE_BOUND, OBJECT_STATE_BOUND, (self.object_state_dim,), np.float32
            )
        self.observation_space = spaces.Dict(obs_spaces)
        action_shape = (ACTION_DIM,) if self.action_chunk == 1 else (self.action_chunk, ACTION_DIM)
        self.action_space = spaces.Box(-1.0, 1.0, action_shape, np.float32)

        self._simulators: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self._sim = None  # LIBERO env of the current episode
        self._task: Any = None
        self._init_state_id = -1
        self._fixture_poses: dict[int, list] = {}  # task -> (body, pos, quat) of its fixtures in a fresh model
        self._frames: dict[str, np.ndarray] = {}  # frames rendered for the current observation
        self._env_steps = 0  # actions executed in the current episode
        self.frames_rendered = 0  # camera frames rendered for observations, for speed checks

    # ------------------------------------------------------------------ simulator management
    @property
    def needs_renderer(self) -> bool:
        return bool(self.cameras) or self.render_mode is not None

    @property
    def libero_env(self):
        """The LIBERO ``ControlEnv``/``OffScreenRenderEnv`` of the current episode (for experts, relabelling)."""
        if self._sim is None:
            raise gym.error.ResetNeeded("call reset() before using the simulator")
        return self._sim

    @property
    def current_task(self):
        return self._task

    def worker_pid(self) -> int:
        """Process id of the process that runs this env (vector-env workers each have their own)."""
        return os.getpid()

    def num_init_states(self, task_id: int) -> int:
        return len(task_init_states(self.suite, task_id))

    def sample_init_state(self, task_id: int, seed: int, robot_noise: float = ROBOT_INIT_NOISE) -> np.ndarray:
        """A new start of task ``task_id``: the flattened MuJoCo state after LIBERO's own reset, which places every
        object by the task's placement sampler (the regions of its BDDL file), with the robot's joints off its nominal
        pose by Gaussian noise of ``robot_noise`` radians, as LIBERO drew the suite's stored init states (0 starts the
        robot at the nominal pose; the objects' placement does not depend on it). The same ``seed`` gives the same
        state; it is none of the stored ones. Start an episode from it with
        ``reset(options={"task_id": task_id, "init_state": state})`` (objects settle there); whether the BDDL premises
        hold after settling is :func:`gym_libero_vla.fidelity.init_predicates`' to check. The env's current episode
        (if of the same task) ends: reset before stepping again."""
        if not (isinstance(task_id, (int, np.integer)) and int(task_id) in self.task_ids):
            raise ValueError(f"unknown task_id {task_id!r} for {self.suite_spec.env_id}: valid {self._task_id_choices()}")
        task_id = int(task_id)
        if not robot_noise >= 0:
            raise ValueError(f"robot_noise {robot_noise!r} must be >= 0 (radians of noise on the robot's joints)")
        sim = self._simulator(task_id)
        if sim is self._sim:
            self._sim = None  # its episode's state is gone
        domain = sim.env
        if task_id not in self._fixture_poses:  # a freshly loaded model's, as LIBERO's hard reset has them
            fresh = domain.model.get_model(mode="mujoco")
            self._fixture_poses[task_id] = [
                (fixture.root_body, fresh.body(fixture.root_body).pos.copy(), fresh.body(fixture.root_body).quat.copy())
                for fixture in domain.fixtures_dict.values()
            ]
        # LIBERO places an object on a fixture's site (a bowl on the cabinet) at the fixture's newly drawn pose plus
        # the site's current world position: right after a hard reset (a fresh model, fixtures at their origin), as
        # LIBERO drew its init states, but off by the fixture's last pose after a soft one. Put them back first.
        for body, pos, quat in self._fixture_poses[task_id]:
            body_id = domain.sim.model.body_name2id(body)
            domain.sim.model.body_pos[body_id] = pos
            domain.sim.model.body_quat[body_id] = quat
        with _global_numpy_seed(int(seed)):  # the samplers draw from the global numpy RNG
            sim.reset()
        state = np.array(sim.get_sim_state(), dtype=np.float64)
        # The robot's joints as LIBERO's stored starts have them (ROBOT_INIT_NOISE), drawn from a stream of their own so
        # the objects' placement of a seed does not depend on it. The flattened state is [time, qpos, qvel, ...].
        rng = np.random.default_rng([int(seed), 1])
        for robot in domain.robots:
            joints = 1 + np.asarray(robot._ref_joint_pos_indexes)
            state[joints] += rng.normal(0.0, robot_noise, size=len(joints))
        return state

    def _simulator(self, task_id: int):
        if task_id in self._simulators:
            self._simulators.move_to_end(task_id)
            return self._simulators[task_id]
        while len(self._simulators) >= self.max_cached_tasks:
            _, old = self._simulators.popitem(last=False)
            old.close()
        if self.needs_renderer:
            rendering.require_rendering()
            rendering.mark_gl_in_use()
        _, _, env_wrapper = libero_modules()
        env_class = env_wrapper.OffScreenRenderEnv if self.needs_renderer else env_wrapper.ControlEnv
        kwargs = dict(
            bddl_file_name=self.tasks[task_id].bddl_file,
            use_camera_obs=False,  # frames are rendered here, only when an observation needs them
            camera_names=[CAMERAS[c] for c in self.cameras] or ["agentview"],
            camera_heights=self.image_size[0],
            camera_widths=self.image_size[1],
            hard_reset=False,
            ignore_done=True,  # truncation is Gymnasium's TimeLimit, not robosuite's horizon
            horizon=10**9,
        )
        if not self.needs_renderer:
            kwargs["has_offscreen_renderer"] = False
        with quiet(), _global_numpy_seed(task_id):  # construction resets (and samples) too
            simulator = env_class(**kwargs)
        if self.needs_renderer:
            import mujoco  # after rendering.require_rendering(): mujoco reads MUJOCO_GL when imported

            # robosuite made the render context in that reset and keeps it across soft resets; its scene flags are
            # MuJoCo's defaults (reflections on) until set here, once per simulator.
            context = simulator.sim._render_context_offscreen
            context.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = self.reflections
        self._simulators[task_id] = simulator
        return simulator

    # ------------------------------------------------------------------ Gymnasium API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = sorted(set(options) - set(RESET_OPTIONS))
        if unknown:
            raise ValueError(f"unknown reset option(s) {unknown}: valid {RESET_OPTIONS}")

        task_id = options.get("task_id")
        if task_id is None:
            if seed is not None:
                task_id = self.task_ids[seed % len(self.task_ids)]
            else:
                task_id = self.task_ids[int(self.np_random.integers(len(self.task_ids)))]
        if not (isinstance(task_id, (int, np.integer)) and int(task_id) in self.task_ids):
            raise ValueError(f"unknown task_id {task_id!r} for {self.suite_spec.env_id}: valid {self._task_id_choices()}")
        task_id = int(task_id)

        given = [key for key in ("init_state_id", "init_state", "layout_seed") if options.get(key) is not None]
        if len(given) > 1:
            raise ValueError(f"reset options {given} are exclusive: give one of 'init_state_id', 'init_state', 'layout_seed'")
        init_state = None
        if options.get("layout_seed") is not None:
            layout_seed = options["layout_seed"]
            if not (isinstance(layout_seed, (int, np.integer)) and layout_seed >= 0):
                raise ValueError(f"layout_seed {layout_seed!r} must be an int >= 0")
            init_state_id = SAMPLED_INIT_STATE
        elif options.get("init_state") is not None:
            init_state = np.asarray(options["init_state"], dtype=np.float64)
            init_state_id = -1
        else:
            init_states = task_init_states(self.suite, task_id)
            init_state_id = options.get("init_state_id")
            if init_state_id is None:
                if seed is not None:
                    init_state_id = (seed // len(self.task_ids)) % len(init_states)
                else:
                    init_state_id = int(self.np_random.integers(len(init_states)))
            (init_state_id,) = resolve_init_state_ids(self.suite, (task_id,), (init_state_id,))
            init_state = init_states[init_state_id]

        sim = self._simulator(task_id)
        if init_state is not None and init_state.shape != sim.get_sim_state().shape:
            raise ValueError(f"init_state has shape {init_state.shape}, task {task_id} needs {sim.get_sim_state().shape}")
        # LIBERO's reset re-samples fixture placements (cabinets, stoves move by ~1 cm) from the global
        # numpy RNG, and init states do not store them: draw them from this env's RNG instead, so that a
        # seed fixes the whole scene, and leave the caller's global RNG as it was.
        fixture_seed = int(self.np_random.integers(2**31))
        self._task, self._init_state_id = self.tasks[task_id], init_state_id
        if init_state is not None:
            raw_obs = self._start(sim, init_state, fixture_seed)
        else:
            raw_obs = self._start_new_layout(sim, task_id, int(options["layout_seed"]), fixture_seed)
        self._env_steps = 0
        return self._observation(raw_obs), self._info(success=False)

    def _start(self, sim, init_state: np.ndarray, fixture_seed: int):
        """Reset ``sim`` (fixtures placed from ``fixture_seed``) to ``init_state``, run the settle steps; the raw
        observation after them. ``sim`` becomes the current episode's simulator."""
        with _global_numpy_seed(fixture_seed):
            sim.reset()
        # A soft reset keeps the Panda gripper's integrated command from the last episode; a hard reset
        # (LIBERO's default) starts it at zero. Match the hard reset so episodes do not leak into each other.
        for robot in sim.robots:
            robot.gripper.current_action = np.zeros(robot.gripper.dof)
        raw_obs = sim.set_init_state(init_state)
        for _ in range(self.num_settle_steps):
            raw_obs, _, _, _ = sim.step(SETTLE_ACTION)
        # set_init_state moves the robot without telling its controller, which caches the end-effector pose
        # and Jacobian from the reset pose until its next run. LIBERO's first settle step is computed from
        # that stale pose (kept, as its evaluations do); the first policy action must not be, or an episode
        # started with num_settle_steps=0 (demo replay) diverges from the recording at its first step.
        for robot in sim.robots:
            robot.controller.new_update = True
        self._sim = sim
        return raw_obs

    def _start_new_layout(self, sim, task_id: int, layout_seed: int, fixture_seed: int):
        """:meth:`_start` from a layout drawn from ``layout_seed`` (and redrawn while a premise fails)."""
        for draw in range(MAX_LAYOUT_DRAWS):
            # The task too: one layout seed gives each task draws of its own, as LIBERO's stored starts are.
            draw_seed = int(np.random.SeedSequence([layout_seed, task_id, draw]).generate_state(1)[0])
            raw_obs = self._start(sim, self.sample_init_state(task_id, draw_seed, self.robot_init_noise), fixture_seed)
            if all(check.holds for check in init_predicates(self) if check.is_premise):
                return raw_obs
        raise RuntimeError(
            f"{MAX_LAYOUT_DRAWS} layouts of task {task_id} drawn from layout_seed {layout_seed} all broke a premise of "
            "its BDDL :init: check the scene with benchmarks/init_state_fidelity.py"
        )

    def step(self, action):
        if self._sim is None:
            raise gym.error.ResetNeeded("call reset() before step()")
        actions = np.asarray(action, dtype=np.float64)
        if actions.shape != self.action_space.shape:
            what = (
                "(dx, dy, dz, droll, dpitch, dyaw, gripper)" if self.action_chunk == 1 else f"a chunk of {self.action_chunk}"
            )
            raise ValueError(f"action has shape {actions.shape}: expected {self.action_space.shape} {what}")
        if not np.all(np.isfinite(actions)):
            raise ValueError(f"action contains NaN or inf: {actions.tolist()}")
        success, truncated, executed = False, False, 0
        for action in actions.reshape(-1, ACTION_DIM):
            if self.gripper_convention == "openvla":  # OpenVLA's [0, 1] gripper (1 = open) -> LIBERO's -1 open / +1 close
                action = openvla_gripper_to_libero(action)
            raw_obs, _, done, _ = self._sim.step(np.clip(action, -1.0, 1.0))
            executed += 1
            self._env_steps += 1
            for hook in self.action_hooks:
                hook()
            success = bool(done)  # LIBERO's `done` is its BDDL goal check
            truncated = self.max_env_steps is not None and self._env_steps >= self.max_env_steps and not success
            if success or truncated:
                break
        info = self._info(success)
        info["executed_actions"] = executed
        return self._observation(raw_obs), float(success), success, truncated, info

    def render(self):
        if self.render_mode is None:
            gym.logger.warn("render() called without render_mode; make the env with render_mode='rgb_array'")
            return None
        if self._sim is None:
            raise gym.error.ResetNeeded("call reset() before render()")
        if self.render_size == self.image_size[0] == self.image_size[1] and "agentview" in self._frames:
            return self._frames["agentview"]
        return self._render_camera("agentview", self.render_size, self.render_size)

    def close(self):
        while self._simulators:
            _, simulator = self._simulators.popitem()
            simulator.close()
        self._sim = None
        super().close()

    # ------------------------------------------------------------------ helpers
    def _task_id_choices(self) -> str:
        ids = self.task_ids
        return f"0..{ids[-1]}" if ids == tuple(range(len(ids))) else str(list(ids))

    def _render_camera(self, camera: str, height: int, width: int) -> np.ndarray:
        frame = self._sim.sim.render(camera_name=CAMERAS[camera], width=width, height=height)
        # OpenGL rows run bottom-up; VLA training data (OpenVLA's LIBERO pipeline) is rotated 180 degrees.
        return np.ascontiguousarray(frame[::-1, ::-1])

    def _observation(self, raw: dict) -> dict:
        obs: dict[str, Any] = {"instruction": self._task.instruction, "task_id": np.int64(self._task.task_id)}
        if "state" in self.obs_mode:
            obs["state"] = np.concatenate(
                [raw["robot0_eef_pos"], _quat2axisangle(raw["robot0_eef_quat"]), raw["robot0_gripper_qpos"]]
            ).astype(np.float32)
        self._frames = {camera: self._render_camera(camera, *self.image_size) for camera in self.cameras}
        self.frames_rendered += len(self._frames)
        obs.update(self._frames)
        if self.privileged_state:
            object_state = np.zeros(self.object_state_dim, dtype=np.float32)
            values = raw["object-state"]
            object_state[: len(values)] = values
            obs["object_state"] = object_state
        return obs

    def _info(self, success: bool) -> dict:
        return {
            "is_success": success,
            "task_id": self._task.task_id,
            "task_name": self._task.name,
            "init_state_id": self._init_state_id,
        }
