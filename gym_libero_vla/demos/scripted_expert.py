"""A scripted expert that solves LIBERO tasks from the simulator's privileged state.

It reads object poses and geometry straight from MuJoCo (``env.unwrapped.libero_env.env.sim``) and the
task's BDDL goal (``parsed_problem["goal_state"]``), and emits the same 7-dim actions a policy emits:
delta end-effector position and axis-angle rotation in [-1, 1] (robosuite's OSC controller scales them
by ``output_max`` = 0.05 m and 0.5 rad per step) and a gripper command (-1 open, +1 close).

The behaviour is a waypoint state machine, as in the scripted policies used to collect demonstrations
for MimicGen / RoboCasa-style pipelines: for ``on``/``in`` goals, approach above the object, descend,
grasp, lift, carry above the target, lower, release, retreat; a failed grasp (the object did not rise
with the gripper) is retried. ``turnon`` (LIBERO-Goal's stove knob) grasps the knob and yaws the gripper.
``open``/``close`` of a cabinet drawer turns the gripper horizontal, grasps the handle from the front and
pulls or pushes it along the drawer's slide joint. Goals without a script (placing into a drawer, hinged
doors such as the microwave's, drawers whose handle is too low for the horizontal hand, pushing a plate)
raise ``NotImplementedError`` at ``reset``. The expert never decides success: callers judge it by the env's
``terminated`` / reward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

POS_SCALE = 0.05  # metres per unit action: robosuite OSC_POSE output_max for position
ROT_SCALE = 0.5  # radians per unit action: OSC_POSE output_max for rotation
GRIPPER_OPEN, GRIPPER_CLOSE = -1.0, 1.0
HAND_HALF_WIDTH = 0.105  # the Panda hand's collision box reaches this far each way along the fingers' closing axis
# Fingers close either way along an axis, so a yaw and that yaw +- 180 degrees grasp alike. The expert takes the one
# that leaves the wrist joint (the Panda's 7th, limits +-2.90 rad, pi/4 at the nominal pose) nearest WRIST_PREFERRED:
# the turns the grasps ask for most (0, +-45, 90 degrees from the nominal pose) are then far from the tie between the
# two (-67.5 / +112.5 degrees), so a start pose's noise does not decide which way the hand turns. (Taking the smaller
# turn put that tie at the rim grasp's 90 degrees: a coin toss by the start noise, and turning one way drove the wrist
# into its limit, where the arm stalled for up to ~100 steps.)
WRIST_PREFERRED = np.pi / 8
EXPERT_VERSION = 2  # 1: the smaller of the two turns; recorded with generated demos


def _axisangle_from_matrix(rotation: np.ndarray) -> np.ndarray:
    """Rotation matrix -> axis-angle vector (log map)."""
    cos_angle = np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0)
    angle = np.arccos(cos_angle)
    if angle < 1e-6:
        return np.zeros(3)
    axis = np.array([rotation[2, 1] - rotation[1, 2], rotation[0, 2] - rotation[2, 0], rotation[1, 0] - rotation[0, 1]])
    norm = np.linalg.norm(axis)
    if norm < 1e-6:  # angle ~ pi: axis from the diagonal
        axis = np.sqrt(np.clip((np.diag(rotation) + 1.0) / 2.0, 0.0, None))
        norm = np.linalg.norm(axis)
    return axis / norm * angle


def _yaw_matrix(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


@dataclasses.dataclass
class Box3:
    """Axis-aligned world bounding box of a body's collision geoms."""

    low: np.ndarray
    high: np.ndarray

    @property
    def center(self) -> np.ndarray:
        return (self.low + self.high) / 2.0

    @property
    def size(self) -> np.ndarray:
        return self.high - self.low


