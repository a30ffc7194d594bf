"""Generate LIBERO demonstrations with the scripted expert, in the official LIBERO HDF5 layout.

Only successful episodes (the env's ``terminated``, i.e. LIBERO's BDDL goal check) are written. The
file follows LIBERO's ``create_dataset.py`` layout (see :mod:`gym_libero_vla.demos.libero_hdf5`): images in
raw OpenGL row order, ``obs/ee_ori`` as axis-angle, ``states[t]`` the flattened MuJoCo state before
``actions[t]``, plus per-demo ``task_id``, ``init_state_id``, ``seed`` and ``language_instruction`` attributes.
With ``--object-state`` it also writes ``obs/object_state``, the env's privileged object poses
(``privileged_state=True``): an extra dataset that official LIBERO files do not have, which readers of the
official layout ignore.

Crash safety and resume. Every finished episode is saved on its own into a sidecar directory
``<out>.parts/`` by writing a temporary file and ``os.replace``-ing it into place (atomic on POSIX), so
a kill leaves either a whole episode file or none. Failed attempts leave a small marker, so neither
successes nor failures are redone when the same command is run again. The HDF5 file is assembled from
the sidecar at the end of a run into ``<out>.tmp`` and renamed over ``<out>``: readers see either the
previous complete file or the new complete file, never a partial one. The sidecar stays (it is the
durable record); pass ``--no-keep-parts`` to delete it after assembly, at the cost of not being able
to resume or extend that run later. Two generators on one ``--out`` take turns (a lock on ``<out>.lock``, see
:mod:`gym_libero_vla.run_lock`): the second waits, then skips the episodes the first saved.

Replay. ``reset`` runs settle steps after ``set_init_state``; ``states[0]`` is recorded after them,
so replay resets an env made with ``num_settle_steps=0`` to ``states[0]`` and steps the actions
(:func:`replay_file`). It also resets with the episode's recorded ``seed`` (LIBERO re-samples fixture
placements, e.g. the cabinet and stove, at every reset and MuJoCo states do not hold them) and restores
the gripper's integrated command and MuJoCo's solver warm start, saved as ``replay_*`` demo attributes.
On the machine that recorded a file, replay retraces its ``states`` exactly; another machine's
simulator build can drift (``max_state_drift`` in the report says how far), and a marginal demo may then
fail.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import time
from typing import Literal

import numpy as np

from gym_libero_vla.demos.libero_hdf5 import IMAGE_KEYS, LiberoHDF5, replay
from gym_libero_vla.demos.scripted_expert import EXPERT_VERSION
from gym_libero_vla.episode import SAMPLED_INIT_STATE
from gym_libero_vla.libero_env import LAYOUT_VERSION, ROBOT_INIT_NOISE
from gym_libero_vla.rollouts import INIT_STATES, Start
from gym_libero_vla.run_lock import exclusive

PARTS_SUFFIX = ".parts"
FORMAT_VERSION = 1
MAX_ATTEMPTS_PER_EPISODE = 10  # sampled layouts tried per wanted demo before a task gives up


@dataclasses.dataclass
class GenerateArgs:
    """Roll out the scripted expert and write its successful episodes to an HDF5 file."""

    suite: str = "spatial"
    """LIBERO suite: short name (spatial, object, goal, 10, 90), LIBERO name or env id."""
    out: str = "data/spatial.hdf5"
    """Output HDF5 file; progress is kept in ``<out>.parts/`` for resuming."""
    episodes_per_task: int = 20
    """Successful episodes wanted per task (init states are tried in order until reached)."""
    task_ids: tuple[int, ...] | None = None
    """Tasks to generate (default: every task of the suite)."""
    init_state_start: int = 0
    """First init state index to try."""
    init_state_end: int | None = None
    """One past the last init state index to try (default: all of the task's init states; with ``--init-states
    sampled``, as many as it takes, up to 10 attempts per wanted episode)."""
    init_states: Literal["suite", "sampled"] = "suite"
    """"suite": start from the suite's stored init states (LIBERO's 50 per task; evaluations hold some out).
    "sampled": start from new layouts drawn by LIBERO's own placement sampler, one per index from the episode seed
    (reset option ``layout_seed``; redrawn until the task's BDDL premises hold after settling): more demos than the
    suite has starts, none of them an evaluation start. Their demos record ``init_state_id`` -2
    (:data:`~gym_libero_vla.episode.SAMPLED_INIT_STATE`)."""
    robot_init_noise: float = ROBOT_INIT_NOISE
    """With ``--init-states sampled``: radians of Gaussian noise on the robot's joints at each new layout's start
    (``LiberoEnv(robot_init_noise=...)``): 0.02 spreads them as LIBERO's stored starts are, 0 starts the robot at one
    pose, as LIBERO's evaluation env does. Stored init states keep the robot where LIBERO stored it."""
    obs_mode: Literal["state", "rgb+state"] = "state"
    """"state" stores proprio only (fast); "rgb+state" also stores agentview and wrist frames."""
    image_size: int = 128
    """Side of the stored camera frames (rgb+state only)."""
    reflections: bool = True
    """Render the frames with LIBERO's reflections (its look); ``--no-reflections`` renders them ~40% faster, nearly
    the same (see ``LiberoEnv``). Policies trained on the demos must be evaluated the same way (``--policy.reflections``)."""
    object_state: bool = False
    """Also store ``obs/object_state``, the env's privileged object poses (not an official LIBERO key)."""
    seed: int = 0
    """Base seed; an episode's seed is derived from it, the task and the init state."""
    noise_scale: float = 0.0
    """Std of Gaussian noise on the expert's translation actions (0: deterministic expert)."""
    perturb_scale: float = 0.0
    """DART (Laskey et al. 2017): std of the noise added to the translation of the actions the env *executes*, while
    the demo records the expert's clean action at every state it visits, so the demos show the expert recovering from
    drift (the states a learner's errors lead to). 0: no perturbation. The executed actions are kept for exact replay."""
    max_episode_steps: int | None = None
    """Step limit of an attempt (default: the suite's, as for policies: 220 on Spatial). Perturbed (DART) attempts
    are slower to finish; a longer limit keeps more of them."""
    perturb_correlation: float = 0.9
    """Step-to-step correlation of the DART noise (AR(1); 0.9 keeps a push for about ten steps, a chunk's length,
    as a learner's error persists), in [0, 1)."""
    max_retries: int = 3
    """Grasp retries the expert may make within an episode."""
    workers: int = 1
    """Processes rolling out the expert side by side, each on its own tasks and simulator (one per core: rendering
    frames is most of an rgb episode's cost)."""
    keep_parts: bool = True
    """Keep the per-episode sidecar directory after assembling the HDF5 file."""
    progress: bool = True
    """Show a tqdm progress bar."""


@dataclasses.dataclass
class ReplayArgs:
    """Replay a file's actions open-loop from each demo's states[0] and report how many still succeed."""

    file: str = "data/spatial.hdf5"
    """HDF5 file written by ``generate`` (or an official file with ``--suite`` and ``--task-id``)."""
    suite: str | None = None
    """Suite of the file (default: read from the file's env_args)."""
    task_id: int = -1
    """Task of demos whose file does not store one (official LIBERO files)."""
    max_episodes: int | None = None
    """Replay at most this many demos."""


@dataclasses.dataclass
class DemoConfig:
    """The expert demos a training run uses: one file, generated with the scripted expert when it is missing (then
    reused), joined by extra files made by other settings. The training CLIs (``examples/train_grpo.py``,
    ``examples/train_sft.py``, ``benchmarks/sft_baseline.py``, ``benchmarks/sft_vs_grpo.py``) declare it with
    ``tyro.conf.OmitArgPrefixes``, so its flags read ``--demos``, ``--extra-demos``, ``--episodes-per-task``..."""

    demos: str | None = None
    """Demo HDF5 file (default: a path under data/ the run names). Used as it is when it exists; otherwise generated
    with the scripted expert (resuming ``<demos>.parts/``)."""
    extra_demos: tuple[str, ...] = ()
    """More demo files whose episodes join --demos' (they must exist, with the same frames; each may hold only some of
    the tasks): e.g. new layouts, ``python -m gym_libero_vla.demos generate --init-states sampled --out
    data/spatial_rgb128_sampled.hdf5``, DART demos, ``generate --perturb-scale 0.3 --seed 1``, or more demos of the
    weakest tasks, ``generate --task-ids 0 4 --init-states sampled --init-state-start 100``."""
    episodes_per_task: int = 20
    """Successful expert demos per task to generate (only when the demo file is missing)."""
    demo_init_state_end: int = 20
    """Demos (and GRPO groups) come from init states 0 .. demo_init_state_end - 1; evaluation must start past them."""
    filter_noops: bool = True
    """Drop no-op steps from the demos, as OpenVLA's processed LIBERO data."""
    filter_stalls: bool = False
    """Drop the demos' stalled open-hand steps: the hand commanded to move, nothing moved (pressing on a surface before
    a grasp; ``demos.stall_mask``)."""

    def __post_init__(self) -> None:
        for name in ("episodes_per_task", "demo_init_state_end"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} {value!r} must be an int >= 1")

    def generate_args(self, default_path: str, **run) -> GenerateArgs:
        """How to generate the file when it is missing: ``--demos`` (or ``default_path``), this config's episode count
        and init states 0 .. demo_init_state_end - 1, and the run's own settings ``run`` (suite, task_ids, obs_mode,
        image_size, object_state, seed, workers, progress)."""
        return GenerateArgs(
            out=self.demos or default_path, episodes_per_task=self.episodes_per_task, init_state_start=0,
            init_state_end=self.demo_init_state_end, **run,
        )  # fmt: skip

    def load(self, generate: GenerateArgs) -> tuple[list, bool]:
        """The episodes of ``generate.out`` (generated first when missing) and of ``extra_demos``, and whether the
        file was generated now: :func:`prepare_demos`."""
        return prepare_demos(
            generate, filter_noops=self.filter_noops, extra_files=self.extra_demos, filter_stalls=self.filter_stalls
        )

    def summary(self, generate: GenerateArgs, episodes: list, generated: bool) -> dict:
        """What a report says about the demos it trained on."""
        return {
            "path": generate.out, "extra_paths": list(self.extra_demos), "generated_this_run": generated,
            "num_demos": len(episodes), "num_transitions": int(sum(len(episode) for episode in episodes)),
            "generator_configs": {path: generator_config(path) for path in (generate.out, *self.extra_demos)},
        }  # fmt: skip


def generator_config(path: str) -> dict:
    """How ``generate`` made the demo file at ``path``: its recorded config with the keys it leaves out at their
    values (files from before ``expert_version`` / ``layout_version`` hold version 1; new layouts' robot start noise is
    ``ROBOT_INIT_NOISE`` unless recorded), or {} for a file it did not make (official LIBERO data)."""
    from gym_libero_vla.demos.libero_hdf5 import LiberoHDF5

    with LiberoHDF5(path, load_images=False) as demo_file:
        config = dict(demo_file.generator_config)
    if config:
        config.setdefault("expert_version", 1)
        if config.get("init_states") == "sampled":
            config.setdefault("layout_version", 1)
            config.setdefault("robot_init_noise", ROBOT_INIT_NOISE)
    return config


def default_demo_path(suite: str, obs_mode: str, image_size: int, reflections: bool = True) -> str:
    """The benchmarks' shared demo file of a suite: ``data/<suite>_state.hdf5``, or ``data/<suite>_rgb<size>.hdf5``
    with frames (``_rgb<size>_norefl.hdf5`` rendered without reflections)."""
    from gym_libero_vla import suites

    short_name = suites.resolve_suite(suite).libero_name.removeprefix("libero_")
    if obs_mode == "state":
        return f"data/{short_name}_state.hdf5"
    return f"data/{short_name}_rgb{image_size}{'' if reflections else '_norefl'}.hdf5"


# ---------------------------------------------------------------------------------------------- rollout
def episode_seed(seed: int, task_id: int, init_state_id: int) -> int:
    return int(seed) * 1_000_003 + task_id * 1000 + init_state_id


def rollout_expert(env, expert, start: Start, perturb_scale: float = 0.0, perturb_correlation: float = 0.9) -> dict:
    """One expert episode from ``start`` (a stored init state or a new layout; its ``seed`` is required); returns its
    arrays in the official layout and ``success`` from the env. With ``perturb_scale`` the env executes the expert's
    actions plus AR(1) noise on the translation (DART) while ``actions`` records the clean ones; the executed ones go
    to ``replay/executed_actions``."""
    if start.seed is None:
        raise ValueError("an expert episode needs start.seed: replay resets with it")
    obs, _ = env.reset(seed=start.seed, options=start.options)
    perturb_rng = np.random.default_rng([start.seed, 1])  # apart from the expert's own noise stream
    push = np.zeros(3)
    expert.reset()
    libero_env = env.unwrapped.libero_env
    observables = libero_env.env._observables
    # Simulator state that the flattened MuJoCo state lacks, kept so that replay can be exact: the Panda
    # gripper's integrated command and MuJoCo's solver warm start.
    replay_extras = {
        "gripper_current_action": np.array(libero_env.env.robots[0].gripper.current_action, dtype=np.float64),
        "qacc_warmstart": np.array(libero_env.env.sim.data.qacc_warmstart, dtype=np.float64),
    }
    record: dict[str, list] = {key: [] for key in ("actions", "states", "robot_states", "rewards", "dones")}
    record.update({key: [] for key in ("ee_pos", "ee_ori", "gripper_states", "joint_states")})
    record.update({IMAGE_KEYS[camera]: [] for camera in IMAGE_KEYS if camera in obs})
    if "object_state" in obs:
        record["object_state"] = []
    success = False
    while True:
        # The observation and simulator state *before* the action, as LIBERO's create_dataset.py records them.
        record["states"].append(libero_env.get_sim_state().copy())
        gripper_qpos = observables["robot0_gripper_qpos"].obs
        record["robot_states"].append(
            np.concatenate([gripper_qpos, observables["robot0_eef_pos"].obs, observables["robot0_eef_quat"].obs])
        )
        record["ee_pos"].append(obs["state"][:3])
        record["ee_ori"].append(obs["state"][3:6])
        record["gripper_states"].append(obs["state"][6:8])
        record["joint_states"].append(np.asarray(observables["robot0_joint_pos"].obs).copy())
        for camera, key in IMAGE_KEYS.items():
            if camera in obs:  # store raw OpenGL order, like the official files
                record[key].append(obs[camera][::-1, ::-1])
        if "object_state" in obs:
            record["object_state"].append(obs["object_state"])
        action = expert.act(obs)
        executed = action
        if perturb_scale:
            innovation = perturb_rng.normal(0.0, perturb_scale, 3) * np.sqrt(1.0 - perturb_correlation**2)
            push = perturb_correlation * push + innovation
            executed = action.copy()
            executed[:3] = np.clip(action[:3] + push, -1.0, 1.0)
            record.setdefault("executed", []).append(executed)  # without a perturbation: the actions themselves
        obs, reward, terminated, truncated, _ = env.step(executed)
        record["actions"].append(action)
        record["rewards"].append(reward)
        record["dones"].append(terminated)
        if terminated or truncated:
            success = bool(terminated)
            break
    episode = {
        "actions": np.asarray(record["actions"], dtype=np.float64),
        "states": np.asarray(record["states"], dtype=np.float64),
        "robot_states": np.asarray(record["robot_states"], dtype=np.float64),
        "rewards": np.asarray(record["rewards"], dtype=np.uint8),
        "dones": np.asarray(record["dones"], dtype=np.uint8),
    }
    for key in ("ee_pos", "ee_ori", "gripper_states", "joint_states", "object_state", *IMAGE_KEYS.values()):
        if record.get(key):
            episode["obs/" + key] = np.asarray(record[key], dtype=np.uint8 if key.endswith("_rgb") else np.float64)
    if perturb_scale:
        replay_extras["executed_actions"] = np.asarray(record["executed"], dtype=np.float64)
    episode.update({"replay/" + key: value for key, value in replay_extras.items()})
    return {"arrays": episode, "success": success, "num_steps": len(record["actions"])}


# ---------------------------------------------------------------------------------------------- sidecar
def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _part_name(task_id: int, init_state_id: int) -> str:
    return f"task{task_id:03d}_init{init_state_id:04d}"


def _save_part(parts_dir: str, task_id: int, init_state_id: int, episode: dict, meta: dict) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **{key.replace("/", "__"): value for key, value in episode["arrays"].items()})
    _atomic_write(os.path.join(parts_dir, _part_name(task_id, init_state_id) + ".npz"), buffer.getvalue())
    _atomic_write(os.path.join(parts_dir, _part_name(task_id, init_state_id) + ".json"), json.dumps(meta).encode())


