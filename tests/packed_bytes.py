"""Safetensors framing of packed files, written out for the tests that edit them."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def split(raw: bytes) -> tuple[dict[str, Any], bytes]:
    """(JSON header, data bytes) of a safetensors file."""
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def join(header: dict[str, Any], data: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


def blob_digest(header: dict[str, Any], data: bytes) -> str:
    """Packed version 1's digest: name then raw bytes of each blob, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(k for k in header if k != "__metadata__"):
        start, end = header[name]["data_offsets"]
        h.update(name.encode())
        h.update(data[start:end])
    return h.hexdigest()
