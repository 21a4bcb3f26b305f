"""Tests of the ONNX export (`mcn_compress.formats.onnx`) and `mcn-compress export --format onnx`.

References are independent of the exporter: PyTorch eval outputs of the source model, sign bits
decoded with numpy's ``unpackbits`` (little bit order) and compared with ``C >= 0``, shapes and
byte counts taken from the model's own modules, onnxruntime's optimised graph.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from model_helpers import bare_convert
from onnx import numpy_helper
from torch import nn
from typer.testing import CliRunner

from mcn_compress import ConfigError, MCNConfig, export_onnx, load_float_model, save
from mcn_compress.cli import app
from mcn_compress.errors import ExportError
from mcn_compress.nn.mcconv import MCConv2d

ort = pytest.importorskip("onnxruntime")

REL_TOL = 1e-4


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def scramble(model: nn.Module, seed: int = 0) -> nn.Module:
    """Distinctive values everywhere (BN statistics, biases, M), exact +-0.0 in every latent C,
    so that a wrong bit order, a dropped BN parameter or sign(0) = -1 changes the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, MCConv2d):
                module.weight.normal_(generator=gen)
                flat = module.weight.view(-1)
                flat[0], flat[-1] = 0.0, -0.0
                module.mfilter.uniform_(0.5, 1.5, generator=gen)
                module.mfilter.mul_(math.sqrt(2.0 / module.weight[0].numel()))
            elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                module.weight.uniform_(0.6, 1.4, generator=gen)
                module.bias.normal_(0, 0.1, generator=gen)
                module.running_mean.normal_(0, 0.1, generator=gen)
                module.running_var.uniform_(0.6, 1.4, generator=gen)
            elif name and isinstance(module, nn.Linear | nn.Conv2d) and module.bias is not None:
                module.bias.normal_(0, 0.05, generator=gen)
    return model


def mcn_model(name: str, planes: int = 4, **config: Any) -> nn.Module:
    float_model = load_float_model(name, pretrained=False)
    model = bare_convert(float_model, MCNConfig(planes=planes, **config))
    return scramble(model).eval()


def reference(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(x).numpy()


def session(model: Path | bytes, level: str = "ORT_ENABLE_ALL", optimized: Path | None = None):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run(model: Path | bytes, x: torch.Tensor, level: str = "ORT_ENABLE_ALL") -> np.ndarray:
    sess = session(model, level)
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    """Largest absolute difference relative to the largest reference magnitude."""
    assert got.shape == ref.shape
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))


def converted(model: nn.Module) -> dict[str, MCConv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MCConv2d)}


def float_initializers(proto: onnx.ModelProto) -> list[onnx.TensorProto]:
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)
    return [init for init in proto.graph.initializer if init.data_type in floats]


# --------------------------------------------------------------------------------------------
# the zoo: checker, outputs within 1e-4 of PyTorch eval, both layouts
# --------------------------------------------------------------------------------------------
SLOW = pytest.mark.slow  # the larger models: run by .ci/run, outside the 10-minute suite
ZOO = [
    "resnet18",
    "resnet10t",
    "tv:resnet18",
    pytest.param("efficientnet_b0", marks=SLOW),
    pytest.param("mobilenetv3_large_100", marks=SLOW),
    pytest.param("regnety_002", marks=SLOW),
    pytest.param("convnext_atto", marks=SLOW),
    pytest.param("tv:mobilenet_v2", marks=SLOW),
    pytest.param("resnet50", marks=SLOW),
    pytest.param("densenet121", marks=SLOW),
]


def _check_zoo(name: str, size: int, tmp_path: Path) -> None:
    model = mcn_model(name)
    x = torch.randn(2, 3, size, size)
    ref = reference(model, x)
    for weights in ("folded", "packed"):
        path = tmp_path / f"{weights}.onnx"
        result = export_onnx(model, path, weights=weights, input_size=size, dynamic_batch=True)
        assert result.exporter == "dynamo", f"{name} {weights}: fell back to TorchScript"
        proto = onnx.load(path)
        onnx.checker.check_model(proto, full_check=True)
        error = rel_error(run(path, x), ref)
        assert error <= REL_TOL, f"{name} {weights}: relative error {error:.2e}"


@pytest.mark.parametrize("name", ZOO)
def test_zoo_onnx_matches_pytorch(name: str, tmp_path: Path) -> None:
    _check_zoo(name, 64, tmp_path)


@pytest.mark.slow
def test_zoo_vgg11_at_224(tmp_path: Path) -> None:
    """timm's vgg11 head pools to 7x7, which ONNX only exports for 224-pixel inputs; its folded
    file is 0.5 GB, hence slow (about a minute)."""
    _check_zoo("vgg11", 224, tmp_path)


