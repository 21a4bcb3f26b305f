"""mcn-compress: pretrained classifiers -> Modulated Convolutional Networks (Wang et al., 2018)."""

from mcn_compress.checkpoint import load, save
from mcn_compress.config import MCNConfig
from mcn_compress.convert import convert, plan_conversion
from mcn_compress.errors import (
    CheckpointError,
    ConfigError,
    ConversionError,
    MCNError,
    ModelLoadError,
)
from mcn_compress.export import export_packed
from mcn_compress.models import load_float_model
from mcn_compress.nn import MCConv2d
from mcn_compress.onnx_export import export_onnx
from mcn_compress.summary import ConversionSummary, LayerRecord

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ConversionError",
    "ConversionSummary",
    "LayerRecord",
    "MCConv2d",
    "MCNConfig",
    "MCNError",
    "ModelLoadError",
    "__version__",
    "convert",
    "export_onnx",
    "export_packed",
    "load",
    "load_float_model",
    "plan_conversion",
    "save",
]
