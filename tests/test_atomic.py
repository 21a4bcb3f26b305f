"""Tests of `mcn_compress.formats.atomic`: whole files or nothing, early output checks, and
temporary files of killed writers removed on the next write."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mcn_compress.errors import OutputError
from mcn_compress.formats.atomic import atomic_write, check_not_input, check_writable


def _dead_pid() -> int:
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(child.stdout)


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path: Path) -> None:
    target = tmp_path / "m.pt"
    dead = tmp_path / f".m.pt.{_dead_pid()}.abc123.tmp"
    legacy = tmp_path / ".m.pt.k2j4l5.tmp"  # written before temporaries carried a PID
    live = tmp_path / f".m.pt.{os.getpid()}.zzz999.tmp"
    other = tmp_path / f".other.pt.{_dead_pid()}.abc.tmp"  # another target: not ours to touch
    for path in (dead, legacy, live, other):
        path.write_bytes(b"x" * 100)
    atomic_write(target, lambda tmp: tmp.write_bytes(b"new"))
    assert target.read_bytes() == b"new"
    assert not dead.exists() and not legacy.exists()
    assert live.exists() and other.exists()


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError(
            "[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed "
            "writing file data/3: file write failed"
        ),
    ],
)
def test_a_full_disk_is_one_output_error_and_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    target = tmp_path / "m.pt"
    target.write_bytes(b"old")

    def full_disk(obj: object, path: Path) -> None:
        Path(path).write_bytes(b"half a file")
        raise failure

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OutputError) as info:
        atomic_write(target, lambda tmp: torch.save({}, tmp))
    assert str(info.value).startswith(f"cannot write {target}: ")
    assert "\n" not in str(info.value)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_other_runtime_errors_are_not_taken_for_a_full_disk(tmp_path: Path) -> None:
    def broken(tmp: Path) -> None:
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        atomic_write(tmp_path / "m.pt", broken)


def test_check_writable_refuses_what_a_later_write_would_fail_on(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    for bad, words in (
        (tmp_path / "missing" / "m.pt", "does not exist"),
        (tmp_path / "afile" / "m.pt", "is not a directory"),
        (tmp_path, "is a directory"),
    ):
        with pytest.raises(OutputError, match=words):
            check_writable(bad)
    assert check_writable(tmp_path / "m.pt") == tmp_path / "m.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # the probe is gone


def test_check_not_input_refuses_the_same_file_by_any_name(tmp_path: Path) -> None:
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"weights")
    os.link(weights, tmp_path / "hard.pt")
    (tmp_path / "sub").mkdir()
    for same in (weights, tmp_path / "sub" / ".." / "w.pt", tmp_path / "hard.pt"):
        with pytest.raises(OutputError, match="also the input --weights"):
            check_not_input(same, {"--weights": weights})
    check_not_input(tmp_path / "out.pt", {"--weights": weights, "--other": None})
    assert weights.read_bytes() == b"weights"
