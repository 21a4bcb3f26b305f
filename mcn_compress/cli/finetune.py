"""`mcn-compress finetune --recipe FILE`: fine-tune an MCN with the MCN loss."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from mcn_compress.cli._common import (
    JsonOpt,
    QuietOpt,
    cli_errors,
    err,
    errors_only,
    out,
    print_json,
)
from mcn_compress.errors import ConfigError


class RichCallbacks:
    """Progress bars for training and evaluation (throughput, loss parts, lr, ETA)."""

    def __init__(self, progress: Progress, batch_size: int, show: bool = True) -> None:
        self.progress = progress
        self.batch_size = batch_size
        self.show = show  # print a line per epoch (False with --quiet / --json)
        self.task: int | None = None
        self.eval_task: int | None = None
        self._start = 0.0
        self._done = 0

    def _drop_eval_task(self) -> None:
        if self.eval_task is not None:
            self.progress.remove_task(self.eval_task)
            self.eval_task = None

    def on_epoch_start(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        self._drop_eval_task()
        self.task = self.progress.add_task(
            f"epoch {epoch + 1}/{epochs}", total=steps, completed=done, info=""
        )
        self._start = time.perf_counter()
        self._done = 0

    def on_step(self, values: dict[str, float]) -> None:
        assert self.task is not None
        self._done += 1
        rate = self._done * self.batch_size / max(time.perf_counter() - self._start, 1e-9)
        info = (
            f"{rate:6.0f} img/s  loss {values['loss']:.3f} (ce {values['softmax']:.3f} "
            f"filt {values['filter']:.3f} ctr {values['center']:.3f})  "
            f"top1 {values['top1']:.1f}  lr {values['lr']:.2e}"
        )
        self.progress.update(self.task, advance=1, info=info)

    def on_eval_start(self, steps: int) -> None:
        self._drop_eval_task()
        self.eval_task = self.progress.add_task("  validate", total=steps, info="")

    def on_eval_step(self) -> None:
        assert self.eval_task is not None
        self.progress.advance(self.eval_task)

    def on_epoch_end(self, metrics: object, best: bool) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None
        self._drop_eval_task()
        if not self.show:  # --quiet / --json: nothing but errors on stderr
            return
        m = metrics
        mark = " [green](best)[/]" if best else ""
        self.progress.console.print(
            f"epoch {m.epoch}: loss {m.loss:.4f}  val top-1 {m.val_top1:.2f}  "  # type: ignore[attr-defined]
            f"top-5 {m.val_top5:.2f}  {m.images_per_sec:.0f} img/s{mark}"  # type: ignore[attr-defined]
        )


def training_progress(show: bool) -> Progress:
    """The progress display of training runs (stderr; off with --quiet/--json, and when
    stderr is not a terminal, where it would only leave blank lines)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=err,
        disable=not show or not err.is_terminal,
    )


def history_table(history: list[object]) -> Table:
    """Per-epoch summary table."""
    table = Table(title="Fine-tuning")
    for name in ("epoch", "loss", "softmax", "filter", "center", "val top-1", "val top-5", "img/s"):
        table.add_column(name, justify="right")
    for m in history:
        d = asdict(m)  # type: ignore[call-overload]
        table.add_row(
            str(d["epoch"]),
            f"{d['loss']:.4f}",
            f"{d['softmax']:.4f}",
            f"{d['filter']:.4f}",
            f"{d['center']:.4f}",
            f"{d['val_top1']:.2f}",
            f"{d['val_top5']:.2f}",
            f"{d['images_per_sec']:.0f}",
        )
    return table


