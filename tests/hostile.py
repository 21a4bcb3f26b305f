"""Hostile and careless inputs for the tests of issue 21, made here without the code under
test: CLI runs that must end in one error line, packed-file framing with its checksum, and
compressed "bombs" that expand to gigabytes from a few megabytes."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import zlib
from typing import Any

from typer.testing import CliRunner

from mcn_compress.cli import app

MiB = 1 << 20


def run(*args: str) -> Any:
    """``mcn-compress ARGS`` through Typer's runner (wide, so one line stays one line)."""
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})


def one_line(result: Any, *fragments: str) -> str:
    """Assert exit 1 with exactly one line on stderr, ``error: ...`` holding ``fragments``."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# --- packed files (safetensors framing; digest as docs/design.md section 4.3 words it) -------
def split(raw: bytes) -> tuple[dict[str, Any], bytes]:
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def join(header: dict[str, Any], data: bytes) -> bytes:
    """The file of ``header`` and ``data``, its ``sha256`` recomputed as anyone could."""
    h = hashlib.sha256()
    for name in sorted(k for k in header if k != "__metadata__"):
        start, end = header[name]["data_offsets"]
        h.update(name.encode())
        h.update(data[start:end])
    meta = header["__metadata__"]
    for name in ("format", "version", "description", "index"):
        h.update(name.encode())
        h.update(str(meta.get(name, "")).encode())
    meta["sha256"] = h.hexdigest()
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


def index_of(header: dict[str, Any]) -> list[Any]:
    return json.loads(zlib.decompress(base64.b64decode(header["__metadata__"]["index"])))


def set_index(header: dict[str, Any], index: Any) -> None:
    text = json.dumps(index).encode()
    header["__metadata__"]["index"] = base64.b64encode(zlib.compress(text)).decode()


# --- bombs -----------------------------------------------------------------------------------
def deflate_bomb(head: bytes, fill: bytes, total: int) -> bytes:
    """A raw deflate stream of ``head`` then ``fill`` repeated to about ``total`` bytes: one
    MiB block compressed after a full flush gives the same bytes every time, so the stream is
    built by repeating them (no gigabytes are ever compressed). It has no end marker."""
    block = (fill * (MiB // len(fill) + 1))[:MiB]
    encoder = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = encoder.compress(head) + encoder.flush(zlib.Z_FULL_FLUSH)
    repeated = encoder.compress(block) + encoder.flush(zlib.Z_FULL_FLUSH)
    return first + repeated * (total // MiB)


def zlib_bomb(head: bytes, fill: bytes, total: int) -> bytes:
    """`deflate_bomb` in a zlib wrapper (as the packed index is stored)."""
    return b"\x78\xda" + deflate_bomb(head, fill, total)


def gzip_bomb(head: bytes, fill: bytes, total: int) -> bytes:
    """`deflate_bomb` in a gzip wrapper (as IDX files are shipped)."""
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + deflate_bomb(head, fill, total)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header says ``width`` x ``height`` gray pixels, with one tiny IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (width + 1))  # one row; the rest is missing
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def billion_laughs(levels: int = 9, width: int = 10) -> str:
    """A YAML text of a few hundred bytes whose aliases stand for ``width ** levels`` items."""
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"
