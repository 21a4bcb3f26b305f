"""mcn-compress: pretrained classifiers -> Modulated Convolutional Networks (Wang et al., 2018).

The user API (docs/design.md section 4.1), in the order of the job::

    import mcn_compress as mcn

    float_model = mcn.load_float_model("resnet18", weights="r18.pth")
    model = mcn.convert(float_model, mcn.MCNConfig(planes=4))      # filter_fn=... narrows it
    mcn.calibrate(model, float_model, unlabeled_batches, steps=1000)  # optional, in place
    mcn.save(model, "model.pt")
    mcn.export_packed(model, "model.mcn")
    mcn.export_onnx(model, "model.onnx", compute="auto", threads=2)
    fast = mcn.optimize_for_inference(mcn.load("model.pt"), threads=2)

Internals (the passes, formats, layer classes, planner) stay importable from their modules.
"""

import importlib
from typing import TYPE_CHECKING, Any

from mcn_compress.errors import (
    CheckpointError,
    ConfigError,
    ConversionError,
    DataError,
    ExportError,
    MCNError,
    ModelLoadError,
    OutputError,
    PipelineStopped,
    RunFolderError,
    TrainingDiverged,
    WeightsUnavailable,
)
from mcn_compress.version import __version__

if TYPE_CHECKING:  # the same names, imported on first use below (PyTorch loads only then)
    from mcn_compress.config import MCNConfig
    from mcn_compress.errors import (
        CheckpointError,
        ConfigError,
        ConversionError,
        DataError,
        ExportError,
        MCNError,
        ModelLoadError,
        OutputError,
        PipelineStopped,
        RunFolderError,
        TrainingDiverged,
        WeightsUnavailable,
    )
    from mcn_compress.formats.checkpoint import save
    from mcn_compress.formats.load import load
    from mcn_compress.formats.onnx import export_onnx
    from mcn_compress.formats.packed import export_packed
    from mcn_compress.info import MCNInfo, info_of
    from mcn_compress.models import load_float_model
    from mcn_compress.passes.calibration import CalibrationResult, calibrate
    from mcn_compress.passes.convert import convert
    from mcn_compress.passes.factored import optimize_for_inference
    from mcn_compress.passes.planner import Compute
    from mcn_compress.version import __version__

_LAZY = {
    "MCNConfig": "mcn_compress.config",
    "save": "mcn_compress.formats.checkpoint",
    "load": "mcn_compress.formats.load",
    "export_onnx": "mcn_compress.formats.onnx",
    "export_packed": "mcn_compress.formats.packed",
    "MCNInfo": "mcn_compress.info",
    "info_of": "mcn_compress.info",
    "load_float_model": "mcn_compress.models",
    "CalibrationResult": "mcn_compress.passes.calibration",
    "calibrate": "mcn_compress.passes.calibration",
    "convert": "mcn_compress.passes.convert",
    "optimize_for_inference": "mcn_compress.passes.factored",
    "Compute": "mcn_compress.passes.planner",
}
"""The user API that needs PyTorch, by module: imported on first access (PEP 562), so that
``import mcn_compress`` and ``mcn-compress --help`` stay quick."""


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mcn_compress' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "CalibrationResult",
    "CheckpointError",
    "Compute",
    "ConfigError",
    "ConversionError",
    "DataError",
    "ExportError",
    "MCNConfig",
    "MCNError",
    "MCNInfo",
    "ModelLoadError",
    "OutputError",
    "PipelineStopped",
    "RunFolderError",
    "TrainingDiverged",
    "WeightsUnavailable",
    "__version__",
    "calibrate",
    "convert",
    "export_onnx",
    "export_packed",
    "info_of",
    "load",
    "load_float_model",
    "optimize_for_inference",
    "save",
]
