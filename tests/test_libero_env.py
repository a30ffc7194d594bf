"""LiberoEnv against the real LIBERO simulator (state mode unless a test needs frames)."""

from __future__ import annotations

import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from gym_libero_vla.episode import SAMPLED_INIT_STATE
from gym_libero_vla.libero_env import NUM_SETTLE_STEPS, STATE_DIM, LiberoEnv
from gym_libero_vla.suites import SUITES, suite_tasks, task_init_states


@pytest.mark.parametrize("env_id", sorted(SUITES))
def test_check_env_passes_for_every_suite(env_id):
    env = gym.make(env_id, max_cached_tasks=3)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_env(env.unwrapped, skip_render_check=True)
        messages = [str(w.message) for w in caught if "gym_libero_vla" in str(w.filename) or "gymnasium" in str(w.filename)]
        assert messages == []
    finally:
        env.close()


def test_observation_layout(spatial_env):
    obs, info = spatial_env.reset(options={"task_id": 2, "init_state_id": 5})
    task = suite_tasks("libero_spatial")[2]
    assert obs["instruction"] == task.instruction
    assert obs["task_id"] == 2
    assert obs["state"].shape == (STATE_DIM,) and obs["state"].dtype == np.float32
    assert set(obs) == {"instruction", "task_id", "state"}
    assert info == {"is_success": False, "task_id": 2, "task_name": task.name, "init_state_id": 5}
    assert spatial_env.observation_space.contains(obs)
    # The gripper starts open after the settle steps: both finger joints apart.
    assert obs["state"][6] > 0.03 and obs["state"][7] < -0.03


def test_same_seed_same_rollout():
    envs = [gym.make("LiberoSpatial-v0", task_ids=[1]) for _ in range(2)]
    try:
        actions = np.random.default_rng(0).uniform(-1, 1, size=(50, 7))
        trajectories = []
        for env in envs:
            obs, _ = env.reset(seed=7)
            states = [obs["state"]]
            for action in actions:
                obs, *_ = env.step(action)
                states.append(obs["state"])
            trajectories.append(np.stack(states))
        np.testing.assert_array_equal(trajectories[0], trajectories[1])
        # A different seed picks a different init state, hence a different start.
        other, info = envs[0].reset(seed=8)
        assert info["init_state_id"] == 8
        assert not np.array_equal(other["state"], trajectories[0][0])
    finally:
        for env in envs:
            env.close()


def test_seed_spreads_tasks_and_init_states(spatial_env):
    num_tasks = len(suite_tasks("libero_spatial"))
    _, info = spatial_env.reset(seed=3)
    assert (info["task_id"], info["init_state_id"]) == (3, 0)
    _, info = spatial_env.reset(seed=num_tasks + 1)
    assert (info["task_id"], info["init_state_id"]) == (1, 1)


def test_reset_leaves_global_numpy_rng_alone(spatial_env):
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    spatial_env.reset(seed=0)
    assert np.random.random() == expected


def test_moving_the_bowl_onto_the_plate_succeeds(spatial_env):
    spatial_env.reset(options={"task_id": 0, "init_state_id": 0})
    domain = spatial_env.unwrapped.libero_env.env
    assert domain.parsed_problem["goal_state"] == [["on", "akita_black_bowl_1", "plate_1"]]
    obs, reward, terminated, truncated, info = spatial_env.step(np.zeros(7))
    assert (reward, terminated, info["is_success"]) == (0.0, False, False)

    joint = domain.objects_dict["akita_black_bowl_1"].joints[-1]
    plate_pos = domain.sim.data.body_xpos[domain.obj_body_id["plate_1"]]
    bowl_quat = domain.sim.data.get_joint_qpos(joint)[3:]
    domain.sim.data.set_joint_qpos(joint, np.concatenate([plate_pos + [0, 0, 0.03], bowl_quat]))
    domain.sim.forward()
    for _ in range(20):
        obs, reward, terminated, truncated, info = spatial_env.step(np.zeros(7))
        if terminated:
            break
    assert (reward, terminated, truncated, info["is_success"]) == (1.0, True, False, True)


def test_truncates_at_the_suite_step_limit():
    env = gym.make("LiberoSpatial-v0", max_episode_steps=5)
    try:
        env.reset(seed=0)
        flags = [env.step(np.zeros(7))[3] for _ in range(5)]
        assert flags == [False] * 4 + [True]
    finally:
        env.close()


def test_settle_steps_happen_inside_reset():
    settled = LiberoEnv(task_ids=[0])
    raw = LiberoEnv(task_ids=[0], num_settle_steps=0)
    try:
        settled.reset(options={"task_id": 0, "init_state_id": 0})
        raw.reset(options={"task_id": 0, "init_state_id": 0})
        init = task_init_states("libero_spatial", 0)[0]
        np.testing.assert_allclose(raw.libero_env.get_sim_state(), init)
        # Settling advances simulated time by exactly the settle steps.
        assert settled.libero_env.env.timestep == NUM_SETTLE_STEPS
        assert not np.allclose(settled.libero_env.get_sim_state(), init)
    finally:
        settled.close()
        raw.close()


