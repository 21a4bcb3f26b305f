"""State dicts as files store them: plain tensors plus the module versions torch keeps in
``state_dict()._metadata`` (modules such as torchvision's MNASNet refuse to load without them).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn


def plain_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors on the CPU, module metadata)`` of ``model.state_dict()``; the metadata maps
    each module prefix to its plain ``{"version": N}`` record."""
    state = model.state_dict()
    tensors = {k: v.detach().cpu() for k, v in state.items()}
    raw = getattr(state, "_metadata", None) or {}
    metadata = {
        str(prefix): {str(k): v for k, v in entry.items() if isinstance(v, int | float | str)}
        for prefix, entry in raw.items()
        if isinstance(entry, dict)
    }
    return tensors, metadata


def loadable_state_dict(
    tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None
) -> OrderedDict[str, torch.Tensor]:
    """The state dict `nn.Module.load_state_dict` expects, module versions included; module
    versions that are not ``{prefix: {name: int | float | str}}`` raise `ValueError`."""
    state: OrderedDict[str, torch.Tensor] = OrderedDict(tensors)
    if metadata:
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str)
            and isinstance(v, dict)
            and all(isinstance(n, str) and _plain_number_or_text(x) for n, x in v.items())
            for k, v in metadata.items()
        ):
            raise ValueError("its record of module versions is malformed")
        state._metadata = {k: dict(v) for k, v in metadata.items()}  # type: ignore[attr-defined]
    return state


def _plain_number_or_text(value: Any) -> bool:
    return isinstance(value, int | float | str) and not isinstance(value, bool)
