"""The packed 1-bit file (``model.mcn``): what docs/design.md section 2 says is kept after training.

Stored: the sign bits B of every `MCConv2d` packed 8 per byte, and every other state-dict entry
(M-Filters, biases, float layers, BatchNorm parameters and buffers) at its own dtype, or float16
with ``float16=True``; integer buffers always keep their dtype. ``float_layers`` (``"float32"``
default, ``"float16"``, ``"int8"``) stores the weights of the layers that stay float (stem,
classifier, depthwise and other float convs; `mcn_compress.formats.quantize`) as float16, or as
per-output-channel int8 with float32 scales (docs/design.md section 4.9); loading turns them
back into float32. The latent filters C are not
stored: loading sets each latent ``weight`` to the ±1 signs, so ``sign(C) = B`` and every
reconstructed filter Q, hence every eval-mode output, is bit-identical to the source model's.

Layout (format ``mcn-compress.packed``, version 2, or 3 with int8 float layers): a safetensors
file (no pickle) holding one flat tensor ("blob") per stored dtype plus ``signs`` (uint8), and
for int8 float layers ``qint8`` (int8) and ``qscale`` (float32), and these strings in its JSON
header (``__metadata__``):

- ``format``: ``mcn-compress.packed``; ``version``: ``2``, or ``3`` when the file holds
  ``qint8`` entries, which a version 2 reader would misread (readers refuse newer versions).
- ``description``: JSON with how to rebuild the model (``model``: `ModelSource`, ``mcn``:
  `MCNConfig`), ``float16``, ``float_layers`` (only when not ``float32``), the checkpoint
  ``metadata`` (versions, parent, metrics) and the state dict's module versions
  (``state_dict_metadata``).
- ``index``: base64 of zlib-compressed JSON ``[[key, blob, shape], ...]`` in state-dict order;
  each entry occupies the next ``prod(shape)`` elements of its blob, or for ``signs`` the next
  ``ceil(prod(shape) / 8)`` bytes. Sign entries are the ``.weight`` keys of the converted
  layers, with the latent shape ``(out // K, in // groups, kh, kw)``. A ``qint8`` entry takes
  the next ``prod(shape)`` values of ``qint8`` and the next ``shape[0]`` scales of ``qscale``
  (design.md 4.9: ``W' = q * scale_o`` along the first axis).
- ``sha256``: digest of the blobs (name, then raw bytes, blobs in sorted name order), then of
  the ``format``, ``version``, ``description`` and ``index`` strings (name, then value), so
  an edited header is refused like damaged data. Version 1 files (digest of the blobs only)
  still load.

Sign bit order (`pack_signs`): the latent tensor is flattened in row-major (C) order; element
``i`` goes to byte ``i // 8``, bit ``i % 8`` counted from the least significant bit (numpy's
``packbits(..., bitorder="little")``). Bit 1 means +1 (``C >= 0``, since sign(0) = +1), bit 0
means -1; the unused high bits of a layer's last byte are 0 and every layer starts on a byte.

One index entry costs a few bytes after compression, so the file stays within 1% + 16 KiB of
the theoretical minimum (sign bits / 8 + bytes of the stored float and integer values) even for
small heads; `mcn_compress.profile` measures it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mcn_compress.errors import CheckpointError, ConfigError, ExportError, MCNError
from mcn_compress.formats.atomic import atomic_write
from mcn_compress.formats.checkpoint import checkpoint_dict, model_from_checkpoint
from mcn_compress.formats.quantize import (
    DEFAULT_FLOAT_LAYERS,
    check_float_layers,
    dequantize_int8,
    float_layer_weight_keys,
    quantize_int8,
)
from mcn_compress.info import info_of, update_info
from mcn_compress.limits import MAX_JSON_DEPTH, check_file, inflate, json_depth_exceeds

_logger = logging.getLogger(__name__)

PACKED_FORMAT = "mcn-compress.packed"
PACKED_VERSION = 3  # 2: the digest covers the header strings too; 3: qint8 entries
PLAIN_VERSION = 2  # written when the file holds no qint8 entries (what version 2 readers read)
HEADER_FIELDS = ("format", "version", "description", "index")
PACKED_SUFFIX = ".mcn"
SIGNS = "signs"
QINT8 = "qint8"  # int8 float layer weights (docs/design.md section 4.9)
QSCALE = "qscale"  # their float32 per-output-channel scales
MAX_HEADER = 16 * 1024 * 1024  # JSON header (ours: a few KiB; safetensors allows 100 MiB)
MAX_INDEX = 16 * 1024 * 1024  # decompressed index JSON (ours: ~60 bytes per state-dict entry)
INDEX_BYTES_PER_BYTE = 64  # an entry (>= 1 byte of blobs) never needs more JSON than this
MAX_DIMS = 8  # dimensions of one index entry's shape

_BLOB_DTYPES = {SIGNS: torch.uint8, QINT8: torch.int8, QSCALE: torch.float32}
_BIT_WEIGHTS = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8)


# --- sign bits ------------------------------------------------------------------------------
def pack_signs(latent: torch.Tensor) -> torch.Tensor:
    """Pack ``sign(latent)`` 8 per byte: a 1-D uint8 tensor of ``ceil(numel / 8)`` bytes.

    Element ``i`` of the row-major flattening is bit ``i % 8`` (least significant first) of
    byte ``i // 8``; bit 1 is +1 (``latent >= 0``, sign(0) = +1), bit 0 is -1.
    """
    bits = (latent.detach().reshape(-1) >= 0).to(torch.uint8)
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    return (bits.reshape(-1, 8).cpu() * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def unpack_signs(
    packed: torch.Tensor, shape: tuple[int, ...] | list[int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of `pack_signs`: a tensor of ``shape`` holding +1 and -1 in ``dtype``."""
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.numel() != math.ceil(numel / 8):
        raise ValueError(
            f"{packed.numel()} {packed.dtype} values cannot hold {numel} sign bits "
            f"(need {math.ceil(numel / 8)} uint8)"
        )
    bits = (packed.reshape(-1, 1) & _BIT_WEIGHTS) != 0
    bits = bits.reshape(-1)[:numel]
    return torch.where(bits, 1.0, -1.0).to(dtype).reshape(tuple(shape))


