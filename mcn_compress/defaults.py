"""Defaults and choices shared by the library and the CLI, importable without PyTorch (so
``mcn-compress --help`` answers at once). The modules that use them re-export them.
"""

from __future__ import annotations

CALIBRATION_IMAGES = 2048
"""Default number of unlabeled calibration images of the CLI (`calibration_data`)."""
SMALL_INPUT = 64 * 64
"""Inputs up to this many pixels (Fashion-MNIST, CIFAR) get the small-input defaults."""
CALIBRATION_BATCH = 32
"""Default calibration batch for inputs up to 64x64 (docs/design.md 2.10): more, smaller steps
beat fewer large ones at the same time (Fashion-MNIST, docs/benchmarks.md "Calibration")."""
LARGE_INPUT_BATCH = 16
"""Default calibration batch above 64x64 (ImageNet sizes), so a step costs seconds."""
CALIBRATION_STEPS = 1000
"""Default label-free distillation steps for inputs up to 64x64 (docs/design.md 2.10)."""
LARGE_INPUT_STEPS = 60
"""Default steps for larger inputs: timm resnet18 at 224x224 takes about 175 s for the whole
`convert` on 2 CPU cores, 100 s of it in the steps (docs/benchmarks.md "Calibration")."""
LARGE_INPUT_BN_IMAGES = 256
"""Images each BatchNorm recalibration reads above 64x64 (up to 64x64: all of them): the
statistics settle within a few hundred, and at 224x224 a pass over 2,048 takes a minute on 2
CPU cores."""
PROBE_IMAGES = 256
"""Images the calibration's KL probes (before and after the distillation) read up to 64x64."""
LARGE_INPUT_PROBE_IMAGES = 128
"""Images each KL probe reads above 64x64: a probe runs both models, about 10 s per probe
at 224x224 on 2 CPU cores."""
CALIBRATION_LR = 8e-3
"""AdamW learning rate of the distillation (M-Filters: a tenth of it)."""
CALIBRATION_TEMPERATURE = 4.0
"""Softmax temperature T of the distillation's KL."""
AMP_MODES = ("auto", "bf16", "off")
"""Autocast of the calibration (`amp.autocast_dtype`): auto = bfloat16 where the device
computes it natively."""
DISTILL_COST = (
    "about 100 s for a Fashion-MNIST CNN on 2 CPU cores; for inputs larger than "
    "64x64 about 3 minutes for timm resnet18 at 224x224"
)
"""What the default calibration costs, for the CLI's help."""


def is_small_input(input_hw: tuple[int, int]) -> bool:
    """Whether ``input_hw`` gets the small-input defaults (at most `SMALL_INPUT` pixels)."""
    return input_hw[0] * input_hw[1] <= SMALL_INPUT


def default_steps(input_hw: tuple[int, int]) -> int:
    """The CLI's distillation steps for inputs of ``input_hw`` (`CALIBRATION_STEPS` up to
    64x64, else `LARGE_INPUT_STEPS`)."""
    return CALIBRATION_STEPS if is_small_input(input_hw) else LARGE_INPUT_STEPS


def default_bn_images(input_hw: tuple[int, int]) -> int | None:
    """Images each BatchNorm recalibration reads for inputs of ``input_hw`` (None: all up to
    64x64, else `LARGE_INPUT_BN_IMAGES`)."""
    return None if is_small_input(input_hw) else LARGE_INPUT_BN_IMAGES


def default_probe_images(input_hw: tuple[int, int]) -> int:
    """Images each KL probe of the calibration reads for inputs of ``input_hw``
    (`PROBE_IMAGES` up to 64x64, else `LARGE_INPUT_PROBE_IMAGES`)."""
    return PROBE_IMAGES if is_small_input(input_hw) else LARGE_INPUT_PROBE_IMAGES


def default_batch(input_hw: tuple[int, int]) -> int:
    """The calibration batch for inputs of ``input_hw`` (`CALIBRATION_BATCH` up to 64x64,
    else `LARGE_INPUT_BATCH`)."""
    return CALIBRATION_BATCH if is_small_input(input_hw) else LARGE_INPUT_BATCH


WEIGHT_LAYOUTS = ("packed", "folded")
"""How ONNX stores the converted convs' weights (docs/design.md section 4.4)."""
FLOAT_LAYER_MODES = ("float32", "float16", "int8")
ACTIVATIONS = ("float32", "int8")  # ONNX activations (docs/design.md section 4.10)
DEFAULT_INT8_IMAGES = 256  # calibration images for int8 activation ranges (MinMax)
"""How the weights of the layers that stay float are stored (docs/design.md section 4.9)."""
