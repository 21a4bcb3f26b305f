"""mcn-compress: pretrained classifiers -> Modulated Convolutional Networks (Wang et al., 2018)."""

from mcn_compress.config import MCNConfig
from mcn_compress.errors import (
    CheckpointError,
    ConfigError,
    ConversionError,
    MCNError,
    ModelLoadError,
)
from mcn_compress.formats.checkpoint import save
from mcn_compress.formats.load import load
from mcn_compress.formats.onnx import export_onnx
from mcn_compress.formats.packed import export_packed
from mcn_compress.info import MCNInfo, ModelSource, info_of
from mcn_compress.models import load_float_model
from mcn_compress.nn.mcconv import MCConv2d
from mcn_compress.passes.convert import convert
from mcn_compress.passes.factored import (
    FactoredConv2d,
    FactoredLayer,
    FactoredSummary,
    optimize_for_inference,
)
from mcn_compress.passes.policy import plan_conversion
from mcn_compress.passes.summary import ConversionSummary, LayerRecord
from mcn_compress.version import __version__

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ConversionError",
    "ConversionSummary",
    "FactoredConv2d",
    "FactoredLayer",
    "FactoredSummary",
    "LayerRecord",
    "MCConv2d",
    "MCNConfig",
    "MCNError",
    "MCNInfo",
    "ModelLoadError",
    "ModelSource",
    "__version__",
    "convert",
    "export_onnx",
    "export_packed",
    "info_of",
    "load",
    "load_float_model",
    "optimize_for_inference",
    "plan_conversion",
    "save",
]
