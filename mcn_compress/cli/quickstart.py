"""`mcn-compress quickstart`: the whole job on Fashion-MNIST, offline, in minutes on a CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mcn_compress.cli._common import JsonOpt, QuietOpt, cli_errors, errors_only, out, print_json
from mcn_compress.cli.finetune import RichCallbacks, training_progress
from mcn_compress.defaults import CALIBRATION_IMAGES, CALIBRATION_STEPS


def quickstart_command(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Run folder.")] = Path(
        "runs/quickstart"
    ),
    arch: Annotated[
        str, typer.Option(help="Float architecture (mcn_resnet_small, mcn_resnet_tiny, ...).")
    ] = "mcn_resnet_small",
    planes: Annotated[int, typer.Option("--planes", "-k", help="K of the MCN.", min=1)] = 4,
    train_samples: Annotated[
        int, typer.Option(help="Training images used (of 60,000).", min=1)
    ] = 20000,
    pretrain_epochs: Annotated[int, typer.Option(help="Float training epochs.", min=1)] = 3,
    epochs: Annotated[int, typer.Option(help="MCN fine-tuning epochs.", min=1)] = 3,
    augment: Annotated[
        bool,
        typer.Option(
            "--augment",
            help="Random crop + flip while training (off by default: on Fashion-MNIST it "
            "cost the K=4 MCN 1.6 points, see the README).",
        ),
    ] = False,
    calibrate_images: Annotated[
        int, typer.Option(help="Unlabeled training images to calibrate the MCN on.", min=1)
    ] = CALIBRATION_IMAGES,
    calibrate_steps: Annotated[
        int,
        typer.Option(
            help="Label-free distillation steps from the float model right after conversion "
            "(0 = BatchNorm recalibration only).",
            min=0,
        ),
    ] = CALIBRATION_STEPS,
    data_root: Annotated[
        Path | None,
        typer.Option(help="Fashion-MNIST folder (default: Debian's dataset-fashion-mnist)."),
    ] = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """The whole job on Fashion-MNIST, offline: float CNN -> MCN -> fine-tune -> packed file.

    Trains a small float CNN, converts it to an MCN, fine-tunes it and shows accuracy and
    real file sizes side by side. Runs finished earlier in the same --out folder with the
    same settings are reused.

    Needs the data: apt-get install -y dataset-fashion-mnist
    """
    from mcn_compress.experiments.fashion_mnist import Budget
    from mcn_compress.experiments.quickstart import quickstart

    errors_only(quiet)
    show = not (quiet or json_output)
    budget = Budget(
        arch=arch,
        train_samples=train_samples,
        pretrain_epochs=pretrain_epochs,
        epochs=epochs,
        root=str(data_root) if data_root else None,
        augment=augment,
        calibrate_images=calibrate_images,
        calibrate_steps=calibrate_steps,
    )
    progress = training_progress(show)
    with cli_errors(), progress:

        def callbacks(stage: str) -> RichCallbacks | None:
            if not show:
                return None
            progress.console.print(f"[bold]{stage}[/]: {arch}")
            return RichCallbacks(progress, budget.batch_size)

        result = quickstart(out_dir, budget, planes=planes, callbacks_for=callbacks)
    if json_output:
        print_json(
            {
                "float_top1": result.float_top1,
                "float_bytes": result.float_bytes,
                "mcn_top1": result.mcn_top1,
                "mcn_after_conversion_top1": result.mcn_after_conversion_top1,
                "mcn_calibrated_top1": result.mcn_calibrated_top1,
                "packed_bytes": result.packed_bytes,
                "compression": result.ratio,
                "packed": str(result.packed_path),
                "checkpoint": str(result.checkpoint_path),
                "minutes": result.minutes,
            }
        )
        return
    if not show:
        return
    table = Table(title=f"Fashion-MNIST quickstart ({arch}, {result.minutes:.1f} min)")
    for name in ("model", "val top-1", "file", "bytes", "vs float"):
        table.add_column(name, justify="right" if name != "model" else "left")
    table.add_row(
        f"float32 ({pretrain_epochs} ep)",
        f"{result.float_top1:.2f}",
        "-",
        f"{result.float_bytes:,}",
        "1.0x",
    )
    if result.mcn_after_conversion_top1 is not None:
        table.add_row(
            f"MCN K={planes} after conversion (BatchNorm recalibrated)",
            f"{result.mcn_after_conversion_top1:.2f}",
            "-",
            "-",
            "-",
        )
    if result.mcn_calibrated_top1 is not None:
        table.add_row(
            f"MCN K={planes} calibrated ({calibrate_steps} steps, no labels)",
            f"{result.mcn_calibrated_top1:.2f}",
            "-",
            "-",
            "-",
        )
    table.add_row(
        f"MCN K={planes} (+{epochs} ep)",
        f"{result.mcn_top1:.2f}",
        result.packed_path.name,
        f"{result.packed_bytes:,}",
        f"{result.ratio:.1f}x smaller",
    )
    out.print(table)
    out.print(
        f"conv weights: {result.float_conv_bits / 8:,.0f} -> {result.conv_bits / 8:,.0f} bytes; "
        f"checkpoint for more fine-tuning: {result.checkpoint_path}",
        markup=False,
    )
