"""Defaults and choices shared by the library and the CLI, importable without PyTorch (so
``mcn-compress --help`` answers at once). The modules that use them re-export them.
"""

from __future__ import annotations

CALIBRATION_IMAGES = 2048
"""Default number of unlabeled calibration images of the CLI (`calibration_data`)."""
CALIBRATION_STEPS = 300
"""Default label-free distillation steps for inputs up to 64x64 (docs/design.md 2.10)."""
LARGE_INPUT_STEPS = 60
"""Default for larger inputs: timm resnet18 at 224x224, batch 16, takes about 5 s a step on
one loaded CPU core (2026-12-01), so 300 steps would take 15-25 minutes; 60 keep the
calibration of 1024 images within a few minutes on 2 cores."""
DISTILL_COST = (
    "6 minutes for a Fashion-MNIST CNN on 2 CPU cores (300 steps); for inputs larger than "
    "64x64 the default is 60 steps, a few minutes for timm resnet18 at 224x224"
)
"""What the default calibration costs, for the CLI's help."""


def default_steps(input_hw: tuple[int, int]) -> int:
    """The CLI's distillation steps for inputs of ``input_hw`` (`CALIBRATION_STEPS` up to
    64x64, else `LARGE_INPUT_STEPS`)."""
    return CALIBRATION_STEPS if input_hw[0] * input_hw[1] <= 64 * 64 else LARGE_INPUT_STEPS


WEIGHT_LAYOUTS = ("packed", "folded")
"""How ONNX stores the converted convs' weights (docs/design.md section 4.4)."""
FLOAT_LAYER_MODES = ("float32", "float16", "int8")
ACTIVATIONS = ("float32", "int8")  # ONNX activations (docs/design.md section 4.10)
DEFAULT_INT8_IMAGES = 256  # calibration images for int8 activation ranges (MinMax)
"""How the weights of the layers that stay float are stored (docs/design.md section 4.9)."""
