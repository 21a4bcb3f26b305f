"""`mcn-compress export MODEL --out PATH`: ship a converted model as a packed file or ONNX."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from mcn_compress.cli._common import (
    JsonOpt,
    OutOpt,
    QuietOpt,
    cli_errors,
    errors_only,
    out,
    parse_input_size,
    print_json,
)
from mcn_compress.defaults import (
    ACTIVATIONS,
    DEFAULT_INT8_IMAGES,
    FLOAT_LAYER_MODES,
    WEIGHT_LAYOUTS,
)
from mcn_compress.errors import ConfigError
from mcn_compress.formats.atomic import check_not_input, check_writable
from mcn_compress.passes.planner import Compute


class ExportFormat(str, Enum):
    """Export targets (docs/design.md section 4: packed 1-bit file, ONNX)."""

    packed = "packed"
    onnx = "onnx"


OnnxWeights = Enum(  # type: ignore[misc]
    "OnnxWeights", {name: name for name in WEIGHT_LAYOUTS}, type=str
)
"""How ONNX stores the converted convs' weights (`defaults.WEIGHT_LAYOUTS`)."""

OnnxCompute = Enum(  # type: ignore[misc]
    "OnnxCompute", {c.value: c.value for c in Compute if c is not Compute.TIME}, type=str
)
"""How ONNX computes the converted convs (`passes.planner.Compute` but ``time``; design.md 4.8)."""

Activations = Enum(  # type: ignore[misc]
    "Activations", {name: name for name in ACTIVATIONS}, type=str
)
"""ONNX activations: float32, or int8 (a QDQ graph; docs/design.md section 4.10)."""

FloatLayers = Enum(  # type: ignore[misc]
    "FloatLayers", {name: name for name in FLOAT_LAYER_MODES}, type=str
)
"""How the weights of the layers that stay float are stored (`formats.quantize`; design.md 4.9)."""


def _check_output(path: Path, model_path: Path) -> None:
    """Refuse an --out that cannot be written (`formats.atomic.check_writable`: a directory, a
    device or FIFO, a missing folder, a name too long), or that is the model being exported."""
    check_writable(path)
    check_not_input(path, {"MODEL": model_path})


