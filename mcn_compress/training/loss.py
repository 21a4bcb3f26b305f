"""The MCN loss (docs/design.md section 3, Eq. 3.18 of the MCN chapter).

``L = CE + theta * sum_layers L_filter + lambda/2 * mean_m ||f_m - centre[y_m]||^2``

- ``L_filter`` is each `MCConv2d`'s `filter_loss()` (B = sign(C) held constant).
- ``f_m`` is the feature vector that enters the classifier, captured by a forward pre-hook on
  the classifier module, flattened to ``(N, D)``.
- ``centre`` is a ``(num_classes, D)`` buffer (in the state dict, never an optimiser parameter)
  moved after each training step by the centre-loss rule of Wen et al., "A Discriminative
  Feature Learning Approach for Deep Face Recognition", ECCV 2016:
  ``centre[j] -= alpha * sum_{m: y_m = j} (centre[j] - f_m) / (1 + n_j)``.

Reduction: Eq. 3.18 writes the centre term as a sum over the mini-batch; like Wen et al.'s
reference implementation (and like the cross-entropy term) it is averaged over the batch by
default (``reduction="mean"``), so ``lambda`` does not depend on the batch size.
``reduction="sum"`` gives the equation's literal form.

Distributed training: the centre update must see the same data on every rank, or the centres
drift apart. `MCNLoss.forward` all-gathers features and targets when `torch.distributed` is
initialised (see `gather_for_centers`); callers that run the update themselves pass
``update=False`` and call `MCNLoss.update_centers` with globally gathered tensors. The update is
a one-hot matrix product (no atomics), hence bit-identical on identical inputs and hardware.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from mcn_compress.errors import ConfigError
from mcn_compress.nn.mcconv import MCConv2d
from mcn_compress.passes.policy import find_classifier

if TYPE_CHECKING:
    from mcn_compress.training.recipe import LossRecipe

_logger = logging.getLogger(__name__)

Reduction = Literal["mean", "sum"]


class LossParts(NamedTuple):
    """The loss and its weighted parts: ``total = softmax + filter + center`` (Eq. 3.18)."""

    total: torch.Tensor
    softmax: torch.Tensor
    filter: torch.Tensor
    center: torch.Tensor

    def to_dict(self) -> dict[str, float]:
        """Python floats for logging (synchronises with the device)."""
        return {name: float(value.detach()) for name, value in self._asdict().items()}


def classifier_of(model: nn.Module) -> nn.Module:
    """The classifier module of ``model`` whose input the centre loss reads
    (`passes.policy.find_classifier`: timm's head, else the last Linear / Conv2d)."""
    found = find_classifier(model)
    if found is None:
        raise ConfigError(
            f"cannot find the classifier of {type(model).__name__}: it has no get_classifier() "
            "and no nn.Linear / nn.Conv2d layer"
        )
    return found[1]


def _feature_dim(classifier: nn.Module) -> int:
    """D: the input width of the first Linear / Conv2d of the classifier module."""
    for module in classifier.modules():
        if isinstance(module, nn.Linear):
            return module.in_features
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    raise ConfigError(
        f"cannot infer the feature size of classifier {type(classifier).__name__}; pass feature_dim"
    )


def gather_for_centers(
    features: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather ``features`` (N, D) and ``targets`` (N,) over every rank, in rank order.

    Without an initialised process group (or with one rank) the inputs come back unchanged.
    Ranks may hold different batch sizes (the last batch of an epoch). Every rank gets the same
    tensors, so every rank computes the same centre update.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, targets
    world = dist.get_world_size()
    count = torch.tensor([features.shape[0]], device=features.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    longest = max(sizes)
    pad = longest - features.shape[0]
    feats = F.pad(features, (0, 0, 0, pad)) if pad else features
    tgts = F.pad(targets, (0, pad)) if pad else targets
    feat_list = [torch.empty_like(feats) for _ in range(world)]
    tgt_list = [torch.empty_like(tgts) for _ in range(world)]
    dist.all_gather(feat_list, feats.contiguous())
    dist.all_gather(tgt_list, tgts.contiguous())
    return (
        torch.cat([f[:n] for f, n in zip(feat_list, sizes, strict=True)]),
        torch.cat([t[:n] for t, n in zip(tgt_list, sizes, strict=True)]),
    )


class MCNLoss(nn.Module):
    """Eq. 3.18: cross-entropy + theta * filter loss + lambda/2 * centre loss.

    Building the loss registers a forward pre-hook on the model's classifier; the model's
    forward must run before each call of the loss. Only the centres (and the ``seen`` flags)
    live in this module's state dict; the model is referenced, not registered.

    Args:
        model: the MCN (unwrapped: not the DDP / compiled wrapper); its `MCConv2d` layers give
            the filter term and its classifier the features.
        num_classes: number of classes (rows of the centre buffer).
        theta: weight of the filter loss.
        lambda_center: weight lambda of the centre loss (0 turns it and the update off).
        alpha: centre learning rate of Wen et al. (0 < alpha <= 1).
        feature_dim: D; inferred from the classifier when None.
        reduction: ``"mean"`` (default) or ``"sum"`` of the centre term over the batch.
        warm_start: set a class's centre to the mean of its features in the first batch that
            contains the class (instead of starting from 0); Wen et al.'s rule afterwards.
        sync: all-gather features and targets for the centre update under torch.distributed.

    Example:
        >>> criterion = MCNLoss(model, num_classes=10, theta=1e-4, lambda_center=1e-3)
        >>> parts = criterion(model(x), y)
        >>> parts.total.backward()
    """

    centers: torch.Tensor
    seen: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        theta: float = 1e-4,
        lambda_center: float = 1e-2,
        alpha: float = 0.5,
        *,
        feature_dim: int | None = None,
        reduction: Reduction = "mean",
        warm_start: bool = True,
        sync: bool = True,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"num_classes must be at least 1, got {num_classes}")
        if theta < 0 or lambda_center < 0:
            raise ConfigError(f"theta and lambda must be >= 0, got {theta}, {lambda_center}")
        if not 0 < alpha <= 1:
            raise ConfigError(f"alpha (centre learning rate) must be in (0, 1], got {alpha}")
        if reduction not in ("mean", "sum"):
            raise ConfigError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.num_classes = num_classes
        self.theta = float(theta)
        self.lambda_center = float(lambda_center)
        self.alpha = float(alpha)
        self.reduction: Reduction = reduction
        self.warm_start = warm_start
        self.sync = sync
        # plain Python containers: the model's modules must not join this state dict
        self._layers: list[MCConv2d] = [m for m in model.modules() if isinstance(m, MCConv2d)]
        if not self._layers:
            _logger.info("%s has no MCConv2d layer: the filter term is 0", type(model).__name__)
        self._classifier: list[nn.Module] = [classifier_of(model)]
        dim = feature_dim if feature_dim is not None else _feature_dim(self._classifier[0])
        param = next(model.parameters(), None)
        device = param.device if param is not None else None
        self.register_buffer("centers", torch.zeros(num_classes, dim, device=device))
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool, device=device))
        self._features: torch.Tensor | None = None
        self._handle: RemovableHandle | None = self._classifier[0].register_forward_pre_hook(
            self._capture
        )

    # --- hook ----------------------------------------------------------------------------
    @classmethod
    def from_recipe(cls, model: nn.Module, num_classes: int, loss: LossRecipe) -> MCNLoss:
        """The loss with the weights of a recipe's ``loss`` section (Eq. 3.18)."""
        return cls(
            model,
            num_classes,
            theta=loss.theta,
            lambda_center=loss.lambda_center,
            alpha=loss.alpha,
        )

    def _capture(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self._features = inputs[0]

    @property
    def classifier(self) -> nn.Module:
        """The module whose input is captured as ``f``."""
        return self._classifier[0]

    def remove_hook(self) -> None:
        """Detach from the model (the loss can no longer compute its centre term)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._features = None

    def pop_features(self) -> torch.Tensor:
        """The features captured by the last forward of the model, as ``(N, D)``; clears them."""
        features = self._features
        self._features = None
        if features is None:
            raise RuntimeError(
                "MCNLoss saw no classifier input: run the model's forward before the loss "
                "(and build the loss on the same model object)"
            )
        flat = features.flatten(1)
        if flat.shape[1] != self.centers.shape[1]:
            raise ConfigError(
                f"classifier input has {flat.shape[1]} features per sample (shape "
                f"{tuple(features.shape)}), the centres expect {self.centers.shape[1]}; pass "
                "feature_dim or pool the features before the classifier"
            )
        return flat

    # --- terms ---------------------------------------------------------------------------
    def filter_term(self) -> torch.Tensor:
        """``theta * sum over MCConv2d layers of filter_loss()`` (first term of Eq. 3.18)."""
        if not self._layers:
            return self.centers.new_zeros(())
        total = self._layers[0].filter_loss()
        for layer in self._layers[1:]:
            total = total + layer.filter_loss()
        return self.theta * total

    def center_term(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``lambda/2 * mean_m (or sum_m) ||f_m - centre[y_m]||^2`` with the current centres."""
        diff = features.float() - self.centers[targets]
        per_sample = diff.pow(2).sum(dim=1)
        reduced = per_sample.mean() if self.reduction == "mean" else per_sample.sum()
        return 0.5 * self.lambda_center * reduced

    @torch.no_grad()
    def update_centers(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        """One step of Wen et al.'s rule on ``features`` (N, D) and ``targets`` (N,).

        ``centre[j] -= alpha * sum_{m: y_m = j} (centre[j] - f_m) / (1 + n_j)``. Under DDP pass
        the features and targets gathered from every rank (`gather_for_centers`). With
        ``warm_start``, a class never seen before takes the mean of its features instead.
        """
        with torch.autocast(device_type=self.centers.device.type, enabled=False):
            feats = features.detach().to(self.centers.dtype)
            onehot = F.one_hot(targets.long(), self.num_classes).to(feats.dtype)  # (N, J)
            counts = onehot.sum(dim=0)  # n_j
            sums = onehot.t() @ feats  # sum_{m: y_m = j} f_m
            present = counts > 0
            # sum_{m: y_m=j} (c_j - f_m) = n_j c_j - sum f_m
            delta = counts[:, None] * self.centers - sums
            updated = self.centers - self.alpha * delta / (1 + counts)[:, None]
            if self.warm_start:
                fresh = present & ~self.seen
                means = sums / counts.clamp(min=1)[:, None]
                updated = torch.where(fresh[:, None], means, updated)
            # Rebound, not updated in place: a compiled step (AOTAutograd) may read the centres
            # again in the backward, which must see the centres the forward used.
            self.centers = torch.where(present[:, None], updated, self.centers)
            self.seen = self.seen | present

    def broadcast_centers(self, src: int = 0) -> None:
        """Copy rank ``src``'s centres to every rank (no-op without torch.distributed)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(self.centers, src)
            dist.broadcast(self.seen, src)

    def forward(
        self, logits: torch.Tensor, targets: torch.Tensor, *, update: bool | None = None
    ) -> LossParts:
        """The loss of the model's last forward: ``logits`` (N, J) and class ``targets`` (N,).

        The centre term uses the centres before this step's update. ``update`` defaults to
        ``self.training``: centres move only in training mode, after the term is computed.
        """
        softmax = F.cross_entropy(logits.float(), targets)
        filt = self.filter_term()
        if self.lambda_center > 0:
            features = self.pop_features()
            center = self.center_term(features, targets)
            if self.training if update is None else update:
                feats, tgts = features.detach(), targets.detach()
                if self.sync:
                    feats, tgts = gather_for_centers(feats, tgts)
                self.update_centers(feats, tgts)
        else:
            self._features = None
            center = softmax.new_zeros(())
        return LossParts(softmax + filt + center, softmax, filt, center)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, feature_dim={self.centers.shape[1]}, "
            f"theta={self.theta}, lambda_center={self.lambda_center}, alpha={self.alpha}, "
            f"layers={len(self._layers)}"
        )