# --------------------------------------------------------------------------------------------
# what the packed file holds
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def r18() -> nn.Module:
    torch.manual_seed(0)
    return mcn_model("resnet18")


@pytest.fixture(scope="module")
def r18_files(r18: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("r18")
    return {
        w: export_onnx(r18, root / f"{w}.onnx", weights=w, input_size=64).path
        for w in ("packed", "folded")
    }


def test_packed_has_no_full_size_float_weights(r18: nn.Module, r18_files: dict[str, Path]):
    proto = onnx.load(r18_files["packed"])
    layers = converted(r18)
    full_shapes = {(m.out_channels, *m.weight.shape[1:]) for m in layers.values()}
    float_dims = [tuple(init.dims) for init in float_initializers(proto)]
    assert not full_shapes & set(float_dims)
    # every float value left is one the model really keeps in float: stem, classifier, biases,
    # BN-derived scales, M-Filters (counted from the modules, not from the exporter)
    keep = sum(m.mfilter.numel() + 2 * m.out_channels for m in layers.values())
    keep += sum(
        p.numel()
        for name, module in r18.named_modules()
        if isinstance(module, nn.Conv2d | nn.Linear) and not isinstance(module, MCConv2d)
        for p in module.parameters()
    )
    stem_bn = r18.bn1.num_features * 2  # folded into the stem conv's bias: at most 2 per channel
    floats = sum(math.prod(d) for d in float_dims)
    assert floats <= keep + stem_bn + 64
    uint8 = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.UINT8]
    sign_bytes = sum(math.ceil(m.weight.numel() / 8) for m in layers.values())
    assert sum(math.prod(i.dims) for i in uint8) == sign_bytes + 8 + 1  # + shifts and mask


def test_packed_sign_bits_decode_to_sign_of_latent(r18: nn.Module, r18_files: dict[str, Path]):
    proto = onnx.load(r18_files["packed"])
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for name, module in converted(r18).items():
        packed = inits[f"{name}.weight.signs"]
        assert packed.dtype == np.uint8
        bits = np.unpackbits(packed, bitorder="little")[: module.weight.numel()]
        expected = (module.weight.detach().reshape(-1) >= 0).numpy()
        assert np.array_equal(bits.astype(bool), expected), name
        mfilter = inits[f"{name}.weight.mfilter"]
        assert np.array_equal(mfilter.reshape(module.mfilter.shape), module.mfilter.detach())


def test_packed_uses_only_default_domain(r18_files: dict[str, Path]) -> None:
    proto = onnx.load(r18_files["packed"])
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
    ops = {n.op_type for n in proto.graph.node}
    assert {"BitShift", "Conv"} <= ops
    assert {i.name for i in proto.graph.input} == {"input"}


def test_packed_file_is_small(r18: nn.Module, r18_files: dict[str, Path]) -> None:
    """Packed ONNX is within a few percent of sign bits / 8 + 4 bytes per float kept."""
    folded = r18_files["folded"].stat().st_size
    packed = r18_files["packed"].stat().st_size
    params = sum(p.numel() for p in r18.parameters())
    latent = sum(m.weight.numel() for m in converted(r18).values())
    minimum = latent / 8 + 4 * (params - latent)
    assert packed <= 1.05 * minimum + 64 * 1024
    assert packed < folded / 5


def test_unpacking_is_folded_by_onnxruntime_at_load(
    r18_files: dict[str, Path], tmp_path: Path
) -> None:
    optimized = tmp_path / "optimized.onnx"
    session(r18_files["packed"], "ORT_ENABLE_BASIC", optimized)
    nodes = [n.op_type for n in onnx.load(optimized).graph.node]
    ops = set(nodes)
    assert not ops & {"BitShift", "BitwiseAnd", "Cast", "Mod", "Sub"}, ops
    assert "Conv" in ops
    # the only Reshapes left are the model's own (its flatten), as many as in the float graph
    own = [n.op_type for n in onnx.load(r18_files["folded"]).graph.node].count("Reshape")
    assert nodes.count("Reshape") <= own


def test_folded_has_float_conv_weights_and_no_batchnorm(
    r18: nn.Module, r18_files: dict[str, Path]
) -> None:
    proto = onnx.load(r18_files["folded"])
    ops = [n.op_type for n in proto.graph.node]
    assert "BatchNormalization" not in ops  # every BN of resnet18 follows a conv
    convs = sum(isinstance(m, nn.Conv2d | MCConv2d) for m in r18.modules())
    assert ops.count("Conv") == convs
    assert not {"BitShift", "Cast"} & set(ops)