def _scan_parts(parts_dir: str) -> dict[tuple[int, int], dict]:
    """Finished attempts: (task_id, init_state_id) -> meta (with "success"). Leftover temp files are removed."""
    done = {}
    for name in sorted(os.listdir(parts_dir)):
        path = os.path.join(parts_dir, name)
        if ".tmp." in name:
            os.remove(path)  # an attempt killed mid-write
            continue
        if not name.endswith(".json") or name == "config.json":
            continue
        with open(path) as f:
            meta = json.load(f)
        # A success's meta is written after its arrays, so a success without arrays cannot happen;
        # still, trust only what is complete.
        if meta["success"] and not os.path.exists(path[: -len(".json")] + ".npz"):
            continue
        done[(meta["task_id"], meta["init_state_id"])] = meta
    return done


def _check_config(parts_dir: str, config: dict) -> None:
    path = os.path.join(parts_dir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        # A setting at its default is left out of the config (older sidecars lack it): absent on both sides is equal.
        changed = {k: (previous.get(k), config.get(k)) for k in {**previous, **config} if previous.get(k) != config.get(k)}
        if changed:
            raise ValueError(
                f"{parts_dir!r} holds episodes generated with different settings {changed} (old, new): "
                "use another --out or delete that directory"
            )
    else:
        _atomic_write(path, json.dumps(config, indent=2).encode())


# ---------------------------------------------------------------------------------------------- assembly
def assemble_hdf5(out: str, parts_dir: str) -> int:
    """Write every successful episode of ``parts_dir`` into ``out`` (atomically); return the demo count."""
    import h5py

    from gym_libero_vla import suites

    with open(os.path.join(parts_dir, "config.json")) as f:
        config = json.load(f)
    spec = suites.resolve_suite(config["suite"])
    tasks = suites.suite_tasks(spec.libero_name)
    meta_by_key = _scan_parts(parts_dir)
    successes = sorted(key for key, meta in meta_by_key.items() if meta["success"])
    task_ids = sorted({task_id for task_id, _ in successes})
    instructions = {tasks[t].instruction for t in task_ids}  # empty when no episode succeeded
    tmp = out + ".tmp"
    total = 0
    with h5py.File(tmp, "w") as f:
        data = f.create_group("data")
        data.attrs["problem_info"] = json.dumps(
            {
                "problem_name": tasks[task_ids[0]].name if len(task_ids) == 1 else spec.libero_name,
                "domain_name": "robosuite",
                # One task per file in official data; a multi-task file keeps instructions per demo.
                "language_instruction": instructions.pop() if len(instructions) == 1 else "",
            }
        )
        data.attrs["env_args"] = json.dumps(
            {
                "type": 1,
                "env_name": "LiberoEnv",
                "suite": spec.libero_name,
                "env_id": spec.env_id,
                "env_kwargs": {
                    "obs_mode": config["obs_mode"],
                    "image_size": config["image_size"],
                    "reflections": config.get("reflections", True),
                },
                "bddl_files": {str(t): tasks[t].bddl_file for t in task_ids},
            }
        )
        data.attrs["macros_image_convention"] = "opengl"
        data.attrs["generator"] = "gym_libero_vla.demos scripted expert"
        data.attrs["generator_config"] = json.dumps(config)
        for index, (task_id, init_state_id) in enumerate(successes):
            with np.load(os.path.join(parts_dir, _part_name(task_id, init_state_id) + ".npz")) as arrays:
                demo = data.create_group(f"demo_{index}")
                for key in arrays.files:
                    if key.startswith("replay__"):  # small vectors: attributes, not datasets
                        demo.attrs[key.replace("__", "_")] = arrays[key]
                    else:
                        demo.create_dataset(key.replace("__", "/"), data=arrays[key])
                states = arrays["states"]
                demo.attrs["num_samples"] = len(arrays["actions"])
                demo.attrs["init_state"] = states[0]
                total += len(arrays["actions"])
            demo.attrs["task_id"] = task_id
            # A sampled layout's index is not the suite's init state of that index.
            demo.attrs["init_state_id"] = SAMPLED_INIT_STATE if config.get("init_states") == "sampled" else init_state_id
            demo.attrs["seed"] = meta_by_key[(task_id, init_state_id)]["seed"]
            demo.attrs["task_name"] = tasks[task_id].name
            demo.attrs["language_instruction"] = tasks[task_id].instruction
        data.attrs["num_demos"] = len(successes)
        data.attrs["total"] = total
    os.replace(tmp, out)
    return len(successes)


def _check_args(args: GenerateArgs) -> None:
    """Refuse bad settings by name, before any work."""
    if args.episodes_per_task < 1:
        raise ValueError(f"episodes_per_task {args.episodes_per_task} must be >= 1")
    if args.image_size < 1:
        raise ValueError(f"image_size {args.image_size} must be >= 1")
    if args.max_episode_steps is not None and not (isinstance(args.max_episode_steps, int) and args.max_episode_steps >= 1):
        raise ValueError(f"max_episode_steps {args.max_episode_steps!r} must be an int >= 1 (or None: the suite's limit)")
    if args.perturb_scale < 0:
        raise ValueError(f"perturb_scale {args.perturb_scale} must be >= 0 (0: no DART perturbation)")
    if not 0.0 <= args.perturb_correlation < 1.0:
        raise ValueError(f"perturb_correlation {args.perturb_correlation} must be in [0, 1)")
    if not (isinstance(args.workers, int) and args.workers >= 1):
        raise ValueError(f"workers {args.workers!r} must be an int >= 1")
    if args.init_states not in INIT_STATES:
        raise ValueError(f"unknown init_states {args.init_states!r}: valid {INIT_STATES}")
    if not args.robot_init_noise >= 0:
        raise ValueError(f"robot_init_noise {args.robot_init_noise!r} must be >= 0 (radians; 0: the robot at one pose)")
    if args.robot_init_noise != ROBOT_INIT_NOISE and args.init_states != "sampled":
        raise ValueError(
            f"robot_init_noise {args.robot_init_noise!r} applies to new layouts only (--init-states sampled); the "
            f"suite's stored init states ({args.init_states!r}) keep the robot where LIBERO stored it"
        )


# ---------------------------------------------------------------------------------------------- entry points
def generate(args: GenerateArgs) -> dict:
    """Run the generation described by ``args``; returns counts (successes, failures, attempts this run)."""
    import gym_libero_vla  # noqa: F401  (registers the env ids)
    from gym_libero_vla import suites

    spec = suites.resolve_suite(args.suite)
    _check_args(args)
    task_ids = suites.resolve_task_ids(spec.env_id, args.task_ids)

    out = os.path.abspath(args.out)
    # Two generators on one file would redo the same episodes, and one's removal of leftover temp files or its
    # assembly into <out>.tmp would race the other's writes: a second one waits here, then finds the parts done.
    with exclusive(out + ".lock", f"demos {out}"):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        parts_dir = out + PARTS_SUFFIX
        os.makedirs(parts_dir, exist_ok=True)
        config = {
            "format": FORMAT_VERSION,
            "suite": spec.libero_name,
            "obs_mode": args.obs_mode,
            "image_size": args.image_size,
            "seed": args.seed,
            "noise_scale": args.noise_scale,
            "max_retries": args.max_retries,
            # Parts of another expert (older sidecars lack it: version 1) are not continued into the same file.
            "expert_version": EXPERT_VERSION,
        }
        if args.object_state:  # only when set, so sidecars written before this option still resume
            config["object_state"] = True
        if args.max_episode_steps is not None:  # likewise
            config["max_episode_steps"] = args.max_episode_steps
        if args.init_states != "suite":  # likewise
            config["init_states"] = args.init_states
            # Layouts drawn another way (LAYOUT_VERSION; older sidecars: 1) are not continued into the same file.
            config["layout_version"] = LAYOUT_VERSION
        if args.robot_init_noise != ROBOT_INIT_NOISE:  # likewise
            config["robot_init_noise"] = float(args.robot_init_noise)
        if not args.reflections:  # likewise
            config["reflections"] = False
        if args.perturb_scale:  # likewise
            config["perturb_scale"] = args.perturb_scale
            config["perturb_correlation"] = args.perturb_correlation
        _check_config(parts_dir, config)
        done = _scan_parts(parts_dir)

        if args.workers > 1 and len(task_ids) > 1:
            counts = _roll_out_in_workers(args, spec, task_ids, parts_dir, done)
        else:
            counts = _roll_out_missing(args, spec, task_ids, parts_dir, done)
        counts["num_demos"] = assemble_hdf5(out, parts_dir)
        if not args.keep_parts:
            shutil.rmtree(parts_dir)
        return counts


def prepare_demos(
    args: GenerateArgs, filter_noops: bool = True, extra_files: tuple[str, ...] = (), filter_stalls: bool = False
) -> tuple[list, bool]:
    """The successful demos of ``args.task_ids`` in ``args.out``, generated first when the file is missing (a process
    wanting a file another is generating waits for it and loads the result), followed by those of ``extra_files``
    (demo files made by other settings -- DART, sampled layouts -- which must exist: they are never generated here;
    they may hold only some of the tasks, e.g. more demos of the weakest ones). Returns ``(episodes, generated)``;
    ``args.out`` lacking a task, an extra file holding none of them, or a file lacking the object poses or the frames
    ``args`` asks for is refused, naming the difference. No-op steps are dropped (OpenVLA's processed data) unless
    ``filter_noops`` is False; stalled open-hand steps (``stall_mask``) with ``filter_stalls``."""
    for path in extra_files:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"extra demo file {path!r} does not exist: generate it first (python -m gym_libero_vla.demos generate ...)"
            )
    path = args.out
    with exclusive(os.path.abspath(path) + ".lock", f"demos {path}"):
        generated = not os.path.exists(path)
        if generated:
            resuming = f" (resuming {path}{PARTS_SUFFIX})" if os.path.isdir(path + PARTS_SUFFIX) else ""
            print(f"{path} not found: generating it with the scripted expert{resuming}", flush=True)
            print(f"demos: {generate(args)}", flush=True)
    episodes = _load_checked(args.out, args, filter_noops, filter_stalls=filter_stalls)
    for path in extra_files:
        episodes += _load_checked(path, args, filter_noops, every_task=False, filter_stalls=filter_stalls)
    return episodes, generated


