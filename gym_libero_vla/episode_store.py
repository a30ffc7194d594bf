"""A persistent episode store on disk: rollout sources append finished episodes, learners sample them.

This is the trajectory cache of an asynchronous RL pipeline (RLinf-USER's "persistent, cache-aware
buffer"): one process rolls out a policy and appends episodes (online), demos (offline) and hindsight
relabelled episodes go into the same store, and a learner process samples them by task, source and
policy version while the writer keeps appending. The store outlives both processes, so a crashed or
restarted run picks up its data.

Layout of a store directory::

    store.json          format name and version; an incompatible version refuses to open
    index.sqlite        one row per episode: id, file, task, source, policy version, success, size, time, group
    episodes/<uuid>.npz one compressed numpy archive per episode (arrays + a JSON metadata record)

Why trust it:
- Appends are atomic. The episode file is written under a temporary name, fsynced and ``os.replace``d
  into place (atomic on POSIX), and only then is its index row inserted, in one SQLite transaction. A
  ``kill -9`` at any point leaves either no row (the episode in flight is lost; its file, if any, is an
  invisible orphan, removed when a later writer opens the store) or a row whose file is complete.
  Evicted files are deleted only after the transaction that removes their rows commits.
- SQLite in WAL mode is built for exactly one writer with concurrent readers across processes: a
  reader sees the last committed state and never blocks the writer; transactions survive process
  crashes. No server, no extra dependency (``sqlite3`` ships with Python).
- ``.npz`` files are zip archives with a CRC-32 per array, and every file carries its own metadata, so a
  damaged file is detected on read: it is skipped with a logged warning, moved to ``corrupt/`` and
  dropped from the index, instead of crashing a learner or handing it garbage.
- Episode ids are SQLite ``AUTOINCREMENT`` keys: increasing in insertion order, never reused after
  eviction, so "oldest" and "newest" are well defined.
- Groups are atomic too. :meth:`EpisodeStore.append_many` writes the files of several episodes (a GRPO
  group: the ``group_size`` rollouts of one (task, init state), tagged with one ``group_id``) and then
  inserts all their rows in one transaction: a reader sees the whole group or none of it, and the ids of
  one group are consecutive. :meth:`EpisodeStore.groups` lists the stored groups in commit order, so an
  asynchronous learner can consume them FIFO behind a single "consumed through episode id" watermark.

Bounded size: ``max_episodes`` and/or ``max_bytes``; on append, the writer evicts the oldest episodes
whose source is evictable (online and relabelled; offline too only with ``evict_offline=True``),
never the episode it just appended. Offline data alone may therefore exceed the bounds.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
import uuid
import zipfile
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from gym_libero_vla.episode import SOURCES, Episode  # noqa: F401  (Episode: also importable from here)

logger = logging.getLogger(__name__)

FORMAT_NAME = "gym_libero_vla.EpisodeStore"
FORMAT_VERSION = 1
META_FILENAME = "store.json"
INDEX_FILENAME = "index.sqlite"
EPISODES_DIRNAME = "episodes"
CORRUPT_DIRNAME = "corrupt"
ORPHAN_GRACE_S = 600.0  # an unindexed file younger than this may belong to an append in progress
_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile, zlib.error)

_TABLE = """
CREATE TABLE IF NOT EXISTS episodes (
    episode_id INTEGER PRIMARY KEY AUTOINCREMENT,
    file TEXT NOT NULL UNIQUE,
    task_id INTEGER NOT NULL,
    init_state_id INTEGER NOT NULL,
    source TEXT NOT NULL,
    policy_version INTEGER NOT NULL,
    success INTEGER NOT NULL,
    num_steps INTEGER NOT NULL,
    total_reward REAL NOT NULL,
    num_bytes INTEGER NOT NULL,
    created_at REAL NOT NULL,
    env_id TEXT NOT NULL,
    group_id TEXT
)
"""
# Stores written before groups existed lack the group_id column: added on open (NULL: in no group). The
# change is additive, so the format version stays 1 and older readers still open the store.
_MIGRATIONS = (("group_id", "ALTER TABLE episodes ADD COLUMN group_id TEXT"),)
_INDEXES = """
CREATE INDEX IF NOT EXISTS episodes_by_task ON episodes (task_id, source, policy_version);
CREATE INDEX IF NOT EXISTS episodes_by_source ON episodes (source, episode_id);
CREATE INDEX IF NOT EXISTS episodes_by_group ON episodes (group_id, episode_id);
"""
_COLUMNS = (
    "episode_id", "file", "task_id", "init_state_id", "source", "policy_version",
    "success", "num_steps", "total_reward", "num_bytes", "created_at", "env_id", "group_id",
)  # fmt: skip


class IncompatibleStoreError(ValueError):
    """The directory holds a store of another format version, or something that is not a store."""


class EpisodeStore:
    """Episodes on disk under ``path``; opening an existing store reuses it.

    Args:
        path: the store directory (created if missing).
        max_episodes: keep at most this many episodes (None: no limit), evicting the oldest evictable.
        max_bytes: keep the episode files under this many bytes in total (None: no limit).
        evict_offline: also evict offline episodes (demos); by default they are kept whatever the bounds.

    Bounds are enforced by whoever appends. Any number of processes may open the same store; one writer
    at a time appends (SQLite serialises concurrent writers, so several work, they just wait on each other).

    Example::

        store = EpisodeStore("runs/cache", max_episodes=10_000)
        store.append(Episode(observations, actions, rewards, success=True, task_id=3, policy_version=7))
        batch = store.sample(32, task_id=3, min_policy_version=5, rng=np.random.default_rng(0))
    """

    def __init__(
        self,
        path: str | os.PathLike,
        max_episodes: int | None = None,
        max_bytes: int | None = None,
        evict_offline: bool = False,
    ):
        for name, bound in (("max_episodes", max_episodes), ("max_bytes", max_bytes)):
            if bound is not None and not (isinstance(bound, (int, np.integer)) and bound >= 1):
                raise ValueError(f"{name} {bound!r} must be a positive int or None")
        self.path = os.fspath(path)
        self.max_episodes, self.max_bytes, self.evict_offline = max_episodes, max_bytes, bool(evict_offline)
        self.episodes_dir = os.path.join(self.path, EPISODES_DIRNAME)
        self._connection: sqlite3.Connection | None = None
        self._connection_pid = -1
        self._open_directory()
        self.remove_orphans()  # also opens the index, creating its tables in a new store

    # ------------------------------------------------------------------ opening
    def _open_directory(self) -> None:
        meta_path = os.path.join(self.path, META_FILENAME)
        if os.path.isdir(self.path) and not os.path.exists(meta_path):
            foreign = sorted(set(os.listdir(self.path)) - {INDEX_FILENAME, EPISODES_DIRNAME, CORRUPT_DIRNAME})
            foreign = [name for name in foreign if not name.startswith(META_FILENAME)]
            if foreign:
                raise IncompatibleStoreError(
                    f"{self.path} is not an episode store (no {META_FILENAME}) and is not empty: {foreign[:5]}"
                )
        os.makedirs(self.episodes_dir, exist_ok=True)
        if not os.path.exists(meta_path):
            tmp_path = f"{meta_path}.tmp-{uuid.uuid4().hex}"
            with open(tmp_path, "w") as file:
                json.dump({"format": FORMAT_NAME, "format_version": FORMAT_VERSION}, file)
            os.replace(tmp_path, meta_path)  # two processes creating the store write the same content
        with open(meta_path) as file:
            try:
                meta = json.load(file)
            except json.JSONDecodeError as error:
                raise IncompatibleStoreError(f"{meta_path} is not valid JSON: {error}") from error
        if meta.get("format") != FORMAT_NAME or meta.get("format_version") != FORMAT_VERSION:
            raise IncompatibleStoreError(
                f"episode store {self.path} has format {meta.get('format')!r} version {meta.get('format_version')!r}: "
                f"this gym-libero-vla reads {FORMAT_NAME!r} version {FORMAT_VERSION} only; open it with the version "
                "that wrote it, or point to a new directory"
            )

    @property
    def _db(self) -> sqlite3.Connection:
        # SQLite connections must not cross fork: each process opens its own.
        if self._connection is None or self._connection_pid != os.getpid():
            connection = sqlite3.connect(os.path.join(self.path, INDEX_FILENAME), timeout=60.0, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a killed process loses no commit; a power cut may lose the last ones, never corrupts.
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("PRAGMA busy_timeout=60000")
            connection.execute("BEGIN IMMEDIATE")
            try:
                connection.execute(_TABLE)
                columns = {row[1] for row in connection.execute("PRAGMA table_info(episodes)")}
                for column, statement in _MIGRATIONS:
                    if column not in columns:
                        connection.execute(statement)
                for statement in _INDEXES.split(";"):
                    if statement.strip():
                        connection.execute(statement)
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            self._connection, self._connection_pid = connection, os.getpid()
        return self._connection

    def _transaction(self):
        return _Transaction(self._db)

    def close(self) -> None:
        if self._connection is not None and self._connection_pid == os.getpid():
            self._connection.close()
        self._connection = None

    def __enter__(self) -> EpisodeStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_connection"], state["_connection_pid"] = None, -1
        return state

    def __repr__(self) -> str:
        return (
            f"EpisodeStore({self.path!r}, episodes={len(self)}, max_episodes={self.max_episodes}, max_bytes={self.max_bytes})"
        )

    # ------------------------------------------------------------------ writing
    def append(self, episode: Episode) -> int:
        """Store a finished episode (atomically) and evict over the bounds; returns its episode id."""
        return self.append_many([episode])[0]

    def append_many(self, episodes: Sequence[Episode]) -> list[int]:
        """Store several episodes as one unit -- all of them or, after a crash, none -- and evict over the
        bounds (never one of these); returns their ids, consecutive and in order. A GRPO group goes in this
        way, so a learner never sees half a group."""
        episodes = list(episodes)
        for episode in episodes:
            if not isinstance(episode, Episode):
                raise TypeError(f"append takes Episodes: got {type(episode).__name__}")
        if not episodes:
            return []
        file_names = [f"{uuid.uuid4().hex}.npz" for _ in episodes]
        file_paths = [os.path.join(self.episodes_dir, name) for name in file_names]
        try:
            for episode, file_path in zip(episodes, file_paths):
                _write_atomically(file_path, _episode_arrays(episode))
            rows = [
                (
                    file_name, episode.task_id, episode.init_state_id, episode.source, episode.policy_version,
                    int(episode.success), episode.num_env_steps, episode.total_reward, os.path.getsize(file_path),
                    episode.created_at, episode.env_id, episode.group_id,
                )
                for episode, file_name, file_path in zip(episodes, file_names, file_paths)
            ]  # fmt: skip
            with self._transaction() as db:
                episode_ids = []
                for row in rows:  # one writer holds the lock: the ids of this transaction are consecutive
                    cursor = db.execute(
                        f"INSERT INTO episodes ({', '.join(_COLUMNS[1:])}) VALUES ({', '.join('?' * (len(_COLUMNS) - 1))})",
                        row,
                    )
                    episode_ids.append(int(cursor.lastrowid))
                evicted = self._evict(db, keep_from=episode_ids[0])
        except BaseException:
            for file_path in file_paths:
                _unlink(file_path)
            raise
        for name in evicted:  # only after the rows are gone: a crash here leaves orphans, never dangling rows
            _unlink(os.path.join(self.episodes_dir, name))
        for episode, episode_id in zip(episodes, episode_ids):
            episode.episode_id = episode_id
        return episode_ids

    def _evict(self, db: sqlite3.Connection, keep_from: int) -> list[str]:
        if self.max_episodes is None and self.max_bytes is None:
            return []
        count, total_bytes = db.execute("SELECT COUNT(*), COALESCE(SUM(num_bytes), 0) FROM episodes").fetchone()
        excess_episodes = count - self.max_episodes if self.max_episodes is not None else 0
        excess_bytes = total_bytes - self.max_bytes if self.max_bytes is not None else 0
        if excess_episodes <= 0 and excess_bytes <= 0:
            return []
        evictable = SOURCES if self.evict_offline else tuple(s for s in SOURCES if s != "offline")
        rows = db.execute(
            f"SELECT episode_id, file, num_bytes FROM episodes WHERE source IN ({', '.join('?' * len(evictable))}) "
            "AND episode_id < ? ORDER BY episode_id",
            (*evictable, keep_from),
        )
        victims: list[tuple[int, str]] = []
        for episode_id, name, num_bytes in rows:
            if excess_episodes <= 0 and excess_bytes <= 0:
                break
            victims.append((episode_id, name))
            excess_episodes, excess_bytes = excess_episodes - 1, excess_bytes - num_bytes
        db.executemany("DELETE FROM episodes WHERE episode_id = ?", [(episode_id,) for episode_id, _ in victims])
        if excess_episodes > 0 or excess_bytes > 0:
            logger.debug("episode store %s stays over its bounds: the rest is offline data or the newest episodes", self.path)
        return [name for _, name in victims]

    def remove_orphans(self, grace_s: float = ORPHAN_GRACE_S) -> int:
        """Delete episode files no index row points to (left by a killed writer) older than ``grace_s``."""
        indexed = {name for (name,) in self._db.execute("SELECT file FROM episodes")}
        removed, now = 0, time.time()
        for name in os.listdir(self.episodes_dir):
            path = os.path.join(self.episodes_dir, name)
            try:
                if name not in indexed and now - os.path.getmtime(path) > grace_s:
                    os.unlink(path)
                    removed += 1
            except FileNotFoundError:
                pass
        return removed

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM episodes").fetchone()[0])

    @property
    def num_bytes(self) -> int:
        return int(self._db.execute("SELECT COALESCE(SUM(num_bytes), 0) FROM episodes").fetchone()[0])

    def records(
        self,
        task_id: int | Sequence[int] | None = None,
        source: str | Sequence[str] | None = None,
        min_policy_version: int | None = None,
        success: bool | None = None,
    ) -> list[dict[str, Any]]:
        """Index rows (dicts with ``episode_id``, ``task_id``, ``source``, ``policy_version``, ``success``,
        ``num_steps``, ``num_bytes``, ...) matching every given filter, oldest first. Reads no episode file."""
        clauses, params = [], []
        if task_id is not None:
            task_ids = [int(task_id)] if np.isscalar(task_id) else [int(t) for t in task_id]
            clauses.append(f"task_id IN ({', '.join('?' * len(task_ids))})")
            params += task_ids
        if source is not None:
            sources = [source] if isinstance(source, str) else list(source)
            for name in sources:
                if name not in SOURCES:
                    raise ValueError(f"unknown episode source {name!r}: valid {SOURCES}")
            clauses.append(f"source IN ({', '.join('?' * len(sources))})")
            params += sources
        if min_policy_version is not None:
            clauses.append("policy_version >= ?")
            params.append(int(min_policy_version))
        if success is not None:
            clauses.append("success = ?")
            params.append(int(bool(success)))
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM episodes {where} ORDER BY episode_id", params)
        return [dict(zip(_COLUMNS, row), success=bool(row[6])) for row in rows]

    def groups(self, after_episode_id: int = 0) -> list[dict[str, Any]]:
        """The stored groups whose episodes all have ids above ``after_episode_id``, in commit order.

        One dict per ``group_id``: ``group_id``, ``episode_ids`` (all sources, oldest first), ``first_episode_id``,
        ``last_episode_id``, ``num_online`` (its online episodes: a complete group has ``group_size`` of them,
        fewer only when eviction took some), ``policy_version`` (the oldest of its online episodes),
        ``task_id``, ``init_state_id``, ``num_steps`` (online steps) and ``num_successes``. Reads no episode file.
        """
        rows = self._db.execute(
            "SELECT group_id, GROUP_CONCAT(episode_id), MIN(episode_id), MAX(episode_id), SUM(source = 'online'), "
            "MIN(CASE WHEN source = 'online' THEN policy_version END), MIN(task_id), MIN(init_state_id), "
            "SUM(CASE WHEN source = 'online' THEN num_steps ELSE 0 END), SUM(source = 'online' AND success) "
            "FROM episodes WHERE group_id IS NOT NULL AND episode_id > ? GROUP BY group_id ORDER BY MIN(episode_id)",
            (int(after_episode_id),),
        )
        names = ("first_episode_id", "last_episode_id", "num_online", "policy_version", "task_id", "init_state_id",
                 "num_steps", "num_successes")  # fmt: skip
        groups = []
        for group_id, ids, *values in rows:
            group = {"group_id": group_id, "episode_ids": sorted(int(i) for i in ids.split(","))}
            group.update({name: int(value) if value is not None else -1 for name, value in zip(names, values)})
            groups.append(group)
        return groups

    def episode_ids(self, **filters) -> list[int]:
        """Ids of the episodes matching :meth:`records`'s filters, oldest first."""
        return [record["episode_id"] for record in self.records(**filters)]

    def load(self, episode_id: int) -> Episode:
        """The episode with this id; ``KeyError`` if it is not (or no longer) in the store, or was corrupt."""
        episodes = self._load_many([episode_id])
        if episode_id not in episodes:
            raise KeyError(f"no episode {episode_id} in episode store {self.path} (evicted, corrupt, or never stored)")
        return episodes[episode_id]

    def sample(
        self,
        n: int,
        *,
        task_id: int | Sequence[int] | None = None,
        source: str | Sequence[str] | None = None,
        min_policy_version: int | None = None,
        success: bool | None = None,
        newest: int | None = None,
        replace: bool = False,
        rng: np.random.Generator | int | None = None,
    ) -> list[Episode]:
        """Up to ``n`` episodes drawn uniformly among those matching the filters.

        ``newest`` restricts the draw to the ``newest`` most recent matching episodes (recency sampling).
        Without ``replace``, fewer than ``n`` come back when fewer match. Corrupt episodes are skipped
        (and dropped from the store) and replaced by other draws.
        """
        if n < 0:
            raise ValueError(f"n {n} must be >= 0")
        if newest is not None and newest < 1:
            raise ValueError(f"newest {newest} must be a positive int or None")
        rng = np.random.default_rng(rng)
        candidates = self.episode_ids(task_id=task_id, source=source, min_policy_version=min_policy_version, success=success)
        if newest is not None:
            candidates = candidates[-newest:]
        sampled: list[Episode] = []
        while len(sampled) < n and candidates:
            wanted = n - len(sampled)
            picks = rng.choice(len(candidates), size=wanted if replace else min(wanted, len(candidates)), replace=replace)
            chosen = [candidates[i] for i in picks]
            episodes = self._load_many(sorted(set(chosen)))
            sampled += [episodes[i] for i in chosen if i in episodes]
            gone = set(chosen) - set(episodes) if replace else set(chosen)
            candidates = [i for i in candidates if i not in gone]
        return sampled

    def _load_many(self, episode_ids: Sequence[int]) -> dict[int, Episode]:
        if not episode_ids:
            return {}
        rows = self._db.execute(
            f"SELECT episode_id, file FROM episodes WHERE episode_id IN ({', '.join('?' * len(episode_ids))})",
            [int(i) for i in episode_ids],
        ).fetchall()
        episodes = {}
        for episode_id, name in rows:
            path = os.path.join(self.episodes_dir, name)
            try:
                episode = _read_episode(path)
            except FileNotFoundError:
                if self._db.execute("SELECT 1 FROM episodes WHERE episode_id = ?", (episode_id,)).fetchone() is None:
                    continue  # evicted by the writer between our query and the read: not an error
                self._drop_corrupt(episode_id, path, "its file is missing")
                continue
            except _READ_ERRORS as error:
                self._drop_corrupt(episode_id, path, f"{type(error).__name__}: {error}")
                continue
            episode.episode_id = episode_id
            episodes[episode_id] = episode
        return episodes

    def _drop_corrupt(self, episode_id: int, path: str, reason: str) -> None:
        logger.warning(
            "episode store %s: skipping corrupt episode %d (%s); moved it out of the index", self.path, episode_id, reason
        )
        with self._transaction() as db:
            db.execute("DELETE FROM episodes WHERE episode_id = ?", (episode_id,))
        if os.path.exists(path):
            os.makedirs(os.path.join(self.path, CORRUPT_DIRNAME), exist_ok=True)
            os.replace(path, os.path.join(self.path, CORRUPT_DIRNAME, os.path.basename(path)))


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error): the write lock is taken up front, so a
    transaction never fails half-way on a lock upgrade."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


