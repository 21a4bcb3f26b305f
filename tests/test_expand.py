"""``width: expand`` (docs/design.md section 2): region finding, widening rules, init and
round trips."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from mcn_compress import ConversionError, MCNConfig, convert, export_packed, info_of, load, save
from mcn_compress.info import ModelSource, update_info
from mcn_compress.models import build_model
from mcn_compress.nn.expand_init import expanded_error, fit_expanded
from mcn_compress.nn.init import fit_binary_approximation
from mcn_compress.nn.mcconv import MCConv2d
from mcn_compress.passes.calibration import calibrate
from mcn_compress.passes.convert import rebuild
from mcn_compress.passes.expand import expand_model, plan_expansion
from mcn_compress.passes.tracing import trace
from mcn_compress.passes.widen import widen_conv, widen_norm_

# model -> (source, stem conv, input channels); small heads keep the suite fast
ZOO = {
    "resnet18": (ModelSource("timm", "resnet18", {"num_classes": 10}), "conv1", 3),
    "resnet10t": (ModelSource("timm", "resnet10t", {"num_classes": 10}), "conv1.0", 3),
    "regnety_002": (ModelSource("timm", "regnety_002", {"num_classes": 10}), "stem.conv", 3),
    "vgg11": (
        ModelSource("timm", "vgg11", {"num_classes": 10, "mlp_ratio": 0.0625}),
        "features.0",
        3,
    ),
    "tv:resnet18": (ModelSource("torchvision", "resnet18", {"num_classes": 10}), "conv1", 3),
    "mcn_resnet_small": (ModelSource("timm", "mcn_resnet_small", {}), "stem.0", 1),
}


def float_model(name: str) -> nn.Module:
    """The float model with random BatchNorm statistics and affine parameters (not identity)."""
    source = ZOO[name][0]
    model = build_model(source, pretrained=False)
    update_info(model, source=source)
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


def _input(name: str, batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, ZOO[name][2], size, size)


def _expected_converted(model: nn.Module, stem: str) -> set[str]:
    """The expand policy, written independently: plain Conv2d, groups 1, not the stem."""
    return {
        n for n, m in model.named_modules() if type(m) is nn.Conv2d and m.groups == 1 and n != stem
    }


def _planes_spread(t: torch.Tensor, k: int) -> float:
    """Largest difference between the K planes of a map, relative to the tensor's scale."""
    t = t.detach()
    planes = t.unflatten(1, (-1, k))
    return float((planes - planes.mean(2, keepdim=True)).abs().max() / t.abs().max())


# --- toy graphs: region finding as a pure function -------------------------------------------
class Block(nn.Module):
    """Stem, two converted convs with a residual, a float head: the plan is known by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = self.b(torch.relu(self.bn(self.a(x))))
        y = torch.relu(y + x)
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


class Mixer(Block):
    """A channel permutation between two converted convs: cannot be widened."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = torch.flip(self.a(x), dims=(1,))
        return self.fc(self.b(y).mean((2, 3)))


def test_plan_on_toy_graph() -> None:
    gm = trace(Block())
    plan = plan_expansion(gm.graph, dict(gm.named_modules()), frozenset({"a", "b"}))
    assert plan.widened == ("a", "bn", "relu_1", "b", "add", "relu_2")
    assert plan.rules["a"] == plan.rules["b"] == "mcn" and plan.rules["bn"] == "norm"
    assert plan.entries == (("relu", "a"),)  # the stem's output, replicated once
    assert plan.exits == (("relu_2", "adaptive_avg_pool2d"),)


def test_toy_rewrite_lints_counts_and_matches_float() -> None:
    model = Block().eval()
    wide = expand_model(model, MCNConfig(width="expand", planes=3), binarize=False)
    assert isinstance(wide, fx.GraphModule)
    wide.graph.lint()
    calls = [n.target for n in wide.graph.nodes if n.op in ("call_function", "call_method")]
    assert calls.count(torch.repeat_interleave) == 1 and calls.count("unflatten") == 1
    assert wide.bn.num_features == 24 and wide.a.weight.shape == (24, 24, 3, 3)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(wide(x), model(x), rtol=1e-5, atol=1e-6)


