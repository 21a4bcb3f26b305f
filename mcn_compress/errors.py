"""Exception types raised by the library; the CLI maps each to one red line and exit 1."""

from __future__ import annotations


class MCNError(Exception):
    """Base class of every error mcn-compress raises on purpose."""


class ConfigError(MCNError, ValueError):
    """An option or configuration value is out of range or inconsistent."""


class ModelLoadError(MCNError):
    """A float model or its weights could not be built or loaded."""


class ConversionError(MCNError):
    """The conversion pass cannot convert the given model as asked."""


class CheckpointError(MCNError):
    """A checkpoint file is missing, foreign, truncated, corrupt or unsafe."""


class DataError(MCNError):
    """Training or evaluation data is missing, in an unknown layout, or malformed."""


class ExportError(MCNError):
    """A model, layer or operator cannot be exported in the requested format."""