def _load_checked(
    path: str, args: GenerateArgs, filter_noops: bool, every_task: bool = True, filter_stalls: bool = False
) -> list:
    """The demos of ``args.task_ids`` in ``path``, refused (naming the difference) when the file lacks a task (any
    task, with ``every_task`` False: it holds none of them), the object poses or the frames ``args`` asks for. A file
    that stores no task ids (LIBERO's own) has its demos' tasks found by their instruction."""
    from gym_libero_vla import suites
    from gym_libero_vla.demos.libero_hdf5 import load_episodes

    spec = suites.resolve_suite(args.suite)
    with LiberoHDF5(path, load_images=False) as demos:
        recorded = demos.env_args.get("suite")  # official files do not name it
        recorded_reflections = demos.reflections
    if recorded is not None and suites.resolve_suite(recorded).libero_name != spec.libero_name:
        raise ValueError(f"{path} holds {recorded} demos, not {spec.libero_name}: give demos of the suite you train on")
    episodes = load_episodes(
        path, filter_noops=filter_noops, load_images=args.obs_mode == "rgb+state", filter_stalls=filter_stalls
    )
    episodes = _tasks_from_instructions(episodes, spec, path)
    task_ids = suites.resolve_task_ids(spec.env_id, args.task_ids)
    present = sorted({episode.task_id for episode in episodes})
    missing = [task_id for task_id in task_ids if task_id not in present]
    if missing and (every_task or len(missing) == len(task_ids)):  # an extra file may hold some of the tasks
        hint = "move this one away to have it generated" if every_task else "drop it from the extra demo files"
        raise ValueError(
            f"{path} has no successful demos of task(s) {missing}: it has tasks {present}. Give another file, or {hint}"
        )
    episodes = [episode for episode in episodes if episode.task_id in task_ids]
    observations = episodes[0].observations
    if args.object_state and "object_state" not in observations:
        raise ValueError(
            f"{path} has no obs/object_state (privileged object poses): give demos generated with --object-state, "
            "or move this file away to have them generated"
        )
    if args.obs_mode == "rgb+state":
        if "agentview" not in observations:
            raise ValueError(f"{path} has no agentview frames: rgb+state needs demos generated with --obs-mode rgb+state")
        size = observations["agentview"].shape[1]
        if size != args.image_size:
            raise ValueError(f"{path} holds {size} px frames, not {args.image_size} px: ask for {size} or give other demos")
        if recorded_reflections != args.reflections:
            flag = "--policy.reflections" if recorded_reflections else "--policy.no-reflections"
            raise ValueError(
                f"{path} holds frames rendered {'with' if recorded_reflections else 'without'} reflections, and this "
                f"run renders them {'with' if args.reflections else 'without'}: pass {flag}, or give other demos"
            )
    return episodes


