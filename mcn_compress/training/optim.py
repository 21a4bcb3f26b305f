"""Optimiser parameter groups and the learning-rate schedule (docs/design.md section 3)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mcn_compress.nn.mcconv import MCConv2d
from mcn_compress.training.recipe import OptimRecipe, Recipe


def lr_factor(step: int, total_steps: int, warmup_steps: int, recipe: Recipe) -> float:
    """Multiplier of every group's base lr at ``step``: linear warmup, then cosine or step."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    optim = recipe.optim
    if optim.schedule == "cosine":
        span = max(total_steps - warmup_steps, 1)
        progress = min((step - warmup_steps) / span, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    steps_per_epoch = max(total_steps // optim.epochs, 1)
    epoch = step // steps_per_epoch
    return optim.gamma ** sum(1 for m in optim.milestones if epoch >= m)


def build_param_groups(model: nn.Module, recipe: Recipe | OptimRecipe) -> list[dict[str, Any]]:
    """Optimiser parameter groups (docs/design.md section 3).

    - ``weights``: latent C and every other parameter of two or more dimensions, at
      ``optim.lr`` with ``optim.weight_decay``;
    - ``no_decay``: BatchNorm parameters, biases and any other 0-D/1-D parameter, at
      ``optim.lr`` without weight decay;
    - ``mfilter``: every `MCConv2d` M-Filter at ``optim.lr_mfilter`` without weight decay.

    Frozen parameters are left out, and so are empty groups. Each group has a ``name``.
    """
    optim = recipe.optim if isinstance(recipe, Recipe) else recipe
    mfilters = {id(m.mfilter) for m in model.modules() if isinstance(m, MCConv2d)}
    buckets: dict[str, list[nn.Parameter]] = {"weights": [], "no_decay": [], "mfilter": []}
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in mfilters:
            buckets["mfilter"].append(param)
        elif param.ndim <= 1:
            buckets["no_decay"].append(param)
        else:
            buckets["weights"].append(param)
    settings = {
        "weights": (optim.lr, optim.weight_decay),
        "no_decay": (optim.lr, 0.0),
        "mfilter": (optim.lr_mfilter, 0.0),
    }
    return [
        {"name": name, "params": params, "lr": settings[name][0], "weight_decay": settings[name][1]}
        for name, params in buckets.items()
        if params
    ]


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW over `build_param_groups`; ``momentum`` is AdamW's beta1."""
    optim = recipe.optim
    groups = build_param_groups(model, recipe)
    if optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.momentum, 0.999))
