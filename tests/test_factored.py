"""Tests of the factored compute (`mcn_compress.passes.planner`, `passes.factored_forms`,
`passes.factored`, `formats.onnx_factored`; docs/design.md section 4.8).

References are independent of the code under test: the dense weight is rebuilt here from the
latent C (``C >= 0`` -> +1, else -1) and M by explicit loops over (h, j), BatchNorm is applied
as ``(y - mean) / sqrt(var + eps) * gamma + beta``, MACs are counted from the output shapes.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from model_helpers import bare_convert
from torch import nn
from typer.testing import CliRunner

from mcn_compress import (
    ConfigError,
    MCNConfig,
    export_onnx,
    export_packed,
    load_float_model,
    optimize_for_inference,
    save,
)
from mcn_compress.cli import app
from mcn_compress.formats.onnx import onnx_model
from mcn_compress.info import info_of
from mcn_compress.nn.mcconv import MCConv2d
from mcn_compress.passes.factored_forms import FactoredConv2d, create_factored
from mcn_compress.passes.planner import (
    Backend,
    Form,
    Geometry,
    LayerPlan,
    Tunables,
    candidates,
    choose_form,
    layer_geometry,
    rule_form,
)

ort = pytest.importorskip("onnxruntime")

EAGER_TOL = 1e-5
ONNX_TOL = 1e-4


def rel_error(got: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray) -> float:
    if isinstance(got, torch.Tensor):
        got = got.detach().numpy()
    if isinstance(ref, torch.Tensor):
        ref = ref.detach().numpy()
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))


def naive_q(layer: MCConv2d) -> torch.Tensor:
    """``Q[h*K + j, c] = (+1 if C[h, c] >= 0 else -1) * M[j]``, by loops."""
    c, m = layer.weight.detach(), layer.mfilter.detach()
    k = layer.planes
    q = torch.empty(layer.out_channels, *c.shape[1:])
    for h in range(c.shape[0]):
        signs = torch.where(c[h] >= 0, 1.0, -1.0)
        for j in range(k):
            q[h * k + j] = signs * m[j]
    return q


def dense_reference(layer: MCConv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(
        x, naive_q(layer), layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups
    )


def random_layer(rng: random.Random) -> tuple[MCConv2d, tuple[int, int]]:
    k = rng.choice([1, 2, 4, 8])
    groups = rng.choice([1, 1, 2])
    cin = groups * k * rng.choice([2, 3, 4])
    cout = groups * k * rng.choice([1, 2, 3])
    kernel = rng.choice([1, 3, (3, 5), (2, 2)])
    mcn1 = rng.random() < 0.25
    dilation = rng.choice([1, 1, 2])
    padding: Any = rng.choice([0, 1, 2, (1, 2), "valid"])
    stride = rng.choice([1, 2, (2, 1)])
    if rng.random() < 0.15:
        padding, stride = "same", 1
    layer = MCConv2d(
        cin,
        cout,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=rng.random() < 0.5,
        planes=k,
        mcn1=mcn1,
    )
    with torch.no_grad():
        layer.weight.normal_()
        layer.weight.view(-1)[0] = 0.0  # sign(0) = +1
        layer.weight.view(-1)[-1] = -0.0
        layer.mfilter.normal_()
        if layer.bias is not None:
            layer.bias.normal_()
    return layer.eval(), (rng.randint(9, 14), rng.randint(9, 14))


def factored(
    layer: MCConv2d,
    form: Form,
    hw: tuple[int, int] = (1, 1),
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> FactoredConv2d:
    return create_factored(layer, LayerPlan("l", layer_geometry(layer, hw), form), scale, shift)


@pytest.mark.parametrize("seed", range(24))
def test_every_form_matches_the_dense_conv(seed: int) -> None:
    torch.manual_seed(seed)
    layer, (hi, wi) = random_layer(random.Random(seed))
    x = torch.randn(2, layer.in_channels, hi, wi)
    ref = dense_reference(layer, x)
    tried = 0
    for form in Form:
        try:
            fact = factored(layer, form, (hi, wi))
        except ConfigError:
            continue
        tried += 1
        assert fact.form is form
        error = rel_error(fact(x), ref)
        assert error <= EAGER_TOL, f"{form}: relative error {error:.2e} ({layer})"
    assert tried >= 2


def test_padding_of_every_kind_matches_the_conv_output_size() -> None:
    """The planner's padding and output size against what F.conv2d gives, for explicit,
    "same" and "valid" padding."""
    for padding, stride in [((1, 2), (2, 1)), ("same", 1), ("valid", 2), (0, 3)]:
        layer = MCConv2d(8, 8, (3, 4), stride=stride, padding=padding, dilation=2, planes=2)
        geo = layer_geometry(layer, (17, 19))
        out = F.conv2d(torch.zeros(1, 8, 17, 19), torch.zeros(8, 8, 3, 4), None, stride, padding, 2)
        assert geo.output_hw == tuple(out.shape[2:]), padding
        top, bottom, left, right = geo.pads
        if padding == "same":  # PyTorch puts the odd pixel at the end
            assert (top, bottom, left, right) == (2, 2, 3, 3)


@pytest.mark.parametrize("form", ["scale", "cols", "grid", "dense"])
def test_batchnorm_folds_exactly(form: str) -> None:
    kernel, mcn1 = (1, False) if form == "scale" else (3, False)
    layer = MCConv2d(8, 16, kernel, padding=kernel // 2, planes=4, mcn1=mcn1).eval()
    bn = nn.BatchNorm2d(16).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 8, 10, 10)
    y = dense_reference(layer, x)
    shape = (1, -1, 1, 1)
    ref = (y - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
    ref = ref * bn.weight.view(shape) + bn.bias.view(shape)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    fact = factored(layer, Form(form), (10, 10), scale, shift)
    assert rel_error(fact(x).detach(), ref.detach()) <= 1e-5


def test_a_wrong_combination_is_detected() -> None:
    """The reference can fail: a factored layer with M's planes swapped is far off."""
    layer = MCConv2d(8, 8, 3, padding=1, planes=2).eval()
    x = torch.randn(1, 8, 9, 9)
    fact = factored(layer, Form.COLS, (9, 9))
    fact.combine.copy_(fact.combine.flip(1))
    assert rel_error(fact(x), dense_reference(layer, x)) > 1e-2