def _tasks_from_instructions(episodes: list, spec, path: str) -> list:
    """Episodes of a file that stores no task ids (LIBERO's own files: one task each, named only by its instruction)
    take the task of ``spec``'s suite with their instruction; an instruction of none of its tasks is refused."""
    from gym_libero_vla import suites

    unnamed = {episode.instruction for episode in episodes if episode.task_id < 0}
    if not unnamed:
        return episodes

    def words(instruction: str) -> str:  # case and spacing aside
        return " ".join(instruction.lower().split())

    tasks = suites.suite_tasks(spec.libero_name)
    by_instruction = {words(task.instruction): task.task_id for task in tasks}
    task_of = {instruction: by_instruction.get(words(instruction)) for instruction in unnamed}
    unknown = sorted(instruction for instruction, task_id in task_of.items() if task_id is None)
    if unknown:
        raise ValueError(
            f"{path} stores no task ids, and its instruction(s) {unknown} are none of {spec.libero_name}'s: give demos "
            f"of the suite you train on (its tasks: {[task.instruction for task in tasks]})"
        )
    return [
        dataclasses.replace(episode, task_id=task_of[episode.instruction]) if episode.task_id < 0 else episode
        for episode in episodes
    ]


def _roll_out_in_workers(args: GenerateArgs, spec, task_ids: tuple[int, ...], parts_dir: str, done: dict) -> dict:
    """:func:`_roll_out_missing` over ``args.workers`` processes, one task at a time each (tasks are independent and
    every attempt is its own sidecar file, so a kill loses at most the attempts in flight)."""
    import concurrent.futures
    import multiprocessing

    from tqdm import tqdm

    worker_args = dataclasses.replace(args, progress=False, workers=1)
    wanted = args.episodes_per_task * len(task_ids)

    def have() -> int:
        scanned = _successes_per_task(parts_dir)
        return sum(min(scanned.get(task_id, 0), args.episodes_per_task) for task_id in task_ids)

    counts = {"successes": 0, "failures": 0, "attempts": 0, "skipped": 0}
    bar = tqdm(total=wanted, initial=have(), desc=f"{spec.env_id} demos ({args.workers} workers)", unit="demo",
               disable=not args.progress)  # fmt: skip
    context = multiprocessing.get_context("forkserver")  # a clean process per worker: its own GL context
    try:
        # A pool's workers outlive a killed parent and would go on rendering for nobody: each watches this process.
        with concurrent.futures.ProcessPoolExecutor(
            args.workers, mp_context=context, initializer=_exit_with, initargs=(os.getpid(),)
        ) as pool:
            pending = {pool.submit(_roll_out_missing, worker_args, spec, (task_id,), parts_dir, done) for task_id in task_ids}
            while pending:
                finished, pending = concurrent.futures.wait(pending, timeout=5.0)
                for future in finished:
                    for key, value in future.result().items():
                        counts[key] += value
                bar.update(have() - bar.n)
    finally:
        bar.close()
    return counts


