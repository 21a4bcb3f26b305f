"""`mcn-compress quickstart`: float model -> MCN -> calibrate -> fine-tune -> packed file, on
Fashion-MNIST, with a plan (which stages run, roughly how long) and per-stage progress events.
Numbers only: the CLI draws the plan and the bars."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from mcn_compress.defaults import CALIBRATION_BATCH, PROBE_IMAGES
from mcn_compress.experiments.fashion_mnist import (
    Budget,
    Variant,
    finetune_variant,
    float_model,
    float_run_finished,
    pretrain_float,
)
from mcn_compress.training.run_dir import EpochMetrics

if TYPE_CHECKING:
    from mcn_compress.passes.calibration import CalibrationStep

STAGES = ("float", "calibrate", "finetune", "export")
"""The quickstart's stages, in order."""
TEST_IMAGES = 10_000  # Fashion-MNIST's test split, evaluated after every epoch by default


@dataclass(frozen=True)
class Stage:
    """One stage of the plan: what it does, its progress units and its estimated seconds
    (0 when a finished run is reused)."""

    name: str
    description: str
    units: int
    seconds: float
    reused: bool = False


class StageProgress(Protocol):
    """Progress events of the quickstart, one stage at a time."""

    def start(self, stage: str, total: int) -> None: ...

    def advance(self, stage: str, done: int, info: str = "") -> None: ...

    def finish(self, stage: str) -> None: ...


@dataclass
class QuickstartResult:
    """Before and after of the quickstart: accuracy (float32, on the 10,000 test images, of the
    float model and of the packed file), real file sizes and stage times."""

    float_top1: float
    float_bytes: int
    mcn_top1: float
    mcn_after_conversion_top1: float | None
    mcn_calibrated_top1: float | None
    packed_bytes: int
    packed_path: Path
    checkpoint_path: Path
    conv_bits: int
    float_conv_bits: int
    minutes: float
    stage_seconds: dict[str, float]

    @property
    def ratio(self) -> float:
        return self.float_bytes / self.packed_bytes


def _step_seconds(budget: Budget, model: torch.nn.Module, batch: int, repeats: int = 3) -> float:
    """Seconds of one training step (forward, backward, AdamW) of ``model`` at ``batch`` on
    random images, with the budget's autocast: the median of ``repeats`` after a warm-up."""
    model = _layout(model, budget).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    times = []
    for index in range(repeats + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=budget.amp == "bf16"):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if index:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def plan(out_dir: Path, budget: Budget, planes: int = 4) -> list[Stage]:
    """The stages `quickstart` will run for ``budget``, with estimates from a few timed
    training steps on this machine (about a second). A finished float run is reused."""
    from mcn_compress.config import MCNConfig
    from mcn_compress.passes.convert import convert

    reused = float_run_finished(budget, out_dir / "float")
    probe = float_model(budget)
    float_step = _step_seconds(budget, probe, budget.batch_size)
    mcn = convert(probe, MCNConfig(planes=planes))
    mcn_step = _step_seconds(budget, mcn, budget.batch_size)
    calibration_step = _step_seconds(budget, mcn, CALIBRATION_BATCH)
    # two BatchNorm passes over the images and two KL probes (both models): forwards only
    calibration_forwards = (2 * budget.calibrate_images + 4 * PROBE_IMAGES) / CALIBRATION_BATCH
    train = budget.train_samples or 60_000
    steps = math.ceil(train / budget.batch_size)
    test_images = budget.val_samples or TEST_IMAGES
    eval_s = test_images / budget.batch_size * float_step / 3  # a forward is ~1/3 of a step
    stages = [
        Stage(
            "float",
            f"{budget.arch}, {budget.pretrain_epochs} epochs on {train:,} images",
            budget.pretrain_epochs * steps,
            0.0 if reused else budget.pretrain_epochs * (steps * float_step + eval_s),
            reused,
        ),
        Stage(
            "calibrate",
            f"K={planes}, {budget.calibrate_steps} label-free steps on "
            f"{budget.calibrate_images:,} images",
            budget.calibrate_steps,
            budget.calibrate_steps * calibration_step
            + calibration_forwards * calibration_step / 3
            + 3 * eval_s,
        ),
        Stage(
            "finetune",
            f"{budget.epochs} epochs with the MCN loss",
            budget.epochs * steps,
            budget.epochs * (steps * mcn_step + eval_s),
        ),
        Stage(
            "export",
            f"{out_dir / 'model.mcn'}, then top-1 of both models",
            1,
            2.0 + (1 if _float_top1_from_training(budget) else 2) * eval_s,
        ),
    ]
    return stages