# ---------------------------------------------------------------------- episode files
def _episode_arrays(episode: Episode) -> dict[str, np.ndarray]:
    meta = {
        "format_version": FORMAT_VERSION,
        "task_id": episode.task_id,
        "init_state_id": episode.init_state_id,
        "success": episode.success,
        "policy_version": episode.policy_version,
        "source": episode.source,
        "env_id": episode.env_id,
        "created_at": episode.created_at,
        "group_id": episode.group_id,
        "text_observations": {key: value for key, value in episode.observations.items() if isinstance(value, str)},
        "observation_keys": list(episode.observations),
    }
    arrays = {"meta": np.array(json.dumps(meta)), "actions": episode.actions, "rewards": episode.rewards}
    if episode.log_probs is not None:
        arrays["log_probs"] = episode.log_probs
    if episode.executed is not None:
        arrays["executed"] = episode.executed
    for key, value in episode.observations.items():
        if not isinstance(value, str):
            arrays[f"obs/{key}"] = value
    return arrays


def _write_atomically(path: str, arrays: dict[str, np.ndarray]) -> None:
    directory = os.path.dirname(path)
    tmp_path = os.path.join(directory, f".tmp-{os.path.basename(path)}")
    try:
        with open(tmp_path, "wb") as file:
            np.savez_compressed(file, **arrays)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        _unlink(tmp_path)
        raise
    directory_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_fd)  # the rename itself survives a power cut
    finally:
        os.close(directory_fd)


def _read_episode(path: str) -> Episode:
    observations: dict[str, np.ndarray | str] = {}
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"episode file has format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
        for name in data.files:
            if name.startswith("obs/"):
                observations[name[len("obs/") :]] = data[name]  # reading checks each array's CRC
        actions, rewards = data["actions"], data["rewards"]
        log_probs = data["log_probs"] if "log_probs" in data.files else None
        executed = data["executed"] if "executed" in data.files else None
    observations.update(meta["text_observations"])
    return Episode(
        observations={key: observations[key] for key in meta["observation_keys"]},
        actions=actions,
        rewards=rewards,
        success=meta["success"],
        task_id=meta["task_id"],
        init_state_id=meta["init_state_id"],
        policy_version=meta["policy_version"],
        source=meta["source"],
        log_probs=log_probs,
        executed=executed,
        env_id=meta["env_id"],
        created_at=meta["created_at"],
        group_id=meta.get("group_id"),  # absent in files written before groups existed
    )


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
