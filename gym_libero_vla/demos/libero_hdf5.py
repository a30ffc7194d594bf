"""Read LIBERO / robomimic HDF5 demonstrations in the observation layout of our envs.

The official LIBERO datasets (written by LIBERO's ``scripts/create_dataset.py``) and the files our
generator writes (:mod:`gym_libero_vla.demos.generate`) share robomimic's layout::

    data                      attrs: problem_info (JSON, "language_instruction"), env_args (JSON), ...
    data/demo_N               attrs: num_samples, init_state; ours add task_id, init_state_id, seed,
                              language_instruction, replay_* (see generate.py; DART demos add
                              replay_executed_actions, the perturbed actions the env executed)
    data/demo_N/actions       (T, 7) delta eef position, delta axis-angle, gripper (-1 open, +1 close)
    data/demo_N/states        (T, S) flattened MuJoCo states, states[t] before actions[t]
    data/demo_N/robot_states  (T, 9) gripper qpos (2), eef position (3), eef quaternion (4)
    data/demo_N/rewards, dones (T,)
    data/demo_N/obs/ee_pos (T, 3), ee_ori (T, 3, axis-angle), gripper_states (T, 2), joint_states (T, 7)
    data/demo_N/obs/agentview_rgb, eye_in_hand_rgb (T, H, W, 3) uint8, raw OpenGL row order (upside down)
    data/demo_N/obs/object_state (T, D) ours only, with ``--object-state``: not an official LIBERO key

An :class:`Episode` exposes the same keys as ``LiberoEnv`` observations: "instruction", "task_id",
"state" (ee_pos, ee_ori, gripper_states: 8 numbers, OpenVLA-OFT's proprio) and upright "agentview" /
"wrist" frames (``raw[::-1, ::-1]``, as the env and OpenVLA's LIBERO pipeline rotate them), plus
"object_state" (the env's ``privileged_state=True`` observation) when the file has it.

Filtering follows OpenVLA's processed LIBERO data (``experiments/robot/libero/regenerate_libero_dataset.py``):
no-op steps (zero translation and rotation with the gripper command unchanged) are dropped, and failed
demonstrations are dropped, judged from the file's ``dones``/``rewards`` or, with :func:`replay_success`,
by replaying the actions in the simulator. :class:`ActionStats` holds the per-dimension statistics
(min, max, mean, std, 1st and 99th percentiles) that action normalisation / tokenisation uses.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator, Sequence

import numpy as np

from gym_libero_vla.episode import Episode

ACTION_DIM = 7
NOOP_THRESHOLD = 1e-4  # OpenVLA's is_noop threshold on the norm of the 6 motion dims
# A stall (see stall_mask): the step moved the end effector less than these, and each finger less than STALL_FINGER.
STALL_DISTANCE = 1e-3  # metres
STALL_ANGLE = 0.01  # radians
STALL_FINGER = 5e-4  # metres of finger joint travel
# Our observation keys -> dataset keys under data/demo_N/obs.
IMAGE_KEYS = {"agentview": "agentview_rgb", "wrist": "eye_in_hand_rgb"}
_DEMO_KEY = re.compile(r"^demo_(\d+)$")


def _h5py():
    import h5py  # deferred: importing the package must stay cheap

    return h5py


# ---------------------------------------------------------------------------------------------- statistics
@dataclasses.dataclass
class ActionStats:
    """Per-dimension statistics of a set of actions; q01/q99 bound the action tokenizer's range."""

    min: list[float]
    max: list[float]
    mean: list[float]
    std: list[float]
    q01: list[float]
    q99: list[float]
    num_transitions: int = 0

    @classmethod
    def from_actions(cls, actions: np.ndarray) -> ActionStats:
        actions = np.asarray(actions, dtype=np.float64)
        if actions.ndim != 2 or actions.shape[0] == 0:
            raise ValueError(f"actions must be a non-empty (N, action_dim) array, got shape {actions.shape}")

        def as_list(values):
            return [float(v) for v in values]

        return cls(
            min=as_list(actions.min(axis=0)),
            max=as_list(actions.max(axis=0)),
            mean=as_list(actions.mean(axis=0)),
            std=as_list(actions.std(axis=0)),
            q01=as_list(np.quantile(actions, 0.01, axis=0)),
            q99=as_list(np.quantile(actions, 0.99, axis=0)),
            num_transitions=int(actions.shape[0]),
        )

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=2)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ActionStats:
        with open(path) as f:
            values = json.load(f)
        fields = {field.name for field in dataclasses.fields(cls)}
        missing = sorted(fields - set(values) - {"num_transitions"})
        if missing:
            raise ValueError(f"action stats file {path} lacks {missing}: expected keys {sorted(fields)}")
        return cls(**{k: v for k, v in values.items() if k in fields})


