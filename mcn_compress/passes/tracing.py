"""torch.fx tracing that keeps MCConv2d and timm's untraceable layers as leaves."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from torch import fx, nn

from mcn_compress.nn.mcconv import MCConv2d

_logger = logging.getLogger(__name__)


def _timm_notrace() -> tuple[tuple[type[nn.Module], ...], tuple[Callable[..., Any], ...]]:
    """timm's registered leaf modules and autowrap functions, from its public API (empty when
    timm is absent)."""
    try:
        from timm.models import get_notrace_functions, get_notrace_modules
    except ImportError:  # pragma: no cover - timm is a runtime dependency
        return (), ()
    modules = tuple(m for m in get_notrace_modules() if isinstance(m, type))
    functions = tuple(f for f in get_notrace_functions() if callable(f))
    return modules, functions


class MCNTracer(fx.Tracer):
    """An `fx.Tracer` with MCConv2d, timm's no-trace modules and any extra types as leaves."""

    def __init__(self, extra_leaves: tuple[type[nn.Module], ...] = ()) -> None:
        timm_modules, timm_functions = _timm_notrace()
        super().__init__(autowrap_functions=timm_functions)
        self.leaf_types: tuple[type[nn.Module], ...] = (
            MCConv2d,
            *timm_modules,
            *extra_leaves,
        )

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module, tracer: fx.Tracer | None = None) -> fx.GraphModule:
    """Symbolically trace ``model`` (not mutated) into a linted `fx.GraphModule`."""
    tracer = tracer or MCNTracer()
    graph = tracer.trace(model)
    graph.lint()
    name = model.__class__.__name__
    return fx.GraphModule(tracer.root, graph, name)


def called_modules(gm: fx.GraphModule) -> list[str]:
    """Qualified names of the modules the graph calls, in execution order, first call only.

    A leaf module's submodules run inside it: they are listed right after the leaf.
    """
    names = [name for name, _ in gm.named_modules()]
    seen: dict[str, None] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            target = str(node.target)
            seen.setdefault(target, None)
            for name in names:
                if name.startswith(target + "."):
                    seen.setdefault(name, None)
    return list(seen)