def test_out_of_range_actions_are_clipped(spatial_env):
    results = []
    for action in ([1, -1, 1, 0, 0, 0, 1], [5, -3, 1.5, 0, 0, 0, 9]):
        spatial_env.reset(options={"task_id": 0, "init_state_id": 1})
        for _ in range(3):
            obs, *_ = spatial_env.step(np.array(action, dtype=np.float32))
        results.append(obs["state"])
    np.testing.assert_array_equal(results[0], results[1])


def test_reset_from_an_explicit_mujoco_state(spatial_env):
    spatial_env.reset(options={"task_id": 4, "init_state_id": 2})
    state = spatial_env.unwrapped.libero_env.get_sim_state()
    obs, info = spatial_env.reset(options={"task_id": 4, "init_state": state})
    assert info["init_state_id"] == -1 and info["task_id"] == 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"obs_mode": "depth"}, "unknown obs_mode 'depth': valid"),
        ({"obs_mode": "rgb", "cameras": ["frontview"]}, "unknown camera 'frontview': valid"),
        ({"obs_mode": "rgb", "cameras": []}, "needs at least one camera"),
        ({"task_ids": [12]}, "unknown task_id 12 for LiberoSpatial-v0: valid 0..9"),
        ({"image_size": 0}, "image_size"),
        ({"render_mode": "human"}, "unknown render_mode 'human'"),
        ({"max_cached_tasks": 0}, "max_cached_tasks"),
        ({"suite": "libero_nope"}, "unknown LIBERO suite"),
        ({"reflections": "no"}, r"reflections 'no' must be True \(LIBERO's look\) or False"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LiberoEnv(**kwargs)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"task_id": 10}, "unknown task_id 10 for LiberoSpatial-v0: valid 0..9"),
        ({"task_id": -1}, "unknown task_id -1"),
        ({"task_id": 0, "init_state_id": 50}, r"unknown init_state_id 50 for task 0 of LiberoSpatial-v0: valid 0..49"),
        ({"task": 0}, r"unknown reset option\(s\) \['task'\]: valid"),
        ({"task_id": 0, "init_state": np.zeros(3)}, "init_state has shape"),
    ],
)
def test_bad_reset_options(spatial_env, options, match):
    with pytest.raises(ValueError, match=match):
        spatial_env.reset(options=options)


@pytest.mark.parametrize(
    "action, match",
    [
        (np.zeros(6), r"action has shape \(6,\): expected \(7,\)"),
        (np.zeros((1, 7)), r"action has shape \(1, 7\)"),
        (np.array([0, 0, np.nan, 0, 0, 0, 0]), "NaN or inf"),
        (np.array([0, 0, 0, np.inf, 0, 0, 0]), "NaN or inf"),
    ],
)
def test_bad_actions(spatial_env, action, match):
    spatial_env.reset(seed=0)
    with pytest.raises(ValueError, match=match):
        spatial_env.step(action)


def test_step_before_reset_is_refused():
    env = LiberoEnv()
    with pytest.raises(gym.error.ResetNeeded):
        env.step(np.zeros(7))


def test_rgb_observations_and_render():
    env = gym.make("LiberoSpatial-v0", obs_mode="rgb+state", image_size=(48, 64), render_mode="rgb_array", render_size=96)
    try:
        obs, _ = env.reset(seed=0)
        assert env.observation_space.contains(obs)
        assert obs["agentview"].shape == (48, 64, 3) and obs["wrist"].shape == (48, 64, 3)
        assert obs["agentview"].dtype == np.uint8 and obs["agentview"].std() > 5  # a real picture, not a blank frame
        raw = env.unwrapped.libero_env.env.sim.render(camera_name="agentview", width=64, height=48)
        np.testing.assert_array_equal(obs["agentview"], raw[::-1, ::-1])  # rotated 180 degrees, as OpenVLA's LIBERO data
        frame = env.render()
        assert frame.shape == (96, 96, 3) and frame.dtype == np.uint8
        obs, *_ = env.step(np.zeros(7))
        assert env.observation_space.contains(obs)
    finally:
        env.close()


def test_frames_without_reflections_differ_only_by_the_mirror_image_in_the_table():
    """reflections=False skips MuJoCo's reflection pass (faster frames on a CPU renderer): the same scene, with the
    table's faint mirror image gone from the agentview frame and the wrist view nearly untouched; render() too."""
    frames = {}
    for reflections in (True, False):
        env = gym.make("LiberoSpatial-v0", obs_mode="rgb", image_size=64, reflections=reflections,
                       render_mode="rgb_array", render_size=64)  # fmt: skip
        try:
            obs, _ = env.reset(seed=0)  # render(), after the observation's frames: the choice holds for every frame
            frames[reflections] = (obs["agentview"].astype(int), obs["wrist"].astype(int), env.render().astype(int))
        finally:
            env.close()
    (agentview, wrist, render), (agentview_off, wrist_off, render_off) = frames[True], frames[False]
    changed = np.abs(agentview - agentview_off)
    assert 0.002 < (changed > 0).mean() < 0.1 and changed.mean() < 3  # a few percent of pixels, a small change
    assert np.abs(wrist - wrist_off).mean() < 0.2 and np.abs(render - render_off).mean() > 0.1