class _TrainingStage:
    """Trainer callbacks that report one training stage's steps as one bar."""

    def __init__(self, progress: StageProgress, stage: str) -> None:
        self.progress, self.stage = progress, stage
        self.done = 0

    def on_epoch_start(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        self.done = epoch * steps + done

    def on_step(self, values: dict[str, float]) -> None:
        self.done += 1
        info = f"loss {values['loss']:.3f}  top-1 {values['top1']:.1f}"
        self.progress.advance(self.stage, self.done, info)

    def on_eval_start(self, steps: int) -> None:
        pass

    def on_eval_step(self) -> None:
        pass

    def on_epoch_end(self, metrics: EpochMetrics, best: bool) -> None:
        self.progress.advance(self.stage, self.done, f"val top-1 {metrics.val_top1:.2f}")


def quickstart(
    out_dir: Path,
    budget: Budget,
    planes: int = 4,
    progress: StageProgress | None = None,
    stages: list[Stage] | None = None,
) -> QuickstartResult:
    """Float baseline (reused when already trained) -> MCN K=``planes`` -> BatchNorm
    recalibration and label-free distillation on ``budget.calibrate_images`` unlabeled
    training images (docs/design.md section 2.10) -> fine-tune -> .mcn. ``progress`` gets one
    stage at a time (`plan` gives their totals)."""
    from mcn_compress.evaluate import evaluate_accuracy
    from mcn_compress.formats.load import load
    from mcn_compress.formats.packed import export_packed
    from mcn_compress.profile import float32_file_bytes
    from mcn_compress.training.recipe import DataRecipe

    stages = stages or plan(out_dir, budget, planes)
    seconds: dict[str, float] = {}
    start = time.perf_counter()

    def begin(stage: str) -> float:
        if progress is not None:
            progress.start(stage, next(s.units for s in stages if s.name == stage))
        return time.perf_counter()

    def end(stage: str, began: float) -> None:
        seconds[stage] = time.perf_counter() - began
        if progress is not None:
            progress.finish(stage)

    began = begin("float")
    callbacks = _TrainingStage(progress, "float") if progress is not None else None
    float_weights, float_history = pretrain_float(budget, out_dir / "float", callbacks)
    end("float", began)

    began = begin("calibrate")
    on_calibration: Callable[[CalibrationStep], None] | None = None
    if progress is not None:
        reporter = progress

        def on_calibration(event: CalibrationStep) -> None:
            if event.stage == "distill":
                kl = f"KL to the float model {event.kl:.4f}" if event.kl is not None else ""
                reporter.advance("calibrate", event.done, kl)

    tuning = _TrainingStage(progress, "finetune") if progress is not None else None
    switch = _StageSwitch(tuning, lambda: end("calibrate", began), lambda: begin("finetune"))
    variant = Variant(f"MCN keep K={planes}", {"planes": planes})
    result = finetune_variant(
        budget, variant, float_weights, out_dir / "mcn", switch, on_calibration
    )
    switch.close()
    end("finetune", switch.began or time.perf_counter())

    began = begin("export")
    checkpoint = result.run_dir / "best.pt"
    packed = export_packed(load(checkpoint), out_dir / "model.mcn")
    # the shipped files in float32 (training may have evaluated under bfloat16 autocast)
    test = DataRecipe(
        dataset="fashion_mnist",
        root=budget.root,
        batch_size=500,
        workers=0,
        val_samples=budget.val_samples,
    )
    original = float_model(budget, float_weights)
    float_top1 = (
        float_history[-1].val_top1
        if _float_top1_from_training(budget) and float_history
        else evaluate_accuracy(_layout(original, budget), test)[0]
    )
    mcn_top1 = evaluate_accuracy(_layout(load(packed), budget), test)[0]
    end("export", began)
    return QuickstartResult(
        float_top1=float_top1,
        float_bytes=float32_file_bytes(original),
        mcn_top1=mcn_top1,
        mcn_after_conversion_top1=result.after_conversion_top1,
        mcn_calibrated_top1=result.calibrated_top1,
        packed_bytes=packed.stat().st_size,
        packed_path=packed,
        checkpoint_path=checkpoint,
        conv_bits=result.conv_bits,
        float_conv_bits=result.float_conv_bits,
        minutes=(time.perf_counter() - start) / 60,
        stage_seconds=seconds,
    )


def _float_top1_from_training(budget: Budget) -> bool:
    """Whether the float run's last evaluation is the float32 top-1 the quickstart reports
    (it trained without autocast), so the export stage need not evaluate it again."""
    return budget.amp == "off"


def _layout(model: torch.nn.Module, budget: Budget) -> torch.nn.Module:
    """``model`` in the budget's memory layout (channels-last weights make the convs' outputs
    channels-last too: an evaluation then takes about half the time on a CPU)."""
    return model.to(memory_format=torch.channels_last) if budget.channels_last else model


class _StageSwitch:
    """Trainer callbacks of the MCN run: its first epoch ends the calibration stage and starts
    the fine-tuning one (the MCN is calibrated inside `finetune_variant`, before training)."""

    def __init__(
        self,
        inner: _TrainingStage | None,
        end_calibration: Callable[[], None],
        begin_finetune: Callable[[], float],
    ) -> None:
        self.inner = inner
        self.end_calibration, self.begin_finetune = end_calibration, begin_finetune
        self.began: float | None = None

    def _switch(self) -> None:
        if self.began is None:
            self.end_calibration()
            self.began = self.begin_finetune()

    def close(self) -> None:
        """A reused MCN run trains nothing: close the calibration stage all the same."""
        self._switch()

    def on_epoch_start(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        self._switch()
        if self.inner is not None:
            self.inner.on_epoch_start(epoch, epochs, steps, done)

    def on_step(self, values: dict[str, float]) -> None:
        if self.inner is not None:
            self.inner.on_step(values)

    def on_eval_start(self, steps: int) -> None:
        pass

    def on_eval_step(self) -> None:
        pass

    def on_epoch_end(self, metrics: EpochMetrics, best: bool) -> None:
        if self.inner is not None:
            self.inner.on_epoch_end(metrics, best)


__all__ = ["STAGES", "QuickstartResult", "Stage", "StageProgress", "plan", "quickstart"]
