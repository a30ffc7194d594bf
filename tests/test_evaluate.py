"""gym_libero_vla.evaluate rolls a saved policy out in the real simulator and writes its report files."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading

import gymnasium as gym
import numpy as np
import pytest
import tyro

from gym_libero_vla.evaluate import (
    EvalArgs,
    EvalRange,
    difference_interval,
    env_kwargs_for_policy,
    evaluate_policy,
    layout_starts,
    main,
    make_eval_envs,
    paired_difference_interval,
    read_episode_rows,
    wilson_interval,
)
from gym_libero_vla.libero_env import LAYOUT_VERSION
from gym_libero_vla.policies import CompactVLA, CompactVLAConfig, WordTokenizer
from gym_libero_vla.policies.base import weights_fingerprint
from gym_libero_vla.rollouts import Start, run_episodes
from gym_libero_vla.wrappers.action_tokenizer import ActionBins


def tiny_policy(object_state_dim: int = 0, **config) -> CompactVLA:
    config = CompactVLAConfig(**{"cameras": (), "object_state_dim": object_state_dim, "hidden_size": 16, "num_layers": 1,
                                 "num_heads": 2, **config})  # fmt: skip
    bins = ActionBins(low=-np.ones(7, np.float32), high=np.ones(7, np.float32), num_bins=16)
    return CompactVLA(config, bins, WordTokenizer.from_texts(["pick up the black bowl and place it on the plate"]))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("policy") / "tiny"
    tiny_policy(object_state_dim=70).save_pretrained(path)
    return str(path)


def test_writes_table_json_plot_and_video(checkpoint, tmp_path, capsys):
    out_dir = tmp_path / "eval"
    args = EvalArgs(
        checkpoint=checkpoint, suite="spatial", task_ids=(0,), init_states=(20, 21), max_episode_steps=4,
        video_episodes=1, out_dir=str(out_dir), progress=False,
    )  # fmt: skip
    results = main(args)
    assert [(e["task_id"], e["init_state_id"]) for e in results["episodes"]] == [(0, 20), (0, 21)]
    assert all(e["length"] <= 4 for e in results["episodes"])
    with open(out_dir / "success.json") as file:
        saved = json.load(file)
    assert saved["per_task"]["0"]["episodes"] == 2 and 0.0 <= saved["success_rate"] <= 1.0
    assert "| task | instruction |" in (out_dir / "success.md").read_text()
    assert "| task | instruction |" in capsys.readouterr().out
    assert (out_dir / "success.png").read_bytes()[:4] == b"\x89PNG"
    (video,) = results["videos"]
    assert video.endswith(".mp4") and os.path.getsize(video) > 0

    # --resume: episodes go to episodes.jsonl as they finish; the same command again runs none of them.
    resumed = dataclasses.replace(args, video_episodes=0, resume=True)
    first = main(resumed)
    assert first["run_now"] == 2 and len((out_dir / "episodes.jsonl").read_text().splitlines()) == 2
    again = main(resumed)
    assert again["run_now"] == 0 and again["episodes"] == first["episodes"]
    with pytest.raises(ValueError, match="--resume continues greedy evaluations only"):
        main(dataclasses.replace(resumed, deterministic=False))


class StepLog(gym.Wrapper):
    """Observer for the test: every episode's (task, init state, seed) and the states and actions it went through."""

    def __init__(self, env, log: dict):
        super().__init__(env)
        self.log, self.key, self.tasks = log, None, []

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)
        self.key = (options["task_id"], options["init_state_id"], seed)
        self.tasks.append(options["task_id"])
        self.log[self.key] = [obs["state"].copy()]
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.log[self.key] += [np.asarray(action).copy(), obs["state"].copy()]
        return obs, reward, terminated, truncated, info