def _successes_per_task(parts_dir: str) -> dict[int, int]:
    counts: dict[int, int] = {}
    for name in os.listdir(parts_dir):
        if name.endswith(".npz") and name.startswith("task"):
            task_id = int(name[4:7])
            counts[task_id] = counts.get(task_id, 0) + 1
    return counts


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a killed one its parent has not reaped yet, a zombie, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def _exit_with(parent_pid: int, interval: float = 1.0) -> None:
    """Pool initializer: end this worker as soon as ``parent_pid`` is gone (an episode in flight is dropped; every
    saved one is complete, and the next run removes the half-written temp file)."""
    import threading

    def watch() -> None:
        while _alive(parent_pid):
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _roll_out_missing(args: GenerateArgs, spec, task_ids: tuple[int, ...], parts_dir: str, done: dict) -> dict:
    """Roll out the expert on every (task, init state) not in ``done`` until each task has its episodes, saving
    each attempt into ``parts_dir``; returns the counts of this run."""
    import gymnasium as gym
    from tqdm import tqdm

    from gym_libero_vla import suites
    from gym_libero_vla.demos.scripted_expert import ScriptedExpert

    env = gym.make(
        spec.env_id,
        max_episode_steps=args.max_episode_steps,
        obs_mode=args.obs_mode,
        image_size=args.image_size,
        cameras=("agentview", "wrist"),
        task_ids=task_ids,
        privileged_state=args.object_state,
        reflections=args.reflections,
        robot_init_noise=args.robot_init_noise,
    )
    expert = ScriptedExpert(env, max_retries=args.max_retries, noise_scale=args.noise_scale, seed=args.seed)
    counts = {"successes": 0, "failures": 0, "attempts": 0, "skipped": 0}
    wanted = args.episodes_per_task * len(task_ids)
    have = {t: sum(1 for (task, _), m in done.items() if task == t and m["success"]) for t in task_ids}
    bar = tqdm(
        total=wanted,
        initial=sum(min(n, args.episodes_per_task) for n in have.values()),
        desc=f"{spec.env_id} demos",
        unit="demo",
        disable=not args.progress,
    )
    try:
        for task_id in task_ids:
            if args.init_states == "sampled":  # any number of new layouts
                end = args.init_state_start + MAX_ATTEMPTS_PER_EPISODE * args.episodes_per_task
                end = end if args.init_state_end is None else args.init_state_end
            else:
                end = suites.task_init_states(spec.libero_name, task_id).shape[0]
                end = end if args.init_state_end is None else min(end, args.init_state_end)
            for init_state_id in range(args.init_state_start, end):
                if have[task_id] >= args.episodes_per_task:
                    break
                if (task_id, init_state_id) in done:
                    counts["skipped"] += 1
                    continue
                seed = episode_seed(args.seed, task_id, init_state_id)
                expert.rng = np.random.default_rng(seed)
                start = time.perf_counter()
                if args.init_states == "sampled":  # a new layout per index
                    origin = Start(task_id, SAMPLED_INIT_STATE, seed, layout_seed=seed)
                else:
                    origin = Start(task_id, init_state_id, seed)
                episode = rollout_expert(env, expert, origin, args.perturb_scale, args.perturb_correlation)
                meta = {
                    "task_id": task_id,
                    "init_state_id": init_state_id,
                    "seed": seed,
                    "success": episode["success"],
                    "num_steps": episode["num_steps"],
                    "seconds": time.perf_counter() - start,
                }
                if episode["success"]:
                    _save_part(parts_dir, task_id, init_state_id, episode, meta)
                    have[task_id] += 1
                    counts["successes"] += 1
                    bar.update(1)
                else:
                    _atomic_write(
                        os.path.join(parts_dir, _part_name(task_id, init_state_id) + ".json"), json.dumps(meta).encode()
                    )
                    counts["failures"] += 1
                counts["attempts"] += 1
                bar.set_postfix(task=task_id, failures=counts["failures"])
    finally:
        bar.close()
        env.close()
    return counts


def replay_file(args: ReplayArgs) -> list[dict]:
    """Replay each demo of ``args.file``: per demo its name, ``success`` (the env's) and ``max_state_drift``
    (largest difference between a replayed and a recorded MuJoCo state entry; 0.0 is an exact replay)."""
    import gymnasium as gym

    import gym_libero_vla  # noqa: F401
    from gym_libero_vla import suites

    with LiberoHDF5(args.file, task_id=args.task_id, load_images=False) as demos:
        suite = args.suite or demos.env_args.get("suite")
        if suite is None:
            raise ValueError(f"{args.file!r} does not name its suite in env_args: pass --suite")
        spec = suites.resolve_suite(suite)
        env = gym.make(spec.env_id, obs_mode="state", num_settle_steps=0)
        try:
            results = []
            for index, episode in enumerate(demos):
                if args.max_episodes is not None and index >= args.max_episodes:
                    break
                success, states = replay(env, episode)
                drift = float(np.abs(states - episode.states[: len(states)]).max())
                results.append({"demo": episode.name, "success": success, "max_state_drift": drift})
        finally:
            env.close()
    return results
