"""EpisodeStore on real files: reopening, filters, eviction, crashes, a concurrent reader, corruption."""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from gym_libero_vla.episode_store import (
    EPISODES_DIRNAME,
    META_FILENAME,
    SOURCES,
    Episode,
    EpisodeStore,
    IncompatibleStoreError,
)


def make_episode(task_id=0, source="online", policy_version=0, num_steps=5, success=False, seed=0, image_size=8) -> Episode:
    rng = np.random.default_rng(seed)
    rewards = np.zeros(num_steps, dtype=np.float32)
    rewards[-1] = float(success)
    return Episode(
        observations={
            "instruction": f"task {task_id}: put the bowl on the plate",
            "state": rng.normal(size=(num_steps + 1, 8)).astype(np.float32),
            "agentview": rng.integers(0, 256, size=(num_steps + 1, image_size, image_size, 3), dtype=np.uint8),
        },
        actions=rng.uniform(-1, 1, size=(num_steps, 7)).astype(np.float32),
        rewards=rewards,
        success=success,
        task_id=task_id,
        init_state_id=seed % 50,
        policy_version=policy_version,
        source=source,
        log_probs=rng.normal(size=(num_steps, 7)).astype(np.float32),
        env_id="LiberoSpatial-v0",
    )


def assert_same_episode(loaded: Episode, original: Episode) -> None:
    assert list(loaded.observations) == list(original.observations)
    for key, value in original.observations.items():
        if isinstance(value, str):
            assert loaded.observations[key] == value
        else:
            np.testing.assert_array_equal(loaded.observations[key], value)
            assert loaded.observations[key].dtype == value.dtype
    np.testing.assert_array_equal(loaded.actions, original.actions)
    np.testing.assert_array_equal(loaded.rewards, original.rewards)
    np.testing.assert_array_equal(loaded.log_probs, original.log_probs)
    for name in ("success", "task_id", "init_state_id", "policy_version", "source", "env_id", "created_at"):
        assert getattr(loaded, name) == getattr(original, name), name


def episode_files(store: EpisodeStore) -> list[str]:
    return sorted(name for name in os.listdir(store.episodes_dir) if not name.startswith("."))


def test_append_reopen_and_load_round_trip(tmp_path):
    originals = [make_episode(task_id=t % 3, seed=t, success=t % 2 == 0) for t in range(6)]
    with EpisodeStore(tmp_path / "store") as store:
        ids = [store.append(episode) for episode in originals]
    assert ids == sorted(ids) and len(set(ids)) == 6
    reopened = EpisodeStore(tmp_path / "store")
    assert len(reopened) == 6 and reopened.num_bytes == sum(
        os.path.getsize(os.path.join(reopened.episodes_dir, f)) for f in episode_files(reopened)
    )
    for episode_id, original in zip(ids, originals):
        loaded = reopened.load(episode_id)
        assert loaded.episode_id == episode_id
        assert_same_episode(loaded, original)
    with pytest.raises(KeyError, match="no episode 999"):
        reopened.load(999)
    # Appending to the reopened store continues the ids.
    assert reopened.append(make_episode(seed=10)) > max(ids)
    # A pickled store (sent to a worker process) reopens its own connection.
    assert len(pickle.loads(pickle.dumps(reopened))) == 7


def test_sample_filters_by_task_source_version_success_and_recency(tmp_path):
    store = EpisodeStore(tmp_path)
    for i in range(12):
        source = SOURCES[i % 3]
        store.append(make_episode(task_id=i % 4, source=source, policy_version=i, success=i % 5 == 0, seed=i))
    rng = np.random.default_rng(0)
    by_task = store.sample(100, task_id=1, rng=rng)
    assert sorted(e.policy_version for e in by_task) == [1, 5, 9]  # fewer match than asked: all of them, once
    assert {e.source for e in store.sample(10, source="offline", rng=rng)} == {"offline"}
    assert {e.task_id for e in store.sample(10, task_id=[0, 2], rng=rng)} == {0, 2}
    recent = store.sample(20, min_policy_version=8, source=["online", "relabelled"], rng=rng)
    assert sorted(e.policy_version for e in recent) == [8, 9, 11]  # 10 is offline
    assert all(e.success for e in store.sample(10, success=True, rng=rng))
    newest = store.sample(3, newest=3, rng=rng)
    assert sorted(e.policy_version for e in newest) == [9, 10, 11]
    with_replacement = store.sample(30, task_id=3, replace=True, rng=rng)
    assert len(with_replacement) == 30 and {e.policy_version for e in with_replacement} == {3, 7, 11}
    # Same seed, same sample.
    draw = [e.episode_id for e in store.sample(4, rng=np.random.default_rng(5))]
    assert draw == [e.episode_id for e in store.sample(4, rng=np.random.default_rng(5))]
    assert store.sample(5, task_id=42) == []
    assert [r["policy_version"] for r in store.records(source="offline")] == [1, 4, 7, 10]
    with pytest.raises(ValueError, match=r"unknown episode source 'replay'.*'online', 'offline', 'relabelled'"):
        store.sample(1, source="replay")