def test_batched_episodes_are_the_sequential_ones():
    """Envs side by side with one batched policy call per step run exactly the episodes one env runs one by one:
    same states, same actions, same outcome, for every (task, init state, seed)."""
    policy = tiny_policy(object_state_dim=70).eval()
    starts = [Start(task_id, init_state_id, seed) for task_id in (0, 3) for init_state_id in (20, 21) for seed in (0, 1)]
    kwargs = {"max_episode_steps": 12, **env_kwargs_for_policy(policy)}
    sequential, batched = {}, {}
    env = StepLog(gym.make("LiberoSpatial-v0", task_ids=(0, 3), **kwargs), sequential)
    one_by_one = {rollout.index: rollout for rollout in run_episodes(policy, env, starts, deterministic=True)}
    env.close()
    envs = [StepLog(env, batched) for env in make_eval_envs("LiberoSpatial-v0", 3, (0, 3), **kwargs)]
    results = list(run_episodes(policy, envs, starts, deterministic=True))
    for env in envs:
        env.close()
    assert sorted(rollout.index for rollout in results) == list(range(len(starts)))  # each start once
    for rollout in results:
        episode, alone = rollout.episode, one_by_one[rollout.index].episode
        start = starts[rollout.index]
        assert (episode.task_id, episode.init_state_id, episode.seed) == (start.task_id, start.init_state_id, start.seed)
        assert (episode.success, episode.num_steps) == (alone.success, alone.num_steps)
        np.testing.assert_allclose(episode.actions, alone.actions)
        np.testing.assert_allclose(episode.observations["state"], alone.observations["state"], atol=1e-6)
    assert sequential.keys() == batched.keys()
    for start in starts:
        run = (start.task_id, start.init_state_id, start.seed)
        assert len(batched[run]) == len(sequential[run]) == 2 * 12 + 1
        np.testing.assert_allclose(np.concatenate(batched[run]), np.concatenate(sequential[run]), atol=1e-6)
    assert all(rollout.seconds > 0 for rollout in results)
    # The envs spread over the tasks (the most runs left per env on it) and keep to theirs while it has runs left:
    # task 0's two envs run out first, and one of them moves to task 3 (the only task switch).
    assert [env.tasks[0] for env in envs] == [0, 3, 0]
    assert [len(set(env.tasks)) for env in envs] == [2, 1, 1]


def test_evaluate_policy_results_do_not_depend_on_num_envs():
    policy = tiny_policy()
    one, three = (
        evaluate_policy(policy, "LiberoSpatial-v0", (1, 2), (20, 21), max_episode_steps=5, progress=False, num_envs=n)
        for n in (1, 3)
    )
    drop_seconds = [{key: value for key, value in episode.items() if key != "seconds"} for episode in one["episodes"]]
    assert drop_seconds == [{key: value for key, value in e.items() if key != "seconds"} for e in three["episodes"]]
    assert [(e["task_id"], e["init_state_id"]) for e in three["episodes"]] == [(1, 20), (1, 21), (2, 20), (2, 21)]
    with pytest.raises(ValueError, match="num_envs 0 must be an int >= 1"):
        make_eval_envs("LiberoSpatial-v0", 0)
    for num_runs, expected in ((2, 2), (0, 1)):  # no env that would sit idle, and always one
        envs = make_eval_envs("LiberoSpatial-v0", 3, (1,), num_runs=num_runs)
        assert len(envs) == expected
        for env in envs:
            env.close()
    with pytest.raises(ValueError, match="no envs"):
        next(run_episodes(policy, [], [Start(0, 20, 0)]))


