"""Content digests of checkpoints and packed files (docs/design.md section 4, "Integrity").

`content_digest` hashes a nested structure of plain containers and tensors in a canonical
order (dict keys sorted, every tensor as dtype, shape and raw bytes), so the same content
always gives the same SHA-256 and one flipped byte anywhere gives another.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

DIGEST_KEY = "sha256"


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        h.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for key in sorted(value, key=lambda k: (type(k).__name__, str(k))):
            _feed(h, key)
            _feed(h, value[key])
    elif isinstance(value, list | tuple):
        h.update(f"L{len(value)}".encode())
        for item in value:
            _feed(h, item)
    else:  # str, int, float, bool, None (and torch.Size / dtype reprs)
        h.update(repr((type(value).__name__, value)).encode())


def content_digest(data: Any, skip: str = DIGEST_KEY) -> str:
    """SHA-256 of ``data`` (a dict's ``skip`` key left out), in canonical order."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in data.items() if k != skip} if isinstance(data, dict) else data)
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