def test_eviction_removes_oldest_online_first_and_keeps_offline(tmp_path):
    store = EpisodeStore(tmp_path, max_episodes=4)
    store.append(make_episode(source="offline", seed=0, policy_version=0))
    store.append(make_episode(source="offline", seed=1, policy_version=0))
    for version in range(1, 6):
        store.append(make_episode(source="online", seed=version, policy_version=version))
    assert len(store) == 4
    assert [(r["source"], r["policy_version"]) for r in store.records()] == [
        ("offline", 0),
        ("offline", 0),
        ("online", 4),
        ("online", 5),
    ]
    assert len(episode_files(store)) == 4  # evicted files are deleted
    # Offline data alone may exceed the bound; it is evicted only when configured.
    for seed in range(3):
        store.append(make_episode(source="offline", seed=10 + seed))
    assert [r["source"] for r in store.records()].count("offline") == 5
    assert len(store) == 5  # over the bound of 4: nothing evictable is left
    assert "online" not in {r["source"] for r in store.records()}
    evicting = EpisodeStore(tmp_path, max_episodes=2, evict_offline=True)
    evicting.append(make_episode(source="online", seed=20, policy_version=9))
    assert [(r["source"], r["policy_version"]) for r in evicting.records()][-1] == ("online", 9)
    assert len(evicting) == 2


def test_byte_bound_evicts_until_under_budget(tmp_path):
    store = EpisodeStore(tmp_path / "probe")
    store.append(make_episode(seed=0, image_size=32))
    episode_bytes = store.num_bytes
    bounded = EpisodeStore(tmp_path / "bounded", max_bytes=int(3.5 * episode_bytes))
    for seed in range(8):
        bounded.append(make_episode(seed=seed, image_size=32, policy_version=seed))
    assert bounded.num_bytes <= 3.5 * episode_bytes
    assert [r["policy_version"] for r in bounded.records()] == [5, 6, 7]


WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from gym_libero_vla.episode_store import Episode, EpisodeStore
    store = EpisodeStore(sys.argv[1], max_episodes=int(sys.argv[3]))
    rng = np.random.default_rng(int(sys.argv[2]))
    for i in range(10**6):
        steps = 20
        store.append(Episode(
            observations={"instruction": "put the bowl on the plate",
                          "agentview": rng.integers(0, 256, size=(steps + 1, 64, 64, 3), dtype=np.uint8),
                          "state": np.full((steps + 1, 8), i, dtype=np.float32)},
            actions=np.full((steps, 7), i, dtype=np.float32), rewards=np.zeros(steps), success=False,
            task_id=i % 3, policy_version=i))
        print(i, flush=True)
    """
)


def start_writer(path, seed, max_episodes=10**6) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(seed), str(max_episodes)], stdout=subprocess.PIPE, text=True
    )


def assert_all_episodes_complete(store: EpisodeStore) -> None:
    for record in store.records():
        episode = store.load(record["episode_id"])  # KeyError if corrupt
        version = episode.policy_version
        assert episode.observations["agentview"].shape == (21, 64, 64, 3)
        np.testing.assert_array_equal(episode.actions, np.full((20, 7), version, dtype=np.float32))
        np.testing.assert_array_equal(episode.observations["state"], np.full((21, 8), version, dtype=np.float32))


def test_writer_killed_mid_append_leaves_a_readable_store(tmp_path, caplog):
    path = tmp_path / "store"
    reported = 0
    for attempt, delay in enumerate((2.0, 2.63, 3.27)):  # kill at different points of an append
        writer = start_writer(path, seed=attempt, max_episodes=15)
        time.sleep(delay)
        os.kill(writer.pid, signal.SIGKILL)
        output, _ = writer.communicate()
        assert writer.returncode == -signal.SIGKILL
        reported += len(output.split())
        with caplog.at_level(logging.WARNING):
            store = EpisodeStore(path)
            # Every episode the writer reported is there (up to eviction), plus at most the one in flight.
            assert min(15, reported) <= len(store) <= min(15, reported + 1)
            assert_all_episodes_complete(store)
        store.close()
    assert reported >= 3, "the writer never finished an append: the test proves nothing"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # Each kill leaves at most one unindexed file (the episode being written, or the one just evicted), kept while
    # young in case a live writer owns it; once past the grace period, remove_orphans deletes exactly those.
    store = EpisodeStore(path)
    orphans = len(episode_files(store)) - len(store)
    assert 0 <= orphans <= 3
    assert store.remove_orphans(grace_s=0) >= orphans  # hidden temp files count too
    assert len(episode_files(store)) == len(store)
    assert_all_episodes_complete(store)


def test_reader_process_samples_while_a_writer_appends(tmp_path):
    path = tmp_path / "store"
    store = EpisodeStore(path)  # the reader (this process) opens first; the writer reuses the store
    writer = start_writer(path, seed=0, max_episodes=8)
    try:
        seen_ids: set[int] = set()
        counts = []
        deadline = time.monotonic() + 60
        while len(seen_ids) < 12 and time.monotonic() < deadline:
            batch = store.sample(4, rng=np.random.default_rng(len(counts)))
            for episode in batch:
                np.testing.assert_array_equal(episode.actions, np.full((20, 7), episode.policy_version, dtype=np.float32))
                seen_ids.add(episode.episode_id)
            counts.append(len(store))
            time.sleep(0.05)
        assert len(seen_ids) >= 12, f"the reader saw only {len(seen_ids)} distinct episodes"
        assert max(counts) <= 8 and counts[-1] >= 1  # eviction commits with the append
    finally:
        writer.kill()
        writer.communicate()
    assert_all_episodes_complete(EpisodeStore(path))


def test_incompatible_version_and_foreign_directory_refuse_to_open(tmp_path):
    EpisodeStore(tmp_path / "store").append(make_episode())
    meta_path = tmp_path / "store" / META_FILENAME
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 2
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(IncompatibleStoreError, match="version 2.*reads 'gym_libero_vla.EpisodeStore' version 1"):
        EpisodeStore(tmp_path / "store")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a store")
    with pytest.raises(IncompatibleStoreError, match="not an episode store"):
        EpisodeStore(tmp_path / "other")


def test_corrupt_episode_is_skipped_with_a_warning_and_dropped(tmp_path, caplog):
    store = EpisodeStore(tmp_path)
    ids = [store.append(make_episode(seed=seed, policy_version=seed, image_size=16)) for seed in range(5)]
    files = {r["episode_id"]: r["file"] for r in store.records()}
    truncated = os.path.join(store.episodes_dir, files[ids[1]])
    with open(truncated, "r+b") as file:
        file.truncate(os.path.getsize(truncated) // 2)
    flipped = os.path.join(store.episodes_dir, files[ids[3]])
    content = bytearray(open(flipped, "rb").read())
    content[len(content) // 3] ^= 0xFF  # one bit-flipped byte inside compressed image data
    open(flipped, "wb").write(bytes(content))
    with caplog.at_level(logging.WARNING, logger="gym_libero_vla.episode_store"):
        episodes = store.sample(10, rng=np.random.default_rng(0))
    assert sorted(e.policy_version for e in episodes) == [0, 2, 4]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("corrupt episode" in w for w in warnings)
    assert store.episode_ids() == [ids[0], ids[2], ids[4]]
    assert sorted(os.listdir(tmp_path / "corrupt")) == sorted([files[ids[1]], files[ids[3]]])
    with pytest.raises(KeyError):
        store.load(ids[1])


def test_invalid_episodes_and_bounds_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown episode source 'replay': valid \('online', 'offline', 'relabelled'\)"):
        make_episode(source="replay")
    episode = make_episode()
    with pytest.raises(ValueError, match=r"rewards have shape \(4,\): expected \(5,\)"):
        Episode(episode.observations, episode.actions, episode.rewards[:4], False, 0)
    with pytest.raises(ValueError, match="observation 'state' has shape"):
        Episode({"state": np.zeros((9, 8))}, episode.actions, episode.rewards, False, 0)
    with pytest.raises(ValueError, match="max_episodes 0 must be a positive int"):
        EpisodeStore(tmp_path, max_episodes=0)
    assert not os.path.exists(tmp_path / EPISODES_DIRNAME)  # validation happens before touching the disk


# ---------------------------------------------------------------------- groups (the asynchronous GRPO pipeline)
def test_groups_go_in_atomically_and_are_listed_in_commit_order(tmp_path):
    store = EpisodeStore(tmp_path / "store")
    first = [make_episode(seed=i, policy_version=3, success=i == 0) for i in range(3)]
    relabelled = make_episode(seed=9, source="relabelled", policy_version=3)
    for episode in first + [relabelled]:
        episode.group_id = "a"
    ids = store.append_many(first + [relabelled])
    assert ids == list(range(ids[0], ids[0] + 4))  # one transaction: consecutive ids
    store.append(make_episode(seed=5))  # in no group
    second = [make_episode(seed=i, policy_version=4) for i in range(3)]
    for episode in second:
        episode.group_id = "b"
    store.append_many(second)
    groups = store.groups()
    assert [group["group_id"] for group in groups] == ["a", "b"]
    assert groups[0]["episode_ids"] == ids and groups[0]["num_online"] == 3 and groups[0]["num_successes"] == 1
    assert groups[0]["num_steps"] == 15 and groups[0]["policy_version"] == 3 and groups[1]["policy_version"] == 4
    assert [group["group_id"] for group in store.groups(after_episode_id=groups[0]["last_episode_id"])] == ["b"]
    assert store.load(ids[0]).group_id == "a" and store.load(groups[1]["episode_ids"][0]).group_id == "b"
    assert EpisodeStore(tmp_path / "store").records()[-1]["group_id"] == "b"


def test_a_store_written_before_groups_gets_the_column_on_open(tmp_path):
    import sqlite3

    path = tmp_path / "old"
    EpisodeStore(path).append(make_episode(seed=1))
    with sqlite3.connect(path / "index.sqlite") as db:  # the version-1 schema had no group_id column
        db.execute("DROP INDEX episodes_by_group")
        db.execute("ALTER TABLE episodes DROP COLUMN group_id")
    reopened = EpisodeStore(path)
    assert reopened.records()[0]["group_id"] is None and reopened.load(reopened.episode_ids()[0]).group_id is None
    reopened.append_many([make_episode(seed=2)])
    assert len(reopened) == 2 and reopened.groups() == []


GROUP_WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from gym_libero_vla.episode_store import Episode, EpisodeStore
    store = EpisodeStore(sys.argv[1])
    rng = np.random.default_rng(0)
    for i in range(10**6):
        group = [Episode(observations={"instruction": "put the bowl on the plate",
                                       "agentview": rng.integers(0, 256, size=(21, 64, 64, 3), dtype=np.uint8)},
                         actions=np.zeros((20, 7), np.float32), rewards=np.zeros(20), success=False, task_id=0,
                         group_id=f"group{i}") for _ in range(4)]
        store.append_many(group)
        print(i, flush=True)
    """
)


def test_writer_killed_mid_group_leaves_only_whole_groups(tmp_path):
    path = tmp_path / "store"
    writer = subprocess.Popen([sys.executable, "-c", GROUP_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    time.sleep(3.0)
    os.kill(writer.pid, signal.SIGKILL)
    output, _ = writer.communicate()
    reported = len(output.split())
    assert reported >= 2, "the writer never finished a group: the test proves nothing"
    store = EpisodeStore(path)
    groups = store.groups()
    assert reported <= len(groups) <= reported + 1  # the group in flight is all there or not at all
    assert all(group["num_online"] == 4 for group in groups) and len(store) == 4 * len(groups)
