"""Bounds every reader applies before it trusts what a file declares (docs/design.md 4.5).

A file may say anything about itself: a size, a shape, a nesting, an alias. Readers check such
claims against these limits and against the file's real size before they allocate, decompress
or recurse, so a small hostile file is one clear error, never gigabytes of memory, a
`RecursionError` or a hang. Each limit is far above what mcn-compress itself ever writes.
"""

from __future__ import annotations

import errno
import os
import stat
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from mcn_compress.errors import MCNError

NAME_MAX = 255
"""Longest file-name component in bytes (Linux, macOS and Windows file systems)."""
MAX_JSON_DEPTH = 64
"""Deepest nesting of a JSON document (packed headers, descriptions): ours reach about 6."""
MAX_NESTING = 64
"""Deepest nesting of the containers inside a checkpoint: ours reach about 8."""
MAX_ITEMS = 5_000_000
"""Most container items a checkpoint's structure may hold, counting shared ones each time
they are reached (a checkpoint of a large model with its optimiser state has well under 1e5)."""


MISSING = "does not exist"


def _fs_bytes(text: str) -> int:
    return len(os.fsencode(text))


def kind_of(mode: int) -> str:
    """What a file of ``mode`` (``st_mode``) is, in words."""
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((words for test, words in kinds if test(mode)), "a special file")


def long_component(path: str | Path) -> str | None:
    """The first component of ``path`` longer than `NAME_MAX` bytes, or None."""
    return next((p for p in Path(path).parts if _fs_bytes(p) > NAME_MAX), None)


def shorten(path: str | Path, most: int = 100) -> str:
    """``path`` as text, its middle elided when longer than ``most`` characters."""
    text = str(path)
    return text if len(text) <= most else f"{text[: most - 40]}...{text[-37:]}"


def file_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be read as a file, as words that follow the path ("does not
    exist", "is a directory", "is a FIFO (named pipe), not a regular file", ...), or None
    when it is a regular file or a symlink to one. Nothing is opened: a FIFO or a device is
    never read (a FIFO would block, ``/dev/zero`` never ends)."""
    if long_component(path) is not None:
        return f"has a name component longer than {NAME_MAX} bytes"
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return MISSING
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            return "does not exist (a folder on its path is a file)"
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory"
    return f"is {kind_of(mode)}, not a regular file"


def check_file(
    path: str | Path, error: type[MCNError], what: str = "", missing: str | None = None
) -> Path:
    """``path`` if it is a regular file (or a symlink to one); else ``error`` saying
    ``"<what><path> <problem>"`` (`file_problem`), or ``missing`` when given and the path
    does not exist."""
    problem = file_problem(path)
    if problem is None:
        return Path(path)
    if problem == MISSING and missing is not None:
        raise error(missing)
    raise error(f"{what}{shorten(path)} {problem}")


# --- JSON and nested containers ------------------------------------------------------------
_CHUNK = 1 << 20


def json_depth_exceeds(text: str | bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON ``text`` nests arrays / objects deeper than ``limit``, found before
    any parser recurses into it by one linear, vectorised pass: a quote ends a string unless
    an odd run of backslashes precedes it, and brackets inside strings do not count."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    array = np.frombuffer(data, dtype=np.uint8)
    run = quotes = depth = 0  # carried between chunks: backslash run, quotes seen, depth
    for start in range(0, len(array), _CHUNK):
        chunk = array[start : start + _CHUNK]
        where = np.arange(len(chunk), dtype=np.int64)
        slash = chunk == ord("\\")
        last_other = np.maximum.accumulate(np.where(slash, -1, where))
        # backslashes right before each position (the run may come from the last chunk)
        before = np.empty(len(chunk), dtype=np.int64)
        before[0] = run
        before[1:] = where[:-1] - last_other[:-1] + np.where(last_other[:-1] < 0, run, 0)
        quote = (chunk == ord('"')) & (before % 2 == 0)
        seen = np.cumsum(quote, dtype=np.int64) + quotes
        outside = seen % 2 == 0
        opens = ((chunk == ord("[")) | (chunk == ord("{"))) & outside
        closes = ((chunk == ord("]")) | (chunk == ord("}"))) & outside
        levels = np.cumsum(opens.astype(np.int64) - closes) + depth
        if int(levels.max()) > limit:
            return True
        depth, quotes = int(levels[-1]), int(seen[-1])
        run = int(before[-1]) + 1 if slash[-1] else 0
    return False


def nesting_problem(
    data: Any, max_depth: int | None = None, max_items: int | None = None
) -> str | None:
    """Why the containers of ``data`` (dicts, lists, tuples) are too deep or too many to walk
    (one iterative pass that stops at the first excess; shared containers count each time
    they are reached), or None. The limits default to `MAX_NESTING` and `MAX_ITEMS`."""
    max_depth = MAX_NESTING if max_depth is None else max_depth
    max_items = MAX_ITEMS if max_items is None else max_items
    stack: list[tuple[Any, int]] = [(data, 1)]
    items = 0
    while stack:
        value, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(value, dict):
            children = [*value.keys(), *value.values()]
        elif isinstance(value, list | tuple):
            children = value
        else:
            continue
        if depth > max_depth:
            return f"it nests containers more than {max_depth} deep"
        for child in children:
            items += 1
            if items > max_items:
                return f"it holds more than {max_items:,} items"
            if isinstance(child, dict | list | tuple):
                stack.append((child, depth + 1))
    return None


# --- decompression -------------------------------------------------------------------------
def inflate(data: bytes, limit: int, *, gzip: bool = False) -> bytearray | None:
    """Decompress the zlib stream ``data`` (with ``gzip``: every member of a gzip file), or
    None as soon as it would give more than ``limit`` bytes; the output never grows past
    ``limit + 1`` bytes. Raises `zlib.error` for a damaged stream, `EOFError` for a cut one."""
    out = bytearray()
    pending = data
    while True:
        decoder = zlib.decompressobj(31 if gzip else zlib.MAX_WBITS)
        while not decoder.eof:
            out += decoder.decompress(pending, limit + 1 - len(out))  # max_length >= 1
            if len(out) > limit:
                return None
            pending = decoder.unconsumed_tail
            if not pending and not decoder.eof:
                raise EOFError("compressed data ends before its end-of-stream marker")
        pending = decoder.unused_data
        if not gzip or not pending:
            return out


def inflate_head(data: bytes, size: int, *, gzip: bool = False) -> bytes:
    """The first ``size`` decompressed bytes of ``data`` (fewer when it holds fewer)."""
    decoder = zlib.decompressobj(31 if gzip else zlib.MAX_WBITS)
    return decoder.decompress(data, size)