def test_privileged_object_state_is_padded_to_the_largest_scene():
    env = gym.make("LiberoSpatial-v0", privileged_state=True)
    try:
        obs, _ = env.reset(seed=0)
        raw = env.unwrapped.libero_env.env._get_observations()["object-state"]
        assert obs["object_state"].shape == env.observation_space["object_state"].shape
        np.testing.assert_allclose(obs["object_state"][: len(raw)], raw, rtol=1e-6, atol=1e-6)
        assert np.all(obs["object_state"][len(raw) :] == 0)
    finally:
        env.close()


def test_state_mode_prints_nothing():
    code = (
        "import gymnasium as gym, gym_libero_vla, numpy as np\n"
        "env = gym.make('LiberoObject-v0')\n"
        "env.reset(seed=0); env.step(np.zeros(7)); env.close()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""


def test_new_layouts_start_the_robot_spread_as_the_stored_starts_are(spatial_env):
    """LIBERO drew its stored init states with robosuite's default joint noise (0.02 rad) while its evaluation env,
    which new layouts come from, starts the robot at one pose: sample_init_state puts the noise back, on a stream of
    its own (the objects of a seed are where they are without it)."""
    from gym_libero_vla.libero_env import ROBOT_INIT_NOISE

    env = spatial_env.unwrapped
    robot = env._simulator(0).env.robots[0]
    joints = 1 + np.asarray(robot._ref_joint_pos_indexes)
    nominal = np.asarray(robot.init_qpos)

    def spread(states) -> np.ndarray:
        return np.std([state[joints] - nominal for state in states], axis=0)

    stored = spread(task_init_states("libero_spatial", 0))
    noisy = [env.sample_init_state(0, seed) for seed in range(30)]
    still = [env.sample_init_state(0, seed, robot_noise=0.0) for seed in range(30)]
    assert np.all((stored > 0.014) & (stored < 0.028)) and ROBOT_INIT_NOISE == 0.02
    assert np.all((spread(noisy) > 0.011) & (spread(noisy) < 0.03))
    np.testing.assert_allclose([state[joints] for state in still], np.tile(nominal, (30, 1)), atol=1e-9)
    others = np.ones(len(noisy[0]), dtype=bool)
    others[joints] = False
    for with_noise, without in zip(noisy, still):
        np.testing.assert_array_equal(with_noise[others], without[others])
    np.testing.assert_array_equal(noisy[3], env.sample_init_state(0, 3))
    # One layout seed gives every task draws of its own (LAYOUT_VERSION 2): not the same robot start on each.
    starts = []
    for task_id in (0, 1):
        spatial_env.reset(seed=0, options={"task_id": task_id, "layout_seed": 7})
        starts.append(env.libero_env.get_sim_state()[joints])
    assert np.abs(starts[0] - starts[1]).max() > 1e-3
    with pytest.raises(ValueError, match="robot_noise -0.1 must be >= 0"):
        env.sample_init_state(0, 0, robot_noise=-0.1)
    # LiberoEnv(robot_init_noise=0): the same layouts with the robot at one pose, as LIBERO's evaluation env has it.
    still_env = gym.make("LiberoSpatial-v0", obs_mode="state", task_ids=(0,), robot_init_noise=0.0)
    try:
        for layout_seed in (7, 8):
            spatial_env.reset(seed=0, options={"task_id": 0, "layout_seed": layout_seed})
            _, info = still_env.reset(seed=0, options={"task_id": 0, "layout_seed": layout_seed})
            noisy_start = env.libero_env.get_sim_state()
            still_start = still_env.unwrapped.libero_env.get_sim_state()
            assert info["init_state_id"] == SAMPLED_INIT_STATE
            assert np.abs(noisy_start[joints] - nominal).max() > 0.01
            assert np.abs(still_start[joints] - nominal).max() < 0.002, still_start[joints] - nominal
            # The objects are where the noisy robot's layout has them (after the gripper's two joints in qpos).
            objects = slice(joints[-1] + 3, 1 + env.libero_env.env.sim.model.nq)
            np.testing.assert_allclose(still_start[objects], noisy_start[objects], atol=1e-3)
    finally:
        still_env.close()
    with pytest.raises(ValueError, match=r"robot_init_noise -1 must be a number >= 0 .*0.02: as LIBERO's stored"):
        gym.make("LiberoSpatial-v0", obs_mode="state", robot_init_noise=-1)
