"""`mcn-compress export MODEL --format packed --out model.mcn`: ship a converted model."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from mcn_compress.cli._common import JsonOpt, OutOpt, QuietOpt, cli_errors, out, print_json
from mcn_compress.errors import CheckpointError, ConfigError


class ExportFormat(str, Enum):
    """Export targets (DESIGN.md section 4: packed 1-bit file, ONNX)."""

    packed = "packed"
    onnx = "onnx"


def _check_output(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise CheckpointError(f"--out {path} is a directory; give a file name such as model.mcn")
    if not parent.is_dir():
        raise CheckpointError(f"--out {path}: directory {parent} does not exist")


def export_command(
    model_path: Annotated[
        Path, typer.Argument(help="MCN checkpoint (.pt) or packed file to export.")
    ],
    out_path: OutOpt,
    fmt: Annotated[
        ExportFormat, typer.Option("--format", "-f", help="Output format.")
    ] = ExportFormat.packed,
    float16: Annotated[
        bool, typer.Option("--float16", help="Store the float parts as float16 (half size).")
    ] = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Export a converted model: packed = sign bits 8 per byte + float parts, no latent filters.

    `mcn_compress.load` reads the packed file back; without --float16 its outputs are
    identical to the checkpoint's.

    Examples:

      mcn-compress export model.pt --out model.mcn

      mcn-compress export model.pt --float16 -o model-fp16.mcn
    """
    from mcn_compress.export import export_packed, load_model_file
    from mcn_compress.report import size_bound, storage_counts

    with cli_errors():
        if fmt is ExportFormat.onnx:
            raise ConfigError("--format onnx is not implemented yet; use --format packed")
        _check_output(out_path)
        model = load_model_file(model_path)
        export_packed(model, out_path, float16=float16, parent=str(model_path))
        size = out_path.stat().st_size
        minimum = storage_counts(model, 2 if float16 else None).min_bytes
    result = {
        "input": str(model_path),
        "out": str(out_path),
        "format": fmt.value,
        "float16": float16,
        "bytes": size,
        "min_bytes": minimum,
        "bound_bytes": size_bound(minimum),
        "input_bytes": model_path.stat().st_size,
    }
    if json_output:
        print_json(result)
    elif not quiet:
        out.print(
            f"wrote {out_path}: {size:,} bytes (theoretical minimum {minimum:,}, "
            f"+{size / minimum - 1:.2%}); {model_path} was {result['input_bytes']:,} bytes",
            soft_wrap=True,
            markup=False,
        )
