"""`mcn-compress convert MODEL --out PATH`: float model -> MCN checkpoint."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mcn_compress.cli._common import (
    JsonOpt,
    OutOpt,
    QuietOpt,
    cli_errors,
    err,
    errors_only,
    out,
    parse_input_size,
    print_json,
)
from mcn_compress.cli.render import layer_table, summary_table
from mcn_compress.defaults import (
    AMP_MODES,
    CALIBRATION_BATCH,
    CALIBRATION_IMAGES,
    CALIBRATION_LR,
    CALIBRATION_STEPS,
    CALIBRATION_TEMPERATURE,
    DISTILL_COST,
    LARGE_INPUT_BATCH,
    LARGE_INPUT_STEPS,
    PROBE_IMAGES,
    default_bn_images,
    default_probe_images,
    default_steps,
)
from mcn_compress.errors import ConfigError, WeightsUnavailable
from mcn_compress.formats.atomic import check_not_input, check_writable
from mcn_compress.info import info_of

if TYPE_CHECKING:
    from mcn_compress.passes.calibration import CalibrationStep

WEIGHTS_ADVICE = "pass --weights FILE (a local state dict) or --no-pretrained (random weights)"
"""What `convert` accepts instead of published weights it cannot fetch."""


VAL_IMAGES = 2000
"""Most validation images `--calibrate-val` evaluates (a seeded subset): enough to tell one
calibration from another, seconds on a CPU for small inputs."""
LABELLED = ("fashion_mnist", "synthetic", "cifar10", "cifar100", "imagefolder")


def _labelled(source: str) -> str | None:
    """``source`` when it names a labelled dataset (not an image folder), else None."""
    return source if source.partition(":")[0] in LABELLED[:4] else None


def _record_top1(model: object, source: str, input_hw: tuple[int, ...] | None) -> None:
    """Top-1 of ``model`` on the validation split of ``source`` (`VAL_IMAGES` at most),
    recorded as the conversion summary's ``calibration_top1``."""
    import dataclasses

    from mcn_compress.evaluate import evaluate_accuracy
    from mcn_compress.info import update_info
    from mcn_compress.passes.planner import default_threads
    from mcn_compress.training.recipe import DataRecipe

    name, _, root = source.partition(":")
    recipe = DataRecipe(
        dataset=name,  # type: ignore[arg-type]
        root=root or None,
        image_size=input_hw[0] if input_hw else None,
        val_samples=VAL_IMAGES,
        workers=min(4, default_threads()),
    )
    top1, _ = evaluate_accuracy(model, recipe)  # type: ignore[arg-type]
    summary = info_of(model).summary  # type: ignore[arg-type]
    if summary is not None:
        update_info(model, summary=dataclasses.replace(summary, calibration_top1=top1))  # type: ignore[arg-type]


def _check_writable(path: Path, weights: Path | None = None) -> None:
    """Refuse an --out that cannot be written (`formats.atomic.check_writable`: a directory, a
    device or FIFO, a missing folder, a name too long), or that is the --weights input, before
    any work."""
    check_writable(path)
    check_not_input(path, {"--weights": weights})


def _progress(quiet: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[item]}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=quiet or not err.is_terminal,  # off a terminal it only leaves a blank line
    )