def export_command(
    model_path: Annotated[
        Path,
        typer.Argument(metavar="MODEL", help="MCN checkpoint (.pt) or packed file to export."),
    ],
    out_path: OutOpt,
    fmt: Annotated[
        ExportFormat, typer.Option("--format", "-f", help="Output format.")
    ] = ExportFormat.packed,
    float16: Annotated[
        bool, typer.Option("--float16", help="Store the float parts as float16 (half size).")
    ] = False,
    float_layers: Annotated[
        FloatLayers,
        typer.Option(
            "--float-layers",
            help="Weights of the layers that stay float (stem, classifier, depthwise and other "
            "float convs): float32 (as the other float parts), float16, or int8 per output "
            "channel with float32 scales (ONNX: DequantizeLinear, opset >= 13). Biases, "
            "BatchNorm and M-Filters are not changed.",
        ),
    ] = FloatLayers.float32,
    weights: Annotated[
        OnnxWeights | None,
        typer.Option(
            "--weights",
            help="ONNX only: packed = sign bits as uint8 unpacked in the graph (default); "
            "folded = float Conv weights.",
        ),
    ] = None,
    opset: Annotated[
        int | None,
        typer.Option("--opset", metavar="N", help="ONNX only: opset version (11..20, default 18)."),
    ] = None,
    input_size: Annotated[
        str | None,
        typer.Option(
            "--input-size",
            metavar="SIZE",
            help="ONNX only: S, H,W or C,H,W of one input (default: the model's).",
        ),
    ] = None,
    dynamic_batch: Annotated[
        bool, typer.Option("--dynamic-batch", help="ONNX only: symbolic batch dimension.")
    ] = False,
    compute: Annotated[
        OnnxCompute | None,
        typer.Option(
            "--compute",
            help="ONNX only: auto = factored form (out/K binary filters + M, K times fewer "
            "MACs) where it is faster, per layer (default with --weights packed); factored = "
            "every converted conv factored; dense = one Conv with the rebuilt weight.",
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            min=1,
            show_default=False,
            help="ONNX only: the onnxruntime intra-op threads the file will run with; --compute "
            "auto picks each layer's form for that count (default: this machine's cores).",
        ),
    ] = None,
    activations: Annotated[
        Activations,
        typer.Option(
            "--activations",
            help="ONNX only: float32, or int8 = a QDQ graph with uint8 activations that "
            "onnxruntime and OpenVINO run with int8 kernels (needs --calibrate-data; every "
            "layer int8, the sign bits still packed).",
        ),
    ] = Activations.float32,
    calibrate_data: Annotated[
        str | None,
        typer.Option(
            "--calibrate-data",
            metavar="DIR|DATASET",
            help="With --activations int8: unlabeled images for the activation ranges, a "
            "folder of images or fashion_mnist, cifar10:ROOT, cifar100:ROOT, synthetic.",
        ),
    ] = None,
    calibrate_images: Annotated[
        int | None,
        typer.Option(
            "--calibrate-images",
            metavar="N",
            show_default=False,
            help=f"With --activations int8: images for the ranges (default {DEFAULT_INT8_IMAGES}).",
        ),
    ] = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Export a converted model: a packed 1-bit file, or ONNX that onnxruntime runs.

    packed: sign bits 8 per byte + float parts, no latent filters; `mcn_compress.load` reads it
    back, and without --float16 its outputs are identical to the checkpoint's.

    onnx: standard operators only. --weights packed keeps the sign bits as uint8 and unpacks them
    in the graph (onnxruntime does it once, at session creation); --weights folded stores float
    Conv weights. BatchNorm after a conv is folded in both. --compute (packed only) runs the
    converted convs factored where faster (default), all factored, or dense.

    --float-layers int8 stores the weights of the layers that stay float as int8 with one scale
    per output channel (scale = max|W| / 127), about 4x fewer bytes for them; their outputs move
    by well under 1% (docs/design.md section 4.9). Activations stay float32.

    --activations int8 makes a W1A8 file: int8 activations with ranges from --calibrate-data,
    every layer int8, the converted convs' int8 weights rebuilt from their sign bits and each
    in the int8 form that is fastest for --threads (docs/design.md section 4.10).

    Examples:

    \b
      mcn-compress export model.pt --out model.mcn
      mcn-compress export model.pt --float16 -o model-fp16.mcn
      mcn-compress export model.pt --float-layers int8 -o model-int8.mcn
      mcn-compress export model.pt --format onnx --dynamic-batch -o model.onnx
      mcn-compress export model.pt -f onnx --weights folded -o folded.onnx
      mcn-compress export model.pt -f onnx --input-size 3,160,160 -o m160.onnx
      mcn-compress export model.pt -f onnx --compute dense -o dense.onnx
      mcn-compress export model.pt -f onnx --threads 4 -o model-4threads.onnx
      mcn-compress export model.pt -f onnx --float-layers int8 -o model-int8.onnx
      mcn-compress export model.pt -f onnx --activations int8 \\
          --calibrate-data imgs -o model-w1a8.onnx
    """
    from mcn_compress.formats.load import load
    from mcn_compress.formats.packed import export_packed
    from mcn_compress.profile import size_bound, storage_counts

    errors_only(quiet)
    with cli_errors():
        _check_output(out_path, model_path)
        if fmt is ExportFormat.onnx:
            if float16:
                raise ConfigError("--float16 applies to --format packed only")
            size_hint = parse_input_size(input_size)
            int8 = _int8_options(
                activations, calibrate_data, calibrate_images, weights, float_layers.value
            )
            model = load(model_path)
            calibration = _calibration(model, calibrate_data, calibrate_images, size_hint)
            result = {
                "input": str(model_path),
                **_export_onnx(
                    model,
                    out_path,
                    weights,
                    opset,
                    size_hint,
                    dynamic_batch,
                    compute,
                    float_layers.value,
                    threads,
                    calibration=calibration if int8 else None,
                ),
            }
        else:
            onnx_only = [
                flag
                for flag, given in (
                    ("--weights", weights is not None),
                    ("--opset", opset is not None),
                    ("--input-size", input_size is not None),
                    ("--dynamic-batch", dynamic_batch),
                    ("--compute", compute is not None),
                    ("--threads", threads is not None),
                    ("--activations", activations is not Activations.float32),
                    ("--calibrate-data", calibrate_data is not None),
                    ("--calibrate-images", calibrate_images is not None),
                )
                if given
            ]
            if onnx_only:
                verb = "applies" if len(onnx_only) == 1 else "apply"
                raise ConfigError(f"{', '.join(onnx_only)} {verb} to --format onnx only")
            model = load(model_path)
            export_packed(
                model,
                out_path,
                float16=float16,
                parent=str(model_path),
                float_layers=float_layers.value,
            )
            size = out_path.stat().st_size
            minimum = storage_counts(model, 2 if float16 else None, float_layers.value).min_bytes
            result = {
                "input": str(model_path),
                "out": str(out_path),
                "format": fmt.value,
                "float16": float16,
                "float_layers": float_layers.value,
                "bytes": size,
                "min_bytes": minimum,
                "bound_bytes": size_bound(minimum),
            }
    result["input_bytes"] = model_path.stat().st_size
    if json_output:
        print_json(result)
    elif quiet:
        return
    elif fmt is ExportFormat.onnx:
        out.print(
            f"wrote {out_path}: {result['bytes']:,} bytes, {result['weights']} weights "
            f"({result['packed_layers']} layers as sign bits, {result['factored_layers']} run "
            f"factored{_for_threads(result)}, {result['folded_batchnorms']} BatchNorms folded), "
            f"{_activations(result)}, opset {result['opset']}"
            f"{' (TorchScript exporter)' if result['exporter'] == 'torchscript' else ''}, input "
            f"{'x'.join(str(d) for d in result['input_shape'])}"
            f"{' (dynamic batch)' if result['dynamic_batch'] else ''}; {model_path} was "
            f"{result['input_bytes']:,} bytes",
            soft_wrap=True,
            markup=False,
        )
    else:
        minimum = result["min_bytes"]
        out.print(
            f"wrote {out_path}: {result['bytes']:,} bytes (theoretical minimum {minimum:,}, "
            f"+{result['bytes'] / minimum - 1:.2%}; float layers {result['float_layers']}); "
            f"{model_path} was "
            f"{result['input_bytes']:,} bytes",
            soft_wrap=True,
            markup=False,
        )


def _int8_options(
    activations: Activations,
    calibrate_data: str | None,
    calibrate_images: int | None,
    weights: OnnxWeights | None,
    float_layers: str,
) -> bool:
    """Whether int8 activations are asked for; a one-line `ConfigError` for options that do
    not go together."""
    from mcn_compress.calibration_data import check_image_count

    int8 = activations is Activations.int8
    if not int8 and (calibrate_data is not None or calibrate_images is not None):
        raise ConfigError("--calibrate-data and --calibrate-images need --activations int8")
    if int8 and calibrate_data is None:
        raise ConfigError(
            "--activations int8 needs --calibrate-data DIR|DATASET: unlabeled images for the "
            "activation ranges (a folder of images, fashion_mnist, synthetic, ...)"
        )
    if int8 and weights is not None and weights.value != "packed":
        raise ConfigError("--activations int8 keeps the sign bits: drop --weights folded")
    if int8 and float_layers != "float32":
        raise ConfigError("--activations int8 makes every layer int8: drop --float-layers")
    check_image_count(calibrate_images)
    return int8


def _calibration(
    model: object,
    source: str | None,
    images: int | None,
    size: tuple[int, ...] | None,
) -> object | None:
    """Batches of calibration images at the export's input size (None without a source)."""
    if source is None:
        return None
    from mcn_compress.calibration_data import calibration_data
    from mcn_compress.module_utils import resolve_input_shape

    shape = resolve_input_shape(model, size)  # type: ignore[arg-type]
    return calibration_data(
        source,
        model,  # type: ignore[arg-type]
        DEFAULT_INT8_IMAGES if images is None else images,
        batch_size=32,
        input_hw=(shape[1], shape[2]),
    )


def _activations(result: dict[str, object]) -> str:
    if result.get("activations") == "int8":
        return f"int8 activations and layers (ranges from {result['calibration_images']} images)"
    return f"float layers {result['float_layers']}"


def _for_threads(result: dict[str, object]) -> str:
    threads = result.get("threads")
    return f" for {threads} thread{'s' if threads != 1 else ''}" if threads else ""


def _export_onnx(
    model: object,
    out_path: Path,
    weights: OnnxWeights | None,
    opset: int | None,
    input_size: tuple[int, ...] | None,
    dynamic_batch: bool,
    compute: OnnxCompute | None = None,
    float_layers: str = "float32",
    threads: int | None = None,
    calibration: object | None = None,
) -> dict[str, object]:
    """Call the library's ONNX exporter; returns the JSON-ready result."""
    from mcn_compress.formats.onnx import export_onnx
    from mcn_compress.formats.onnx_torch import DEFAULT_OPSET

    layout = (weights or OnnxWeights.packed).value
    default = "auto" if layout == "packed" else "dense"
    result = export_onnx(
        model,  # type: ignore[arg-type]
        out_path,
        weights=layout,
        compute=compute.value if compute is not None else default,
        opset=DEFAULT_OPSET if opset is None else opset,
        input_size=input_size,
        dynamic_batch=dynamic_batch,
        float_layers=float_layers,
        threads=threads,
        activations="int8" if calibration is not None else "float32",
        calibration=calibration,  # type: ignore[arg-type]
        calibration_images=DEFAULT_INT8_IMAGES,
    )
    return {**result.to_dict(), "format": ExportFormat.onnx.value}
