"""`mcn-compress quickstart`: the whole job on Fashion-MNIST, offline, in minutes on a CPU."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import TaskID
from rich.table import Table

from mcn_compress.cli._common import JsonOpt, QuietOpt, cli_errors, errors_only, out, print_json
from mcn_compress.cli.finetune import training_progress
from mcn_compress.defaults import CALIBRATION_IMAGES

# The quickstart's budget: 4.2 to 4.9 minutes on the 2-core development CPU, MCN top-1 88.3 to
# 88.7 (docs/quickstart.md); the fine-tuning epochs recover what fewer calibration steps leave.
QUICKSTART_ARCH = "mcn_resnet_tiny"
QUICKSTART_TRAIN_IMAGES = 60_000
QUICKSTART_FLOAT_EPOCHS = 2
QUICKSTART_MCN_EPOCHS = 3
QUICKSTART_CALIBRATION_STEPS = 500

if TYPE_CHECKING:
    from mcn_compress.experiments.fashion_mnist import Budget
    from mcn_compress.experiments.quickstart import Stage

STAGE_TITLES = {
    "float": "1/4 float model",
    "calibrate": "2/4 convert + calibrate",
    "finetune": "3/4 fine-tune MCN",
    "export": "4/4 export",
}


class StageBars:
    """One progress bar per quickstart stage, with elapsed time and an estimate (stderr)."""

    def __init__(self, show: bool) -> None:
        self.bars = training_progress(show)
        self.tasks: dict[str, TaskID] = {}

    def start(self, stage: str, total: int) -> None:
        self.tasks[stage] = self.bars.add_task(STAGE_TITLES[stage], total=total, info="")

    def advance(self, stage: str, done: int, info: str = "") -> None:
        self.bars.update(self.tasks[stage], completed=done, info=info)

    def finish(self, stage: str) -> None:
        task = self.bars.tasks[self.tasks[stage]]
        self.bars.update(self.tasks[stage], completed=task.total)


def _print_plan(stages: list[Stage], budget: Budget) -> None:
    total = sum(stage.seconds for stage in stages)
    where = "bfloat16 autocast" if budget.amp == "bf16" else "float32"
    out.print(f"[bold]Fashion-MNIST quickstart[/] (offline, CPU, {where}):", highlight=False)
    for stage in stages:
        when = "reused from an earlier run" if stage.reused else f"~{stage.seconds:.0f} s"
        out.print(f"  {STAGE_TITLES[stage.name]:<24} {stage.description} ({when})", markup=False)
    out.print(f"about {total / 60:.1f} minutes on this machine", highlight=False)


def quickstart_command(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Run folder.")] = Path(
        "runs/quickstart"
    ),
    arch: Annotated[
        str,
        typer.Option(
            help="Float architecture: mcn_resnet_tiny (16-32-64, the 5-minute default) or "
            "mcn_resnet_small (32-64-128, about 4x the compute per image)."
        ),
    ] = QUICKSTART_ARCH,
    planes: Annotated[int, typer.Option("--planes", "-k", help="K of the MCN.", min=1)] = 4,
    train_samples: Annotated[
        int, typer.Option(help="Training images used (of 60,000).", min=1)
    ] = QUICKSTART_TRAIN_IMAGES,
    pretrain_epochs: Annotated[
        int, typer.Option(help="Float training epochs.", min=1)
    ] = QUICKSTART_FLOAT_EPOCHS,
    epochs: Annotated[
        int, typer.Option(help="MCN fine-tuning epochs.", min=1)
    ] = QUICKSTART_MCN_EPOCHS,
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
    ] = QUICKSTART_CALIBRATION_STEPS,
    val_samples: Annotated[
        int | None,
        typer.Option(
            "--val-samples",
            min=1,
            show_default=False,
            help="Evaluate on a fixed random subset of this many test images [default: all "
            "10,000].",
        ),
    ] = None,
    data_root: Annotated[
        Path | None,
        typer.Option(help="Fashion-MNIST folder (default: Debian's dataset-fashion-mnist)."),
    ] = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """The whole job on Fashion-MNIST, offline: float CNN -> MCN -> calibrate -> fine-tune ->
    packed file.

    Trains a small float CNN, converts it to an MCN, calibrates it on unlabeled images,
    fine-tunes it and shows accuracy and real file sizes side by side. It first prints what it
    will do and about how long each stage takes on this machine (from a few timed steps), then
    one progress bar per stage. Runs finished earlier in the same --out folder with the same
    settings are reused. About 4.5 minutes on a 2-core CPU (docs/quickstart.md).

    Needs the data: apt-get update && apt-get install -y dataset-fashion-mnist

    Examples:

    \b
      mcn-compress quickstart
      mcn-compress quickstart --out /tmp/qs --json
      mcn-compress quickstart --planes 2 --epochs 5
    """
    from mcn_compress.experiments.fashion_mnist import Budget, cpu_amp
    from mcn_compress.experiments.quickstart import plan, quickstart

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
        amp=cpu_amp(),
        val_samples=val_samples,
    )
    with cli_errors():
        stages = plan(out_dir, budget, planes)
        if show:
            _print_plan(stages, budget)
        progress = StageBars(show)
        with progress.bars:
            result = quickstart(out_dir, budget, planes, progress, stages)
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
                "stage_seconds": result.stage_seconds,
            }
        )
        return
    if not show:
        return
    times = ", ".join(f"{name} {sec:.0f} s" for name, sec in result.stage_seconds.items())
    table = Table(title=f"Fashion-MNIST quickstart ({arch}, {result.minutes:.1f} min: {times})")
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
