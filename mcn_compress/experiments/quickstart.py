"""`mcn-compress quickstart`: float model -> MCN -> fine-tune -> packed file, on Fashion-MNIST."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mcn_compress.experiments.fashion_mnist import (
    Budget,
    Variant,
    finetune_variant,
    float_model,
    pretrain_float,
)
from mcn_compress.training.run_dir import read_history
from mcn_compress.training.trainer import TrainCallbacks


@dataclass
class QuickstartResult:
    """Before and after of the quickstart: accuracy and real file sizes."""

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

    @property
    def ratio(self) -> float:
        return self.float_bytes / self.packed_bytes


def quickstart(
    out_dir: Path,
    budget: Budget,
    planes: int = 4,
    callbacks_for: Callable[[str], TrainCallbacks | None] = lambda _: None,
) -> QuickstartResult:
    """Float baseline (reused when already trained) -> MCN K=``planes`` -> BatchNorm
    recalibration and label-free distillation on ``budget.calibrate_images`` unlabeled
    training images (docs/design.md section 2.10) -> fine-tune -> .mcn."""
    import time

    from mcn_compress.formats.load import load
    from mcn_compress.formats.packed import export_packed
    from mcn_compress.profile import float32_file_bytes

    start = time.perf_counter()
    float_weights, history = pretrain_float(budget, out_dir / "float", callbacks_for("float"))
    variant = Variant(f"MCN keep K={planes}", {"planes": planes})
    result = finetune_variant(budget, variant, float_weights, out_dir / "mcn", callbacks_for("mcn"))
    checkpoint = result.run_dir / "best.pt"
    model = load(checkpoint)
    packed = export_packed(model, out_dir / "model.mcn")
    return QuickstartResult(
        float_top1=history[-1].val_top1,
        float_bytes=float32_file_bytes(float_model(budget, float_weights)),
        mcn_top1=max(m.val_top1 for m in read_history(result.run_dir)),
        mcn_after_conversion_top1=result.after_conversion_top1,
        mcn_calibrated_top1=result.calibrated_top1,
        packed_bytes=packed.stat().st_size,
        packed_path=packed,
        checkpoint_path=checkpoint,
        conv_bits=result.conv_bits,
        float_conv_bits=result.float_conv_bits,
        minutes=(time.perf_counter() - start) / 60,
    )
