"""IDX files (MNIST, Fashion-MNIST; http://yann.lecun.com/exdb/mnist/), read within bounds.

Header: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D
float32, 0x0E float64), the number of dimensions, then each dimension as a big-endian uint32;
the data follows, big-endian, row-major. The data must have exactly the size the header
declares, at most `MAX_IDX_BYTES`; a gzipped file is decompressed only that far, so a gzip
bomb is refused a byte past what its header declares (docs/design.md 4.5 and 5).
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mcn_compress.errors import DataError, first_line
from mcn_compress.limits import check_file, inflate, inflate_head

MAX_IDX_BYTES = 256 * 1024 * 1024
"""Most data bytes of one IDX file (Fashion-MNIST's largest holds 47 MB)."""

# IDX type codes: code -> big-endian numpy dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_LONGEST_HEADER = 4 + 4 * 255
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | Path) -> torch.Tensor:
    """Parse an IDX file (gzip-compressed or not) into a tensor (see the module docstring);
    every problem is one `DataError` naming the file."""
    path = check_file(path, DataError, "IDX file ")
    try:
        with path.open("rb") as handle:
            raw = handle.read(_LONGEST_HEADER)
            packed = raw[:2] == _GZIP_MAGIC
            if packed:
                raw += handle.read()  # the compressed bytes: as many as the file holds
            head = inflate_head(raw, _LONGEST_HEADER, gzip=True) if packed else raw
            dims, dtype, header = _idx_header(path, head)
            size = header + math.prod(dims) * dtype.itemsize
            if size - header > MAX_IDX_BYTES:
                raise DataError(
                    f"{path}: its IDX header declares {list(dims)} ({dtype.name}), "
                    f"{size - header:,} bytes; mcn-compress reads IDX files up to "
                    f"{MAX_IDX_BYTES:,}"
                )
            if packed:
                data = inflate(raw, size, gzip=True)
            else:
                data = raw[: size + 1] + handle.read(max(0, size + 1 - len(raw)))
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read IDX file {path}: {first_line(exc)}") from exc
    if data is None or len(data) != size:
        found = "more" if data is None or len(data) > size else f"{len(data) - header:,}"
        raise DataError(
            f"{path}: IDX data has {found} bytes, its header {list(dims)} ({dtype.name}) "
            f"needs {size - header:,}"
        )
    writable = data if isinstance(data, bytearray) else bytearray(data)
    array = np.frombuffer(writable, dtype=dtype, offset=header).reshape(dims)
    if dtype.itemsize > 1:  # to native byte order, in place
        array = array.byteswap(inplace=True).view(dtype.newbyteorder("="))
    return torch.from_numpy(array)


def _idx_header(path: Path, head: bytes) -> tuple[tuple[int, ...], np.dtype[Any], int]:
    """``(dims, dtype, header bytes)`` from the first bytes of an IDX file."""
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {head[:4].hex()})")
    ndim = head[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(head) < header:
        raise DataError(f"{path}: IDX header is truncated or has no dimensions")
    dims = struct.unpack(f">{ndim}I", head[4:header])
    return dims, np.dtype(_IDX_DTYPES[head[2]]), header