def test_async_evaluation_runs_in_worker_processes_with_the_same_episodes():
    # Each env in a worker process (both cores busy): the same rows as in-process envs, and the episodes start
    # where their starts say (their observations match an in-process env's, step for step).
    policy = tiny_policy(object_state_dim=70)
    kwargs = dict(max_episode_steps=5, progress=False, num_envs=2)
    sync, async_ = (
        evaluate_policy(policy, "LiberoSpatial-v0", (1, 2), (20, 21), vectorization_mode=mode, **kwargs)
        for mode in ("sync", "async")
    )
    drop_seconds = [{key: value for key, value in e.items() if key != "seconds"} for e in sync["episodes"]]
    assert drop_seconds == [{key: value for key, value in e.items() if key != "seconds"} for e in async_["episodes"]]
    starts = [Start(1, 20, 0), Start(2, 21, 0), Start(1, 21, 0)]
    env_kwargs = env_kwargs_for_policy(policy, 3)
    vector_env = make_eval_envs("LiberoSpatial-v0", 2, (1, 2), vectorization_mode="async", **env_kwargs)
    assert isinstance(vector_env, gym.vector.VectorEnv) and vector_env.num_envs == 2
    envs = make_eval_envs("LiberoSpatial-v0", 1, (1, 2), **env_kwargs)
    try:
        in_workers = {r.index: r.episode for r in run_episodes(policy, vector_env, starts, deterministic=True)}
        in_process = {r.index: r.episode for r in run_episodes(policy, envs, starts, deterministic=True)}
    finally:
        vector_env.close()
        envs[0].close()
    for index in range(len(starts)):
        np.testing.assert_allclose(in_workers[index].observations["object_state"],
                                   in_process[index].observations["object_state"], atol=1e-6)  # fmt: skip
    with pytest.raises(ValueError, match=r"unknown vectorization_mode 'threads': valid \('sync', 'async'\)"):
        evaluate_policy(policy, "LiberoSpatial-v0", (1,), (20,), vectorization_mode="threads", progress=False)


def test_evaluation_resumes_from_its_episodes_file(tmp_path):
    """Each episode is appended as it ends; a second call with more starts runs only the new ones, and a policy
    with other weights runs everything again."""
    policy = tiny_policy(object_state_dim=70)
    path = str(tmp_path / "episodes.jsonl")
    first = evaluate_policy(policy, "LiberoSpatial-v0", (0,), (20,), max_episode_steps=6, progress=False, episodes_path=path)
    assert first["run_now"] == 1 and len(read_episode_rows(path)) == 1
    with open(path, "a") as file:
        file.write('{"task_id": 0, "init_st')  # a kill in the middle of a line
    second = evaluate_policy(
        policy, "LiberoSpatial-v0", (0,), (20, 21), max_episode_steps=6, progress=False, episodes_path=path
    )
    assert second["run_now"] == 1 and second["episodes"][0] == first["episodes"][0]
    rows = read_episode_rows(path)
    assert len(rows) == 2 and {row["policy_sha"] for row in rows} == {weights_fingerprint(policy)}
    other = tiny_policy(object_state_dim=70)  # other random weights
    assert evaluate_policy(other, "LiberoSpatial-v0", (0,), (20, 21), max_episode_steps=6, progress=False,
                           episodes_path=path)["run_now"] == 2  # fmt: skip
    with pytest.raises(ValueError, match="deterministic evaluations only"):
        evaluate_policy(policy, "LiberoSpatial-v0", (0,), (20,), deterministic=False, episodes_path=path)