def test_folded_and_packed_give_identical_outputs(r18_files: dict[str, Path]) -> None:
    x = torch.randn(1, 3, 64, 64)
    folded = run(r18_files["folded"], x)
    assert np.array_equal(run(r18_files["packed"], x), folded)
    # without graph optimisations the subgraph runs per inference and still gives Q * s
    unoptimized = run(r18_files["packed"], x, "ORT_DISABLE_ALL")
    assert rel_error(unoptimized, folded) <= REL_TOL


# --------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opset", [11, 17, 18, 20])
def test_opsets(opset: int, tmp_path: Path) -> None:
    model = mcn_model("test_resnet")
    x = torch.randn(2, 3, 48, 48)
    path = export_onnx(model, tmp_path / "m.onnx", opset=opset, input_size=(48, 48)).path
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {opset}
    ops = {n.op_type for n in proto.graph.node}
    assert ("BitwiseAnd" in ops) == (opset >= 18)
    assert ("Mod" in ops) == (opset < 18)
    assert rel_error(run(path, x[:1]), reference(model, x[:1])) <= REL_TOL


def test_dynamic_batch(tmp_path: Path) -> None:
    model = mcn_model("test_resnet")
    x = torch.randn(3, 3, 40, 40)
    ref = reference(model, x)
    dyn = export_onnx(model, tmp_path / "d.onnx", input_size=40, dynamic_batch=True).path
    assert rel_error(run(dyn, x[:1]), ref[:1]) <= REL_TOL
    assert rel_error(run(dyn, x), ref) <= REL_TOL
    static = export_onnx(model, tmp_path / "s.onnx", input_size=40).path
    dims = onnx.load(static).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, 40, 40]
    with pytest.raises(Exception, match=r"(?i)dimension|shape"):
        run(static, x)


def test_default_input_size_comes_from_the_model(tmp_path: Path) -> None:
    model = mcn_model("test_resnet")  # timm's default config: 3 x 160 x 160
    result = export_onnx(model, tmp_path / "m.onnx", weights="folded")
    dims = onnx.load(result.path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, *model.pretrained_cfg["input_size"]]
    assert result.input_shape == (1, 3, 160, 160)


@pytest.mark.parametrize(
    "kwargs", [{"opset": 10}, {"opset": 21}, {"weights": "bits"}, {"input_size": (0, 32)}]
)
def test_bad_options_raise_config_error(kwargs: dict[str, Any], tmp_path: Path) -> None:
    model = mcn_model("test_resnet")
    with pytest.raises(ConfigError):
        export_onnx(model, tmp_path / "m.onnx", **kwargs)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# layer variants: MCNs-1, grouped, odd bit counts, shared weights, BN that cannot fold
# --------------------------------------------------------------------------------------------
class Variants(nn.Module):
    """MCConv2d with padding bits (36 signs), groups, dilation, stride, MCNs-1, no bias, a BN
    that follows a conv and one that does not (pre-activation)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.odd = MCConv2d(8, 4, 3, padding=1, planes=4)  # 1 x 8 x 3 x 3 = 72 bits
        self.tiny = MCConv2d(4, 4, 3, padding=1, planes=4, bias=False)  # 36 bits: 4 padding
        self.bn_tiny = nn.BatchNorm2d(4)
        self.grouped = MCConv2d(4, 8, 3, padding=2, dilation=2, groups=2, planes=2)
        self.pre_bn = nn.BatchNorm2d(8)
        self.mcn1 = MCConv2d(8, 8, 3, stride=2, padding=1, planes=4, mcn1=True, bias=False)
        self.bn_mcn1 = nn.BatchNorm2d(8)
        self.point = MCConv2d(8, 16, 1, planes=4)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.odd(self.stem(x)))
        x = torch.relu(self.bn_tiny(self.tiny(x)))
        x = torch.relu(self.grouped(x))
        x = self.mcn1(self.pre_bn(x))
        x = self.point(torch.relu(self.bn_mcn1(x)))
        return self.head(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("weights", ["packed", "folded"])
def test_layer_variants(weights: str, tmp_path: Path) -> None:
    model = scramble(Variants()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 12, 12)
    result = export_onnx(model, tmp_path / "v.onnx", weights=weights, input_size=(3, 12, 12))
    after = model.state_dict()  # the input model is not modified
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(model.tiny, MCConv2d) and isinstance(model.bn_tiny, nn.BatchNorm2d)
    assert rel_error(run(result.path, x[:1]), reference(model, x[:1])) <= REL_TOL
    proto = onnx.load(result.path)
    bns = [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == 1  # pre_bn follows a ReLU: it stays; the other two fold into convs
    if weights == "packed":
        assert set(result.packed_layers) == set(converted(model))


def test_identical_weights_are_packed_once(tmp_path: Path) -> None:
    """Zero BN scales make two converted convs' folded weights equal; the exporter merges them
    into one initializer, and the packed graph must still rebuild it correctly."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        MCConv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        MCConv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
    )
    scramble(model)
    with torch.no_grad():
        model[2].weight.zero_()
        model[5].weight.zero_()
    model.eval()
    x = torch.randn(1, 3, 8, 8)
    result = export_onnx(model, tmp_path / "m.onnx", input_size=8)
    assert result.packed_layers == ("1", "4")
    assert rel_error(run(result.path, x), reference(model, x)) <= REL_TOL


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so nothing folds in PyTorch."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = MCConv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if x.sum() > -1e30:  # always true, but not traceable symbolically
            x = self.bn(self.conv(x))
        return x


