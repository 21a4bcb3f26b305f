"""The self-describing checkpoint (DESIGN.md section 4) and atomic file writes.

A checkpoint is a dict of plain containers and tensors, readable with
``torch.load(weights_only=True)``: format name and version, how to rebuild the float model,
the MCN config, the converted layer names, the state dict and metadata. Modules and code are
never pickled, and loading never unpickles code.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import pickle
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mcn_compress.config import MCNConfig
from mcn_compress.errors import CheckpointError, ConfigError, ConversionError, ModelLoadError
from mcn_compress.models import ModelSource, build_model
from mcn_compress.nn.mcconv import MCConv2d

_logger = logging.getLogger(__name__)

FORMAT_NAME = "mcn-compress.checkpoint"
FORMAT_VERSION = 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    On any exception the temporary file is removed, so ``path`` is either the complete new
    file or whatever was there before, never half a file.
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise CheckpointError(f"cannot write {target}: directory {directory} does not exist")
    if target.is_dir():
        raise CheckpointError(f"cannot write {target}: it is a directory")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically."""
    try:
        with atomic_path(path) as tmp:
            write(tmp)
    except OSError as exc:
        raise CheckpointError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _library_versions() -> dict[str, str]:
    import mcn_compress

    versions = {"mcn_compress": str(mcn_compress.__version__), "torch": str(torch.__version__)}
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
    source = getattr(model, "mcn_source", None)
    config = getattr(model, "mcn_config", None)
    if not isinstance(source, ModelSource):
        raise CheckpointError(
            "cannot save: the model does not say how to rebuild its float architecture; build it "
            "with mcn_compress.models.load_float_model (or set model.mcn_source to a ModelSource "
            "of a timm-registered or torchvision model)"
        )
    if not isinstance(config, MCNConfig):
        raise CheckpointError("cannot save: the model was not produced by mcn_compress.convert")
    summary = getattr(model, "mcn_summary", None)
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
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metadata": metadata,
    }
    if extra:
        data.update(extra)
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


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and validate a checkpoint dict without building the model."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "unsupported global" not in str(exc).lower():
            raise CheckpointError(f"{path} is truncated or corrupt (not a torch file)") from exc
        raise CheckpointError(
            f"{path} was refused: it holds pickled objects other than tensors and plain "
            "containers, which mcn-compress never loads"
        ) from exc
    except Exception as exc:
        raise CheckpointError(f"{path} is truncated or corrupt ({type(exc).__name__})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"{path} is not an mcn-compress checkpoint (for float weights use --weights)"
        )
    version = data.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version!r}; this mcn-compress reads up to "
            f"{FORMAT_VERSION}: upgrade mcn-compress"
        )
    for key, kind in (("model", dict), ("mcn", dict), ("layers", list), ("state_dict", dict)):
        if not isinstance(data.get(key), kind):
            raise CheckpointError(f"{path} is corrupt: field {key!r} is missing or malformed")
    return data


def model_from_checkpoint(data: dict[str, Any], origin: str = "checkpoint") -> nn.Module:
    """Rebuild the float architecture, convert it with the stored config, load the weights."""
    from mcn_compress.convert import convert

    try:
        source = ModelSource.from_dict(data["model"])
        config = MCNConfig.from_dict(data["mcn"])
        float_model = build_model(source, pretrained=False)
        model = convert(float_model, config, layers=list(data["layers"]), initialize=False)
    except (ModelLoadError, ConfigError, ConversionError) as exc:
        raise CheckpointError(f"{origin}: cannot rebuild the model: {exc}") from exc
    try:
        model.load_state_dict(data["state_dict"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise CheckpointError(f"{origin}: state dict does not fit the model: {first}") from exc
    model.mcn_source = source  # type: ignore[assignment]
    model.mcn_metadata = dict(data.get("metadata") or {})  # type: ignore[assignment]
    return model.eval()


def load(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a checkpoint written by `save` and return the MCN model in eval mode.

    Only tensors and plain containers are read (``torch.load(weights_only=True)``); files that
    are not ours, truncated, corrupt or carrying pickled code raise `CheckpointError`.
    Packed files (`mcn_compress.export`, recognised by content) load with `load_packed`.
    """
    from mcn_compress.export import load_packed, looks_packed

    if looks_packed(path):
        return load_packed(path)
    data = read_checkpoint(path, map_location=map_location)
    return model_from_checkpoint(data, origin=str(path))
