"""``runtime.compile``: the fine-tuning step through ``torch.compile`` (docs/design.md section 3).

`compiled` compiles the model and the MCN loss *in place* with
``nn.Module.compile``: the modules stay the same objects, so their state dicts (checkpoints,
resume) have exactly the eager keys (no ``_orig_mod.`` prefix), the loss's classifier hook
keeps working, and evaluation, which calls the same model, is compiled too. Under torchrun the
compiled model is then wrapped in DistributedDataParallel, as PyTorch advises ("Where to apply
torch.compile?": compile the inner module, then wrap it).

Compilation is lazy: a backend failure (e.g. inductor finding no C++ compiler) surfaces at the
first call, where it is turned into a `ConfigError` that says to set ``runtime.compile: false``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

from mcn_compress.errors import ConfigError, first_line

if TYPE_CHECKING:
    from mcn_compress.training.recipe import RuntimeRecipe

_logger = logging.getLogger(__name__)

BACKEND = "inductor"
"""The ``torch.compile`` backend; ``runtime.compile_mode`` is inductor's ``mode``."""

COMPILE_HINT = (
    "set runtime.compile: false (--set runtime.compile=false) to train eagerly, or install what "
    "the backend needs (inductor on CPU needs a C++ compiler such as g++)"
)


def _explained(call: Callable[..., Any], what: str, mode: str) -> Callable[..., Any]:
    """``call`` (a compiled ``_call_impl``) with backend failures raised as `ConfigError`."""
    from torch._dynamo.exc import BackendCompilerFailed

    @functools.wraps(call)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except BackendCompilerFailed as exc:
            raise ConfigError(
                f"runtime.compile: torch.compile (mode {mode}) failed to compile the {what}: "
                f"{first_line(exc)}; {COMPILE_HINT}"
            ) from exc

    return guarded


def compile_module(module: nn.Module, mode: str, what: str) -> nn.Module:
    """Compile ``module``'s call in place (``nn.Module.compile``) and return it; ``what``
    names it in errors. Its state dict keeps the eager keys."""
    module.compile(backend=BACKEND, mode=mode)
    call = module._compiled_call_impl
    assert call is not None
    module._compiled_call_impl = _explained(call, what, mode)
    return module


def compiled(model: nn.Module, criterion: nn.Module, runtime: RuntimeRecipe) -> nn.Module:
    """With ``runtime.compile``, compile ``model`` (training and evaluation forward) and
    ``criterion`` (the MCN loss with its centre update) in place; returns ``model``.

    Call it before wrapping the model in DistributedDataParallel. Without ``runtime.compile``
    nothing changes.
    """
    if not runtime.compile:
        return model
    compile_module(model, runtime.compile_mode, f"model {type(model).__name__}")
    compile_module(criterion, runtime.compile_mode, f"loss {type(criterion).__name__}")
    _logger.info(
        "runtime.compile: on (mode %s): the model forward (training and evaluation) and the "
        "loss run through torch.compile; the first steps include compilation",
        runtime.compile_mode,
    )
    return model


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` was compiled in place (`compile_module` / ``nn.Module.compile``)."""
    return module._compiled_call_impl is not None