def test_new_layouts_are_evaluated_resumed_and_kept_apart_from_stored_starts(checkpoint, tmp_path):
    """--layouts N starts every task from N new layouts (LIBERO's sampler, seeds from 2^31: none a demo or GRPO group
    uses); their episodes carry the layout seed, resume by it, and never stand in for a stored init state's."""
    out_dir = tmp_path / "eval"
    run = dict(checkpoint=checkpoint, suite="spatial", task_ids=(0,), max_episode_steps=4, out_dir=str(out_dir),
               progress=False, resume=True)  # fmt: skip
    first = main(EvalArgs(**run, layouts=2, video_episodes=1))
    assert [(e["init_state_id"], e["layout_seed"]) for e in first["episodes"]] == [(-2, 2**31), (-2, 2**31 + 1)]
    assert first["layout_seeds"] == [2**31, 2**31 + 1] and first["run_now"] == 2
    table = (out_dir / "success.md").read_text()
    assert table.startswith(
        "Success on LiberoSpatial-v0: 2 new layouts per task (layout version 2, layout seeds 2147483648, 2147483649)"
    )
    [video] = first["videos"]
    assert os.path.basename(video).startswith("task00_layout2147483648_seed0_")
    more = main(EvalArgs(**run, layouts=3, video_episodes=0))
    assert more["run_now"] == 1 and more["episodes"][:2] == first["episodes"]  # only the third layout ran
    stored = main(EvalArgs(**run, init_states=(20,), video_episodes=0))
    assert stored["run_now"] == 1 and "layout_seed" not in stored["episodes"][0] and "layout_seeds" not in stored
    rows = read_episode_rows(str(out_dir / "episodes.jsonl"))
    assert [row.get("layout_seed") for row in rows] == [2**31, 2**31 + 1, 2**31 + 2, None]
    assert [row.get("layout_version") for row in rows] == [LAYOUT_VERSION] * 3 + [None] and LAYOUT_VERSION == 2
    # A layout episode recorded before layouts were drawn this way (no layout_version: version 1) began elsewhere.
    with open(out_dir / "episodes.jsonl", "a") as file:
        file.write(json.dumps({**{k: v for k, v in rows[0].items() if k != "layout_version"}, "layout_seed": 2**31 + 3}))
        file.write("\n")
    assert main(EvalArgs(**run, layouts=4, video_episodes=0))["run_now"] == 1
    starts = layout_starts((0, 3), 2, seeds=(0, 1))
    assert [(s.task_id, s.layout_seed - 2**31, s.seed) for s in starts] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (3, 0, 0), (3, 0, 1), (3, 1, 0), (3, 1, 1)
    ]  # fmt: skip
    assert starts[0].options == {"task_id": 0, "layout_seed": 2**31}
    with pytest.raises(ValueError, match="layouts -1 must be >= 0: N new layouts per task, or 0 for the stored"):
        main(EvalArgs(**run, layouts=-1))
    with pytest.raises(ValueError, match="--layouts starts from new layouts, --init-states from stored ones: give one"):
        main(EvalArgs(**run, layouts=1, init_states=(20,)))
    with pytest.raises(ValueError, match="layouts 0 must be an int >= 1"):
        layout_starts((0,), 0)
    with pytest.raises(ValueError, match="layouts 2 and starts exclude each other"):
        evaluate_policy(tiny_policy(object_state_dim=70), "LiberoSpatial-v0", starts=starts, layouts=2)
    assert len(read_episode_rows(str(out_dir / "episodes.jsonl"))) == 6  # refused before any episode


def test_a_receding_horizon_is_evaluated_as_another_behaviour(tmp_path):
    """The same weights executing fewer actions of each chunk act differently: their recorded episodes are not reused
    for the full-chunk policy (nor the other way), and the CLI's --execute-steps sets the horizon."""
    config = CompactVLAConfig(cameras=(), object_state_dim=70, hidden_size=16, num_layers=1, num_heads=2, chunk_size=4)
    bins = ActionBins(low=-np.ones(7, np.float32), high=np.ones(7, np.float32), num_bins=16)
    policy = CompactVLA(config, bins, WordTokenizer.from_texts(["pick up the black bowl and place it on the plate"]))
    path = str(tmp_path / "episodes.jsonl")
    run = dict(max_episode_steps=8, progress=False, episodes_path=path)
    assert evaluate_policy(policy, "LiberoSpatial-v0", (0,), (20,), **run)["run_now"] == 1
    policy.set_execute_steps(2)
    assert policy.execute_steps == 2 and env_kwargs_for_policy(policy)["action_chunk"] == 2
    assert evaluate_policy(policy, "LiberoSpatial-v0", (0,), (20,), **run)["run_now"] == 1  # not the full chunk's
    assert evaluate_policy(policy, "LiberoSpatial-v0", (0,), (20,), **run)["run_now"] == 0  # its own, reused
    policy.set_execute_steps(None)
    assert policy.execute_steps == 4
    assert evaluate_policy(policy, "LiberoSpatial-v0", (0,), (20,), **run)["run_now"] == 0
    weights = weights_fingerprint(policy)
    assert [row["policy_sha"] for row in read_episode_rows(path)] == [weights, f"{weights}-execute2"]
    for bad in (0, 5):
        with pytest.raises(ValueError, match=rf"execute_steps {bad} must be None or an int in 1..chunk_size \(4\)"):
            policy.set_execute_steps(bad)
    with pytest.raises(ValueError, match=r"execute_steps 2 must be None or an int in 1..chunk_size \(1\)"):
        tiny_policy().set_execute_steps(2)  # one action per query: no chunk to cut
    policy.save_pretrained(tmp_path / "chunked")
    results = main(EvalArgs(checkpoint=str(tmp_path / "chunked"), suite="spatial", task_ids=(0,), init_states=(20,),
                            max_episode_steps=8, execute_steps=3, video_episodes=0, out_dir=str(tmp_path / "eval"),
                            progress=False))  # fmt: skip
    assert results["execute_steps"] == 3 and results["episodes"][0]["length"] <= 8
    with pytest.raises(ValueError, match=r"execute_steps 9 must be None or an int in 1..chunk_size \(4\)"):
        main(EvalArgs(checkpoint=str(tmp_path / "chunked"), suite="spatial", execute_steps=9, progress=False))


