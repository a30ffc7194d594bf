"""One process at a time on a run's files.

The benchmarks resume every stage from what is on disk (checkpoints, ``curve.jsonl``, ``episodes.jsonl``,
``<demos>.parts/``), so two processes working on the same run, e.g. two ``sft_vs_grpo.py`` commands sharing an
``--output-dir`` with overlapping variants, would both train into one checkpoint directory and interleave one
curve file. :func:`exclusive` makes the second wait for the first, then find its work done and reuse it::

    with exclusive(os.path.join(run_dir, "run.lock"), "grpo_offline seed 0"):
        ...  # check what is already there, then train / evaluate the rest

The lock is the kernel's advisory ``flock`` on the lock file: it goes away with the process holding it, so a
killed run never leaves a stale lock behind (the file stays, holding the last holder's pid, for messages only).
A process may take a lock it already holds again (nested calls pass through). POSIX only, as MuJoCo rendering.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator

_held: dict[str, int] = {}  # lock file (absolute) -> nesting depth, in this process


def holder(lock_path: str) -> str:
    """The pid written into ``lock_path`` by its last holder ("unknown" when there is none)."""
    try:
        with open(lock_path) as file:
            return file.read().strip() or "unknown"
    except FileNotFoundError:
        return "unknown"


@contextlib.contextmanager
def exclusive(lock_path: str, what: str, wait: bool = True) -> Iterator[None]:
    """Hold the lock ``lock_path`` (created with its directory) while the block runs.

    Another process holding it: with ``wait`` (the default) block until it is released, saying so once; without,
    raise ``RuntimeError`` naming the holder's pid. ``what`` names the work in those messages."""
    lock_path = os.path.abspath(lock_path)
    if _held.get(lock_path):
        _held[lock_path] += 1
        try:
            yield
        finally:
            _held[lock_path] -= 1
        return
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    with open(lock_path, "a+") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise RuntimeError(
                    f"{what}: process {holder(lock_path)} is working on it (it holds {lock_path}); wait for it to "
                    "finish, or give this run another output directory"
                ) from None
            print(f"{what}: waiting for process {holder(lock_path)}, which holds {lock_path}", flush=True)
            start = time.perf_counter()
            fcntl.flock(file, fcntl.LOCK_EX)
            print(f"{what}: lock taken after {time.perf_counter() - start:.0f} s", flush=True)
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()}\n")
        file.flush()
        _held[lock_path] = 1
        try:
            yield
        finally:
            del _held[lock_path]
            fcntl.flock(file, fcntl.LOCK_UN)