def test_rule_and_macs() -> None:
    one = layer_geometry(MCConv2d(64, 256, 1, planes=4), (56, 56))
    assert rule_form(one) is Form.SCALE
    assert one.macs(Form.SCALE) == 64 * 64 * 56 * 56 + 256 * 56 * 56
    assert one.macs(Form.DENSE) == 256 * 64 * 56 * 56
    big = layer_geometry(MCConv2d(64, 64, 3, padding=1, planes=4), (56, 56))
    assert rule_form(big) is Form.GRID
    assert big.macs(Form.COLS) == 16 * 64 * 9 * 56 * 56 + 64 * 9 * 56 * 56
    strided = layer_geometry(MCConv2d(64, 128, 3, stride=2, padding=1, planes=4), (56, 56))
    assert rule_form(strided) is Form.COLS and strided.output_hw == (28, 28)
    tiny = layer_geometry(MCConv2d(8, 8, 3, padding=1, planes=4), (56, 56))
    assert rule_form(tiny) is Form.DENSE
    # onnxruntime: a layer must save 8M MACs per image and thread, else it stays dense
    tunables = Tunables(onnx_min_saved_macs=8_000_000)

    def ort_form(geo: Geometry, threads: int) -> Form:
        return choose_form(geo, Backend.ONNXRUNTIME, threads, tunables)

    saved = big.macs(Form.DENSE) - big.macs(Form.GRID)
    most = saved // 8_000_000  # the most threads for which the layer still pays
    assert ort_form(big, 1) is Form.GRID and ort_form(big, most) is Form.GRID
    assert ort_form(big, most + 1) is Form.DENSE
    small = layer_geometry(MCConv2d(64, 64, 3, padding=1, planes=4), (14, 14))
    assert rule_form(small) is Form.GRID and ort_form(small, 1) is Form.DENSE


