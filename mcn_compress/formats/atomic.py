"""Atomic file writes: a temporary file beside the target, renamed onto it on success.

Temporary files are named ``.<target>.<pid>.<random>.tmp`` (a target name too long for that
is cut, with a hash of the whole name, so the temporary name stays within the file system's
limit). A process killed while writing (SIGKILL, power loss) leaves its temporary file
behind; the next write of the same target removes every such file whose process is gone.

Every write, and `check_writable` before any work, runs `check_output`: mcn-compress writes
regular files only, so an existing output that is a device, a FIFO, a socket, a directory or
a link into ``/proc`` is refused, and so is a name the file system cannot hold
(docs/design.md 4.7). `check_not_input` refuses an output that is one of the inputs.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from mcn_compress.errors import OutputError
from mcn_compress.limits import NAME_MAX, kind_of, long_component, shorten

TEMP_EXTRA = 22
"""Bytes a temporary name adds to its target's: two dots, a pid of up to 7 digits, a dot,
8 random characters (`tempfile.mkstemp`) and ``.tmp``."""
_MAX_LINKS = 40  # symlinks followed before giving up, as the kernel does

_logger = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _temp_prefix(target: Path) -> str:
    """``.<name>.``; a name too long to leave room for `TEMP_EXTRA` bytes is cut (at a
    character boundary) and followed by ``~`` and 8 hex digits of the whole name's hash."""
    name = target.name
    room = NAME_MAX - TEMP_EXTRA
    if len(os.fsencode(name)) <= room:
        return f".{name}."
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:8]
    cut = name
    while len(os.fsencode(cut)) > room - 9:
        cut = cut[:-1]
    return f".{cut}~{digest}."


def _links_into_proc(target: Path) -> str | None:
    """The first link on the way from ``target`` that points into ``/proc`` (such as
    ``/proc/self/fd/1``, whose meaning changes with the process that opens it), or None."""
    current = Path(os.path.abspath(target))
    if current.parts[1:2] == ("proc",):
        return str(current)
    for _ in range(_MAX_LINKS):
        if not current.is_symlink():
            return None
        pointed = os.readlink(current)
        current = Path(os.path.normpath(current.parent / pointed))
        if current.is_absolute() and current.parts[1:2] == ("proc",):
            return pointed
    return None


def check_output(path: str | Path) -> Path:
    """Raise one `OutputError` unless ``path`` can be replaced by a new regular file: its
    name components fit the file system, and what is there, if anything, is a regular file
    or a symlink to one. Devices (``/dev/null``), FIFOs, sockets, directories and links into
    ``/proc`` are refused; nothing is opened or changed."""
    target = Path(path)
    long = long_component(target)
    if long is not None:
        raise OutputError(
            f"cannot write {shorten(target)}: a name in it is {len(os.fsencode(long))} bytes, "
            f"longer than the {NAME_MAX} a file system allows; choose a shorter name"
        )
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return target  # nothing there (or a dangling symlink, which the write replaces)
    except NotADirectoryError:
        return target  # `_directory` names the file in the way
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(mode):
        raise OutputError(f"cannot write {target}: it is a directory; give a file name")
    if not stat.S_ISREG(mode):
        raise OutputError(
            f"cannot write {target}: it is {kind_of(mode)}, not a regular file; mcn-compress "
            "writes regular files only (choose a file name)"
        )
    link = _links_into_proc(target)
    if link is not None:
        raise OutputError(
            f"cannot write {target}: it is a link to {link}, not a regular file; choose a file name"
        )
    return target


def remove_stale_temps(target: Path) -> list[Path]:
    """Remove the temporary files of earlier writes of ``target`` whose process has died."""
    prefix = _temp_prefix(target)
    removed = []
    for name in glob.glob(glob.escape(str(target.parent / prefix)) + "*.tmp"):
        pid_text = Path(name).name[len(prefix) :].split(".", 1)[0]
        if pid_text.isdigit() and _alive(int(pid_text)):
            continue  # another live process is writing this target now
        with contextlib.suppress(OSError):
            os.unlink(name)
            removed.append(Path(name))
    if removed:
        _logger.info("removed %d stale temporary file(s) of %s", len(removed), target)
    return removed


def _directory(target: Path) -> Path:
    directory = target.parent if str(target.parent) else Path(".")
    check_output(target)
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise OutputError(f"cannot write {target}: directory {directory} {what}")
    return directory


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    On any exception the temporary file is removed, so ``path`` is either the complete new
    file or whatever was there before, never half a file.
    """
    target = Path(path)
    directory = _directory(target)
    remove_stale_temps(target)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f"{_temp_prefix(target)}{os.getpid()}.", suffix=".tmp", dir=directory
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        check_output(target)  # again: something may have appeared there meanwhile
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


_WRITE_FAILURE = re.compile(
    r"failed writing|write failed|iostream|inline_container|no space left", re.IGNORECASE
)


def _is_write_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it arose from) is torch's zip writer failing on the
    file: a full disk shows as ``basic_ios::clear: iostream error``, then ``[enforce fail at
    inline_container.cc] unexpected pos``, or ``... failed writing file ...``."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) or _WRITE_FAILURE.search(str(current)):
            return True
        current = current.__cause__ or current.__context__
    return False


def _write_failure_words(path: Path, exc: BaseException) -> str:
    directory = path.parent if str(path.parent) else Path(".")
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = None
    if free is not None and free < 1 << 20:
        return f"no space left on the device ({free:,} bytes free)"
    return f"{str(exc).strip().splitlines()[0]} (is the disk full?)"


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically; a failed write
    (full disk, read-only folder) is one `OutputError` and leaves ``path`` as it was."""
    try:
        with atomic_path(path) as tmp:
            write(tmp)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except RuntimeError as exc:
        if not _is_write_failure(exc):
            raise
        raise OutputError(f"cannot write {path}: {_write_failure_words(Path(path), exc)}") from exc


def check_writable(path: str | Path) -> Path:
    """Raise `OutputError` now if ``path`` cannot be written later: its folder must exist and
    take a new file, and ``path`` must not be a directory. Nothing is left behind."""
    target = Path(path)
    directory = _directory(target)
    try:
        fd, probe = tempfile.mkstemp(
            prefix=f"{_temp_prefix(target)}{os.getpid()}.", suffix=".tmp", dir=directory
        )
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from exc
    return target


def check_not_input(output: str | Path, inputs: dict[str, str | Path | None]) -> None:
    """Refuse an ``output`` that is one of the ``inputs`` (``{option: path}``): the write
    would replace the file the work reads."""
    out = Path(output)
    for option, given in inputs.items():
        if given is None:
            continue
        source = Path(given)
        same = out.resolve() == source.resolve()
        if not same and os.path.exists(out) and os.path.exists(source):  # False on any OSError
            same = os.path.samefile(out, source)
        if same:
            raise OutputError(
                f"{out} is also the input {option} {source}: writing it would replace the "
                "input; choose another output name"
            )
