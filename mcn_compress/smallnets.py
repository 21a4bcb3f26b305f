"""Small ResNets for low-resolution data (Fashion-MNIST, CIFAR), registered with timm.

`mcn_resnet_small` is the float baseline of the quickstart and the Fashion-MNIST benchmark:
a 3x3 stem without pooling, three stages of one basic block each (width w, 2w, 4w; the last
two downsample), global average pooling and a linear classifier. Registered in timm's model
registry so checkpoints can rebuild it by name like any timm model. It has no published
weights: train it (the quickstart does) or pass ``--weights``.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import register_model
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN pairs with a residual connection (1x1 projection when shapes change)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False), nn.BatchNorm2d(out_chs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.downsample(x)
        x = self.act(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act(x + shortcut)


class SmallResNet(nn.Module):
    """ResNet for 28-32 px inputs with timm's classifier API."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 32) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = 4 * width
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.stages = nn.Sequential(
            BasicBlock(width, width, 1),
            BasicBlock(width, 2 * width, 2),
            BasicBlock(2 * width, 4 * width, 2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc: nn.Module = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x).flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes)


@register_model
def mcn_resnet_small(pretrained: bool = False, **kwargs: Any) -> SmallResNet:
    """Small ResNet (width 32-64-128 by default, ``width=`` to change) for 28x28 inputs."""
    if pretrained:
        raise RuntimeError("mcn_resnet_small has no published weights; train it or use --weights")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    model = SmallResNet(**kwargs)
    in_chans = kwargs.get("in_chans", 1)
    model.pretrained_cfg = {  # type: ignore[assignment]
        "architecture": "mcn_resnet_small",
        "input_size": (in_chans, 28, 28),
        "mean": (0.2860,) * in_chans,
        "std": (0.3530,) * in_chans,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "num_classes": model.num_classes,
    }
    return model


@register_model
def mcn_resnet_tiny(pretrained: bool = False, **kwargs: Any) -> SmallResNet:
    """`mcn_resnet_small` at width 16-32-64: about 4x cheaper, for quick CPU runs."""
    kwargs.setdefault("width", 16)
    model = mcn_resnet_small(pretrained=pretrained, **kwargs)
    model.pretrained_cfg["architecture"] = "mcn_resnet_tiny"  # type: ignore[index]
    return model
