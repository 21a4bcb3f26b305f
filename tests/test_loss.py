"""Tests of `MCNLoss` (Eq. 3.18, docs/design.md section 3) against naive references.

Filter-loss gradients are checked against the closed forms written with explicit loops; the
centre update against numbers worked out by hand; the captured features against each model
library's own "pre-logits" path.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import timm
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision
from torch import nn

from mcn_compress import ConfigError
from mcn_compress.nn.mcconv import MCConv2d
from mcn_compress.training.loss import MCNLoss, classifier_of

DT = torch.float64


def naive_sign(t: torch.Tensor) -> torch.Tensor:
    return torch.sign(t) + (t == 0).to(t.dtype)


def toy_model(mcn1: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # float stem
        MCConv2d(8, 8, 3, padding=1, planes=4),
        nn.ReLU(),
        MCConv2d(8, 12, 3, padding=1, planes=2, mcn1=mcn1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 5),
    ).to(DT)


def naive_filter_grads(
    c: torch.Tensor, m: torch.Tensor, theta: float
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Value, dL/dC and dL/dM of ``theta/2 * sum ||C[h,c] - B[h,c] M[c mod K]||^2`` by loops."""
    planes = m.shape[0]
    value = 0.0
    grad_c = torch.zeros_like(c)
    grad_m = torch.zeros_like(m)
    for h in range(c.shape[0]):
        for ch in range(c.shape[1]):
            k = ch % planes
            b = naive_sign(c[h, ch])
            residual = c[h, ch] - b * m[k]  # m[k] broadcasts for MCNs-1 (1x1 planes)
            value += 0.5 * theta * float((residual**2).sum())
            grad_c[h, ch] = theta * residual
            term = -theta * residual * b
            grad_m[k] += term if m.shape[1:] != (1, 1) else term.sum()
    return value, grad_c, grad_m


@pytest.mark.parametrize("mcn1", [False, True])
def test_filter_term_value_and_gradients_match_closed_forms(mcn1: bool) -> None:
    model = toy_model(mcn1)
    layers = [m for m in model.modules() if isinstance(m, MCConv2d)]
    with torch.no_grad():  # exact zeros: sign(0) must count as +1
        layers[0].weight[0, 0, 0, 0] = 0.0
        layers[1].weight[1, 2, 1, 1] = 0.0
    theta = 0.3
    loss = MCNLoss(model, num_classes=5, theta=theta, lambda_center=0.0)
    x = torch.randn(2, 3, 6, 6, dtype=DT)
    parts = loss(model(x), torch.tensor([0, 3]))
    expected_value = 0.0
    for layer in layers:
        value, grad_c, grad_m = naive_filter_grads(
            layer.weight.detach(), layer.mfilter.detach(), theta
        )
        expected_value += value
        got_c, got_m = torch.autograd.grad(
            parts.filter, [layer.weight, layer.mfilter], retain_graph=True
        )
        torch.testing.assert_close(got_c, grad_c)
        torch.testing.assert_close(got_m, grad_m)
    assert parts.filter.item() == pytest.approx(expected_value, rel=1e-10)


def test_total_is_cross_entropy_plus_weighted_terms() -> None:
    model = toy_model()
    theta, lam = 0.01, 0.2
    loss = MCNLoss(model, num_classes=5, theta=theta, lambda_center=lam, warm_start=False)
    x = torch.randn(4, 3, 6, 6, dtype=DT)
    y = torch.tensor([0, 1, 4, 1])
    feats = model[:-1](x)  # the classifier input, computed independently of the hook
    logits = model(x)
    parts = loss.eval()(logits, y)
    layers = [m for m in model.modules() if isinstance(m, MCConv2d)]
    filt = sum(naive_filter_grads(m.weight.detach(), m.mfilter.detach(), theta)[0] for m in layers)
    center = lam / 2 * float((feats.detach() ** 2).sum()) / 4  # centres start at 0
    ce = -sum(float(torch.log_softmax(logits[i].detach(), 0)[y[i]]) for i in range(4)) / 4
    assert parts.softmax.item() == pytest.approx(ce, rel=1e-6)
    assert parts.filter.item() == pytest.approx(filt, rel=1e-6)
    assert parts.center.item() == pytest.approx(center, rel=1e-6)
    assert parts.total.item() == pytest.approx(ce + filt + center, rel=1e-6)
    assert set(parts.to_dict()) == {"total", "softmax", "filter", "center"}