def convert_command(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL", help="timm name (resnet18), tv:NAME for torchvision, or hf-hub:ID."
        ),
    ],
    out_path: OutOpt,
    planes: Annotated[
        int,
        typer.Option(
            "--planes", "-k", metavar="K", help="K: M-Filter planes per layer (1 bit x K)."
        ),
    ] = 4,
    width: Annotated[
        str,
        typer.Option(
            metavar="keep|expand",
            help="keep: same tensor shapes (drop-in); expand: K-times wider tensors.",
        ),
    ] = "keep",
    mcn1: Annotated[
        bool, typer.Option("--mcn1", help="MCNs-1: one scalar per M plane instead of kh x kw.")
    ] = False,
    keep: Annotated[
        list[str] | None,
        typer.Option(
            "--keep", metavar="REGEX", help="Keep matching module names float (repeatable)."
        ),
    ] = None,
    only: Annotated[
        list[str] | None,
        typer.Option(
            "--only", metavar="REGEX", help="Convert only matching module names (repeatable)."
        ),
    ] = None,
    grouped: Annotated[
        bool, typer.Option("--grouped", help="Also convert grouped convs (per-group % K == 0).")
    ] = False,
    weights: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE", help="Local float weights (.pt/.pth/.safetensors state dict)."
        ),
    ] = None,
    pretrained: Annotated[
        bool,
        typer.Option(
            help="Fetch the published weights (from the local cache, else the network; "
            "offline and not cached, it fails at once)."
        ),
    ] = True,
    num_classes: Annotated[int | None, typer.Option(help="Classifier outputs.")] = None,
    in_chans: Annotated[int | None, typer.Option(help="Input channels (timm models).")] = None,
    calibrate_data: Annotated[
        str | None,
        typer.Option(
            metavar="DIR|DATASET",
            help="Unlabeled images to calibrate on: a folder of images, or fashion_mnist, "
            "synthetic, cifar10:ROOT, cifar100:ROOT (training split, labels ignored). "
            "Recalibrates BatchNorm, then distills from the float model (--calibrate-steps).",
        ),
    ] = None,
    calibrate_images: Annotated[
        int,
        typer.Option(help="How many calibration images (all of DIR when it holds fewer).", min=1),
    ] = CALIBRATION_IMAGES,
    calibrate_val: Annotated[
        str | None,
        typer.Option(
            "--calibrate-val",
            metavar="DATASET[:ROOT]",
            show_default=False,
            help="Labelled data to measure the top-1 right after calibration on (its validation "
            f"split, at most {VAL_IMAGES:,} images): fashion_mnist, synthetic, cifar10:ROOT, "
            "cifar100:ROOT or imagefolder:ROOT (ROOT/val/<class>/...). Default: the "
            "--calibrate-data dataset when it is one of these names.",
        ),
    ] = None,
    calibrate_steps: Annotated[
        int | None,
        typer.Option(
            help="Label-free distillation steps from the float model (KL at "
            f"T={CALIBRATION_TEMPERATURE:g}, AdamW {CALIBRATION_LR:g}) after the BatchNorm "
            f"recalibration; 0 = BatchNorm only (default: {CALIBRATION_STEPS} for inputs up to "
            f"64x64, else {LARGE_INPUT_STEPS}). The default takes about {DISTILL_COST}.",
            min=0,
            show_default=False,
        ),
    ] = None,
    calibrate_lr: Annotated[
        float,
        typer.Option(help="AdamW learning rate of the distillation (M-Filters: a tenth).", min=0),
    ] = CALIBRATION_LR,
    calibrate_temperature: Annotated[
        float,
        typer.Option(help="Softmax temperature T of the distillation's KL.", min=0),
    ] = CALIBRATION_TEMPERATURE,
    calibrate_amp: Annotated[
        str,
        typer.Option(
            metavar="|".join(AMP_MODES),
            help="Autocast of the distillation's forward passes: auto = bfloat16 where the "
            "CPU (AVX512-BF16/AMX) or GPU computes it natively; parameters stay float32.",
        ),
    ] = "auto",
    input_size: Annotated[
        str | None,
        typer.Option(
            "--input-size",
            metavar="S|H,W",
            show_default=False,
            help="Image size the float weights were trained at, for --calibrate-data (S, H,W "
            "or C,H,W; a C must match the model's channels) [default: the model's own, e.g. "
            "timm's pretrained config].",
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help=f"Calibration batch size (default: {CALIBRATION_BATCH} for inputs up to "
            f"64x64, else {LARGE_INPUT_BATCH}).",
            min=1,
            show_default=False,
        ),
    ] = None,
    device: Annotated[
        str,
        typer.Option(metavar="auto|cpu|cuda", help="Where to calibrate (auto: cuda when present)."),
    ] = "auto",
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Convert a float classifier into an MCN and save a checkpoint.

    Every eligible conv becomes an MCConv2d (1-bit filters x learned M-Filter); the stem,
    the classifier, depthwise and non-divisible convs stay float, each listed with the reason.
    Published weights come from the local cache, else the network; offline and not cached,
    the command stops at once: pass --weights FILE or --no-pretrained.

    Examples:

    \b
      mcn-compress convert resnet18 --out model.pt
      mcn-compress convert tv:resnet18 --weights r18.pth -k 2 -o r18-k2.pt
      mcn-compress convert resnet50 --no-pretrained --keep layer4 --json -o m.pt
      mcn-compress convert resnet18 --weights w.pth --calibrate-data imgs -o m.pt
      mcn-compress convert resnet14t --in-chans 1 --weights fm.pth -o m.pt \\
          --calibrate-data gray_pngs --input-size 28
    """
    from mcn_compress.calibration_data import check_image_count
    from mcn_compress.config import MCNConfig
    from mcn_compress.formats.checkpoint import save
    from mcn_compress.models import load_float_model
    from mcn_compress.passes.calibration import calibrate
    from mcn_compress.passes.convert import convert

    errors_only(quiet)
    show = not (quiet or json_output)
    with cli_errors():
        config = MCNConfig(
            planes=planes,
            width=width,  # type: ignore[arg-type]
            mcn1=mcn1,
            include=tuple(only or ()),
            exclude=tuple(keep or ()),
            grouped=grouped,
        )
        _check_writable(out_path, weights)
        size = parse_input_size(input_size)
        if size is not None and calibrate_data is None:
            raise ConfigError("--input-size sets the calibration size: it needs --calibrate-data")
        if calibrate_val is not None and calibrate_data is None:
            raise ConfigError("--calibrate-val measures the calibration: it needs --calibrate-data")
        if calibrate_val is not None and calibrate_val.partition(":")[0] not in LABELLED:
            raise ConfigError(
                f"--calibrate-val {calibrate_val!r}: expected one of {', '.join(LABELLED)} "
                "(NAME:ROOT for cifar and imagefolder)"
            )
        if calibrate_data is not None:
            check_image_count(calibrate_images)
        if calibrate_amp not in AMP_MODES:
            raise ConfigError(
                f"--calibrate-amp {calibrate_amp}: expected one of {', '.join(AMP_MODES)}"
            )
        if not (calibrate_lr > 0 and calibrate_temperature > 0):
            raise ConfigError("--calibrate-lr and --calibrate-temperature must be > 0")
        if device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device {device}: expected auto, cpu or cuda")
        with err.status(f"Loading {model}", spinner="dots") if show else contextlib.nullcontext():
            try:
                float_model = load_float_model(
                    model,
                    pretrained=pretrained,
                    weights=weights,
                    num_classes=num_classes,
                    in_chans=in_chans,
                ).eval()
            except WeightsUnavailable as exc:
                raise exc.with_advice(WEIGHTS_ADVICE) from exc
        calibration = bn_images = None
        probe_images = PROBE_IMAGES
        if calibrate_data is not None:
            import torch

            from mcn_compress.calibration_data import calibration_data

            if device == "cuda" and not torch.cuda.is_available():
                raise ConfigError("--device cuda: no CUDA device is visible; use auto or cpu")
            float_model.to("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
            from mcn_compress.module_utils import in_channels, resolve_input_shape

            shape = resolve_input_shape(float_model, size)
            if size is not None and len(size) == 3 and size[0] != in_channels(float_model):
                raise ConfigError(
                    f"--input-size {input_size}: the model takes {in_channels(float_model)} "
                    f"channels, not {size[0]} (give H,W, or convert with --in-chans {size[0]})"
                )
            calibration = calibration_data(
                calibrate_data,
                float_model,
                calibrate_images,
                batch_size,
                input_hw=shape[1:] if size is not None else None,
            )
            if calibrate_steps is None:
                calibrate_steps = default_steps(shape[1:])
            bn_images = default_bn_images(shape[1:])
            probe_images = default_probe_images(shape[1:])
        calibrate_steps = calibrate_steps or 0
        with _progress(not show) as bar:
            task = bar.add_task("Converting", total=None, item="")

            def on_layer(name: str, index: int, total: int) -> None:
                bar.update(task, completed=index, total=total, item=name)

            mcn = convert(float_model, config, progress=on_layer)
            if calibration is not None:
                n = len(calibration.dataset)  # type: ignore[arg-type]
                n = min(n, bn_images or n)
                cal = bar.add_task("Calibrating BN", total=n, item="images", visible=False)
                dist = bar.add_task("Distilling", total=calibrate_steps, item="", visible=False)

                def on_calibration(event: CalibrationStep) -> None:
                    if event.stage == "batchnorm":
                        bar.update(cal, completed=event.done, visible=True)
                    else:
                        kl = f"KL {event.kl:.4f}" if event.kl is not None else ""
                        bar.update(dist, completed=event.done, item=kl, visible=True)

                calibrate(
                    mcn,
                    float_model,
                    calibration,
                    steps=calibrate_steps,
                    progress=on_calibration,
                    lr=calibrate_lr,
                    temperature=calibrate_temperature,
                    amp=calibrate_amp,
                    bn_images=bn_images,
                    probe_images=probe_images,
                )
                val = calibrate_val or _labelled(calibrate_data)
                if val is not None:
                    with (
                        err.status(f"Measuring top-1 on {val}", spinner="dots")
                        if show
                        else contextlib.nullcontext()
                    ):
                        _record_top1(mcn, val, shape[1:] if size is not None else None)
        save(mcn, out_path)
        summary = info_of(mcn).summary
        assert summary is not None
    if json_output:
        print_json({"model": model, "out": str(out_path), **summary.to_dict()})
    elif show:
        out.print(layer_table(summary))
        out.print(summary_table(summary, title=escape(f"{model} -> {out_path}")))
