"""Which torch exporter makes the ONNX graph: torch.export-based first, TorchScript as the
documented fallback (docs/design.md section 4, "Exporter")."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from onnx_helpers import ort_run, rel_norm
from torch import nn
from typer.testing import CliRunner

from mcn_compress import MCNConfig, convert, export_onnx, load_float_model, save
from mcn_compress.cli import app
from mcn_compress.errors import ConfigError, ExportError
from mcn_compress.nn.mcconv import MCConv2d


class Recorder:
    """Wraps ``torch.onnx.export`` and keeps the warnings torch raised inside each call."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.calls: list[tuple[bool, list[warnings.WarningMessage]]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                return self.real(*args, **kwargs)
            finally:
                self.calls.append((bool(kwargs.get("dynamo")), list(caught)))

    def deprecations(self) -> list[str]:
        return [
            str(w.message)
            for _, caught in self.calls
            for w in caught
            if issubclass(w.category, DeprecationWarning | FutureWarning)
        ]


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder(torch.onnx.export)
    monkeypatch.setattr(torch.onnx, "export", rec)
    return rec


@pytest.fixture(scope="module")
def r18_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = convert(load_float_model("resnet18", pretrained=False), MCNConfig(planes=4))
    return save(model, tmp_path_factory.mktemp("r18") / "r18.pt")


def test_cli_export_resnet18_raises_no_deprecation_warning(
    r18_checkpoint: Path, recorder: Recorder, tmp_path: Path
) -> None:
    out = tmp_path / "r18.onnx"
    args = ["export", str(r18_checkpoint), "--format", "onnx", "--input-size", "64", "-o", str(out)]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    assert [dynamo for dynamo, _ in recorder.calls] == [True]  # one call, the new exporter
    assert recorder.deprecations() == []
    assert '"exporter": "dynamo"' in result.stdout
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert meta["mcn_compress.exporter"] == "dynamo"


def test_the_recorder_sees_the_legacy_exporters_deprecation(
    r18_checkpoint: Path, recorder: Recorder, tmp_path: Path
) -> None:
    """The check above can fail: the TorchScript exporter does warn, and the recorder sees it."""
    import mcn_compress

    model = mcn_compress.load(r18_checkpoint)
    result = export_onnx(model, tmp_path / "m.onnx", input_size=64, exporter="torchscript")
    assert result.exporter == "torchscript"
    assert [dynamo for dynamo, _ in recorder.calls] == [False]
    assert any("TorchScript" in text for text in recorder.deprecations())


class DataDependent(nn.Module):
    """A branch on a tensor's value: torch.export refuses it, TorchScript tracing takes one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > -1e9:  # always true: the traced branch is the right one
            y = y.relu()
        return y


def test_fallback_to_torchscript_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Conv2d(3, 16, 3), DataDependent(), nn.Conv2d(16, 4, 1))
    model = convert(float_model, MCNConfig(planes=2)).eval()
    assert any(isinstance(m, MCConv2d) for m in model.modules())
    x = torch.randn(1, 3, 16, 16)
    with caplog.at_level(logging.INFO, logger="mcn_compress"):
        result = export_onnx(model, tmp_path / "m.onnx", input_size=16)
    assert result.exporter == "torchscript"
    lines = [r.getMessage() for r in caplog.records if "TorchScript exporter" in r.getMessage()]
    assert len(lines) == 1 and "torch.export-based" in lines[0]
    with torch.no_grad():
        assert rel_norm(ort_run(result.path, x), model(x)) <= 1e-4
    with pytest.raises(ExportError, match=r"torch\.export-based ONNX exporter cannot export"):
        export_onnx(model, tmp_path / "d.onnx", input_size=16, exporter="dynamo")
    assert not (tmp_path / "d.onnx").exists()


def test_opset_below_the_new_exporters_reach_falls_back(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = convert(load_float_model("test_resnet", pretrained=False), MCNConfig(planes=4))
    result = export_onnx(model.eval(), tmp_path / "m.onnx", input_size=32, opset=11)
    proto = onnx.load(result.path)
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {11}
    assert result.exporter == "torchscript"


def test_dynamo_graph_has_no_debug_metadata(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = convert(load_float_model("test_resnet", pretrained=False), MCNConfig(planes=4))
    result = export_onnx(model.eval(), tmp_path / "m.onnx", input_size=32)
    assert result.exporter == "dynamo"
    proto = onnx.load(result.path)
    assert all(len(node.metadata_props) == 0 for node in proto.graph.node)
    keys = {p.key for p in proto.metadata_props}
    assert keys and all(key.startswith("mcn_compress.") for key in keys)


def test_unknown_exporter_is_a_config_error(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    with pytest.raises(ConfigError, match="exporter must be one of auto, dynamo, torchscript"):
        export_onnx(model, tmp_path / "m.onnx", input_size=8, exporter="jit")
