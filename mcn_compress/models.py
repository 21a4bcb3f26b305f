"""Load a float classifier by name: timm names, ``tv:NAME`` for torchvision, ``hf-hub:`` ids.

Every model this module builds carries ``mcn_info.source`` (`ModelSource`), the recipe for
rebuilding its architecture that checkpoints store (docs/design.md section 4).
"""

from __future__ import annotations

import difflib
import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mcn_compress.errors import ModelLoadError, WeightsUnavailable, first_line
from mcn_compress.hub import HUB_PREFIXES, published_weights
from mcn_compress.info import TV_PREFIX, ModelSource, update_info
from mcn_compress.limits import check_file, file_problem

_logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def _torchvision_names() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def suggest_names(name: str, limit: int = 5) -> list[str]:
    """Close matches for an unknown name among timm and torchvision (``tv:``) classifiers."""
    import timm

    bare = name.removeprefix(TV_PREFIX).lower()
    candidates = {n: n for n in timm.list_models()}
    candidates.update({n: TV_PREFIX + n for n in _torchvision_names()})
    matches = difflib.get_close_matches(bare, list(candidates), n=limit, cutoff=0.6)
    return [candidates[m] for m in matches]


def resolve_source(
    name: str, num_classes: int | None = None, in_chans: int | None = None
) -> ModelSource:
    """Check ``name`` exists and return its `ModelSource` (no weights are built)."""
    import timm

    for option, value in (("--num-classes", num_classes), ("--in-chans", in_chans)):
        if value is not None and (isinstance(value, bool) or value < 1):
            raise ModelLoadError(f"{option} must be a positive integer, got {value}")

    import mcn_compress.smallnets  # noqa: F401  (registers mcn_resnet_small with timm)

    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if name.startswith(TV_PREFIX):
        bare = name[len(TV_PREFIX) :]
        if bare not in _torchvision_names():
            raise ModelLoadError(_unknown_message(name))
        if in_chans not in (None, 3):
            raise ModelLoadError("--in-chans is only supported for timm models, not torchvision")
        return ModelSource("torchvision", bare, kwargs)
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    if name.startswith(("hf-hub:", "hf_hub:")) or timm.is_model(name):
        return ModelSource("timm", name, kwargs)
    raise ModelLoadError(_unknown_message(name))


def _unknown_message(name: str) -> str:
    close = suggest_names(name)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `timm.list_models()`"
    return f"unknown model {name!r} (timm name, tv:NAME or hf-hub:ID){hint}"


def build_model(source: ModelSource, pretrained: bool = False) -> nn.Module:
    """Instantiate ``source``; with ``pretrained`` its published weights, from the local cache
    or the network (`hub.published_weights`: offline and not cached, `WeightsUnavailable`
    at once)."""
    with published_weights(source, pretrained):
        return _build(source, pretrained)


def _build(source: ModelSource, pretrained: bool) -> nn.Module:
    try:
        if source.library == "torchvision":
            import torchvision

            weights = "DEFAULT" if pretrained else None
            model = torchvision.models.get_model(source.name, weights=weights, **source.kwargs)
        elif source.library == "timm":
            import timm

            import mcn_compress.smallnets  # noqa: F401  (registers mcn_resnet_small)

            model = timm.create_model(source.name, pretrained=pretrained, **source.kwargs)
        else:
            raise ModelLoadError(f"unknown model library {source.library!r}")
    except ModelLoadError:
        raise
    except Exception as exc:
        if pretrained:
            raise WeightsUnavailable(
                f"could not fetch the published weights of {source.display_name} "
                f"({type(exc).__name__}: {first_line(exc)[:200]})"
            ) from exc
        raise ModelLoadError(f"could not build {source.display_name}: {exc}") from exc
    return model