# ---------------------------------------------------------------------------------------------- episodes
def noop_mask(actions: np.ndarray, threshold: float = NOOP_THRESHOLD) -> np.ndarray:
    """True where an action is a no-op, as OpenVLA's ``is_noop``: near-zero translation and rotation, and
    the gripper command equal to that of the previous *kept* action (the first action: motion alone)."""
    actions = np.asarray(actions)
    mask = np.zeros(len(actions), dtype=bool)
    previous_gripper = None
    for t, action in enumerate(actions):
        still = np.linalg.norm(action[:-1]) < threshold
        if still and (previous_gripper is None or action[-1] == previous_gripper):
            mask[t] = True
        else:
            previous_gripper = action[-1]
    return mask


def drop_noops(episode: Episode, threshold: float = NOOP_THRESHOLD) -> Episode:
    """The episode without its no-op steps (see :func:`noop_mask`)."""
    return episode.select(~noop_mask(episode.actions, threshold))


def _rotation_angle(axis_angle_a: np.ndarray, axis_angle_b: np.ndarray) -> np.ndarray:
    """Angle (radians) of the rotation between orientations given as axis-angle rows (robust where the axis-angle
    flips sign near pi, as a gripper pointing down does)."""

    def quaternion(axis_angle):
        angle = np.linalg.norm(axis_angle, axis=-1, keepdims=True)
        axis = np.divide(axis_angle, angle, out=np.zeros_like(axis_angle), where=angle > 1e-12)
        return np.concatenate([np.cos(angle / 2), np.sin(angle / 2) * axis], axis=-1)

    dot = np.abs(np.sum(quaternion(axis_angle_a) * quaternion(axis_angle_b), axis=-1))
    return 2 * np.arccos(np.clip(dot, 0.0, 1.0))


def stall_mask(episode: Episode) -> np.ndarray:
    """True where a step commanded the open hand to move and nothing moved: the end effector went less than
    ``STALL_DISTANCE`` and turned less than ``STALL_ANGLE``, each finger less than ``STALL_FINGER``, and the gripper
    command stayed that of the step before (a switch is kept). Such steps are the hand pressing against a surface
    before a grasp (the scripted expert's descent into a drawer waits there until its phase times out): many frames
    that look alike, labelled "keep pushing, hand open", teach a policy to hesitate where it should close. No-op
    actions are :func:`noop_mask`'s, not stalls; the last step (no state after it) is kept. Reads the proprio
    ``observations["state"]`` (ee_pos, ee_ori, gripper_states)."""
    actions = np.asarray(episode.actions)
    if actions.ndim != 2:
        raise ValueError(f"stall_mask needs one action per step, got actions of shape {actions.shape}")
    if "state" not in episode.observations:
        raise ValueError(
            f"stall_mask reads the proprio observation 'state' (ee_pos, ee_ori, gripper_states); episode "
            f"{episode.name or episode.episode_id or ''} has {sorted(episode.observations)}"
        )
    state = np.asarray(episode.observations["state"], dtype=np.float64)
    if state.ndim != 2 or state.shape[1] < 8:
        raise ValueError(f"stall_mask needs a proprio state of 8 numbers a step, got {state.shape}")
    mask = np.zeros(len(actions), dtype=bool)
    if len(actions) < 2:
        return mask
    now, after = state[: len(actions) - 1], state[1 : len(actions)]
    still = (
        (np.linalg.norm(after[:, 0:3] - now[:, 0:3], axis=1) < STALL_DISTANCE)
        & (_rotation_angle(now[:, 3:6], after[:, 3:6]) < STALL_ANGLE)
        & (np.abs(after[:, 6:8] - now[:, 6:8]).max(axis=1) < STALL_FINGER)
    )
    gripper = actions[:, -1]
    same_command = np.concatenate([[True], gripper[1:] == gripper[:-1]])
    commanded = np.linalg.norm(actions[:, :-1], axis=1) >= NOOP_THRESHOLD
    mask[:-1] = still & (gripper[:-1] < 0) & same_command[:-1] & commanded[:-1]
    return mask


