"""The PyTorch side of every ONNX export (docs/design.md section 4.4): a float32 eval copy of
the model with each `MCConv2d` replaced by an ``nn.Conv2d`` holding its weight Q and every
BatchNorm that is the only consumer of a conv folded into it, plus, per converted layer, what
the packed layouts store (sign bits, M, BatchNorm scale) and the folded weight they rebuild."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
from torch import nn

from mcn_compress.formats.onnx_packing import PackedLayer
from mcn_compress.formats.packed import pack_signs
from mcn_compress.module_utils import set_submodule
from mcn_compress.nn.mcconv import MCConv2d
from mcn_compress.passes.fold_bn import fold_batchnorms


@dataclasses.dataclass
class PreparedModel:
    """A float32 eval copy ready for the exporter, its converted layers and the folds."""

    model: nn.Module
    layers: list[PackedLayer]
    folded_batchnorms: dict[str, str] = dataclasses.field(default_factory=dict)  # conv -> bn


def prepare_for_onnx(model: nn.Module, weights: str) -> PreparedModel:
    """A float32 eval copy with MCConv2d -> Conv2d (weight Q) and BatchNorm folded."""
    work = copy.deepcopy(model).cpu().float().eval()
    converted: dict[str, MCConv2d] = {
        name: m for name, m in work.named_modules() if isinstance(m, MCConv2d)
    }
    layers: dict[str, PackedLayer] = {}
    with torch.no_grad():
        for name, mod in converted.items():
            if weights == "packed":
                layers[name] = PackedLayer(
                    name=name,
                    signs=pack_signs(mod.weight).numpy(),
                    latent_shape=tuple(mod.weight.shape),
                    mfilter=mod.mfilter.detach().cpu().numpy().copy(),
                    weight=np.empty(0, np.float32),
                )
            set_submodule(work, name, mod.to_conv2d())
    folds = fold_batchnorms(work)
    modules = dict(work.named_modules())
    for name, layer in layers.items():
        conv = modules[name]
        assert isinstance(conv, nn.Conv2d)
        layer.weight = conv.weight.detach().cpu().numpy().copy()
        if name in folds:
            layer.folded_batchnorm, scale = folds[name]
            layer.scale = scale.cpu().numpy().astype(np.float32)
    return PreparedModel(work, list(layers.values()), {c: bn for c, (bn, _) in folds.items()})


__all__ = ["PreparedModel", "prepare_for_onnx"]