# --- helpers --------------------------------------------------------------------------------
def _blob_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _digest(blobs: dict[str, torch.Tensor], header: dict[str, str] | None = None) -> str:
    """SHA-256 of the blobs and, from version 2, of the header strings (`HEADER_FIELDS`)."""
    h = hashlib.sha256()
    for name in sorted(blobs):
        h.update(name.encode())
        h.update(blobs[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for name in HEADER_FIELDS if header is not None else ():
        h.update(name.encode())
        h.update(str(header.get(name, "")).encode())
    return h.hexdigest()


def _encode_index(index: list[list[Any]]) -> str:
    text = json.dumps(index, separators=(",", ":"))
    return base64.b64encode(zlib.compress(text.encode(), 9)).decode("ascii")


def index_limit(data_bytes: int) -> int:
    """The most bytes the decompressed index of a file with ``data_bytes`` bytes of blobs may
    take: every entry takes at least one blob byte, and its JSON never needs more than
    `INDEX_BYTES_PER_BYTE` per byte taken, plus 64 KiB for empty tensors; at most `MAX_INDEX`."""
    return min(MAX_INDEX, 64 * 1024 + INDEX_BYTES_PER_BYTE * data_bytes)


def _decode_index(text: str, limit: int) -> list[list[Any]]:
    """The index entries, decompressed to at most ``limit`` bytes (`index_limit`)."""
    raw = inflate(base64.b64decode(text, validate=True), limit)
    if raw is None:
        raise ValueError(f"its index expands to more than {limit:,} bytes")
    if json_depth_exceeds(raw):
        raise ValueError(f"its index nests deeper than {MAX_JSON_DEPTH} levels")
    index = json.loads(raw)
    if not isinstance(index, list):
        raise ValueError("its index is not a list")
    return index


# --- writing --------------------------------------------------------------------------------
def pack_model(
    model: nn.Module,
    float16: bool = False,
    *,
    parent: str | None = None,
    float_layers: str = DEFAULT_FLOAT_LAYERS,
) -> bytes:
    """The packed file of a converted ``model`` as bytes (see the module docstring)."""
    from safetensors.torch import save as st_save

    check_float_layers(float_layers)
    layer_keys = float_layer_weight_keys(model) if float_layers != DEFAULT_FLOAT_LAYERS else set()
    metadata = dict(info_of(model).metadata)
    data = checkpoint_dict(
        model, parent=parent or metadata.get("parent"), metrics=metadata.get("metrics")
    )
    sign_keys = {f"{name}.weight" for name in data["layers"]}
    parts: dict[str, list[torch.Tensor]] = {}
    index: list[list[Any]] = []
    for key, value in data["state_dict"].items():
        if key in sign_keys:
            blob, stored = SIGNS, pack_signs(value)
        elif key in layer_keys and float_layers == "int8":
            try:
                q, scale = quantize_int8(value)
            except MCNError as exc:
                raise ExportError(f"cannot store {key} as int8: {exc}") from exc
            parts.setdefault(QSCALE, []).append(scale)
            blob, stored = QINT8, q.reshape(-1)
        elif key in layer_keys:  # float16
            blob, stored = "float16", value.reshape(-1).to(torch.float16)
        else:
            stored = value.reshape(-1)
            if float16 and stored.is_floating_point():
                stored = stored.to(torch.float16)
            blob = _blob_name(stored.dtype)
        parts.setdefault(blob, []).append(stored)
        index.append([key, blob, list(value.shape)])
    blobs = {name: torch.cat(tensors) for name, tensors in parts.items()}
    meta = dict(data["metadata"])
    meta.pop("conversion", None)  # per-layer init errors: not needed to rebuild, and large
    description = {
        "model": data["model"],
        "mcn": data["mcn"],
        "float16": float16,
        **({"float_layers": float_layers} if float_layers != DEFAULT_FLOAT_LAYERS else {}),
        "metadata": meta,
        "state_dict_metadata": data["state_dict_metadata"],
    }
    header = {
        "format": PACKED_FORMAT,
        "version": str(PACKED_VERSION if QINT8 in blobs else PLAIN_VERSION),
        "description": json.dumps(description, separators=(",", ":"), default=str),
        "index": _encode_index(index),
    }
    header["sha256"] = _digest(blobs, header)
    return st_save(blobs, metadata=header)


def export_packed(
    model: nn.Module,
    path: str | Path,
    float16: bool = False,
    *,
    parent: str | None = None,
    float_layers: str = DEFAULT_FLOAT_LAYERS,
) -> Path:
    """Write the packed 1-bit file of a converted ``model`` to ``path`` atomically.

    Args:
        model: an MCN model from `convert` or `load` (it must carry ``mcn_info`` with a
            source and a config).
        path: the output file (``model.mcn`` by convention); written via a temporary file.
        float16: store float parts as float16 (half the bytes; outputs then close, not equal).
        parent: the file ``model`` was read from, recorded in the metadata.
        float_layers: how to store the weights of the layers that stay float: ``"float32"``
            (like the other float parts), ``"float16"`` or ``"int8"`` (per output channel with
            float32 scales, docs/design.md section 4.9; the file is then version 3).

    Example:
        >>> export_packed(load("model.pt"), "model.mcn")
        PosixPath('model.mcn')
    """
    payload = pack_model(model, float16, parent=parent, float_layers=float_layers)
    atomic_write(path, lambda tmp: tmp.write_bytes(payload))
    _logger.info(
        "wrote %s (%d bytes, float16=%s, float layers %s)",
        path,
        len(payload),
        float16,
        float_layers,
    )
    return Path(path)


# --- reading --------------------------------------------------------------------------------


def _read_header(path: Path, raw: bytes) -> tuple[dict[str, Any], dict[str, str]]:
    """Validate the safetensors framing and our metadata; returns (header, metadata)."""
    if len(raw) < 8:
        raise CheckpointError(f"{path} is truncated ({len(raw)} bytes)")
    size = int.from_bytes(raw[:8], "little")
    if size > MAX_HEADER:
        raise CheckpointError(
            f"{path} is not an mcn-compress packed file or checkpoint (its header would be "
            f"{size:,} bytes; packed files keep it under {MAX_HEADER:,})"
        )
    if 8 + size > len(raw):
        raise CheckpointError(f"{path} is truncated (header incomplete)")
    if json_depth_exceeds(raw[8 : 8 + size]):
        raise CheckpointError(
            f"{path} is corrupt (its header nests deeper than {MAX_JSON_DEPTH} levels)"
        )
    try:
        header = json.loads(raw[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path} is corrupt (unreadable header)") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt (unreadable header)")
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != PACKED_FORMAT:
        raise CheckpointError(
            f"{path} is a safetensors file but not an mcn-compress packed model "
            "(for float weights use --weights)"
        )
    _check_version(path, meta.get("version"))
    try:
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except (TypeError, KeyError, IndexError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt (bad tensor table)") from exc
    data_size = len(raw) - 8 - size
    if data_size < end:
        raise CheckpointError(f"{path} is truncated ({len(raw)} bytes, expected {8 + size + end})")
    if data_size > end:
        raise CheckpointError(f"{path} is corrupt ({data_size - end} trailing bytes)")
    return header, meta


def _check_version(path: Path, version: Any) -> int:
    """The packed format version ``version`` (a decimal string) as an int: anything but a
    positive integer is "not a valid version"; a newer one asks for an upgrade."""
    valid = isinstance(version, str) and version.isascii() and version.isdigit()
    if not valid or len(version) > 6 or int(version) < 1:
        raise CheckpointError(
            f"{path} is corrupt: {repr(version)[:40]} is not a valid packed format version "
            "(a positive integer written as a string)"
        )
    number = int(version)
    if number > PACKED_VERSION:
        raise CheckpointError(
            f"{path} has packed format version {number}; this mcn-compress reads up to "
            f"{PACKED_VERSION}: upgrade mcn-compress"
        )
    return number


def read_packed(path: str | Path) -> dict[str, Any]:
    """Read and validate a packed file into checkpoint-dict form (signs as ±1 latent weights).

    The result has the fields `formats.checkpoint.model_from_checkpoint` rebuilds from, plus
    ``float16`` and ``float_layers`` (int8 weights already dequantized to float32). Foreign,
    truncated, corrupt or oversized files raise `CheckpointError` (docs/design.md 4.5): the
    header, the index and every entry's shape are checked against the file's real size
    before anything is decompressed or allocated.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    path = Path(path)
    check_file(path, CheckpointError, missing=f"{path}: no such file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
    _, meta = _read_header(path, raw)
    try:
        blobs = st_load(raw)
    except SafetensorError as exc:
        raise CheckpointError(f"{path} is corrupt ({exc})") from exc
    if meta.get("sha256") != _digest(blobs, meta if int(meta["version"]) >= 2 else None):
        raise CheckpointError(
            f"{path} is damaged: its content does not match the checksum stored in it "
            "(checksum mismatch)"
        )
    try:
        if json_depth_exceeds(str(meta["description"])):
            raise ValueError(f"its description nests deeper than {MAX_JSON_DEPTH} levels")
        description = json.loads(meta["description"])
        data_bytes = len(raw) - 8 - int.from_bytes(raw[:8], "little")
        index = _decode_index(meta["index"], index_limit(data_bytes))
        state_dict, layers = _unpack_index(index, blobs)
        data = {
            "model": dict(description["model"]),
            "mcn": dict(description["mcn"]),
            "layers": layers,
            "state_dict": state_dict,
            "metadata": dict(description.get("metadata") or {}),
            "float16": bool(description.get("float16", False)),
            "float_layers": check_float_layers(
                str(description.get("float_layers", DEFAULT_FLOAT_LAYERS))
            ),
            "state_dict_metadata": dict(description.get("state_dict_metadata") or {}),
        }
    except (
        AttributeError,
        KeyError,
        TypeError,
        ValueError,
        ConfigError,
        zlib.error,
        binascii.Error,
        EOFError,
        RecursionError,
    ) as exc:
        raise CheckpointError(f"{path} is corrupt ({type(exc).__name__}: {exc})") from exc
    return data


def _entry(item: Any) -> tuple[str, str, tuple[int, ...]]:
    """One index entry ``[key, blob, shape]`` checked: strings, and a shape of at most
    `MAX_DIMS` non-negative integers."""
    if not isinstance(item, list) or len(item) != 3:
        raise ValueError(f"index entry {str(item)[:60]} is not [key, blob, shape]")
    key, blob, shape = item
    if not isinstance(key, str) or not isinstance(blob, str) or not isinstance(shape, list):
        raise ValueError(f"index entry {str(item)[:60]} is not [key, blob, shape]")
    if len(shape) > MAX_DIMS or not all(
        isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 1 << 62 for s in shape
    ):
        raise ValueError(
            f"entry {key[:100]} has the shape {str(shape)[:60]}; expected at most {MAX_DIMS} "
            "non-negative integers"
        )
    return key, blob, tuple(shape)


def _plan_index(
    index: list[Any], blobs: dict[str, torch.Tensor]
) -> list[tuple[str, str, tuple[int, ...], int, int, int]]:
    """Every entry as ``(key, blob, shape, start, count, scale_start)``, checked before any
    tensor is made: known blobs, each entry within its blob, every blob used exactly."""
    for name, blob in blobs.items():
        wanted = _BLOB_DTYPES.get(name, getattr(torch, name, None))
        if not isinstance(wanted, torch.dtype) or blob.dim() != 1 or blob.dtype != wanted:
            raise ValueError(f"blob {name[:40]!r} is not a flat tensor of the dtype it names")
    sizes = {name: blob.numel() for name, blob in blobs.items()}
    offsets = dict.fromkeys(blobs, 0)
    plan = []
    seen: set[str] = set()
    for item in index:
        key, blob, shape = _entry(item)
        if key in seen:
            raise ValueError(f"entry {key[:100]} appears twice")
        seen.add(key)
        if blob not in blobs:
            raise ValueError(f"entry {key[:100]} refers to a missing blob {blob[:40]!r}")
        if blob == QSCALE:
            raise ValueError(f"entry {key[:100]} refers to blob {blob!r}, which holds only scales")
        if blob == SIGNS and not key.endswith(".weight"):
            raise ValueError(f"sign entry {key[:100]} is not a conv weight")
        numel = math.prod(shape)
        count = -(-numel // 8) if blob == SIGNS else numel
        start = offsets[blob]
        if count > sizes[blob] - start:
            raise ValueError(f"blob {blob!r} is too short for entry {key[:100]}")
        offsets[blob] = start + count
        scale_start = offsets.get(QSCALE, 0)
        if blob == QINT8:
            rows = shape[0] if shape else 0
            if QSCALE not in blobs or not rows or rows > sizes[QSCALE] - scale_start:
                raise ValueError(f"blob {QSCALE!r} is missing or too short for entry {key[:100]}")
            offsets[QSCALE] = scale_start + rows
        plan.append((key, blob, shape, start, count, scale_start))
    unused = [name for name, used in offsets.items() if used != sizes[name]]
    if unused:
        raise ValueError(f"blob {unused[0]!r} holds more values than its entries")
    return plan


def _unpack_index(
    index: list[Any], blobs: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Slice the blobs back into state-dict entries; sign entries become ±1 float32 tensors,
    ``qint8`` entries ``q * scale`` in float32 (docs/design.md section 4.9)."""
    state_dict: dict[str, torch.Tensor] = {}
    layers: list[str] = []
    for key, blob, shape, start, count, scale_start in _plan_index(index, blobs):
        chunk = blobs[blob][start : start + count]
        if blob == SIGNS:
            state_dict[key] = unpack_signs(chunk, shape)
            layers.append(key.removesuffix(".weight"))
        elif blob == QINT8:
            scale = blobs[QSCALE][scale_start : scale_start + shape[0]]
            state_dict[key] = dequantize_int8(chunk.reshape(shape), scale)
        else:
            state_dict[key] = chunk.reshape(shape).clone()
    return state_dict, layers


def load_packed(path: str | Path) -> nn.Module:
    """Rebuild the MCN model of a packed file, in eval mode (see the module docstring).

    The architecture is rebuilt like a checkpoint's (`formats.checkpoint.model_from_checkpoint`):
    float model without downloads, converted at the stored layer names, then every entry
    loaded. Without ``float16`` and with float32 float layers its outputs equal those of the
    model that was exported.
    """
    data = read_packed(path)
    model = model_from_checkpoint(data, origin=str(path))
    update_info(model, packed_float16=data["float16"], packed_float_layers=data["float_layers"])
    return model