class SceneGeometry:
    """World-frame poses and bounding boxes of bodies and sites of a LIBERO domain (robosuite env)."""

    def __init__(self, domain):
        self.domain = domain
        self.model = domain.sim.model._model
        self.data = domain.sim.data._data

    def body_id(self, name: str) -> int:
        domain = self.domain
        if name in domain.obj_body_id:
            return domain.obj_body_id[name]
        return domain.sim.model.body_name2id(name)

    def body_pos(self, name: str) -> np.ndarray:
        return self.data.xpos[self.body_id(name)].copy()

    def body_mat(self, name: str) -> np.ndarray:
        return self.data.xmat[self.body_id(name)].reshape(3, 3).copy()

    def site_pos(self, name: str) -> np.ndarray:
        return self.domain.sim.data.get_site_xpos(name).copy()

    def _geoms(self, body_id: int, collision_only: bool = True) -> np.ndarray:
        model = self.model
        geoms = np.flatnonzero(self.subtree_mask(body_id)[model.geom_bodyid])
        if collision_only:
            colliding = geoms[(model.geom_contype[geoms] != 0) | (model.geom_conaffinity[geoms] != 0)]
            if len(colliding):
                return colliding
        return geoms

    def subtree_mask(self, body_id: int) -> np.ndarray:
        model = self.model
        subtree = np.zeros(model.nbody, dtype=bool)
        subtree[body_id] = True
        for child in range(body_id + 1, model.nbody):  # parents precede children in MuJoCo's body order
            subtree[child] = subtree[model.body_parentid[child]]
        return subtree

    def robot_geoms(self) -> np.ndarray:
        names = [self.model.body(int(b)).name for b in self.model.geom_bodyid]
        return np.array([n.startswith(("robot0_", "gripper0_", "mount0_")) for n in names])

    def geom_boxes(self) -> Box3:
        """World bounding boxes of every colliding geom: ``low``/``high`` of shape (ngeom, 3); others are empty."""
        model, data = self.model, self.data
        signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=np.float64)
        corners = model.geom_aabb[:, None, :3] + signs[None] * model.geom_aabb[:, None, 3:]  # (G, 8, 3)
        world = data.geom_xpos[:, None, :] + np.einsum("gij,gkj->gki", data.geom_xmat.reshape(-1, 3, 3), corners)
        low, high = world.min(axis=1), world.max(axis=1)
        colliding = (model.geom_contype != 0) | (model.geom_conaffinity != 0)
        low[~colliding], high[~colliding] = np.inf, -np.inf
        return Box3(low, high)

    def body_box(self, name: str, frame: np.ndarray | None = None) -> Box3:
        """Bounding box of the body's subtree geoms; axis-aligned in the world (or in ``frame``'s axes)."""
        signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=np.float64)
        points = []
        for geom in self._geoms(self.body_id(name)):
            center, half = self.model.geom_aabb[geom, :3], self.model.geom_aabb[geom, 3:]
            corners = center + signs * half
            rotation = self.data.geom_xmat[geom].reshape(3, 3)
            points.append(self.data.geom_xpos[geom] + corners @ rotation.T)
        points = np.concatenate(points)
        if frame is not None:
            points = points @ frame  # coordinates along frame's columns
        return Box3(points.min(axis=0), points.max(axis=0))


@dataclasses.dataclass
class Waypoint:
    """One phase of the script: drive the gripper to ``position`` with the gripper command held."""

    name: str
    position: np.ndarray
    gripper: float
    tolerance: float = 0.01
    max_steps: int = 60
    max_speed: float = 1.0
    """Largest translation action component (1.0 = 5 cm a step); pushing and turning go slower."""
    until: Callable[[], bool] | None = None
    """Ends the phase early when it returns True (e.g. a drawer's joint reached its open range)."""


