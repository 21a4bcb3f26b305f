"""Outputs are regular files only, with names a file system can hold (issue 21, family 1 and
the long names of family 5; docs/design.md 4.7): devices, FIFOs, sockets, links into /proc
and over-long names are refused with one line before any work, and nothing is touched."""

from __future__ import annotations

import os
import shutil
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
from hostile import one_line, run

from mcn_compress.errors import OutputError
from mcn_compress.formats import atomic
from mcn_compress.formats.atomic import atomic_path, atomic_write, check_writable

NAME_MAX = 255  # bytes in one file-name component (Linux)


@pytest.fixture
def model_files(files: dict[str, Any], tmp_path: Path) -> dict[str, Path]:
    """Copies of the session's small checkpoint and packed file, in this test's folder."""
    work = tmp_path / "work"
    work.mkdir()
    return {
        "ckpt": Path(shutil.copy(files["ckpt"], work / "m.pt")),
        "packed": Path(shutil.copy(files["packed"], work / "m.mcn")),
    }


def _special_files(folder: Path) -> dict[str, Path]:
    """A FIFO, a socket, a folder, links to /dev/null and /proc/self/fd/1 (all unprivileged)."""
    made = {"fifo": folder / "fifo", "dir": folder / "dir"}
    os.mkfifo(made["fifo"])
    made["dir"].mkdir()
    made["socket"] = folder / "sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(made["socket"]))
    server.close()
    made["devnull_link"] = folder / "null"
    made["devnull_link"].symlink_to("/dev/null")
    made["fd_link"] = folder / "fd1"
    made["fd_link"].symlink_to("/proc/self/fd/1")
    return made


def _snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Name -> (mode, size, link target) of everything in ``folder``, links not followed."""
    result = {}
    for entry in sorted(folder.iterdir()):
        info = entry.lstat()
        target = os.readlink(entry) if entry.is_symlink() else ""
        result[entry.name] = (info.st_mode, info.st_size, target)
    return result


def test_every_writer_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    special = _special_files(tmp_path)
    before = _snapshot(tmp_path)
    for name, path in special.items():
        for attempt in (check_writable, lambda p: atomic_write(p, lambda t: t.write_bytes(b"x"))):
            with pytest.raises(OutputError) as info:
                attempt(path)
            message = str(info.value)
            assert "\n" not in message and str(path) in message, (name, message)
            assert ("directory" if name == "dir" else "not a regular file") in message
    assert _snapshot(tmp_path) == before  # no temporary file left, nothing replaced
    # a regular file, or a symlink to one, is still replaced as before
    (tmp_path / "real").write_bytes(b"old")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    atomic_write(tmp_path / "link", lambda t: t.write_bytes(b"new"))
    assert (tmp_path / "link").read_bytes() == b"new"


def test_a_device_output_is_left_a_device(model_files: dict[str, Path], tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("making a device node (mknod) needs root; the /dev/null link case runs")
    device = tmp_path / "full"
    os.mknod(device, 0o600 | stat.S_IFCHR, os.makedev(1, 7))  # a copy of /dev/full
    for args in (
        ("export", str(model_files["ckpt"]), "-o", str(device)),
        ("convert", "test_resnet", "--no-pretrained", "-o", str(device)),
    ):
        one_line(run(*args), "character device", "not a regular file")
        assert stat.S_ISCHR(device.lstat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "work"]


@pytest.mark.parametrize("kind", ["fifo", "socket", "devnull_link", "fd_link", "dir"])
def test_cli_outputs_refuse_special_files_before_work(
    kind: str, model_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    special = _special_files(tmp_path)
    before = _snapshot(tmp_path)

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr("mcn_compress.formats.load.load", never)
    monkeypatch.setattr("mcn_compress.models.load_float_model", never)
    target = str(special[kind])
    for args in (
        ("export", str(model_files["ckpt"]), "-o", target),
        ("export", str(model_files["packed"]), "-f", "onnx", "-o", target),
        ("convert", "test_resnet", "--no-pretrained", "-o", target),
    ):
        one_line(run(*args), target)
    assert _snapshot(tmp_path) == before
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_names_over_the_limit_are_one_line(model_files: dict[str, Path], tmp_path: Path) -> None:
    long = tmp_path / ("n" * (NAME_MAX + 1) + ".mcn")
    one_line(run("export", str(model_files["ckpt"]), "-o", str(long)), "longer than the 255")
    one_line(
        run("convert", "test_resnet", "--no-pretrained", "-o", str(tmp_path / ("é" * 128))),
        "256 bytes",
    )
    long_input = tmp_path / ("i" * (NAME_MAX + 5) + ".pt")
    for args in (
        ("export", str(long_input), "-o", str(tmp_path / "o.mcn")),
        ("report", str(long_input)),
        ("convert", "test_resnet", "--weights", str(long_input), "-o", str(tmp_path / "o.pt")),
    ):
        one_line(run(*args), "longer than 255 bytes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_a_legal_long_name_is_written_with_a_legal_temporary_name(
    model_files: dict[str, Path], tmp_path: Path
) -> None:
    for name in ("x" * 250 + ".mcn", "é" * 127):  # 254 bytes each
        target = tmp_path / name
        assert len(os.fsencode(target.name)) <= NAME_MAX
        with atomic_path(target) as tmp:
            assert len(os.fsencode(tmp.name)) <= NAME_MAX
            assert tmp.parent == tmp_path and tmp.name.startswith(".")
            tmp.write_bytes(b"x")
        assert target.read_bytes() == b"x"
    out = tmp_path / ("y" * 250 + ".pt")
    result = run("export", str(model_files["ckpt"]), "-o", str(out), "-q")
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 0
    hidden = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert hidden == []


def test_stale_temporaries_of_long_names_are_found_again(tmp_path: Path) -> None:
    target = tmp_path / ("z" * 250 + ".pt")
    other = tmp_path / ("z" * 249 + "q.pt")  # the same first 224 bytes
    dead = 2**22 + 1  # above Linux's largest pid: no such process
    stale = []
    for path in (target, other):
        with atomic_path(path) as tmp:
            prefix = tmp.name.split(".")[1]  # the (possibly cut) name part
        name = f".{prefix}.{dead}.abcdefgh.tmp"
        assert len(os.fsencode(name)) <= NAME_MAX
        (tmp_path / name).write_bytes(b"half")
        stale.append(tmp_path / name)
    assert atomic.remove_stale_temps(target) == [stale[0]]
    assert not stale[0].exists() and stale[1].exists()


def test_report_plot_to_a_fifo_is_refused_before_work(run_dir: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "curves.png"
    os.mkfifo(fifo)
    one_line(run("report", str(run_dir), "--plot", str(fifo)), "FIFO", "not a regular file")
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
