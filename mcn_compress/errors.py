"""Exception types raised by the library; the CLI maps each to one red line and exit 1."""

from __future__ import annotations


class MCNError(Exception):
    """Base class of every error mcn-compress raises on purpose."""


class ConfigError(MCNError, ValueError):
    """An option or configuration value is out of range or inconsistent."""


class ModelLoadError(MCNError):
    """A float model or its weights could not be built or loaded."""


class WeightsUnavailable(ModelLoadError):
    """Published weights cannot be fetched: offline and not in the local cache, or the download
    failed. The message names no option: each command adds the options it accepts."""

    def with_advice(self, advice: str) -> WeightsUnavailable:
        """The same error with ``advice`` (what this command accepts instead) appended."""
        return WeightsUnavailable(f"{self}; {advice}")


class ConversionError(MCNError):
    """The conversion pass cannot convert the given model as asked."""


class CheckpointError(MCNError):
    """A checkpoint file is missing, foreign, truncated, corrupt or unsafe."""


class OutputError(CheckpointError):
    """An output file cannot be written (a missing folder, a directory in the way, a full or
    read-only disk). A `CheckpointError` subclass, so code that caught write failures as
    checkpoint errors keeps working."""


class RunFolderError(MCNError):
    """A run folder is in use by another run, or holds a finished run that would be replaced."""


class DataError(MCNError):
    """Training or evaluation data is missing, in an unknown layout, or malformed."""


class ExportError(MCNError):
    """A model, layer or operator cannot be exported in the requested format."""


class TrainingDiverged(MCNError):
    """The loss became NaN or infinite."""


class PipelineStopped(MCNError):
    """A stop request (Ctrl-C / SIGTERM) ended the pipeline; the run folder can be resumed."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type name when the message is empty), for
    one-line errors that wrap an exception from torch, timm or onnx."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
