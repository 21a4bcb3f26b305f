"""One strict `load()` for every model file: sniff the format, then read it with its reader.

A checkpoint (``.pt``, a torch zip archive) goes to `formats.checkpoint`, a packed file
(``.mcn``, safetensors) to `formats.packed`; anything else is refused before it is parsed, so
a foreign file never reaches ``torch.load`` (docs/design.md section 4, "Loading rules")."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mcn_compress.errors import CheckpointError, MCNError
from mcn_compress.formats.checkpoint import model_from_checkpoint, read_checkpoint
from mcn_compress.formats.packed import load_packed
from mcn_compress.limits import check_file, file_problem

SAFETENSORS = "packed"
TORCH_ZIP = "checkpoint"


def sniff_format(path: str | Path) -> str | None:
    """``"packed"`` (safetensors: an 8-byte length, then ``{``), ``"checkpoint"`` (a torch
    zip archive) or None, from the first bytes of ``path``."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return None
    if len(head) == 9 and head[8:9] == b"{":
        return SAFETENSORS
    if head.startswith(b"PK\x03\x04"):
        return TORCH_ZIP
    return None


def load(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a checkpoint (`save`) or a packed file (`export_packed`); the MCN model in eval mode.

    Only tensors and plain containers are read (``torch.load(weights_only=True)``, or
    safetensors); a missing, empty, foreign, truncated or corrupt file, or one carrying pickled
    code, raises `CheckpointError` with one line naming it.

    Example:
        >>> model = load("model.pt")
    """
    path = Path(path)
    if file_problem(path) == "is a directory":
        raise CheckpointError(f"{path} is a directory, not a model file")
    check_file(path, CheckpointError, missing=f"{path}: no such file")
    kind = sniff_format(path)
    if kind is None:
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path} is empty")
        raise CheckpointError(
            f"{path} is not an mcn-compress checkpoint or packed file (unknown format, or "
            "truncated or corrupt)"
        )
    if kind == SAFETENSORS:
        return load_packed(path)
    try:
        data = read_checkpoint(path, map_location=map_location)
    except MCNError:
        raise
    except Exception as exc:  # torch's unpickler raises anything on damaged bytes
        raise CheckpointError(f"{path} is truncated or corrupt ({type(exc).__name__})") from exc
    return model_from_checkpoint(data, origin=str(path))