@pytest.mark.parametrize("weights", ["packed", "folded"])
def test_untraceable_model_exports(weights: str, tmp_path: Path) -> None:
    model = scramble(Untraceable()).eval()
    x = torch.randn(1, 3, 8, 8)
    result = export_onnx(model, tmp_path / "m.onnx", weights=weights, input_size=8)
    assert result.folded_batchnorms == ()
    assert rel_error(run(result.path, x), reference(model, x)) <= REL_TOL
    ops = [n.op_type for n in onnx.load(result.path).graph.node]
    # packed keeps the BatchNorm node (onnxruntime fuses it at load); folded lets the exporter
    # fold it into the float weight
    assert ops.count("BatchNormalization") == (1 if weights == "packed" else 0)


# --------------------------------------------------------------------------------------------
# errors name the layer
# --------------------------------------------------------------------------------------------
class Spectral(nn.Module):
    """Uses an operator the ONNX exporter has no conversion for."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svd(x)[1]


class ReadsWeight(nn.Module):
    """Reads its conv's weight outside the conv: the weight must stay a float tensor.

    64 x 64 x 3 x 3 weights: above the exporter's constant-folding size limit, so the read
    stays in the graph (a tiny weight's ``abs().mean()`` is folded into a constant).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = MCConv2d(64, 64, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.conv.weight.abs().mean()


def test_unsupported_operator_names_the_layer(tmp_path: Path, capfd: pytest.CaptureFixture):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.ReLU(), Spectral())).eval()
    with pytest.raises(ExportError) as info:
        export_onnx(model, tmp_path / "m.onnx", input_size=8)
    message = str(info.value)
    assert "1.1" in message and "Spectral" in message and "linalg_svd" in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []
    assert "graph" not in capfd.readouterr().out  # torch's IR dump does not reach stdout


def test_weight_read_outside_conv_names_the_layer(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 64, 1), ReadsWeight()).eval()
    with pytest.raises(ExportError, match=r"layer 1\.conv"):
        export_onnx(model, tmp_path / "m.onnx", input_size=8)
    assert list(tmp_path.iterdir()) == []
    x = torch.randn(1, 3, 8, 8)
    folded = export_onnx(model, tmp_path / "f.onnx", weights="folded", input_size=8).path
    assert rel_error(run(folded, x), reference(model, x)) <= REL_TOL


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save(mcn_model("test_resnet"), tmp_path_factory.mktemp("ckpt") / "model.pt")


@pytest.mark.parametrize("weights", ["packed", "folded"])
def test_cli_export_onnx(weights: str, checkpoint: Path, tmp_path: Path) -> None:
    import mcn_compress

    out = tmp_path / "model.onnx"
    args = ["export", str(checkpoint), "--format", "onnx", "--weights", weights]
    args += ["--input-size", "3,56,56", "--dynamic-batch", "--opset", "17", "-o", str(out)]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["bytes"] == out.stat().st_size
    assert info["weights"] == weights and info["opset"] == 17
    x = torch.randn(3, 3, 56, 56)
    ref = reference(mcn_compress.load(checkpoint), x)
    assert rel_error(run(out, x), ref) <= REL_TOL
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "onnx", "--opset", "9"], "opset 9"),
        (["--format", "onnx", "--input-size", "3,x"], "--input-size"),
        (["--format", "onnx", "--input-size", "2,32,32"], "in layer conv1.0 (Conv2d)"),
        (["--format", "onnx", "--float16"], "--float16"),
        (["--format", "packed", "--dynamic-batch"], "--dynamic-batch"),
        (["--weights", "folded"], "--weights"),
    ],
)
def test_cli_export_onnx_errors(
    args: list[str], message: str, checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(app, ["export", str(checkpoint), *args, "-o", str(out)])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert message in lines[0]
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []
