"""Per-layer record of a conversion and the size numbers derived from it (numbers only)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class LayerRecord:
    """One `nn.Conv2d` of the float model and what the pass did with it.

    ``rel_error`` is ``||W0 - Q|| / ||W0||`` for converted layers (None when not measured);
    ``reason`` says why a layer stayed float (empty for converted layers).
    """

    name: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    groups: int
    converted: bool
    reason: str = ""
    rel_error: float | None = None
    weight_params: int = 0
    binary_params: int = 0
    mfilter_params: int = 0

    @property
    def float_bits(self) -> int:
        """Bits of this conv's weight in the float original (float32)."""
        return 32 * self.weight_params

    @property
    def mcn_bits(self) -> int:
        """Bits of this conv's weight after conversion: 1 per sign, 32 per M or float value."""
        if self.converted:
            return self.binary_params + 32 * self.mfilter_params
        return 32 * self.weight_params


@dataclass
class ConversionSummary:
    """What `convert` did: every conv with its decision, and whether FX traced the model.

    ``calibration_images`` / ``calibration_steps``: the unlabeled images BatchNorm was
    recalibrated on and the label-free distillation steps on them (docs/design.md section
    2.10; 0 and 0 when `convert` had no calibration data). ``calibration_kl`` is the KL to
    the float model in eval mode (`passes.calibration.kl_on_probe`) after the BatchNorm
    recalibration and after the distillation; ``calibration_top1`` the top-1 (percent) on a
    labelled validation split right after calibration, when one was given.
    """

    planes: int
    width: str
    mcn1: bool
    layers: list[LayerRecord] = field(default_factory=list)
    traced: bool = True
    trace_error: str | None = None
    total_params: int = 0
    calibration_images: int = 0
    calibration_steps: int = 0
    calibration_kl: tuple[float, float] | None = None
    calibration_top1: float | None = None

    @property
    def converted(self) -> list[LayerRecord]:
        return [layer for layer in self.layers if layer.converted]

    @property
    def kept_float(self) -> list[LayerRecord]:
        return [layer for layer in self.layers if not layer.converted]

    @property
    def binary_params(self) -> int:
        """Parameters stored as 1 bit (the signs of every converted conv)."""
        return sum(layer.binary_params for layer in self.layers)

    @property
    def float_params(self) -> int:
        """Every other parameter of the converted model (M-Filters, float layers, BN, biases)."""
        return self.total_params - self.binary_params

    @property
    def conv_float_bits(self) -> int:
        return sum(layer.float_bits for layer in self.layers)

    @property
    def conv_mcn_bits(self) -> int:
        return sum(layer.mcn_bits for layer in self.layers)

    @property
    def conv_compression(self) -> float:
        """float32 conv-weight bits of the original / conv-weight bits after conversion."""
        return self.conv_float_bits / self.conv_mcn_bits if self.conv_mcn_bits else 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with the derived totals."""
        return {
            "planes": self.planes,
            "width": self.width,
            "mcn1": self.mcn1,
            "traced": self.traced,
            "trace_error": self.trace_error,
            "converted_layers": len(self.converted),
            "float_layers": len(self.kept_float),
            "binary_params": self.binary_params,
            "float_params": self.float_params,
            "conv_float_bits": self.conv_float_bits,
            "conv_mcn_bits": self.conv_mcn_bits,
            "conv_compression": self.conv_compression,
            "calibration_images": self.calibration_images,
            "calibration_steps": self.calibration_steps,
            "calibration_kl": None if self.calibration_kl is None else list(self.calibration_kl),
            "calibration_top1": self.calibration_top1,
            "layers": [
                {**asdict(layer), "kernel_size": list(layer.kernel_size)} for layer in self.layers
            ],
        }