def drop_stalls(episode: Episode) -> Episode:
    """The episode without its stalled open-hand steps (see :func:`stall_mask`)."""
    return episode.select(~stall_mask(episode))


# ---------------------------------------------------------------------------------------------- files
def _instruction_from_problem_info(raw) -> str:
    info = json.loads(raw) if isinstance(raw, (str, bytes)) else dict(raw)
    words = info.get("language_instruction", "")
    if isinstance(words, (list, tuple)):
        # LIBERO's BDDL parser returns the instruction as a token list.
        joiner = "" if all(len(str(w)) <= 1 for w in words) else " "
        words = joiner.join(str(w) for w in words)
    return str(words).strip().strip('"')


def _decode(value):
    return value.decode() if isinstance(value, bytes) else value


class LiberoHDF5:
    """A LIBERO / robomimic demonstration file.

    Args:
        path: the .hdf5 file.
        task_id: task index to report for demos whose file does not store one (official LIBERO files
            hold one task each and do not store it); -1 when unknown.
        load_images: read the camera datasets (the slow part); False returns "state" only.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file and the problem
    for a file that is not HDF5 (e.g. truncated) or not in the LIBERO layout.
    """

    def __init__(self, path: str | os.PathLike, task_id: int = -1, load_images: bool = True):
        self.path = os.fspath(path)
        self.default_task_id = int(task_id)
        self.load_images = load_images
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"LIBERO HDF5 file {self.path!r} does not exist")
        h5py = _h5py()
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as error:
            size = os.path.getsize(self.path)
            raise ValueError(
                f"{self.path!r} ({size} bytes) is not a readable HDF5 file; is it truncated or corrupt? ({error})"
            ) from None
        try:
            self._validate()
        except Exception:
            self._file.close()
            raise

    def _validate(self) -> None:
        if "data" not in self._file:
            raise ValueError(
                f"{self.path!r} is not a LIBERO/robomimic demo file: it has no 'data' group "
                f"(top-level keys: {sorted(self._file.keys())})"
            )
        data = self._file["data"]
        self.demo_keys = sorted((k for k in data if _DEMO_KEY.match(k)), key=lambda k: int(k[5:]))
        if not self.demo_keys and len(data):
            raise ValueError(f"{self.path!r}: group 'data' holds no 'demo_N' groups (keys: {sorted(data.keys())[:10]})")
        self.problem_info = json.loads(_decode(data.attrs["problem_info"])) if "problem_info" in data.attrs else {}
        self.env_args = json.loads(_decode(data.attrs["env_args"])) if "env_args" in data.attrs else {}
        self.instruction = _instruction_from_problem_info(data.attrs["problem_info"]) if "problem_info" in data.attrs else ""
        # How ``generate`` made the file (expert and layout versions, robot start noise...); {} for other files.
        raw_config = data.attrs.get("generator_config")
        self.generator_config = json.loads(_decode(raw_config)) if raw_config is not None else {}
        for key in self.demo_keys:
            demo = data[key]
            if "actions" not in demo:
                raise ValueError(f"{self.path!r}: data/{key} has no 'actions' dataset (keys: {sorted(demo.keys())})")
            shape = demo["actions"].shape
            if len(shape) != 2 or shape[1] != ACTION_DIM:
                raise ValueError(
                    f"{self.path!r}: data/{key}/actions has shape {shape}; LIBERO actions are (T, {ACTION_DIM}): "
                    "delta position (3), delta axis-angle (3), gripper (1)"
                )
            if "obs" not in demo and "robot_states" not in demo:
                raise ValueError(f"{self.path!r}: data/{key} has neither an 'obs' group nor 'robot_states'")

    @property
    def reflections(self) -> bool:
        """Whether the frames were rendered with reflections (``LiberoEnv(reflections=...)``): as ``generate`` recorded
        it, else True (LIBERO's own files, and ours before the option, are rendered with them)."""
        return bool(self.env_args.get("env_kwargs", {}).get("reflections", True))

    # ------------------------------------------------------------------ container protocol
    def __len__(self) -> int:
        return len(self.demo_keys)

    def __iter__(self) -> Iterator[Episode]:
        for key in self.demo_keys:
            yield self.episode(key)

    def __getitem__(self, index: int) -> Episode:
        return self.episode(self.demo_keys[index])

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> LiberoHDF5:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ reading
    def episode(self, key: str) -> Episode:
        if key not in self.demo_keys:
            raise KeyError(f"{self.path!r} has no demo {key!r}: valid {self.demo_keys[:5]}... ({len(self)} demos)")
        try:
            return self._read_episode(key)
        except OSError as error:  # a damaged dataset inside a file whose header is intact
            raise ValueError(f"{self.path!r}: cannot read data/{key}; is the file truncated or corrupt? ({error})") from None

    def _read_episode(self, key: str) -> Episode:
        demo = self._file["data"][key]
        actions = np.asarray(demo["actions"][()], dtype=np.float32)
        obs_group = demo["obs"] if "obs" in demo else {}
        observations = {"state": self._state(key, demo, obs_group, len(actions))}
        if self.load_images:
            for ours, theirs in IMAGE_KEYS.items():
                if theirs in obs_group:
                    # Files store raw OpenGL frames (bottom row first): rotate 180 degrees to upright.
                    observations[ours] = np.ascontiguousarray(obs_group[theirs][()][:, ::-1, ::-1])
        if "object_state" in obs_group:
            observations["object_state"] = np.asarray(obs_group["object_state"][()], dtype=np.float32)
        observations["instruction"] = str(_decode(demo.attrs.get("language_instruction", self.instruction)))
        rewards = np.asarray(demo["rewards"][()], dtype=np.float32) if "rewards" in demo else None
        dones = np.asarray(demo["dones"][()]).astype(bool) if "dones" in demo else None
        # A demonstration succeeded when the file says so: any done, or any positive reward.
        success = bool((dones is not None and dones.any()) or (rewards is not None and (rewards > 0).any()))
        if rewards is None:
            rewards = np.zeros(len(actions), dtype=np.float32)
            rewards[-1:] = float(success)
        return Episode(
            observations=observations,
            actions=actions,
            rewards=rewards,
            success=success,
            task_id=int(demo.attrs.get("task_id", self.default_task_id)),
            init_state_id=int(demo.attrs.get("init_state_id", -1)),
            source="offline",
            name=key,
            states=np.asarray(demo["states"][()], dtype=np.float64) if "states" in demo else None,
            seed=int(demo.attrs["seed"]) if "seed" in demo.attrs else None,
            replay_state={
                key.removeprefix("replay_"): np.asarray(value)
                for key, value in demo.attrs.items()
                if key.startswith("replay_")
            },
        )

    def _state(self, key: str, demo, obs_group, length: int) -> np.ndarray:
        if all(k in obs_group for k in ("ee_pos", "ee_ori", "gripper_states")):
            parts = [obs_group["ee_pos"][()], obs_group["ee_ori"][()], obs_group["gripper_states"][()]]
        elif "robot_states" in demo:  # gripper qpos (2), eef pos (3), eef quat xyzw (4)
            from gym_libero_vla.libero_env import _quat2axisangle

            robot = demo["robot_states"][()]
            parts = [robot[:, 2:5], np.stack([_quat2axisangle(q) for q in robot[:, 5:9]]), robot[:, 0:2]]
        else:
            raise ValueError(f"{self.path!r}: data/{key} lacks obs/ee_pos, obs/ee_ori, obs/gripper_states and robot_states")
        state = np.concatenate([np.asarray(p, dtype=np.float32).reshape(length, -1) for p in parts], axis=1)
        if state.shape != (length, 8):
            raise ValueError(f"{self.path!r}: data/{key} gives a proprio state of shape {state.shape}, expected ({length}, 8)")
        return state

    def all_actions(self) -> np.ndarray:
        """Every action of every demo, concatenated: (N, 7)."""
        return np.concatenate([self._file["data"][key]["actions"][()] for key in self.demo_keys]).astype(np.float32)