class ScriptedExpert:
    """Privileged-state expert for LIBERO-Spatial, LIBERO-Object and LIBERO-Goal tasks.

    Usage::

        env = gym.make("LiberoSpatial-v0", obs_mode="state")
        expert = ScriptedExpert(env)
        obs, info = env.reset(options={"task_id": 0, "init_state_id": 0})
        expert.reset()
        while True:
            obs, reward, terminated, truncated, info = env.step(expert.act(obs))
            if terminated or truncated:
                break

    Args:
        env: a gym_libero_vla env (possibly wrapped); only its ``unwrapped.libero_env`` is read.
        max_retries: how many times a failed grasp is retried.
        noise_scale: std of Gaussian noise added to the translation part of actions (diversifies demos).
        seed: seed of the noise generator.
    """

    def __init__(self, env, max_retries: int = 3, noise_scale: float = 0.0, seed: int | None = None):
        if max_retries < 0:
            raise ValueError(f"max_retries {max_retries} must be >= 0")
        if noise_scale < 0:
            raise ValueError(f"noise_scale {noise_scale} must be >= 0")
        self.env = env
        self.max_retries = int(max_retries)
        self.noise_scale = float(noise_scale)
        self.rng = np.random.default_rng(seed)
        self.plan: list = []

    # ------------------------------------------------------------------ public API
    def reset(self) -> None:
        """Read the current episode's goal and scene; call right after ``env.reset``."""
        self.domain = self.env.unwrapped.libero_env.env
        self.scene = SceneGeometry(self.domain)
        self.goal = [list(predicate) for predicate in self.domain.parsed_problem["goal_state"]]
        self.retries = 0
        self.held_by_neck = False
        self.base_rotation = self._eef_rotation()
        self.home = self._eef_pos()
        self.target_rotation = self.base_rotation.copy()
        self.plan = self._plan_task()
        self.phase_steps = 0
        self.gripper = GRIPPER_OPEN

    def act(self, obs=None) -> np.ndarray:
        """Next action (float32, shape (7,)). ``obs`` is accepted for a policy-like signature and ignored."""
        while self.plan:
            step = self.plan[0]
            if callable(step):  # a re-planning hook: returns new waypoints (or none)
                self.plan.pop(0)
                self.plan[:0] = step()
                self.phase_steps = 0
                continue
            eef = self._eef_pos()
            error = step.position - eef
            reached = np.linalg.norm(error) < step.tolerance or (step.until is not None and step.until())
            if reached or self.phase_steps >= step.max_steps:
                self.plan.pop(0)
                self.phase_steps = 0
                continue
            self.phase_steps += 1
            self.gripper = step.gripper
            return self._action(error, step.gripper, step.max_speed)
        return self._action(np.zeros(3), self.gripper)

    # ------------------------------------------------------------------ low level
    def _eef_pos(self) -> np.ndarray:
        return self.scene.site_pos("gripper0_grip_site")

    def _eef_rotation(self) -> np.ndarray:
        return self.domain.sim.data.get_site_xmat("gripper0_grip_site").copy()

    def _action(self, position_error: np.ndarray, gripper: float, max_speed: float = 1.0) -> np.ndarray:
        translation = position_error / POS_SCALE
        norm = np.abs(translation).max()
        if norm > max_speed:  # keep the direction when saturating
            translation = translation * (max_speed / norm)
        if self.noise_scale:
            translation = translation + self.rng.normal(0.0, self.noise_scale, 3)
        # OSC applies the rotation delta on the left of the current orientation, in the world frame.
        rotation = _axisangle_from_matrix(self.target_rotation @ self._eef_rotation().T) / ROT_SCALE
        action = np.concatenate([translation, rotation, [gripper]])
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    def _finger_axis(self) -> np.ndarray:
        """Unit horizontal direction along which the fingers close."""
        axis = self.scene.body_pos("gripper0_leftfinger") - self.scene.body_pos("gripper0_rightfinger")
        axis[2] = 0.0
        return axis / np.linalg.norm(axis)

    # ------------------------------------------------------------------ planning
    def _plan_task(self) -> list:
        plan: list = []
        for predicate in self.goal:
            kind = predicate[0].lower()
            if kind in ("on", "in") and self._is_flat(predicate[1]):
                raise NotImplementedError(f"scripted expert cannot move flat {predicate[1]} (needs a push): {predicate}")
            elif kind in ("on", "in") and self._is_articulated_region(predicate[2]):
                # Opening the drawer works, but the bowl grasps that follow fail next to the pulled-out drawer.
                raise NotImplementedError(f"scripted expert cannot place into a drawer: {predicate}")
            elif kind in ("on", "in"):
                plan += self._plan_pick_place(predicate[1], predicate[2], kind)
            elif kind in ("open", "close") and self._is_articulated_region(predicate[1]):
                self._drawer(predicate[1], predicate)
                plan.append(lambda region=predicate[1], opening=kind == "open": self._drawer_waypoints(region, opening))
            elif kind == "turnon":
                plan.append(lambda fixture=predicate[1]: self._turn_knob_waypoints(fixture))
            else:
                raise NotImplementedError(f"scripted expert has no script for goal predicate {predicate}")
        return plan

    def _is_object(self, name: str) -> bool:
        return name in self.domain.objects_dict

    def _is_articulated_region(self, name: str) -> bool:
        site = getattr(self.domain, "object_sites_dict", {}).get(name)
        return bool(site is not None and getattr(site, "joints", None))

    def _is_flat(self, name: str) -> bool:
        """Plates: wide and too low to pinch from above (they would need a push)."""
        if not self._is_object(name):
            return False
        size = self.scene.body_box(name).size
        return size[2] < 0.03 and size[:2].max() > 0.1

    # ------------------------------------------------------------------ pick and place
    def _plan_pick_place(self, obj: str, target: str, kind: str) -> list:
        return [lambda: self._grasp_waypoints(obj), lambda: self._check_grasp(obj, target, kind)]

    def _grasp_point(self, obj: str) -> np.ndarray:
        """Where the grip site goes to grasp ``obj``; also sets the gripper yaw (``target_rotation``)."""
        if "bowl" in obj:
            return self._rim_grasp(obj)
        return self._body_grasp(obj)

    def _body_grasp(self, obj: str) -> np.ndarray:
        """Pinch a box, can or bottle across one of its horizontal axes: one narrow enough for the open
        fingers, preferring the axis (gripper yaw) whose fingers and hand meet no neighbouring object."""
        box = self.scene.body_box(obj)
        rotation = self.scene.body_mat(obj)
        local = self.scene.body_box(obj, frame=rotation)
        point = rotation @ local.center
        point[2] = box.high[2] - min(0.035, 0.5 * box.size[2])
        candidates = []
        for axis in range(3):
            direction = rotation[:, axis].copy()
            direction[2] = 0.0
            if np.linalg.norm(direction) < 0.5:  # (near) vertical axis
                continue
            direction /= np.linalg.norm(direction)
            width = local.size[axis]
            hits = self._gripper_obstacles(point, direction, exclude=obj)
            candidates.append((width > 0.075, hits, width, direction))  # the open Panda hand spans ~8 cm
        if not candidates:  # an object lying on a tilted face: close along the world axis of the gripper now
            candidates.append((False, 0, 0.0, self._finger_axis()))
        _, _, _, direction = min(candidates, key=lambda c: c[:3])
        self._align_fingers(direction)
        return point

    def _gripper_obstacles(self, point: np.ndarray, closing: np.ndarray, exclude: str) -> int:
        """Geoms of other bodies that the open fingers or the hand would touch at a grasp at ``point``
        with the fingers closing along ``closing``. The Panda hand spans ~0.2 m along that axis."""
        across = np.array([-closing[1], closing[0], 0.0])
        samples = [
            point + s * closing + t * across + np.array([0.0, 0.0, z])
            for s in np.linspace(-0.1, 0.1, 9)
            for t in (-0.03, 0.0, 0.03)
            for z in (0.03, 0.06, 0.1)
        ]
        samples += [point + s * closing + np.array([0.0, 0.0, z]) for s in (-0.045, 0.045) for z in (0.0, 0.03)]
        samples = np.array(samples)
        boxes = self.scene.geom_boxes()
        inside = np.all(boxes.low[:, None] <= samples[None], axis=2) & np.all(boxes.high[:, None] >= samples[None], axis=2)
        own = self.scene.subtree_mask(self.scene.body_id(exclude))
        hit = inside.any(axis=1) & ~own[self.scene.model.geom_bodyid] & ~self.scene.robot_geoms()
        return int(hit.sum())

    def _rim_grasp(self, obj: str) -> np.ndarray:
        """Pinch a bowl's rim, fingers straddling the wall, on the side with the most free space.

        The rim is found in the bowl's own frame, so a bowl tilted on a ramekin is grasped where its rim
        really is. Candidate sides are tried in order of preference (towards the robot first); the
        first whose outer finger would not overlap another body's geoms wins, and the gripper yaws so
        that its fingers close radially.
        """
        rotation = self.scene.body_mat(obj)
        origin = self.scene.body_pos(obj)
        local = self.scene.body_box(obj, frame=rotation)  # coordinates along the bowl's axes
        local_center = local.center - rotation.T @ origin
        radius = local.size[:2].max() / 2.0
        candidates = []
        for angle in np.deg2rad([180, 135, 225, 90, 270, 45, 315, 0]):  # 180 deg: side facing the robot
            direction = np.array([np.cos(angle), np.sin(angle), 0.0])
            local_direction = rotation.T @ direction
            local_direction[2] = 0.0
            local_direction /= np.linalg.norm(local_direction)
            rim_local = np.array([local_center[0], local_center[1], local.high[2] - rotation[:, 2] @ origin])
            rim_local[:2] += (radius - 0.02) * local_direction[:2]
            point = origin + rotation @ rim_local
            point[2] -= 0.025
            hits = self._obstacles_near(point + 0.045 * direction, exclude=obj)
            candidates.append((hits, len(candidates), point, direction))
        _, _, point, direction = min(candidates, key=lambda c: (c[0], c[1]))
        self._align_fingers(direction)
        return point

    def _obstacles_near(self, point: np.ndarray, exclude: str, half_size: float = 0.015) -> int:
        """How many geoms of other bodies have a bounding box within ``half_size`` of a finger at ``point``."""
        low = point - np.array([half_size, half_size, 0.015])
        high = point + np.array([half_size, half_size, 0.08])
        boxes = self.scene.geom_boxes()
        own = self.scene.subtree_mask(self.scene.body_id(exclude))
        overlap = np.all(boxes.low <= high, axis=1) & np.all(boxes.high >= low, axis=1)
        overlap &= ~own[self.scene.model.geom_bodyid] & ~self.scene.robot_geoms()
        return int(overlap.sum())

    def _align_fingers(self, direction: np.ndarray) -> None:
        """Yaw the gripper (pointing down) so its fingers close along ``direction`` (horizontal), by whichever of the
        two turns that do so leaves the wrist joint nearest :data:`WRIST_PREFERRED`."""
        finger = self._finger_axis()
        angle = np.arctan2(finger[0] * direction[1] - finger[1] * direction[0], finger @ direction)
        angle = (angle + np.pi / 2) % np.pi - np.pi / 2  # fingers are symmetric: a half turn changes nothing
        other = angle - np.pi if angle > 0 else angle + np.pi
        # A hand pointing down yaws by +a about the vertical when its wrist joint turns by -a.
        wrist = float(self.domain.sim.data.qpos[self.domain.robots[0]._ref_joint_pos_indexes[-1]])
        if abs(wrist - other - WRIST_PREFERRED) < abs(wrist - angle - WRIST_PREFERRED):
            angle = other
        self.target_rotation = _yaw_matrix(angle) @ self._eef_rotation()

    def _safe_height(self) -> float:
        tops = [self.scene.body_box(name).high[2] for name in self.domain.objects_dict]
        return max(tops)

    def _grasp_waypoints(self, obj: str) -> list:
        grasp = self._grasp_point(obj)
        above = grasp.copy()
        above[2] = max(grasp[2] + 0.08, self._safe_height() + 0.03)
        self.grasp_start_z = self.scene.body_pos(obj)[2]
        lift = grasp.copy()
        lift[2] = above[2] + 0.05
        speed = 0.25 if self._held_by_neck(obj, grasp[2]) else 1.0
        return [
            Waypoint("approach", above, GRIPPER_OPEN, tolerance=0.01, max_steps=80),
            Waypoint("descend", grasp, GRIPPER_OPEN, tolerance=0.006, max_steps=50),
            Waypoint("grasp", grasp, GRIPPER_CLOSE, tolerance=0.0, max_steps=15),
            Waypoint("lift", lift, GRIPPER_CLOSE, tolerance=0.02, max_steps=60, max_speed=speed),
        ]

    def _held_by_neck(self, obj: str, grasp_z: float) -> bool:
        """Whether the object is much narrower at the grasp height than below (a wine bottle's neck): such
        an object pivots in the fingers and slips out if swung fast, so it is lifted and carried slowly."""
        boxes = self.scene.geom_boxes()
        geoms = self.scene._geoms(self.scene.body_id(obj))
        at_grasp = geoms[(boxes.low[geoms, 2] <= grasp_z) & (boxes.high[geoms, 2] >= grasp_z)]
        if not len(at_grasp):
            self.held_by_neck = False
            return False
        neck = (boxes.high[at_grasp].max(axis=0) - boxes.low[at_grasp].min(axis=0))[:2].min()
        self.held_by_neck = bool(neck < 0.6 * self.scene.body_box(obj).size[:2].min())
        return self.held_by_neck

    def _check_grasp(self, obj: str, target: str, kind: str) -> list:
        lifted = self.scene.body_pos(obj)[2] - self.grasp_start_z > 0.03
        if not lifted:
            if self.retries >= self.max_retries:
                return []
            self.retries += 1
            up = self._eef_pos()
            return [
                Waypoint("regrasp-open", up, GRIPPER_OPEN, tolerance=0.0, max_steps=8),
                lambda: self._grasp_waypoints(obj),
                lambda: self._check_grasp(obj, target, kind),
            ]
        return self._place_waypoints(obj, target, kind)

    def _target_point(self, target: str) -> tuple[np.ndarray, float]:
        """(x, y, surface z) where the held object's bottom should go."""
        if self._is_object(target) or target in getattr(self.domain, "fixtures_dict", {}):
            box = self.scene.body_box(target)
            return np.array([box.center[0], box.center[1], box.high[2]]), box.high[2]
        point = self.scene.site_pos(target)
        return point, point[2]

    def _place_waypoints(self, obj: str, target: str, kind: str) -> list:
        eef = self._eef_pos()
        obj_box = self.scene.body_box(obj)
        offset = obj_box.center - eef  # held object relative to the gripper (x, y used)
        bottom_below_eef = eef[2] - obj_box.low[2]
        point, surface = self._target_point(target)
        if kind == "in" and not self._is_object(target):
            parent_top = self._region_parent_top(target)
            surface = max(surface, parent_top) if parent_top is not None else surface
        place = np.array([point[0] - offset[0], point[1] - offset[1], surface + 0.015 + bottom_below_eef])
        carry = place.copy()
        carry[2] = max(eef[2], place[2] + 0.05)
        retreat = place.copy()
        retreat[2] = carry[2]
        speed = 0.25 if self.held_by_neck else 1.0
        return [
            Waypoint("carry", carry, GRIPPER_CLOSE, tolerance=0.015, max_steps=120, max_speed=speed),
            Waypoint("lower", place, GRIPPER_CLOSE, tolerance=0.008, max_steps=60, max_speed=speed),
            Waypoint("release", place, GRIPPER_OPEN, tolerance=0.0, max_steps=10),
            Waypoint("retreat", retreat, GRIPPER_OPEN, tolerance=0.01, max_steps=40),
        ]

    def _region_parent_top(self, region: str) -> float | None:
        for name in list(self.domain.objects_dict) + list(getattr(self.domain, "fixtures_dict", {})):
            if region.startswith(name + "_"):
                if self._is_object(name):  # e.g. a basket: drop from just above its rim
                    return self.scene.body_box(name).high[2]
                return None
        return None

    # ------------------------------------------------------------------ knob (LIBERO-Goal "turn on the stove")
    def _joint_body(self, fixture: str, joint_type: int) -> int:
        """Body of the fixture's first joint of ``joint_type`` (3: hinge, 2: slide)."""
        model = self.scene.model
        for joint in range(model.njnt):
            if model.joint(joint).name.startswith(fixture + "_") and model.jnt_type[joint] == joint_type:
                return int(model.jnt_bodyid[joint])
        raise NotImplementedError(f"scripted expert found no joint of type {joint_type} on {fixture}")

    def _turn_knob_waypoints(self, fixture: str) -> list:
        body = self._joint_body(fixture, 3)
        name = self.scene.model.body(body).name
        box = self.scene.body_box(name)
        axis_point = self.scene.data.xpos[body].copy()
        grasp = np.array([axis_point[0], axis_point[1], box.high[2] - 0.015])
        above = grasp + np.array([0.0, 0.0, 0.08])
        self._align_fingers(np.array([1.0, 0.0, 0.0]))
        return [
            Waypoint("approach", above, GRIPPER_OPEN, tolerance=0.01, max_steps=80),
            Waypoint("descend", grasp, GRIPPER_OPEN, tolerance=0.006, max_steps=40),
            Waypoint("grasp", grasp, GRIPPER_CLOSE, tolerance=0.0, max_steps=12),
            lambda: self._turn(grasp, np.pi / 2),
        ]

    def _turn(self, position: np.ndarray, angle: float) -> list:
        # Positive yaw is counter-clockwise seen from above: the stove's hinge turns on for positive angles.
        self.target_rotation = _yaw_matrix(angle) @ self._eef_rotation()
        return [Waypoint("turn", position, GRIPPER_CLOSE, tolerance=0.0, max_steps=30)]

    # ------------------------------------------------------------------ drawers (cabinets of LIBERO-Goal and LIBERO-90)
    def _drawer(self, region: str, predicate: list) -> tuple[int, float, dict, np.ndarray, np.ndarray]:
        """(slide joint id, sign of the qpos change that opens it, LIBERO's open/close ranges, handle position, pull
        direction) of a drawer region like ``wooden_cabinet_1_top_region``; raises ``NotImplementedError`` for what
        the script cannot do."""
        site = self.domain.object_sites_dict[region]
        model = self.scene.model
        joint = model.joint(site.joints[0]).id
        if model.jnt_type[joint] != 2:  # 2: slide; hinged doors (microwave) have no script
            raise NotImplementedError(f"scripted expert can only open sliding drawers, not hinged {region}: {predicate}")
        ranges = self.domain.get_object(site.parent_name).object_properties["articulation"]
        opens = float(np.sign(np.mean(ranges["default_open_ranges"]) - np.mean(ranges["default_close_ranges"])))
        handle, pull = self._drawer_handle(joint, opens)
        has_table = any(model.body(body).name == "table" for body in range(model.nbody))
        if has_table and handle[2] - HAND_HALF_WIDTH < self.scene.body_box("table").high[2] + 0.01:
            # the horizontal hand closes its fingers vertically and spans ~21 cm that way: it would hit the table
            raise NotImplementedError(f"scripted expert cannot reach {region}: its handle is too low: {predicate}")
        return joint, opens, ranges, handle, pull

    def _drawer_handle(self, joint: int, opens: float) -> tuple[np.ndarray, np.ndarray]:
        """(handle position, horizontal world direction that opens the drawer). The handle is the drawer's
        colliding geom that sticks out furthest along that direction."""
        model, data = self.scene.model, self.scene.data
        body = int(model.jnt_bodyid[joint])
        pull = opens * (data.xmat[body].reshape(3, 3) @ model.jnt_axis[joint])
        pull[2] = 0.0
        pull /= np.linalg.norm(pull)
        geoms = np.flatnonzero((model.geom_bodyid == body) & ((model.geom_contype != 0) | (model.geom_conaffinity != 0)))
        handle = data.geom_xpos[max(geoms, key=lambda geom: data.geom_xpos[geom] @ pull)].copy()
        return handle, pull

    def _drawer_waypoints(self, region: str, opening: bool) -> list:
        """Grasp the drawer's handle from the front with the gripper horizontal, pull (or push) it along the
        slide joint into LIBERO's open (closed) range, release, back off and turn the gripper down again."""
        joint, opens, ranges, handle, pull = self._drawer(region, ["open" if opening else "close", region])
        data, address = self.scene.data, self.scene.model.jnt_qposadr[joint]
        if opening:
            target = min(ranges["default_open_ranges"]) if opens < 0 else max(ranges["default_open_ranges"])
        else:  # LIBERO's is_close is strict at the range's edge: aim past it, into the joint's slack
            target = max(ranges["default_close_ranges"]) if opens < 0 else min(ranges["default_close_ranges"])
        towards = opens if opening else -opens  # sign of the qpos change this script makes

        def there() -> bool:
            return (data.qpos[address] - target) * towards >= (-0.005 if opening else 0.0)

        if there():
            return []
        travel = abs(target - data.qpos[address]) + 0.02  # the grasp gives a little
        moved = handle + (travel if opening else -travel) * pull
        away = moved + 0.08 * pull
        self.target_rotation = self._horizontal_rotation(approach=-pull)
        return [
            Waypoint("turn", self._eef_pos(), GRIPPER_OPEN, tolerance=0.0, max_steps=15),
            Waypoint("approach-handle", handle + 0.12 * pull, GRIPPER_OPEN, tolerance=0.01, max_steps=80),
            Waypoint("reach-handle", handle, GRIPPER_OPEN, tolerance=0.006, max_steps=40, max_speed=0.5),
            Waypoint("grasp-handle", handle, GRIPPER_CLOSE, tolerance=0.0, max_steps=12),
            Waypoint(
                "pull" if opening else "push", moved, GRIPPER_CLOSE, tolerance=0.01, max_steps=60, max_speed=0.4, until=there
            ),
            Waypoint("release-handle", moved, GRIPPER_OPEN, tolerance=0.0, max_steps=8),
            Waypoint("back-off", away, GRIPPER_OPEN, tolerance=0.01, max_steps=30),
            lambda: self._turn_down(),
        ]

    def _horizontal_rotation(self, approach: np.ndarray) -> np.ndarray:
        """Grip-site orientation pointing along ``approach`` (horizontal) with the fingers closing vertically,
        of the two such the one nearer the current orientation. The grip site's z axis points from the hand
        to the fingertips and its x axis is the fingers' closing axis."""
        current = self._eef_rotation()
        best = None
        for sign in (1.0, -1.0):
            closing = np.array([0.0, 0.0, sign])
            rotation = np.stack([closing, np.cross(approach, closing), approach], axis=1)
            angle = np.linalg.norm(_axisangle_from_matrix(rotation @ current.T))
            if best is None or angle < best[0]:
                best = (angle, rotation)
        return best[1]

    def _turn_down(self) -> list:
        """Back to the episode's first pose: the arm turns the gripper down again easily there."""
        self.target_rotation = self.base_rotation.copy()

        def down() -> bool:
            turned = np.linalg.norm(_axisangle_from_matrix(self.target_rotation @ self._eef_rotation().T)) < 0.05
            return turned and np.linalg.norm(self.home - self._eef_pos()) < 0.03

        return [Waypoint("turn-down", self.home, GRIPPER_OPEN, tolerance=0.0, max_steps=60, until=down)]
