"""`MCNInfo`: what mcn-compress records on a model it built, converted or loaded.

One typed record on ``model.mcn_info`` instead of loose attributes: where the float
architecture comes from (`ModelSource`, stored in every checkpoint; docs/design.md section 4),
the `MCNConfig` and `ConversionSummary` of the conversion, the metadata read from a file,
whether a packed file stored its float parts as float16, and the factored-compute plan.
`info_of` reads it (an empty record for a model that has none), `update_info` sets fields on
it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mcn_compress.config import MCNConfig
from mcn_compress.errors import ModelLoadError
from mcn_compress.passes.planner import InferencePlan
from mcn_compress.passes.summary import ConversionSummary

if TYPE_CHECKING:
    from torch import nn

INFO_ATTRIBUTE = "mcn_info"
TV_PREFIX = "tv:"
LIBRARIES = ("timm", "torchvision")

MODEL_KWARGS: dict[str, tuple[type, ...]] = {
    "num_classes": (int,),
    "in_chans": (int,),
    "drop_rate": (float, int),
    "drop_path_rate": (float, int),
    "mlp_ratio": (float, int),
}
"""Constructor keys a stored model description may carry, and their value types. The
description is data, not instructions: keys that name a file (``checkpoint_path``), overlay a
config (``pretrained_cfg_overlay``) or anything else are refused at save and at load."""

KWARG_RANGES: dict[str, tuple[float, float]] = {
    "num_classes": (1, 100_000),
    "in_chans": (1, 1024),
    "drop_rate": (0.0, 1.0),
    "drop_path_rate": (0.0, 1.0),
    "mlp_ratio": (0.0, 64.0),
}
"""Allowed value ranges (a stored ``num_classes`` of 1e9 would allocate a classifier of
terabytes before any check could refuse it)."""
RANGE_WORDS = {
    "num_classes": "expected an integer from 1 to 100,000",
    "in_chans": "expected an integer from 1 to 1,024",
    "drop_rate": "expected a number from 0 to 1",
    "drop_path_rate": "expected a number from 0 to 1",
    "mlp_ratio": "expected a number from 0 to 64",
}


@dataclass(frozen=True)
class ModelSource:
    """How to rebuild a float architecture: library, name and constructor kwargs."""

    library: str  # "timm" or "torchvision"
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None  # where the float weights came from (informational)

    def __post_init__(self) -> None:
        if self.library not in LIBRARIES:
            raise ModelLoadError(
                f"model library {self.library!r} is not one of {', '.join(LIBRARIES)}"
            )
        scheme = self.name.partition(":")[0] if ":" in self.name else None
        if not self.name or scheme not in (None, "hf-hub", "hf_hub"):
            raise ModelLoadError(
                f"model name {self.name!r} is not allowed in a model description (a timm or "
                "torchvision name, or hf-hub:ID)"
            )
        for key, value in self.kwargs.items():
            kinds = MODEL_KWARGS.get(key)
            if kinds is None:
                raise ModelLoadError(
                    f"model constructor key {key!r} is not allowed in a model description "
                    f"(allowed: {', '.join(MODEL_KWARGS)})"
                )
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise ModelLoadError(f"model constructor key {key!r} has a bad value {value!r}")
            low, high = KWARG_RANGES[key]
            if not low <= value <= high:
                raise ModelLoadError(
                    f"model constructor key {key!r} is {value!r}; {RANGE_WORDS[key]}"
                )

    @property
    def display_name(self) -> str:
        return f"{TV_PREFIX}{self.name}" if self.library == "torchvision" else self.name

    def to_dict(self) -> dict[str, Any]:
        return {
            "library": self.library,
            "name": self.name,
            "kwargs": dict(self.kwargs),
            "weights": self.weights,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSource:
        try:
            return cls(
                library=str(data["library"]),
                name=str(data["name"]),
                kwargs=dict(data.get("kwargs") or {}),
                weights=data.get("weights"),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"invalid model source record: {exc}") from exc


@dataclass(frozen=True)
class MCNInfo:
    """What mcn-compress knows about a model (all fields optional).

    ``source``: how to rebuild the float architecture; ``config`` and ``summary``: the
    conversion (None on a float model); ``metadata``: the checkpoint metadata of a loaded
    file (versions, parent, metrics); ``packed_float16``: loaded from a float16 packed file;
    ``packed_float_layers``: how that file stored the float layers' weights (``float32``,
    ``float16`` or ``int8``; docs/design.md section 4.9); ``plan``: the factored-compute
    plan of a model from `optimize_for_inference` (docs/design.md section 4.8).
    """

    source: ModelSource | None = None
    config: MCNConfig | None = None
    summary: ConversionSummary | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    packed_float16: bool = False
    packed_float_layers: str = "float32"
    plan: InferencePlan | None = None


def info_of(model: nn.Module) -> MCNInfo:
    """The `MCNInfo` of ``model``; an empty one when mcn-compress did not build it."""
    info = getattr(model, INFO_ATTRIBUTE, None)
    return info if isinstance(info, MCNInfo) else MCNInfo()


def update_info(model: nn.Module, **changes: Any) -> MCNInfo:
    """Set fields of ``model``'s `MCNInfo` (creating it) and return the new record."""
    info = dataclasses.replace(info_of(model), **changes)
    setattr(model, INFO_ATTRIBUTE, info)
    return info
