"""Demo generation: official layout, exact replay, crash-safe resume, one generator per file, raw-order images."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import gymnasium as gym
import h5py
import numpy as np
import pytest

import gym_libero_vla  # noqa: F401
from gym_libero_vla.demos import LiberoHDF5, load_episodes, replay_success
from gym_libero_vla.demos.generate import (
    DemoConfig,
    GenerateArgs,
    ReplayArgs,
    default_demo_path,
    generate,
    generator_config,
    prepare_demos,
    replay_file,
)
from gym_libero_vla.demos.scripted_expert import EXPERT_VERSION
from gym_libero_vla.libero_env import ROBOT_INIT_NOISE
from gym_libero_vla.run_lock import exclusive

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_generate_writes_official_layout(spatial_demo_file):
    with h5py.File(spatial_demo_file, "r") as f:
        data = f["data"]
        problem_info = json.loads(data.attrs["problem_info"])
        assert problem_info["language_instruction"].startswith("pick up the black bowl between")
        assert json.loads(data.attrs["env_args"])["suite"] == "libero_spatial"
        assert sorted(data) == ["demo_0", "demo_1"] and data.attrs["num_demos"] == 2
        demo = data["demo_0"]
        length = demo["actions"].shape[0]
        assert demo["actions"].shape == (length, 7)
        assert demo["robot_states"].shape == (length, 9)
        assert demo["states"].shape[0] == length
        assert demo["obs/ee_pos"].shape == (length, 3) and demo["obs/ee_ori"].shape == (length, 3)
        assert demo["obs/gripper_states"].shape == (length, 2) and demo["obs/joint_states"].shape == (length, 7)
        assert "agentview_rgb" not in demo["obs"] and "eye_in_hand_rgb" not in demo["obs"]  # state mode
        assert list(demo["dones"][()]) == [0] * (length - 1) + [1]
        assert demo.attrs["task_id"] == 0 and demo.attrs["init_state_id"] == 0 and demo.attrs["num_samples"] == length
        np.testing.assert_array_equal(demo.attrs["init_state"], demo["states"][0])
        first_state = demo["states"][0]

    # The recorded first observation and state are what the env gives for that episode's reset.
    env = gym.make("LiberoSpatial-v0", obs_mode="state", task_ids=(0,))
    try:
        from gym_libero_vla.demos.generate import episode_seed

        obs, _ = env.reset(seed=episode_seed(0, 0, 0), options={"task_id": 0, "init_state_id": 0})
        np.testing.assert_allclose(env.unwrapped.libero_env.get_sim_state(), first_state)
    finally:
        env.close()
    with LiberoHDF5(spatial_demo_file) as demos:
        np.testing.assert_allclose(demos[0].observation(0)["state"], obs["state"], atol=1e-6)


def test_replay_retraces_the_recording_exactly(spatial_demo_file):
    results = replay_file(ReplayArgs(file=str(spatial_demo_file)))
    assert [(r["demo"], r["success"], r["max_state_drift"]) for r in results] == [
        ("demo_0", True, 0.0),
        ("demo_1", True, 0.0),
    ]


def test_replay_needs_an_env_without_settle_steps(spatial_demo_file):
    env = gym.make("LiberoSpatial-v0", obs_mode="state")
    try:
        with LiberoHDF5(spatial_demo_file) as demos, pytest.raises(ValueError, match="num_settle_steps=0"):
            replay_success(env, demos[0])
    finally:
        env.close()


def test_resume_with_other_settings_is_refused(spatial_demo_file):
    args = GenerateArgs(
        suite="spatial", out=str(spatial_demo_file), task_ids=(0,), episodes_per_task=2, seed=7, progress=False
    )
    with pytest.raises(ValueError, match="different settings.*seed"):
        generate(args)


def wait_for_first_episode(process: subprocess.Popen, parts, timeout: float = 240.0) -> None:
    """Until the generator ``process`` has saved an episode into the sidecar directory ``parts``."""
    deadline = time.monotonic() + timeout
    while not (parts.exists() and any(p.suffix == ".npz" for p in parts.iterdir())):
        assert process.poll() is None, "generate exited before its first episode"
        assert time.monotonic() < deadline, f"no episode written within {timeout:.0f} s"
        time.sleep(0.2)


def test_generate_resumes_after_kill_without_redoing_episodes(tmp_path):
    out = tmp_path / "resume.hdf5"
    parts = tmp_path / "resume.hdf5.parts"
    command = [
        sys.executable,
        "-m",
        "gym_libero_vla.demos",
        "generate",
        "--suite",
        "spatial",
        "--task-ids",
        "0",
        "--episodes-per-task",
        "3",
        "--out",
        str(out),
        "--no-progress",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_first_episode(process, parts)
    finally:
        os.kill(process.pid, signal.SIGKILL)  # like a crash or a lost job
        process.wait()
    assert not out.exists(), "a killed run must not leave a (partial) HDF5 file"
    written = {p.name: p.stat().st_mtime_ns for p in parts.iterdir() if p.suffix == ".npz"}
    assert 1 <= len(written) < 3

    counts = generate(GenerateArgs(suite="spatial", out=str(out), task_ids=(0,), episodes_per_task=3, progress=False))
    assert counts["skipped"] == len(written)
    assert counts["attempts"] == 3 - len(written)
    for name, mtime in written.items():
        assert (parts / name).stat().st_mtime_ns == mtime, f"{name} was redone"
    with LiberoHDF5(out) as demos:
        assert [episode.init_state_id for episode in demos] == [0, 1, 2]
        assert all(episode.success for episode in demos)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has stopped
    except OSError:
        return False


def _children(pid: int) -> set[int]:
    """The live child processes of ``pid`` (read from /proc)."""
    children = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited meanwhile
            if int(fields[1]) == pid and fields[0] != "Z":
                children.add(int(entry))
    return children


def test_workers_stop_when_their_generator_is_killed(tmp_path):
    """A process pool's workers outlive a killed parent; ours notice and stop instead of rendering for nobody."""
    out = tmp_path / "orphans.hdf5"
    parts = tmp_path / "orphans.hdf5.parts"
    command = [sys.executable, "-m", "gym_libero_vla.demos", "generate", "--suite", "spatial", "--task-ids", "0", "1"]
    command += ["--episodes-per-task", "20", "--workers", "2", "--out", str(out), "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_first_episode(process, parts)
        # generate -> multiprocessing's forkserver (and resource tracker) -> the pool's workers
        workers = set().union(*(_children(helper) for helper in _children(process.pid)))
        assert len(workers) == 2
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    deadline = time.monotonic() + 30
    while any(_running(pid) for pid in workers):
        assert time.monotonic() < deadline, f"workers {sorted(workers)} still running 30 s after their parent was killed"
        time.sleep(0.5)
    written = sorted(p.name for p in parts.iterdir())
    time.sleep(3)
    assert sorted(p.name for p in parts.iterdir()) == written  # nobody writes any more


def test_a_second_generator_on_the_same_file_waits_then_reuses_the_episodes(tmp_path):
    """Two generators on one --out would redo the same episodes and race on the sidecar's temp files and on
    <out>.tmp. Here the test is the first generator (it holds the lock and writes the episode); a real CLI process
    started meanwhile waits, writes nothing, then skips the saved episode and only assembles the file."""
    out = tmp_path / "shared.hdf5"
    args = GenerateArgs(suite="spatial", out=str(out), task_ids=(0,), episodes_per_task=1, progress=False)
    command = [sys.executable, "-m", "gym_libero_vla.demos", "generate", "--suite", "spatial", "--task-ids", "0"]
    command += ["--episodes-per-task", "1", "--out", str(out), "--no-progress"]
    with exclusive(str(out) + ".lock", "the test"):
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        first_line = process.stdout.readline()
        assert first_line == f"demos {out}: waiting for process {os.getpid()}, which holds {out}.lock\n", first_line
        assert not (tmp_path / "shared.hdf5.parts").exists() and process.poll() is None  # blocked before any write
        counts = generate(args)  # the lock is this process's already: taken again, not waited for
        assert counts["attempts"] == 1 and counts["num_demos"] == 1
        part = tmp_path / "shared.hdf5.parts" / "task000_init0000.npz"
        written = part.stat().st_mtime_ns
    rest, _ = process.communicate(timeout=300)
    assert process.returncode == 0, rest
    assert "lock taken after" in rest
    second = json.loads(rest.strip().splitlines()[-1])
    assert (second["attempts"], second["successes"], second["num_demos"]) == (0, 0, 1)  # nothing rolled out again
    assert part.stat().st_mtime_ns == written
    with LiberoHDF5(out) as demos:
        assert [(episode.task_id, episode.init_state_id, episode.success) for episode in demos] == [(0, 0, True)]


def test_rgb_frames_are_stored_raw_and_read_upright(tmp_path):
    out = tmp_path / "rgb.hdf5"
    generate(
        GenerateArgs(
            suite="spatial",
            out=str(out),
            task_ids=(0,),
            episodes_per_task=1,
            obs_mode="rgb+state",
            image_size=32,
            progress=False,
        )
    )
    with h5py.File(out, "r") as f:
        raw_agentview = f["data/demo_0/obs/agentview_rgb"][0]
        assert f["data/demo_0/obs/eye_in_hand_rgb"].shape[1:] == (32, 32, 3)
    with LiberoHDF5(out) as demos:
        episode = demos[0]
    np.testing.assert_array_equal(episode.observations["agentview"][0], raw_agentview[::-1, ::-1])

    # The env renders the recorded first state (with the recorded seed, which fixes LIBERO's fixture
    # placement) exactly as the reader returns it: same orientation.
    env = gym.make("LiberoSpatial-v0", obs_mode="rgb", image_size=32, num_settle_steps=0)
    try:
        obs, _ = env.reset(seed=episode.seed, options={"task_id": 0, "init_state": episode.states[0]})
    finally:
        env.close()
    np.testing.assert_array_equal(obs["agentview"], episode.observations["agentview"][0])
    # The wrist camera sees the fingers up close and the finger tips' kinematics differ by ~1e-5 m after
    # set_init_state, which flips a few pixels: compare closely, and far closer than the unrotated frame.
    wrist, stored = obs["wrist"].astype(int), episode.observations["wrist"][0].astype(int)
    assert np.abs(wrist - stored).mean() < 1.0
    assert np.abs(wrist - stored[::-1, ::-1]).mean() > 10 * max(np.abs(wrist - stored).mean(), 0.1)


def test_frames_without_reflections_are_recorded_as_such_and_kept_apart(tmp_path):
    """``--no-reflections`` demos: the file says so, its frames are the no-reflection render of its states, a run
    that renders with reflections is refused, and train_sft's fresh policy takes the demos' choice."""
    out = tmp_path / "norefl.hdf5"
    generate(GenerateArgs(suite="spatial", out=str(out), task_ids=(0,), episodes_per_task=1, obs_mode="rgb+state",
                          image_size=32, reflections=False, progress=False))  # fmt: skip
    with LiberoHDF5(out) as demos:
        assert demos.env_args["env_kwargs"]["reflections"] is False and demos.reflections is False
        episode = demos[0]
    rendered = {}
    for reflections in (True, False):
        env = gym.make("LiberoSpatial-v0", obs_mode="rgb", image_size=32, num_settle_steps=0, reflections=reflections)
        try:
            obs, _ = env.reset(seed=episode.seed, options={"task_id": 0, "init_state": episode.states[0]})
        finally:
            env.close()
        rendered[reflections] = obs["agentview"]
    np.testing.assert_array_equal(rendered[False], episode.observations["agentview"][0])
    assert not np.array_equal(rendered[True], episode.observations["agentview"][0])

    with_reflections = GenerateArgs(suite="spatial", out=str(out), task_ids=(0,), obs_mode="rgb+state", image_size=32)
    with pytest.raises(ValueError, match="rendered without reflections, and this run renders them with: pass --policy.no-"):
        prepare_demos(with_reflections)
    episodes, generated = prepare_demos(dataclasses.replace(with_reflections, reflections=False))
    assert not generated and len(episodes) == 1
    assert default_demo_path("spatial", "rgb+state", 32, reflections=False) == "data/spatial_rgb32_norefl.hdf5"

    sys.path.insert(0, os.path.join(REPO, "examples"))
    try:
        import train_sft
    finally:
        sys.path.remove(os.path.join(REPO, "examples"))
    args = train_sft.Args(demo=DemoConfig(demos=str(out)), obs_mode="rgb+state", task_ids=(0,))
    args.policy = dataclasses.replace(args.policy, hidden_size=16, num_heads=2, num_layers=1)
    generate_args = train_sft.demo_args(args)  # the frames' size and reflections are the file's
    assert (generate_args.out, generate_args.image_size, generate_args.reflections) == (str(out), 32, False)
    policy = train_sft.make_policy(args, args.demo.load(generate_args)[0], [episode.instruction], generate_args)
    assert policy.config.reflections is False and policy.config.image_size == 32


def test_object_state_round_trips(tmp_path):
    """--object-state stores the env's privileged object poses beside the official keys; the reader returns them."""
    out = tmp_path / "objects.hdf5"
    generate(
        GenerateArgs(suite="spatial", out=str(out), task_ids=(0,), episodes_per_task=1, object_state=True, progress=False)
    )
    with h5py.File(out, "r") as f:
        demo = f["data/demo_0"]
        length = demo["actions"].shape[0]
        assert demo["obs/object_state"].shape[0] == length
        assert {"ee_pos", "ee_ori", "gripper_states", "joint_states"} <= set(demo["obs"])  # official keys unchanged
        stored = demo["obs/object_state"][()]

    from gym_libero_vla.demos.generate import episode_seed

    env = gym.make("LiberoSpatial-v0", obs_mode="state", task_ids=(0,), privileged_state=True)
    try:
        obs, _ = env.reset(seed=episode_seed(0, 0, 0), options={"task_id": 0, "init_state_id": 0})
    finally:
        env.close()
    assert stored.shape == (length, obs["object_state"].shape[0])
    np.testing.assert_allclose(stored[0], obs["object_state"], atol=1e-6)  # the observation before actions[0]
    assert not np.allclose(stored[0], stored[-1])  # the bowl moved

    with LiberoHDF5(out) as demos:
        episode = demos[0]
    assert set(episode.observations) == {"instruction", "state", "object_state"}
    assert episode.observations["object_state"].dtype == np.float32
    np.testing.assert_allclose(episode.observations["object_state"], stored, atol=1e-6)
    np.testing.assert_allclose(episode.observation(0)["object_state"], obs["object_state"], atol=1e-6)


def test_workers_generate_the_same_demos_side_by_side(spatial_demo_file, tmp_path):
    """Two worker processes over tasks 0 and 1 write what one process writes: the expert is seeded per episode."""
    out = tmp_path / "two_workers.hdf5"
    counts = generate(GenerateArgs(suite="spatial", out=str(out), task_ids=(0, 1), episodes_per_task=2, workers=2,
                                   progress=False))  # fmt: skip
    assert counts["num_demos"] == 4 and counts["successes"] == 4
    with LiberoHDF5(out) as demos, LiberoHDF5(spatial_demo_file) as alone:
        by_start = {(episode.task_id, episode.init_state_id): episode for episode in demos}
        assert sorted(by_start) == [(0, 0), (0, 1), (1, 0), (1, 1)]
        for episode in alone:  # the session's task-0 file, written by one process
            np.testing.assert_array_equal(by_start[(0, episode.init_state_id)].actions, episode.actions)
    with pytest.raises(ValueError, match="workers 0 must be an int >= 1"):
        generate(GenerateArgs(suite="spatial", out=str(tmp_path / "x.hdf5"), workers=0))


def test_dart_demos_label_perturbed_states_with_the_clean_expert(spatial_demo_file, tmp_path):
    """--perturb-scale (DART): the env executes noisy actions, the file records the expert's clean action at every
    state visited; the executed ones are kept, so replay still retraces the recording exactly."""
    out = tmp_path / "dart.hdf5"
    args = GenerateArgs(suite="spatial", out=str(out), task_ids=(0,), episodes_per_task=1, perturb_scale=0.3,
                        progress=False)  # fmt: skip
    assert generate(args)["num_demos"] == 1
    with LiberoHDF5(out) as demos, LiberoHDF5(spatial_demo_file) as clean:
        episode = demos[0]
        unperturbed = {demo.init_state_id: demo for demo in clean}[episode.init_state_id]  # init state 0 times out
    executed = episode.replay_state["executed_actions"]
    assert executed.shape == episode.actions.shape
    pushed = np.abs(executed[:, :3] - episode.actions[:, :3])
    assert pushed.mean() > 0.05  # the env was pushed off the expert's path...
    np.testing.assert_array_equal(executed[:, 3:], episode.actions[:, 3:])  # ...in translation only
    # Same init state and seed, so the states differ only through the perturbation, and the expert's labels answer them.
    np.testing.assert_array_equal(episode.states[0], unperturbed.states[0])
    assert not np.allclose(episode.states[20], unperturbed.states[20])
    assert [(r["success"], r["max_state_drift"]) for r in replay_file(ReplayArgs(file=str(out)))] == [(True, 0.0)]
    with h5py.File(out, "r") as f:
        config = json.loads(f["data"].attrs["generator_config"])
    assert config["perturb_scale"] == 0.3 and config["perturb_correlation"] == 0.9

    with pytest.raises(ValueError, match="different settings.*perturb_scale"):
        generate(dataclasses.replace(args, perturb_scale=0.5))
    # An attempt stops at --max-episode-steps (the suite's limit by default): a failure, kept out of the file.
    short = dataclasses.replace(args, out=str(tmp_path / "short.hdf5"), max_episode_steps=5, init_state_end=1)
    counts = generate(short)
    assert (counts["attempts"], counts["failures"], counts["num_demos"]) == (1, 1, 0)
    with open(tmp_path / "short.hdf5.parts" / "task000_init0000.json") as f:
        assert json.load(f)["num_steps"] == 5
    with pytest.raises(ValueError, match="max_episode_steps 0 must be an int >= 1"):
        generate(dataclasses.replace(short, max_episode_steps=0))
    with pytest.raises(ValueError, match="perturb_scale -0.1 must be >= 0"):
        generate(dataclasses.replace(args, out=str(tmp_path / "x.hdf5"), perturb_scale=-0.1))
    with pytest.raises(ValueError, match=r"perturb_correlation 1.0 must be in \[0, 1\)"):
        generate(dataclasses.replace(args, out=str(tmp_path / "x.hdf5"), perturb_correlation=1.0))


def test_sampled_layouts_give_new_starts_that_replay_and_count_as_held_out(spatial_demo_file, tmp_path):
    """--init-states sampled: each index is a new layout from LIBERO's placement sampler (deterministic in the seed,
    none of the suite's stored starts, premises holding), the expert solves it, replay retraces it, and a benchmark
    counts its demos as held out from any evaluation start."""
    from gym_libero_vla.episode import SAMPLED_INIT_STATE
    from gym_libero_vla.fidelity import init_predicates
    from gym_libero_vla.suites import task_init_states

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    from reporting import held_out_note

    # Task 5: its bowl must rest on the ramekin (the premise MuJoCo >= 3.4 breaks), so a draw is checked after settling.
    env = gym.make("LiberoSpatial-v0", obs_mode="state", task_ids=(5,))
    try:

        def start(layout_seed: int, seed: int = 0) -> np.ndarray:
            _, info = env.reset(seed=seed, options={"task_id": 5, "layout_seed": layout_seed})
            assert info["init_state_id"] == SAMPLED_INIT_STATE
            assert all(check.holds for check in init_predicates(env) if check.is_premise)
            return env.unwrapped.libero_env.get_sim_state().copy()

        first, again, other = start(11), start(11), start(12)
        np.testing.assert_array_equal(first, again)
        # Objects move by centimetres between layouts (the stored starts differ from each other by up to ~5 cm).
        assert 1e-3 < np.abs(first - other).max() < 0.2
        env.reset(seed=0, options={"task_id": 5, "init_state_id": 0})
        stored = env.unwrapped.libero_env.get_sim_state().copy()
        assert np.abs(first - stored).max() > 1e-3 and len(task_init_states("libero_spatial", 5)) == 50
        with pytest.raises(ValueError, match=r"reset options \['init_state_id', 'layout_seed'\] are exclusive"):
            env.reset(options={"task_id": 5, "init_state_id": 0, "layout_seed": 1})
        with pytest.raises(ValueError, match="layout_seed -1 must be an int >= 0"):
            env.reset(options={"task_id": 5, "layout_seed": -1})
        with pytest.raises(ValueError, match=r"unknown task_id 3 .*valid"):
            env.unwrapped.sample_init_state(3, 0)
    finally:
        env.close()
    # Task 3's second bowl starts on the cabinet, a fixture LIBERO re-places at every reset: its layouts are drawn as
    # from a freshly loaded model (after a soft reset the bowl landed ~30 cm off and no draw kept the premise).
    env = gym.make("LiberoSpatial-v0", obs_mode="state", task_ids=(3,))
    try:
        for layout_seed in range(3):
            env.reset(seed=layout_seed, options={"task_id": 3, "layout_seed": layout_seed})
            checks = {check.text: check for check in init_predicates(env)}
            on_cabinet = checks["(on akita_black_bowl_2 wooden_cabinet_1_top_side)"]
            assert on_cabinet.holds and on_cabinet.horizontal_offset < 0.06
    finally:
        env.close()

    out = tmp_path / "sampled.hdf5"
    args = GenerateArgs(suite="spatial", out=str(out), task_ids=(0,), episodes_per_task=2, init_states="sampled",
                        progress=False)  # fmt: skip
    counts = generate(args)
    assert counts["num_demos"] == 2 and counts["attempts"] <= 20, counts
    with LiberoHDF5(out) as demos, LiberoHDF5(spatial_demo_file) as suite_demos:
        episodes, suite_episodes = list(demos), list(suite_demos)
    assert {episode.init_state_id for episode in episodes} == {SAMPLED_INIT_STATE}
    # New scenes: no sampled start is a start of the suite's demos (init states 0 and 1 of the same task).
    for episode in episodes:
        assert min(np.abs(episode.states[0] - other.states[0]).max() for other in suite_episodes) > 1e-3
    assert [(r["success"], r["max_state_drift"]) for r in replay_file(ReplayArgs(file=str(out)))] == [(True, 0.0)] * 2
    assert held_out_note(episodes, (0,), range(50))[0]
    assert not held_out_note(suite_episodes, (0,), range(50))[0]
    with h5py.File(out, "r") as f:
        made = json.loads(f["data"].attrs["generator_config"])
        assert made["init_states"] == "sampled" and made["layout_version"] == 2
    # What a report reads: the recorded config with the start noise the file leaves out (the default) filled in.
    assert generator_config(str(out)) == {**made, "robot_init_noise": ROBOT_INIT_NOISE}
    # Parts of layouts drawn another way before (no layout_version: version 1) are not continued.
    sidecar = tmp_path / "sampled.hdf5.parts" / "config.json"
    sidecar.write_text(json.dumps({k: v for k, v in json.loads(sidecar.read_text()).items() if k != "layout_version"}))
    with pytest.raises(ValueError, match=r"different settings \{'layout_version': \(None, 2\)\}"):
        generate(args)
    # Nor are layouts with the robot at one pose (--robot-init-noise 0, recorded) continued as the default's.
    with pytest.raises(ValueError, match=r"different settings.*'robot_init_noise': \(None, 0.0\)"):
        generate(dataclasses.replace(args, robot_init_noise=0.0))
    with pytest.raises(ValueError, match=r"robot_init_noise 0.0 applies to new layouts only"):
        generate(dataclasses.replace(args, init_states="suite", robot_init_noise=0.0))
    with pytest.raises(ValueError, match=r"robot_init_noise -0.5 must be >= 0"):
        generate(dataclasses.replace(args, robot_init_noise=-0.5))
    # Training joins them to the suite-state demos; a file of another suite is refused, a missing one named.
    suite_args = GenerateArgs(suite="spatial", out=str(spatial_demo_file), task_ids=(0,), progress=False)
    joined, generated = prepare_demos(suite_args, extra_files=(str(out),))
    assert not generated and sorted(episode.init_state_id for episode in joined) == [SAMPLED_INIT_STATE] * 2 + [0, 1]
    # An extra file may hold only some of the run's tasks (more demos of the weakest), not none of them; the main
    # file must hold every task.
    two_tasks = tmp_path / "two_tasks.hdf5"
    shutil.copy(spatial_demo_file, two_tasks)
    with h5py.File(two_tasks, "r+") as f:
        f["data"]["demo_1"].attrs["task_id"] = 1  # a file with demos of tasks 0 and 1
    both_args = dataclasses.replace(suite_args, out=str(two_tasks), task_ids=(0, 1))
    joined, _ = prepare_demos(both_args, extra_files=(str(out),))
    assert [(episode.task_id, episode.init_state_id) for episode in joined] == [(0, 0), (1, 1)] + [(0, SAMPLED_INIT_STATE)] * 2
    with pytest.raises(
        ValueError,
        match=r"sampled.hdf5 has no successful demos of task\(s\) \[1\]: it has tasks \[0\].*drop it from the extra",
    ):
        prepare_demos(dataclasses.replace(both_args, task_ids=(1,)), extra_files=(str(out),))
    with pytest.raises(ValueError, match=r"has no successful demos of task\(s\) \[1\]: it has tasks \[0\].*generated"):
        prepare_demos(dataclasses.replace(suite_args, task_ids=(0, 1)))
    mislabelled = tmp_path / "object.hdf5"
    shutil.copy(out, mislabelled)
    with h5py.File(mislabelled, "r+") as f:
        f["data"].attrs["env_args"] = json.dumps({**json.loads(f["data"].attrs["env_args"]), "suite": "libero_object"})
    with pytest.raises(ValueError, match="object.hdf5 holds libero_object demos, not libero_spatial"):
        prepare_demos(suite_args, extra_files=(str(mislabelled),))
    with pytest.raises(FileNotFoundError, match="extra demo file '.*nope.hdf5' does not exist"):
        prepare_demos(suite_args, extra_files=(str(tmp_path / "nope.hdf5"),))
    with pytest.raises(ValueError, match="different settings.*init_states"):
        generate(dataclasses.replace(args, init_states="suite"))
    with pytest.raises(ValueError, match="unknown init_states 'random'.*'suite'.*'sampled'"):
        generate(dataclasses.replace(args, out=str(tmp_path / "x.hdf5"), init_states="random"))


def test_a_file_without_task_ids_takes_them_from_its_instructions(spatial_demo_file, tmp_path, write_official_file):
    """LIBERO's own files name their task only by its instruction: the training CLIs' loader finds the task id (case
    and spacing aside), and refuses, naming it and the suite's tasks, an instruction that is none of the suite's."""
    official = tmp_path / "official.hdf5"
    shutil.copy(spatial_demo_file, official)
    with h5py.File(official, "r+") as f:
        env_args = json.loads(f["data"].attrs["env_args"])
        del env_args["suite"]
        f["data"].attrs["env_args"] = json.dumps(env_args)
        for key in f["data"]:
            del f[f"data/{key}"].attrs["task_id"]
            instruction = f[f"data/{key}"].attrs.get("language_instruction")
            if instruction is not None:
                f[f"data/{key}"].attrs["language_instruction"] = "  " + str(instruction).upper()
    assert {episode.task_id for episode in load_episodes(str(official), load_images=False)} == {-1}
    config = DemoConfig(demos=str(official))
    episodes, generated = config.load(config.generate_args("unused", suite="spatial", task_ids=(0,), progress=False))
    assert not generated and [episode.task_id for episode in episodes] == [0, 0]
    with pytest.raises(ValueError, match=r"has no successful demos of task\(s\) \[1\]: it has tasks \[0\]"):
        config.load(config.generate_args("unused", suite="spatial", task_ids=(1,), progress=False))

    unknown = DemoConfig(demos=str(write_official_file(tmp_path / "other.hdf5", [np.ones((5, 7))])))
    with pytest.raises(ValueError, match=r"stores no task ids, and its instruction\(s\) \['put the bowl away'\] are none"):
        unknown.load(unknown.generate_args("unused", suite="spatial", progress=False))


def test_demo_config_is_the_one_way_runs_name_their_demos(spatial_demo_file, tmp_path):
    """DemoConfig (the training CLIs' --demos, --extra-demos, --episodes-per-task...) builds the generator's settings,
    loads the file and the extra ones, and says what a report needs; bad counts are refused by name."""
    config = DemoConfig(episodes_per_task=3, demo_init_state_end=7, extra_demos=(str(spatial_demo_file),))
    generate_args = config.generate_args(str(tmp_path / "default.hdf5"), suite="spatial", task_ids=(0,), progress=False)
    assert (generate_args.out, generate_args.episodes_per_task) == (str(tmp_path / "default.hdf5"), 3)
    assert (generate_args.init_state_start, generate_args.init_state_end) == (0, 7)
    named = dataclasses.replace(config, demos=str(spatial_demo_file), extra_demos=())
    assert named.generate_args(str(tmp_path / "default.hdf5"), suite="spatial").out == str(spatial_demo_file)

    both = dataclasses.replace(named, extra_demos=(str(spatial_demo_file),))
    generate_args = both.generate_args("unused", suite="spatial", task_ids=(0,), progress=False)
    one, generated = named.load(generate_args)
    two, _ = both.load(generate_args)
    assert not generated and len(two) == 2 * len(one) > 0  # the file is reused, the extra file's episodes join
    summary = both.summary(generate_args, two, generated)
    assert summary == {
        "path": str(spatial_demo_file), "extra_paths": [str(spatial_demo_file)], "generated_this_run": False,
        "num_demos": len(two), "num_transitions": sum(len(episode) for episode in two),
        "generator_configs": {str(spatial_demo_file): generator_config(str(spatial_demo_file))},
    }  # fmt: skip
    assert summary["generator_configs"][str(spatial_demo_file)]["expert_version"] == EXPERT_VERSION
    kept, _ = dataclasses.replace(named, filter_noops=False).load(generate_args)
    raw = load_episodes(str(spatial_demo_file), filter_noops=False, load_images=False)
    assert [len(episode) for episode in kept] == [len(episode) for episode in raw if episode.task_id == 0]
    for bad in (dict(episodes_per_task=0), dict(demo_init_state_end=-1)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} -?[0-9]+ must be an int >= 1"):
            DemoConfig(**bad)

    # --filter-stalls: a copy of the file whose first demo pressed on something for three steps (the proprio held
    # still while the open hand was commanded to move) loads without those steps; the file without them is unchanged
    stalled = tmp_path / "stalled.hdf5"
    shutil.copy(spatial_demo_file, stalled)
    with h5py.File(stalled, "r+") as f:
        actions = f["data/demo_0/actions"][()]
        start = next(t for t in range(1, len(actions)) if (actions[t - 1 : t + 4, -1] < 0).all())
        for key in ("ee_pos", "ee_ori", "gripper_states"):
            values = f[f"data/demo_0/obs/{key}"]
            values[start + 1 : start + 4] = values[start]
    stalled_config = dataclasses.replace(named, demos=str(stalled), filter_stalls=True)
    without, _ = stalled_config.load(stalled_config.generate_args("unused", suite="spatial", task_ids=(0,), progress=False))
    plain, _ = named.load(generate_args)
    assert [len(episode) for episode in without] == [len(plain[0]) - 3, *[len(episode) for episode in plain[1:]]]
    assert [len(episode) for episode in dataclasses.replace(named, filter_stalls=True).load(generate_args)[0]] == [
        len(episode) for episode in plain
    ]
    assert default_demo_path("LiberoObject-v0", "rgb+state", 128) == "data/object_rgb128.hdf5"
    assert default_demo_path("spatial", "state", 128) == "data/spatial_state.hdf5"