def finetune_command(
    recipe: Annotated[
        Path,
        typer.Option("--recipe", "-r", metavar="FILE", help="YAML recipe (see recipes/)."),
    ],
    checkpoint: Annotated[
        Path | None,
        typer.Argument(
            metavar="CHECKPOINT",
            help="A checkpoint from `mcn-compress convert` to fine-tune instead of the recipe's "
            "model (same as --set model.checkpoint=PATH; the recipe's model.name, weights, "
            "convert and pretrained are then ignored; model.num_classes, when it differs, "
            "replaces the classifier by a new one).",
            show_default=False,
        ),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="KEY=VALUE",
            help="Override a recipe key, e.g. --set optim.lr=0.01 (repeatable).",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run in output.dir from last.pt (a finished run too, with more "
            "optim.epochs).",
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace a finished or stopped run in output.dir (refused without it).",
        ),
    ] = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune an MCN with the MCN loss: softmax + filter loss + centre loss.

    Trains a checkpoint from `mcn-compress convert` (CHECKPOINT) or the recipe's float model,
    converted on the fly. Writes recipe.yaml, metrics.jsonl, metrics.csv, last.pt and best.pt
    to output.dir. Ctrl-C saves a resumable checkpoint; --resume continues it, and extends a
    finished run given more epochs (--resume --set optim.epochs=N).

    A recipe is YAML with six sections (recipes/ holds commented examples; --set KEY=VALUE
    overrides any key, docs/finetune.md lists them all):

    \b
      model    name (timm, tv:NAME) or checkpoint; pretrained, weights,
               num_classes (default: the data's), in_chans, convert
               (planes, width, mcn1), teacher
      data     dataset (imagefolder, cifar10, cifar100, fashion_mnist,
               synthetic), root, image_size, batch_size, workers, augment,
               train_samples, val_samples
      optim    optimizer, epochs, lr, lr_mfilter, weight_decay, schedule,
               warmup_epochs, milestones
      loss     theta, lambda_center, alpha, distill, temperature
      runtime  device, amp, channels_last, compile, seed
      output   dir

    Several GPUs or machines: torchrun --nproc_per_node 8 -m mcn_compress finetune ...

    Examples:

    \b
      mcn-compress finetune --recipe recipes/fashion-mnist.yaml
      mcn-compress finetune model.pt --recipe recipes/fashion-mnist.yaml
      mcn-compress finetune -r recipes/cifar10.yaml --set data.root=/data/cifar
      mcn-compress finetune -r recipes/cifar10.yaml --resume --set optim.epochs=60

    Your own images on a CPU: the ImageNet recipe on a folder DIR holding
    DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg (the recipe's device is cuda):

    \b
      mcn-compress finetune --recipe recipes/imagenet.yaml --set data.root=DIR \\
          --set runtime.device=cpu --set data.workers=2
    """
    from mcn_compress.limits import check_file
    from mcn_compress.training.recipe import load_recipe
    from mcn_compress.training.trainer import Trainer

    errors_only(quiet)
    show = not (quiet or json_output)
    with cli_errors():
        overrides = list(overrides or [])
        if checkpoint is not None:
            check_file(
                checkpoint, ConfigError, "checkpoint ", f"checkpoint {checkpoint}: no such file"
            )
            overrides.append(f"model.checkpoint={checkpoint}")
        spec = load_recipe(recipe, overrides)
        progress = training_progress(show)
        with progress:
            trainer = Trainer(
                spec,
                callbacks=RichCallbacks(progress, spec.data.batch_size, show),
                resume=resume,
                overwrite=overwrite,
            )
            try:
                result = trainer.fit()
            finally:
                trainer.close()
    if result.stopped:
        last = escape(str(result.run_dir / "last.pt"))
        err.print(
            f"[yellow]stopped:[/] a resumable checkpoint is in {last}; "
            "run the same command with --resume to continue",
            soft_wrap=True,
        )
        raise typer.Exit(130)
    if not trainer.dist.is_main:
        return
    if json_output:
        print_json(
            {
                "run_dir": str(result.run_dir),
                "best_top1": result.best_top1,
                "history": [asdict(m) for m in result.history],
            }
        )
    elif show:
        out.print(history_table(result.history))
        out.print(
            f"best top-1 {result.best_top1:.2f}  checkpoints in {result.run_dir}/", markup=False
        )