def linear_probe(num_classes: int = 3, dim: int = 2) -> nn.Module:
    """A model whose classifier input is the model input: f_m = x_m."""
    return nn.Sequential(nn.Identity(), nn.Linear(dim, num_classes))


def hand_example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    centres = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    features = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([0, 0, 1])
    return centres, features, targets


def test_center_update_matches_hand_computation() -> None:
    # alpha = 0.5; class 0: n=2, sum(c0 - f) = (-1,-2) + (-3,0) = (-4,-2), /3 * 0.5 = (-2/3,-1/3)
    #   -> c0 = (2/3, 1/3); class 1: n=1, (1,1)-(0,1) = (1,0), /2 * 0.5 = (0.25, 0) -> (0.75, 1)
    #   class 2 is absent and stays (5, 5).
    centres, features, targets = hand_example()
    loss = MCNLoss(linear_probe(), 3, lambda_center=1.0, alpha=0.5, warm_start=False)
    loss.centers.copy_(centres)
    loss.update_centers(features, targets)
    expected = torch.tensor([[2 / 3, 1 / 3], [0.75, 1.0], [5.0, 5.0]])
    torch.testing.assert_close(loss.centers, expected)


def test_center_loss_value_uses_old_centres_and_updates_only_in_training() -> None:
    # ||f - c[y]||^2: (1,2)-(0,0) -> 5; (3,0)-(0,0) -> 9; (0,1)-(1,1) -> 1; sum 15, mean 5
    centres, features, targets = hand_example()
    model = linear_probe()
    for reduction, expected in (("mean", 0.5 * 0.2 * 5), ("sum", 0.5 * 0.2 * 15)):
        loss = MCNLoss(
            model, 3, lambda_center=0.2, alpha=0.5, reduction=reduction, warm_start=False
        )
        loss.centers.copy_(centres)
        loss.eval()
        parts = loss(model(features), targets)
        assert parts.center.item() == pytest.approx(expected)
        torch.testing.assert_close(loss.centers, centres)  # eval: no update
        loss.train()
        parts = loss(model(features), targets)
        assert parts.center.item() == pytest.approx(expected)  # computed before the update
        torch.testing.assert_close(loss.centers[1], torch.tensor([0.75, 1.0]))
        loss.remove_hook()


def test_center_term_gradient_pulls_features_to_centres() -> None:
    centres, features, targets = hand_example()
    model = linear_probe()
    loss = MCNLoss(model, 3, lambda_center=0.2, warm_start=False)
    loss.centers.copy_(centres)
    x = features.clone().requires_grad_(True)
    parts = loss.eval()(model(x), targets)
    (grad,) = torch.autograd.grad(parts.center, x)
    torch.testing.assert_close(grad, 0.2 * (features - centres[targets]) / 3)


