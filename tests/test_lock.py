"""Tests of `mcn_compress.training.lock`: one run per folder, stale locks taken over."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mcn_compress.errors import RunFolderError
from mcn_compress.training.lock import LOCK_NAME, RunLock, lock_holder


def test_a_held_lock_refuses_a_second_holder_and_is_released(tmp_path: Path) -> None:
    first = RunLock(tmp_path).acquire()
    assert lock_holder(tmp_path) == f"pid {os.getpid()} on {os.uname().nodename}"
    with pytest.raises(RunFolderError, match=rf"in use by .*pid {os.getpid()}"):
        RunLock(tmp_path).acquire()
    first.release()
    first.release()  # twice is harmless
    assert lock_holder(tmp_path) is None
    assert not (tmp_path / LOCK_NAME).exists()  # a finished run leaves no lock file
    with RunLock(tmp_path):
        assert lock_holder(tmp_path) is not None
    assert lock_holder(tmp_path) is None


def test_the_lock_of_a_killed_process_is_taken_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A child takes the lock and dies by SIGKILL: the kernel drops the flock, the file stays.
    code = (
        "import os, signal, sys; from mcn_compress.training.lock import RunLock; "
        f"RunLock({str(tmp_path)!r}).acquire(); os.kill(os.getpid(), signal.SIGKILL)"
    )
    child = subprocess.run([sys.executable, "-c", code], check=False)
    assert child.returncode == -9
    left = (tmp_path / LOCK_NAME).read_text()
    assert left.startswith("pid ") and str(os.getpid()) not in left
    assert lock_holder(tmp_path) is None
    with caplog.at_level(logging.INFO, logger="mcn_compress"):
        lock = RunLock(tmp_path).acquire()
    assert "taking over the lock" in caplog.text
    assert (tmp_path / LOCK_NAME).read_text().startswith(f"pid {os.getpid()} ")
    lock.release()
