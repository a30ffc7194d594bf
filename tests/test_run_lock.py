"""gym_libero_vla.run_lock: one process at a time on a run's files, between real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from gym_libero_vla.run_lock import exclusive, holder

# Holds the lock argv[1] until a line arrives on stdin (or the process is killed).
HOLD = """
import sys
from gym_libero_vla.run_lock import exclusive
with exclusive(sys.argv[1], "holder"):
    print("held", flush=True)
    sys.stdin.readline()
"""
# Exits 0 if it can take the lock argv[1] at once, 3 if another process holds it.
TRY = """
import sys
from gym_libero_vla.run_lock import exclusive
try:
    with exclusive(sys.argv[1], "try", wait=False):
        pass
except RuntimeError:
    sys.exit(3)
"""


def start_holder(lock: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD, lock], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "held\n"
    return process


def test_a_held_lock_is_refused_or_waited_for_then_taken(tmp_path, capsys):
    lock = str(tmp_path / "nested" / "dir" / "run.lock")  # its directory is made
    process = start_holder(lock)
    try:
        assert holder(lock) == str(process.pid)
        with pytest.raises(
            RuntimeError, match=rf"evaluation: process {process.pid} is working on it \(it holds .*run\.lock\)"
        ):
            with exclusive(lock, "evaluation", wait=False):
                pass
        release = threading.Timer(1.0, lambda: (process.stdin.write("\n"), process.stdin.flush()))
        release.start()
        start = time.perf_counter()
        with exclusive(lock, "evaluation"):
            waited = time.perf_counter() - start
            assert holder(lock) == str(os.getpid())
        release.join()
    finally:
        process.kill()
        process.wait()
    assert waited >= 0.9
    out = capsys.readouterr().out
    assert f"evaluation: waiting for process {process.pid}, which holds {lock}" in out
    assert "evaluation: lock taken after" in out


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    lock = str(tmp_path / "run.lock")
    process = start_holder(lock)
    assert subprocess.run([sys.executable, "-c", TRY, lock]).returncode == 3
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert os.path.exists(lock) and holder(lock) == str(process.pid)  # the file stays, for messages only
    assert subprocess.run([sys.executable, "-c", TRY, lock]).returncode == 0
    with exclusive(lock, "after the kill", wait=False):
        pass


def test_taking_a_held_lock_again_in_the_same_process_passes_through(tmp_path):
    lock = str(tmp_path / "run.lock")
    with exclusive(lock, "outer"):
        with exclusive(lock, "inner", wait=False):  # no deadlock against itself
            pass
        # the inner block's end does not release the outer one's lock
        assert subprocess.run([sys.executable, "-c", TRY, lock]).returncode == 3
    assert subprocess.run([sys.executable, "-c", TRY, lock]).returncode == 0