def load_episodes(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    filter_noops: bool = True,
    drop_failed: bool = True,
    load_images: bool = True,
    filter_stalls: bool = False,
) -> list[Episode]:
    """Read one or more files; optionally drop no-op steps and failed demos, as OpenVLA's processed data, and
    stalled open-hand steps (:func:`stall_mask`)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    episodes = []
    for path in paths:
        with LiberoHDF5(path, load_images=load_images) as demos:
            for episode in demos:
                if drop_failed and not episode.success:
                    continue
                if filter_stalls:  # first: a stall is judged against the next recorded state
                    episode = drop_stalls(episode)
                episodes.append(drop_noops(episode) if filter_noops else episode)
    return episodes


def action_stats(episodes: Sequence[Episode]) -> ActionStats:
    """Statistics over every action of ``episodes``."""
    if not episodes:
        raise ValueError("action_stats needs at least one episode")
    return ActionStats.from_actions(np.concatenate([episode.actions for episode in episodes]))


def replay(env, episode: Episode) -> tuple[bool, np.ndarray]:
    """Replay ``episode``'s actions open-loop from ``states[0]``: (success, the sim state before each action).
    A DART demo replays the actions its env executed (``replay_state["executed_actions"]``), not its clean labels.

    The reset uses the episode's recorded ``seed`` (when the file has one), which fixes LIBERO's fixture
    placement as it was during recording, and restores the recorded gripper command and solver warm start,
    so on the machine that recorded it the replay retraces ``states`` exactly. Another machine's simulator
    build may drift: compare the returned states with ``episode.states`` to see where.

    ``env`` must be a gym_libero_vla env of the episode's suite made with ``num_settle_steps=0``: the
    recorded ``states[0]`` already is the state the first action was taken from, so settling again
    would shift the replay.
    """
    if episode.states is None:
        raise ValueError(f"episode {episode.name} has no 'states': it cannot be replayed")
    if episode.task_id < 0:
        raise ValueError(f"episode {episode.name} has no task_id: pass task_id= to LiberoHDF5 to replay it")
    if getattr(env.unwrapped, "num_settle_steps", 0) != 0:
        raise ValueError(
            f"replay needs an env made with num_settle_steps=0, got {env.unwrapped.num_settle_steps}: "
            "states[0] is already settled"
        )
    env.reset(seed=episode.seed, options={"task_id": episode.task_id, "init_state": episode.states[0]})
    libero_env = env.unwrapped.libero_env
    domain = libero_env.env
    if "gripper_current_action" in episode.replay_state:
        domain.robots[0].gripper.current_action = episode.replay_state["gripper_current_action"].copy()
    if "qacc_warmstart" in episode.replay_state:
        domain.sim.data.qacc_warmstart[:] = episode.replay_state["qacc_warmstart"]
    # DART demos record the expert's clean actions; the env executed perturbed ones, which the replay must repeat.
    actions = episode.replay_state.get("executed_actions", episode.actions)
    states = []
    success = False
    for action in actions:
        states.append(libero_env.get_sim_state())
        _, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            success = bool(terminated)
            break
    return success, np.asarray(states)


def replay_success(env, episode: Episode) -> bool:
    """True if replaying ``episode`` (see :func:`replay`) ends in the env's success."""
    return replay(env, episode)[0]
