"""The self-describing checkpoint (docs/design.md section 4).

A checkpoint is a dict of plain containers and tensors, readable with
``torch.load(weights_only=True)``: format name and version, how to rebuild the float model,
the MCN config, the converted layer names, the state dict with its module versions, metadata,
and (version 2) the SHA-256 of all of it (`formats.digest`), checked on every read so a
damaged file is refused. Modules and code are never pickled, and loading never unpickles code.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mcn_compress.config import MCNConfig
from mcn_compress.errors import (
    CheckpointError,
    ConfigError,
    ConversionError,
    ModelLoadError,
    first_line,
)
from mcn_compress.formats.atomic import atomic_write
from mcn_compress.formats.digest import DIGEST_KEY, content_digest
from mcn_compress.formats.state_dict import loadable_state_dict, plain_state_dict
from mcn_compress.info import ModelSource, info_of, update_info
from mcn_compress.limits import check_file, nesting_problem
from mcn_compress.models import rebuild_model
from mcn_compress.nn.mcconv import MCConv2d
from mcn_compress.version import __version__

_logger = logging.getLogger(__name__)

FORMAT_NAME = "mcn-compress.checkpoint"
FORMAT_VERSION = 2  # 2: sha256 of the content, state-dict module versions


def _library_versions() -> dict[str, str]:
    versions = {"mcn_compress": __version__, "torch": str(torch.__version__)}
    for module_name in ("timm", "torchvision"):
        with contextlib.suppress(ImportError):
            versions[module_name] = str(__import__(module_name).__version__)
    return versions


def converted_layer_names(model: nn.Module) -> list[str]:
    """Names of the `MCConv2d` modules of ``model``, in registration order."""
    return [name for name, m in model.named_modules() if isinstance(m, MCConv2d)]


def checkpoint_dict(
    model: nn.Module,
    *,
    parent: str | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint of a converted ``model`` as plain containers and tensors."""
    info = info_of(model)
    source, config = info.source, info.config
    if not isinstance(source, ModelSource):
        raise CheckpointError(
            "cannot save: the model does not say how to rebuild its float architecture; build it "
            "with mcn_compress.models.load_float_model (or give it the ModelSource of a "
            "timm-registered or torchvision model with mcn_compress.info.update_info)"
        )
    if not isinstance(config, MCNConfig):
        raise CheckpointError("cannot save: the model was not produced by mcn_compress.convert")
    try:  # checked again here: the kwargs dict may have been changed since it was built
        ModelSource.from_dict(source.to_dict())
    except ModelLoadError as exc:
        raise CheckpointError(f"cannot save: {exc}") from exc
    summary = info.summary
    metadata: dict[str, Any] = {
        "versions": _library_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "parent": parent,
        "metrics": dict(metrics or {}),
    }
    if summary is not None:
        metadata["conversion"] = summary.to_dict()
    data: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "model": source.to_dict(),
        "mcn": config.to_dict(),
        "layers": converted_layer_names(model),
        "metadata": metadata,
    }
    data["state_dict"], data["state_dict_metadata"] = plain_state_dict(model)
    if extra:
        data.update(extra)
    data[DIGEST_KEY] = content_digest(data)
    return data


def save(
    model: nn.Module,
    path: str | Path,
    *,
    parent: str | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint of a converted ``model`` to ``path`` atomically; returns the path.

    Example:
        >>> save(convert(load_float_model("resnet18", pretrained=False)), "model.pt")
    """
    data = checkpoint_dict(model, parent=parent, metrics=metrics, extra=extra)
    atomic_write(path, lambda tmp: torch.save(data, tmp))
    return Path(path)


def load_plain(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with every failure as one `CheckpointError`:
    missing, a directory, truncated or corrupt, or holding pickled objects other than tensors
    and plain containers (refused; their code never runs)."""
    path = check_file(path, CheckpointError, missing=f"{path}: no such file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "unsupported global" not in str(exc).lower():
            raise CheckpointError(f"{path} is truncated or corrupt (not a torch file)") from exc
        raise CheckpointError(
            f"{path} was refused: it holds pickled objects other than tensors and plain "
            "containers, which mcn-compress never loads"
        ) from exc
    except Exception as exc:  # torch's unpickler raises anything on damaged bytes
        raise CheckpointError(f"{path} is truncated or corrupt ({type(exc).__name__})") from exc


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and validate a checkpoint dict without building the model."""
    path = Path(path)
    return validate_checkpoint(load_plain(path, map_location), path)


def validate_checkpoint(data: Any, path: str | Path) -> dict[str, Any]:
    """``data`` as read from ``path`` if it is a whole, undamaged checkpoint, else one
    `CheckpointError` saying what is wrong."""
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"{path} is not an mcn-compress checkpoint (for float weights use --weights)"
        )
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(
            f"{path} is corrupt: {repr(version)[:40]} is not a valid checkpoint format version "
            "(a positive integer)"
        )
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}; this mcn-compress reads up to "
            f"{FORMAT_VERSION}: upgrade mcn-compress"
        )
    for key, kind in (("model", dict), ("mcn", dict), ("layers", list), ("state_dict", dict)):
        if not isinstance(data.get(key), kind):
            raise CheckpointError(f"{path} is corrupt: field {key!r} is missing or malformed")
    check_digest(data, path)
    if not all(isinstance(name, str) for name in data["layers"]):
        raise CheckpointError(f"{path} is corrupt: field 'layers' holds a name that is not text")
    return data


def check_digest(data: dict[str, Any], path: str | Path) -> None:
    """Refuse ``data`` read from ``path`` when its stored SHA-256 does not match its content
    (format version 2 and later; version 1 files carry none). A structure too deep or too
    large to walk (`limits.nesting_problem`) is refused before the digest walks it."""
    problem = nesting_problem(data)
    if problem is not None:
        raise CheckpointError(f"{path} is corrupt: {problem}")
    version = data.get("version", 1)
    if isinstance(version, int) and not isinstance(version, bool) and version < 2:
        return
    if data.get(DIGEST_KEY) != content_digest(data):
        raise CheckpointError(
            f"{path} is damaged: its content does not match the checksum stored in it (copy "
            "the file again, or use another checkpoint)"
        )


def model_from_checkpoint(data: dict[str, Any], origin: str = "checkpoint") -> nn.Module:
    """Rebuild the float architecture, convert it with the stored config, load the weights."""
    from mcn_compress.passes.convert import rebuild

    try:
        source = ModelSource.from_dict(data["model"])
        config = MCNConfig.from_dict(data["mcn"])
        layers = list(data["layers"])
        if not all(isinstance(name, str) for name in layers):
            raise ConfigError("the converted layer names are not all text")
        float_model = rebuild_model(source)
        model = rebuild(float_model, config, layers)
    except (ModelLoadError, ConfigError, ConversionError) as exc:
        raise CheckpointError(f"{origin}: cannot rebuild the model: {exc}") from exc
    load_model_state(model, data, origin)
    update_info(model, source=source, metadata=dict(data.get("metadata") or {}))
    return model.eval()


def load_model_state(model: nn.Module, data: dict[str, Any], origin: str | Path) -> None:
    """Load the weights (and module versions) of checkpoint dict ``data`` into ``model``; a
    mismatch is one `CheckpointError` naming ``origin``."""
    try:
        model.load_state_dict(
            loadable_state_dict(data["state_dict"], data.get("state_dict_metadata"))
        )
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise CheckpointError(f"{origin}: state dict does not fit the model: {first}") from exc
    except (TypeError, ValueError) as exc:  # a malformed record of module versions
        raise CheckpointError(f"{origin} is corrupt: {first_line(exc)}") from exc