def rebuild_model(source: ModelSource) -> nn.Module:
    """The float architecture of a stored model description, built offline (docs/design.md
    4.5): ``pretrained=False``, and a Hugging Face Hub name is refused before timm sees it,
    since timm would fetch the hub's config (and apply its constructor arguments)."""
    if source.name.startswith(HUB_PREFIXES):
        raise ModelLoadError(
            f"it names the Hugging Face Hub model {source.name}, and opening a file never "
            "reaches the network; convert again from a local timm name with the weights in a "
            "file (mcn-compress convert ARCH --weights FILE -o model.pt)"
        )
    return build_model(source, pretrained=False)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .pt/.pth/.bin (weights_only) or .safetensors, unwrapping
    common containers (``state_dict``, ``model``, ``state_dict_ema``) and ``module.`` prefixes.
    """
    path = Path(path)
    if file_problem(path) == "is a directory":
        raise ModelLoadError(f"weights file {path} is a directory; give a state-dict file")
    check_file(path, ModelLoadError, "weights file ")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "unsupported global" not in str(exc).lower():
            raise ModelLoadError(_unreadable(path, exc)) from exc
        raise ModelLoadError(
            f"cannot read weights file {path}: it holds pickled objects other than tensors "
            "(pickled code is refused; save a plain state dict)"
        ) from exc
    except Exception as exc:
        raise ModelLoadError(_unreadable(path, exc)) from exc
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelLoadError(f"weights file {path} does not hold a state dict of tensors")
    return {str(k).removeprefix("module."): v for k, v in data.items()}


def _unreadable(path: Path, exc: Exception) -> str:
    return (
        f"cannot read weights file {path}: not a .pt/.pth/.safetensors state dict, or truncated "
        f"({type(exc).__name__})"
    )


def load_weights(model: nn.Module, path: str | Path, model_name: str = "model") -> None:
    """Load a state-dict file into ``model``; a message lists whatever does not fit."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (e.g. {mismatched[0]})")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise ModelLoadError(
            f"weights file {path} does not fit {model_name}: {'; '.join(parts)}; "
            "check the model name, --num-classes and --in-chans"
        )
    for key in own:
        _check_values(path, key, state[key])
    model.load_state_dict(state)


def _check_values(path: str | Path, key: str, tensor: torch.Tensor) -> None:
    """Refuse a complex tensor, or a floating one holding NaN or infinite values: loaded,
    it would give a model whose every output is NaN (or silently drop the imaginary part)."""
    if tensor.is_complex():
        raise ModelLoadError(
            f"weights file {path}: tensor {key} is complex ({str(tensor.dtype)[6:]}); "
            "the model takes real weights"
        )
    if tensor.is_floating_point():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise ModelLoadError(
                f"weights file {path}: tensor {key} holds {bad:,} NaN or infinite value"
                f"{'s' if bad > 1 else ''} (of {tensor.numel():,}); the weights are broken"
            )


def load_float_model(
    name: str,
    *,
    pretrained: bool = True,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
) -> nn.Module:
    """Build the float model ``name`` with pretrained or local weights, ready to convert.

    With ``weights`` the architecture is built without downloads and the file is loaded
    (``pretrained`` is then ignored). Never falls back to random weights silently: when the
    published weights cannot be fetched (offline and not in the local cache: at once, see
    `mcn_compress.hub`) this raises `WeightsUnavailable`.

    Example:
        >>> model = load_float_model("resnet18", pretrained=False)
        >>> info_of(model).source.name
        'resnet18'
    """
    source = resolve_source(name, num_classes=num_classes, in_chans=in_chans)
    if weights is not None:
        model = build_model(source, pretrained=False)
        load_weights(model, weights, source.display_name)
        origin: str | None = str(weights)
    else:
        model = build_model(source, pretrained=pretrained)
        origin = "pretrained" if pretrained else None
    if not pretrained and weights is None:
        _logger.info("%s has random weights (--no-pretrained)", source.display_name)
    update_info(model, source=ModelSource(source.library, source.name, source.kwargs, origin))
    return model