# --------------------------------------------------------------------------------------------
# whole models
# --------------------------------------------------------------------------------------------
def scramble(model: nn.Module, seed: int = 0) -> nn.Module:
    """Distinct BN statistics (timm zero-inits some gammas) and M-Filters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MCConv2d):
                module.mfilter.uniform_(0.5, 1.5, generator=gen)
                module.mfilter.mul_(math.sqrt(2.0 / module.weight[0].numel()))
            elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                module.weight.uniform_(0.6, 1.4, generator=gen)
                module.bias.normal_(0, 0.1, generator=gen)
                module.running_mean.normal_(0, 0.1, generator=gen)
                module.running_var.uniform_(0.6, 1.4, generator=gen)
    return model.eval()


def mcn(name: str, **config: Any) -> nn.Module:
    torch.manual_seed(0)
    return scramble(bare_convert(load_float_model(name, pretrained=False), MCNConfig(**config)))


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("resnet10t", {"planes": 4}),
        ("resnet10t", {"planes": 2, "width": "expand"}),
        ("test_resnet", {"planes": 2, "mcn1": True}),
        ("regnety_002", {"planes": 2, "grouped": True}),
    ],
)
def test_optimized_model_matches_dense_eval(name: str, config: dict[str, Any]) -> None:
    model = mcn(name, **config)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    fast = optimize_for_inference(model, input_size=64, threads=1)
    with torch.no_grad():
        got = fast(x)
    assert rel_error(got, ref) <= EAGER_TOL
    layers = [n for n, m in model.named_modules() if isinstance(m, MCConv2d)]
    plan = info_of(fast).plan
    assert plan is not None and plan.threads == 1 and plan.backend is Backend.TORCH
    assert [row.name for row in plan.layers] == layers
    assert not any(isinstance(m, MCConv2d) for m in fast.modules())
    assert not hasattr(fast, "factored_summary")
    assert any(row.folded_batchnorm for row in plan.layers)
    assert plan.macs < plan.dense_macs
    modules = dict(fast.named_modules())
    assert all(modules[row.name].form is row.form for row in plan.layers)
    assert any(isinstance(m, MCConv2d) for m in model.modules())  # the input is unchanged


def test_optimize_compute_choices() -> None:
    model = mcn("test_resnet", planes=2)
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        ref = model(x)
    for compute in ("time", "dense", "factored"):
        fast = optimize_for_inference(model, compute=compute, input_size=48, repeats=1)
        with torch.no_grad():
            assert rel_error(fast(x), ref) <= EAGER_TOL, compute
        plan = info_of(fast).plan
        assert plan is not None and plan.compute.value == compute
        forms = {row.form for row in plan.layers}
        if compute == "dense":
            assert forms == {Form.DENSE}
        elif compute == "factored":
            assert Form.DENSE not in forms
        else:  # every layer timed dense and each candidate, and kept the fastest
            for row in plan.layers:
                assert row.times_ms is not None
                wanted = {f.value for f in [Form.DENSE, *candidates(row.geometry)]}
                assert set(row.times_ms) == wanted
                assert row.form.value == min(row.times_ms, key=row.times_ms.__getitem__)
    for bad in ({"compute": "fast"}, {"threads": 0}):
        with pytest.raises(ConfigError):
            optimize_for_inference(model, **bad)


# --------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------
def session(path: Path, optimized: Path | None = None) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if optimized is not None:  # constant folding, without hardware-specific layouts
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def float_elements(path: Path) -> int:
    proto = onnx.load(path)
    return sum(
        int(np.prod(init.dims))
        for init in proto.graph.initializer
        if init.data_type == onnx.TensorProto.FLOAT
    )


@pytest.mark.parametrize("matmul", [False, True], ids=["conv-windows", "matmul-windows"])
@pytest.mark.parametrize("seed", range(40))
def test_every_onnx_form_matches_the_dense_conv(seed: int, matmul: bool, tmp_path: Path) -> None:
    """Each ONNX form of one random layer (stride, dilation, padding, groups, bias, K, MCNs-1)
    against the loop-built dense conv; ``matmul``: ``cols`` convolves its windows by MatMul
    (large maps) instead of a 1x1 Conv (small maps, strided windows via SpaceToDepth). The
    TorchScript exporter keeps it fast: the rewrite reads only the Conv nodes, which both
    exporters emit (it writes ``auto_pad`` where the default exporter writes ``pads``; the zoo
    tests below use the default one)."""
    torch.manual_seed(seed)
    layer, (hi, wi) = random_layer(random.Random(seed))
    model = nn.Sequential(layer).eval()
    x = torch.randn(2, layer.in_channels, hi, wi)
    with torch.no_grad():
        ref = dense_reference(layer, x).numpy()
    geo = layer_geometry(layer, (hi, wi))
    tunables = Tunables(onnx_conv_max_pixels=0 if matmul else 1024)
    for form in candidates(geo):
        path = tmp_path / f"{form.value}.onnx"
        options = {"input_size": (hi, wi), "dynamic_batch": True, "exporter": "torchscript"}
        proto, result = onnx_model(
            model, compute="auto", tunables=tunables, forms={"0": form}, **options
        )
        path.write_bytes(proto.SerializeToString())
        assert len(result.factored_layers) == 1, (form, layer)
        assert result.plan is not None and result.plan.layers[0].form is form
        ops = {node.op_type for node in onnx.load(path).graph.node}
        assert "Conv" in ops or "MatMul" in ops
        sess = session(path)
        error = rel_error(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0], ref)
        assert error <= ONNX_TOL, f"{form}: relative error {error:.2e} ({layer})"


def test_strided_windows_use_space_to_depth(tmp_path: Path) -> None:
    """A stride-2 3x3 conv at a small map reads its windows from one SpaceToDepth, and the
    stride-1 window that is the input itself is not sliced."""
    layers = {
        2: MCConv2d(32, 64, 3, stride=2, padding=1, planes=2),
        1: MCConv2d(32, 64, 3, stride=1, padding=1, planes=2),
    }
    for stride, layer in layers.items():
        path = tmp_path / f"s{stride}.onnx"
        export_onnx(nn.Sequential(layer.eval()), path, compute="factored", input_size=15)
        ops = [node.op_type for node in onnx.load(path).graph.node]
        assert ops.count("SpaceToDepth") == (1 if stride == 2 else 0)
        assert ops.count("Slice") == (9 if stride == 2 else 8)
        assert ops.count("Conv") == 10  # 9 positions + the combination


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("resnet18", {"planes": 4}),
        pytest.param("tv:mobilenet_v2", {"planes": 4}, marks=pytest.mark.slow),
        ("resnet10t", {"planes": 2, "width": "expand"}),
        ("test_resnet", {"planes": 8, "mcn1": True}),
        pytest.param("regnety_002", {"planes": 2, "grouped": True}, marks=pytest.mark.slow),
    ],
)
def test_factored_onnx_matches_pytorch(name: str, config: dict[str, Any], tmp_path: Path) -> None:
    model = mcn(name, **config)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x).numpy()
    paths = {c: tmp_path / f"{c}.onnx" for c in ("dense", "factored")}
    results = {
        c: export_onnx(model, p, compute=c, input_size=64, dynamic_batch=True)
        for c, p in paths.items()
    }
    fact = results["factored"]
    assert len(fact.factored_layers) == len(fact.packed_layers) > 0
    onnx.checker.check_model(onnx.load(paths["factored"]), full_check=True)
    optimized = {c: tmp_path / f"{c}.opt.onnx" for c in paths}
    for c, path in paths.items():
        sess = session(path, optimized[c])
        error = rel_error(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0], ref)
        assert error <= ONNX_TOL, f"{name} {c}: relative error {error:.2e}"
    # sign bits stay packed: the file is within 5% of the packed .mcn
    packed = export_packed(model, tmp_path / "model.mcn").stat().st_size
    assert fact.bytes <= 1.05 * packed, (fact.bytes, packed)
    # after constant folding the runtime holds 1/K of the converted convs' float weights
    convs = [m for m in model.modules() if isinstance(m, MCConv2d)]
    q = sum(m.out_channels * m.weight.shape[1] * m.weight[0, 0].numel() for m in convs)
    extra = sum(m.out_channels * (m.weight[0, 0].numel() + 2) for m in convs)
    k = config["planes"]
    expected = float_elements(optimized["dense"]) - q + q // k
    assert float_elements(optimized["factored"]) <= expected + extra


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save(mcn("test_resnet", planes=2), tmp_path_factory.mktemp("ckpt") / "model.pt")


@pytest.mark.parametrize("compute", ["dense", "factored", "auto", None])
def test_cli_compute(compute: str | None, checkpoint: Path, tmp_path: Path) -> None:
    import mcn_compress

    out = tmp_path / "m.onnx"
    args = ["export", str(checkpoint), "-f", "onnx", "--input-size", "48", "-o", str(out)]
    args += ["--compute", compute] if compute else []
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["compute"] == (compute or "auto")
    if compute in ("dense", "factored"):  # auto keeps this small model's layers dense
        assert (info["factored_layers"] > 0) == (compute == "factored")
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        ref = mcn_compress.load(checkpoint)(x).numpy()
    sess = session(out)
    assert rel_error(sess.run(None, {"input": x.numpy()})[0], ref) <= ONNX_TOL


def test_cli_compute_needs_packed_weights(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    args = ["export", str(checkpoint), "-f", "onnx", "--weights", "folded"]
    result = CliRunner().invoke(app, [*args, "--compute", "factored", "-o", str(out)])
    assert result.exit_code == 1 and "needs weights 'packed'" in result.stderr
    result = CliRunner().invoke(
        app, ["export", str(checkpoint), "--compute", "dense", "-o", str(out)]
    )
    assert result.exit_code == 1 and "--compute" in result.stderr


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def test_profile_reports_dense_and_factored_costs() -> None:
    from mcn_compress.profile import profile_model

    model = mcn("test_resnet", planes=2)
    profile = profile_model(model, "m", per_layer=True, latency=True, input_size=48)
    fact = profile.factored
    assert fact is not None and fact["latency_ms"] > 0 and profile.latency_ms is not None
    fast = optimize_for_inference(model, input_size=48)
    # weight floats a runtime holds, from the actual tensors of both models
    dense = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    dense += sum(naive_q(m).numel() for m in model.modules() if isinstance(m, MCConv2d))
    held = sum(m.weight.numel() for m in fast.modules() if isinstance(m, nn.Conv2d))
    held += sum(
        m.binary.numel() + (m.combine.numel() if m.form is not Form.DENSE else 0)
        for m in fast.modules()
        if isinstance(m, FactoredConv2d)
    )
    assert fact["dense_weight_bytes"] == 4 * dense and fact["weight_bytes"] == 4 * held
    assert fact["dense_conv_macs"] == profile.conv_macs > fact["conv_macs"]
    rows = [r for r in profile.layers or [] if r.kind == "mcn"]
    assert rows and all(r.factored and r.factored["macs"] < r.factored["dense_macs"] for r in rows)
    assert profile.to_dict()["factored_conv_macs"] == fact["conv_macs"]


def test_cli_report_shows_factored_rows(checkpoint: Path) -> None:
    args = ["report", str(checkpoint), "--per-layer", "--latency", "--input-size", "48"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for text in ("conv MACs, factored", "weight bytes held", "latency ms/image, factored"):
        assert text in result.stdout