# Another evaluator: holds the lock of the episodes file argv[1] until a line arrives on stdin, then appends the
# row argv[2] (its episode) and lets go.
OTHER_EVALUATOR = """
import sys
from gym_libero_vla.run_lock import exclusive
with exclusive(sys.argv[1] + ".lock", "other evaluator"):
    print("held", flush=True)
    sys.stdin.readline()
    with open(sys.argv[1], "a") as file:
        file.write(sys.argv[2] + "\\n")
"""


def test_evaluation_waits_for_another_process_on_the_same_episodes_file_then_reuses_its_episodes(tmp_path):
    episodes_path = str(tmp_path / "episodes.jsonl")
    policy = tiny_policy(object_state_dim=70)
    row = {"task_id": 0, "init_state_id": 20, "seed": 0, "success": True, "length": 7, "seconds": 0.5,
           "policy_sha": weights_fingerprint(policy), "max_episode_steps": 30, "num_envs": 1}  # fmt: skip
    other = subprocess.Popen([sys.executable, "-c", OTHER_EVALUATOR, episodes_path, json.dumps(row)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert other.stdout.readline() == "held\n"
        release = threading.Timer(1.0, lambda: (other.stdin.write("\n"), other.stdin.flush()))
        release.start()
        results = evaluate_policy(
            policy, "LiberoSpatial-v0", (0,), (20,), max_episode_steps=30, progress=False, episodes_path=episodes_path
        )
        release.join()
    finally:
        other.kill()
        other.wait()
    # it waited for the other process rather than running the episode itself, then took the other's row
    assert results["run_now"] == 0 and results["episodes"] == [{key: row[key] for key in results["episodes"][0]}]
    assert len(read_episode_rows(episodes_path)) == 1


def test_env_follows_what_the_policy_reads():
    assert env_kwargs_for_policy(tiny_policy()) == {"obs_mode": "state"}
    assert env_kwargs_for_policy(tiny_policy(object_state_dim=70)) == {"obs_mode": "state", "privileged_state": True}
    pixels = tiny_policy(cameras=("agentview",), image_size=32, reflections=False)  # rendered as it was trained
    assert env_kwargs_for_policy(pixels) == {"obs_mode": "rgb+state", "cameras": ("agentview",), "image_size": 32,
                                             "reflections": False}  # fmt: skip


def test_bad_suite_task_and_init_state_name_the_valid_choices(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="unknown LIBERO suite 'nope'"):
        main(EvalArgs(checkpoint=checkpoint, suite="nope", out_dir=str(tmp_path), progress=False))
    with pytest.raises(ValueError, match="unknown task_id 12 for LiberoSpatial-v0: valid 0..9"):
        main(EvalArgs(checkpoint=checkpoint, task_ids=(12,), init_states=(0,), out_dir=str(tmp_path), progress=False))
    with pytest.raises(ValueError, match="unknown init_state_id 99 for task 0 of LiberoSpatial-v0: valid 0..49"):
        main(EvalArgs(checkpoint=checkpoint, task_ids=(0,), init_states=(99,), out_dir=str(tmp_path), progress=False))
    # the range every evaluating CLI shares (--eval-init-state-start, --eval-num-init-states)
    flags = tyro.cli(EvalArgs, args=[checkpoint, "--eval-init-state-start", "45", "--eval-num-init-states", "6"])
    assert flags.eval == EvalRange(eval_init_state_start=45, eval_num_init_states=6)
    with pytest.raises(ValueError, match="unknown init_state_id 50 for task 0 of LiberoSpatial-v0: valid 0..49"):
        main(dataclasses.replace(flags, task_ids=(0,), out_dir=str(tmp_path), progress=False))
    for bad, message in ((EvalRange(eval_num_init_states=0), "eval_num_init_states 0 must be an int >= 1"),
                         (EvalRange(eval_init_state_start=-1), "eval_init_state_start -1 must be an int >= 0")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            main(EvalArgs(checkpoint=checkpoint, eval=bad, out_dir=str(tmp_path), progress=False))
    with pytest.raises(ValueError, match=r"eval_init_state_start 10 lies inside the training init states 0..19 .*>= 20"):
        EvalRange(eval_init_state_start=10).check_held_out(20)
    EvalRange(eval_init_state_start=20).check_held_out(20)
    assert not os.listdir(tmp_path)  # refused before any episode


def test_wilson_interval_matches_hand_computed_values():
    # 8/10, z = 1.96: center (0.8 + 0.19208) / 1.38416 = 0.71674, half 1.96 * sqrt(0.016 + 0.009604) / 1.38416 = 0.22658
    assert wilson_interval(8, 10) == pytest.approx((0.49016, 0.94332), abs=1e-4)
    # 0/10: center = half = 0.19208 / 1.38416, so the interval starts at 0 and is not empty
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27754), abs=1e-4)
    low, high = wilson_interval(20, 20)
    assert high == 1.0 and 0.8 < low < 0.85
    with pytest.raises(ValueError, match="n 0 must be an int >= 1"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="successes 11 must be in 0..10"):
        wilson_interval(11, 10)


def test_paired_difference_interval_uses_the_pairing_and_keeps_strata():
    # B succeeds on 40 of 200 starts; A on the same 40 and 10 more. Counted as independent samples (Newcombe) the
    # +0.05 is within noise; paired, A never does worse on a start, and the interval excludes 0.
    b = np.array([1.0] * 40 + [0.0] * 160)
    a = b.copy()
    a[40:50] = 1.0
    low, high = paired_difference_interval(a - b)
    assert 0.0 < low < 0.05 < high < 0.1
    assert difference_interval(50, 200, 40, 200)[0] < 0.0
    assert paired_difference_interval(a - b) == (low, high)  # seeded: a report is reproducible
    # Within strata the resampled starts keep each stratum's count: 4 starts at +1, 4 at 0 always average 0.5.
    differences, tasks = [1.0] * 4 + [0.0] * 4, [0] * 4 + [1] * 4
    assert paired_difference_interval(differences, tasks) == (0.5, 0.5)
    low, high = paired_difference_interval(differences)  # unstratified, the mean varies
    assert low < 0.5 < high
    assert paired_difference_interval(np.zeros(20)) == (0.0, 0.0)
    with pytest.raises(ValueError, match="differences must be a non-empty 1-D sequence"):
        paired_difference_interval([])
    with pytest.raises(ValueError, match="strata has shape \\(3,\\), differences \\(2,\\)"):
        paired_difference_interval([0.0, 1.0], [0, 0, 1])
    with pytest.raises(ValueError, match="confidence 1.5 must lie in"):
        paired_difference_interval([0.0, 1.0], confidence=1.5)