def test_warm_start_sets_new_classes_to_their_mean() -> None:
    _, features, targets = hand_example()
    loss = MCNLoss(linear_probe(), 3, lambda_center=1.0, alpha=0.5)
    loss.update_centers(features, targets)
    expected = torch.tensor([[2.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    torch.testing.assert_close(loss.centers, expected)
    assert loss.seen.tolist() == [True, True, False]
    # afterwards Wen's rule: class 1, n=1: (0,1) - (2,3) = (-2,-2), /2 * 0.5 -> (0.5, 1.5)
    loss.update_centers(torch.tensor([[2.0, 3.0]]), torch.tensor([1]))
    torch.testing.assert_close(loss.centers[1], torch.tensor([0.5, 1.5]))


def test_centres_are_state_not_parameters() -> None:
    model = toy_model()
    loss = MCNLoss(model, num_classes=5)
    assert list(loss.parameters()) == []
    assert set(loss.state_dict()) == {"centers", "seen"}  # the model is not registered
    assert loss.centers.shape == (5, 12)
    fresh = MCNLoss(model, num_classes=5)
    loss.centers.normal_()
    fresh.load_state_dict(loss.state_dict())
    torch.testing.assert_close(fresh.centers, loss.centers)


def test_loss_needs_a_forward_and_matching_features() -> None:
    model = linear_probe()
    loss = MCNLoss(model, 3)
    with pytest.raises(RuntimeError, match="forward"):
        loss(torch.zeros(1, 3), torch.tensor([0]))
    with pytest.raises(ConfigError, match="alpha"):
        MCNLoss(model, 3, alpha=0.0)


# --- hook on real architectures ---------------------------------------------------------------
def _tv_reference(model: nn.Module, attr: str, x: torch.Tensor) -> torch.Tensor:
    stripped = copy.deepcopy(model)
    parent, _, last = attr.rpartition(".")
    owner = stripped.get_submodule(parent) if parent else stripped
    setattr(owner, last, nn.Identity())
    return stripped(x)


@pytest.mark.parametrize(
    "name",
    ["timm:resnet18", "timm:efficientnet_b0", "tv:resnet18", "tv:mobilenet_v2"],
)
def test_hook_captures_the_classifier_input(name: str) -> None:
    library, arch = name.split(":")
    x = torch.randn(2, 3, 32, 32)
    if library == "timm":
        model = timm.create_model(arch, pretrained=False, num_classes=10).eval()
        head = model.get_classifier()
        with torch.no_grad():
            expected = model.forward_head(model.forward_features(x), pre_logits=True)
    else:
        model = torchvision.models.get_model(arch, weights=None, num_classes=10).eval()
        attr = "fc" if arch == "resnet18" else "classifier.1"
        head = model.get_submodule(attr)
        with torch.no_grad():
            expected = _tv_reference(model, attr, x)
    loss = MCNLoss(model, num_classes=10)
    assert classifier_of(model) is head
    with torch.no_grad():
        logits = model(x)
    features = loss.pop_features()
    assert features.shape == (2, head.in_features)
    torch.testing.assert_close(features, expected)
    assert logits.shape == (2, 10)


# --- distributed centre update ------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = linear_probe()
        loss = MCNLoss(model, 3, lambda_center=1.0, alpha=0.5, warm_start=False)
        centres, features, targets = hand_example()
        loss.centers.copy_(centres)
        # rank 0 holds samples 0 and 1, rank 1 holds sample 2: different batch sizes
        local = slice(0, 2) if rank == 0 else slice(2, 3)
        loss.train()(model(features[local]), targets[local])
        torch.save(loss.centers.clone(), os.path.join(out_dir, f"centres{rank}.pt"))
        if rank == 1:  # diverge on purpose, then resynchronise from rank 0
            loss.centers.add_(1.0)
        loss.broadcast_centers(src=0)
        torch.save(loss.centers.clone(), os.path.join(out_dir, f"synced{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_update_equals_update_on_the_whole_batch(tmp_path: Path) -> None:
    mp.spawn(
        _ddp_worker,
        args=(2, str(tmp_path / "init"), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    got = [torch.load(tmp_path / f"centres{r}.pt", weights_only=True) for r in range(2)]
    expected = torch.tensor([[2 / 3, 1 / 3], [0.75, 1.0], [5.0, 5.0]])
    assert torch.equal(got[0], got[1])
    torch.testing.assert_close(got[0], expected)
    synced = [torch.load(tmp_path / f"synced{r}.pt", weights_only=True) for r in range(2)]
    assert torch.equal(synced[0], got[0]) and torch.equal(synced[1], got[0])


def test_cross_entropy_part_matches_torch() -> None:
    model = linear_probe(num_classes=4, dim=3)
    loss = MCNLoss(model, 4, lambda_center=0.0)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 0])
    logits = model(x)
    parts = loss(logits, y)
    torch.testing.assert_close(parts.softmax, F.cross_entropy(logits, y))
    assert parts.center.item() == 0.0