def test_unwidenable_op_names_the_node() -> None:
    model = Mixer().eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConversionError, match=r"node 'flip' \(function torch.flip\).*--keep"):
        convert(model, MCNConfig(width="expand", planes=2))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # keeping the convs around it float removes the op from the region
    ok = convert(model, MCNConfig(width="expand", planes=2, exclude=("^b$",)))
    assert ok(torch.randn(1, 3, 8, 8)).shape == (1, 4)


# --- widening rules: equal planes reproduce the float op -------------------------------------
@pytest.mark.parametrize("training", [False, True])
def test_widened_batchnorm_equals_original_on_equal_planes(training: bool) -> None:
    k = 3
    bn = nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    wide = copy.deepcopy(bn)
    widen_norm_(wide, k)
    bn.train(training)
    wide.train(training)
    x = torch.randn(4, 5, 6, 6)
    ref = bn(x)
    out = wide(x.repeat_interleave(k, dim=1))
    torch.testing.assert_close(out, ref.repeat_interleave(k, dim=1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wide.running_mean, bn.running_mean.repeat_interleave(k))
    torch.testing.assert_close(wide.running_var, bn.running_var.repeat_interleave(k))


@pytest.mark.parametrize(
    ("cin", "cout", "groups"), [(6, 4, 1), (6, 9, 3), (6, 6, 6), (4, 8, 4)], ids=str
)
def test_widened_float_conv_equals_original(cin: int, cout: int, groups: int) -> None:
    k = 2
    conv = nn.Conv2d(cin, cout, 3, padding=1, groups=groups)
    wide = widen_conv(conv, k)
    x = torch.randn(2, cin, 7, 7)
    with torch.no_grad():
        ref = conv(x)
        out = wide(x.repeat_interleave(k, dim=1))
    torch.testing.assert_close(out, ref.repeat_interleave(k, dim=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(ZOO))
def test_identity_widening_equals_float_model(name: str) -> None:
    """Every non-conv op widened, convs widened as float: the output equals the float model's,
    in eval mode (running statistics) and train mode (batch statistics)."""
    model = float_model(name).double()  # float64: BN on 1x1 maps of 4 images amplifies noise
    wide = expand_model(model, MCNConfig(width="expand", planes=2), binarize=False)
    wide.graph.lint()
    x = _input(name, batch=4).double()
    with torch.no_grad():
        torch.testing.assert_close(wide.eval()(x), model(x), rtol=1e-9, atol=1e-9)
        train_model = copy.deepcopy(model).train()
        torch.testing.assert_close(wide.train()(x), train_model(x), rtol=1e-9, atol=1e-9)


# --- initialisation --------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("mcn1", [False, True])
def test_fit_reproduces_levels_and_beats_keep(k: int, mcn1: bool) -> None:
    w0 = torch.randn(16, 8, 3, 3) * 0.1
    latent, mfilter = fit_expanded(w0, k, mcn1=mcn1)
    mc = MCConv2d(8 * k, 16 * k, 3, padding=1, bias=False, planes=k, mcn1=mcn1)
    with torch.no_grad():
        mc.weight.copy_(latent)
        mc.mfilter.copy_(mfilter)
    # independent reference: plane j applies M[j] * (sum of the K sign planes of each map)
    levels = torch.where(latent >= 0, 1.0, -1.0).reshape(16, 8, k, 3, 3).sum(2)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        out = mc(x.repeat_interleave(k, dim=1))
    errors = []
    for j in range(k):
        w_j = mfilter[j] * levels
        torch.testing.assert_close(out[:, j::k], F.conv2d(x, w_j, padding=1), rtol=1e-4, atol=1e-5)
        errors.append(float((w0 - w_j).norm() ** 2))
    rel = (sum(errors) / k) ** 0.5 / float(w0.norm())
    assert expanded_error(w0, mc.reconstruct(), k) == pytest.approx(rel, rel=1e-5)
    # the filter-loss minimiser is the chosen M (docs/design.md section 2)
    torch.testing.assert_close(mc.filter_loss_minimizer(), mfilter, rtol=1e-5, atol=1e-7)
    # as good as width keep at the same K, and the planes of M are not copies
    keep_signs, keep_m = fit_binary_approximation(w0.repeat(k, 1, 1, 1), k, mcn1=mcn1)
    q = (keep_signs.unsqueeze(1) * keep_m.unsqueeze(0).unsqueeze(2)).reshape(16 * k, 8, 3, 3)
    keep_error = float((w0.repeat(k, 1, 1, 1) - q).norm() / w0.repeat(k, 1, 1, 1).norm())
    assert rel <= keep_error + 1e-6
    if k > 1:
        assert not torch.equal(mfilter[0], mfilter[1])
        assert rel < 0.5


# --- the zoo ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_expand_shapes_and_round_trip(name: str, tmp_path: Path) -> None:
    model = float_model(name)
    k = 2
    wide = convert(model, MCNConfig(width="expand", planes=k)).eval()
    got = {n for n, m in wide.named_modules() if isinstance(m, MCConv2d)}
    assert got == _expected_converted(model, ZOO[name][1])
    originals = dict(model.named_modules())
    for n in got:
        mc, conv = wide.get_submodule(n), originals[n]
        assert (mc.in_channels, mc.out_channels) == (k * conv.in_channels, k * conv.out_channels)
        assert mc.weight.shape == (conv.out_channels, k * conv.in_channels, *conv.kernel_size)
    summary = info_of(wide).summary
    assert summary.width == "expand" and summary.planes == k
    for layer in summary.converted:
        assert layer.binary_params == k * layer.weight_params  # K times the original bits
        assert layer.rel_error is not None and layer.rel_error < 0.5
    assert info_of(wide).source == info_of(model).source
    if hasattr(model, "pretrained_cfg"):
        assert wide.pretrained_cfg == model.pretrained_cfg
    x = _input(name)
    with torch.no_grad():
        y = wide(x)
        assert y.shape == model(x).shape and torch.isfinite(y).all()
        reloaded = load(save(wide, tmp_path / "m.pt"))
        assert torch.equal(reloaded(x), y)
        packed = load(export_packed(wide, tmp_path / "m.mcn"))
        assert torch.equal(packed(x), y)
    assert not reloaded.training and info_of(reloaded).config == info_of(wide).config


def test_expand_error_beats_keep_per_layer() -> None:
    model = float_model("resnet10t")
    for k in (2, 4):
        keep = {
            r.name: r.rel_error for r in info_of(convert(model, MCNConfig(planes=k))).summary.layers
        }
        wide = info_of(convert(model, MCNConfig(width="expand", planes=k))).summary
        for layer in wide.converted:
            assert layer.rel_error is not None and keep[layer.name] is not None
            assert layer.rel_error < keep[layer.name]


def test_regnety_se_and_grouped_convs() -> None:
    model = float_model("regnety_002")
    wide = convert(model, MCNConfig(width="expand", planes=2))
    se = wide.get_submodule("s1.b1.se")
    assert isinstance(se.fc1, MCConv2d) and se.fc1.in_channels == 48  # 24 maps x 2 planes
    grouped = wide.get_submodule("s1.b1.conv2.conv")
    assert type(grouped) is nn.Conv2d and grouped.groups == 3 and grouped.in_channels == 48
    reasons = {r.name: r.reason for r in info_of(wide).summary.layers}
    assert "grouped" in reasons["s1.b1.conv2.conv"] and "widened" in reasons["s1.b1.conv2.conv"]
    assert wide.get_submodule("s1.b1.conv1.bn").num_features == 48


def test_layers_and_no_initialize_rebuild_the_same_structure() -> None:
    model = float_model("mcn_resnet_small")
    config = MCNConfig(width="expand", planes=4, mcn1=True)
    wide = convert(model, config)
    names = [n for n, m in wide.named_modules() if isinstance(m, MCConv2d)]
    bare = rebuild(model, config, names)
    shapes = {k: v.shape for k, v in wide.state_dict().items()}
    assert {k: v.shape for k, v in bare.state_dict().items()} == shapes
    assert all(r.rel_error is None for r in info_of(bare).summary.converted)


def test_calibration_and_progress() -> None:
    model = float_model("mcn_resnet_small")
    calls: list[tuple[str, int, int]] = []
    batches = [torch.randn(8, 1, 28, 28) for _ in range(2)]
    wide = convert(
        model, MCNConfig(width="expand", planes=2), progress=lambda *args: calls.append(args)
    )
    calibrate(wide, model, batches)
    assert [c[1:] for c in calls] == [(i, 8) for i in range(1, 9)]
    bn = wide.get_submodule("stages.0.bn1")
    widened_float_stats = model.get_submodule("stages.0.bn1").running_mean.repeat_interleave(2)
    assert not torch.allclose(bn.running_mean, widened_float_stats)


# --- fine-tuning: the planes of a map diverge ------------------------------------------------
def _train_and_spread(spread: float, steps: int = 3) -> tuple[list[float], list[float]]:
    """Plane spreads after the BatchNorms of four layers (train mode), at init and trained."""
    k = 2
    model = float_model("mcn_resnet_small")
    wide = expand_model(model, MCNConfig(width="expand", planes=k), spread=spread).train()
    names = ["stages.0.bn1", "stages.1.bn1", "stages.2.bn1", "stages.2.bn2"]
    seen: dict[str, torch.Tensor] = {}

    def keep_output(name: str) -> Callable[..., None]:
        return lambda _module, _inputs, out: seen.__setitem__(name, out)

    for name in names:  # after BN, a common scale per plane would be normalised away
        wide.get_submodule(name).register_forward_hook(keep_output(name))
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    wide(x)
    before = [_planes_spread(seen[n], k) for n in names]
    opt = torch.optim.SGD(wide.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(wide(x), y).backward()
        opt.step()
    wide(x)
    return before, [_planes_spread(seen[n], k) for n in names]


def test_planes_differ_at_init_and_diverge_during_training() -> None:
    before, after = _train_and_spread(spread=0.02)
    assert all(s > 1e-3 for s in before)
    assert all(s > 1e-2 for s in after)


def test_equal_m_planes_would_leave_the_last_layer_copies() -> None:
    """Why the init spreads M: with equal M planes every plane of a layer's output is a copy,
    and before the plane mean the gradients are symmetric too, so the last layer never
    diverges; layers further from the exit do (their consumers' signs differ per plane)."""
    before, after = _train_and_spread(spread=0.0)
    assert before == [0.0] * 4
    assert all(s > 1e-2 for s in after[:3]) and after[3] == 0.0


# --- export ----------------------------------------------------------------------------------
def test_onnx_export_matches(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = float_model("mcn_resnet_small")
    wide = convert(model, MCNConfig(width="expand", planes=2)).eval()
    x = torch.randn(2, 1, 28, 28)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated, not removed
        torch.onnx.export(wide, (x,), str(path), dynamo=False, input_names=["x"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), wide(x), rtol=1e-4, atol=1e-4)


def test_onnx_exporter_of_the_package(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    onnx_export = pytest.importorskip("mcn_compress.formats.onnx")
    wide = convert(float_model("regnety_002"), MCNConfig(width="expand", planes=2)).eval()
    path = tmp_path / "m.onnx"
    onnx_export.export_onnx(wide, path, weights="packed", input_size=32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 32, 32)
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), wide(x), rtol=1e-4, atol=1e-4)
