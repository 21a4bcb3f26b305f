"""The stored model description is data, not instructions (`info.ModelSource`): only known
constructor keys with plain values, no file names, at save and at load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from packed_bytes import blob_digest, join, split

from mcn_compress import CheckpointError, MCNConfig, ModelLoadError, convert, load, save
from mcn_compress.info import ModelSource, update_info
from mcn_compress.models import load_float_model

HOSTILE = [
    {"checkpoint_path": "/etc/passwd"},
    {"pretrained_cfg_overlay": {"file": "/tmp/w.pt"}},
    {"num_classes": -5},
    {"in_chans": 0},
    {"num_classes": "10"},
]


@pytest.mark.parametrize("kwargs", HOSTILE)
def test_hostile_constructor_keys_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ModelLoadError):
        ModelSource("timm", "resnet18", kwargs)


@pytest.mark.parametrize("name", ["local-dir:/tmp/model", "file:/tmp/x", ""])
def test_names_that_point_at_files_are_refused(name: str) -> None:
    with pytest.raises(ModelLoadError):
        ModelSource("timm", name)


def test_allowed_keys_pass() -> None:
    source = ModelSource("timm", "vgg11", {"num_classes": 10, "mlp_ratio": 0.0625})
    assert ModelSource.from_dict(source.to_dict()) == source
    assert ModelSource("timm", "hf-hub:timm/resnet18.a1_in1k").name.startswith("hf-hub:")


def test_a_checkpoint_naming_a_file_never_reaches_timm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = convert(load_float_model("test_resnet", pretrained=False).eval(), MCNConfig())
    data = torch.load(save(model, tmp_path / "m.pt"), weights_only=True)
    data["version"] = 1  # a version 1 file carries no checksum: only the allow-list stands
    data["model"]["kwargs"]["checkpoint_path"] = str(tmp_path / "elsewhere.pt")
    torch.save(data, tmp_path / "hostile.pt")
    calls: list[dict[str, Any]] = []
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: calls.append(k) or real(*a, **k))
    with pytest.raises(CheckpointError, match=r"checkpoint_path.*not allowed"):
        load(tmp_path / "hostile.pt")
    assert not any("checkpoint_path" in k for k in calls)
    with pytest.raises(ModelLoadError, match="not allowed"):
        update_info(model, source=ModelSource("timm", "test_resnet", {"checkpoint_path": "x"}))


def test_save_refuses_a_description_built_around_the_checks(tmp_path: Path) -> None:
    model = convert(load_float_model("test_resnet", pretrained=False).eval(), MCNConfig())
    source = ModelSource("timm", "test_resnet")
    object.__setattr__(source, "kwargs", {"checkpoint_path": "x"})  # bypasses __post_init__
    update_info(model, source=source)
    with pytest.raises((CheckpointError, ModelLoadError)):
        save(model, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


def test_packed_description_is_checked_too(tmp_path: Path) -> None:
    from mcn_compress import export_packed

    model = convert(load_float_model("test_resnet", pretrained=False).eval(), MCNConfig())
    header, data = split(export_packed(model, tmp_path / "m.mcn").read_bytes())
    description = json.loads(header["__metadata__"]["description"])
    description["model"]["kwargs"]["checkpoint_path"] = "/etc/passwd"
    header["__metadata__"]["description"] = json.dumps(description)
    header["__metadata__"]["version"] = "1"  # blob-only digest: the header edit passes it
    header["__metadata__"]["sha256"] = blob_digest(header, data)
    (tmp_path / "bad.mcn").write_bytes(join(header, data))
    with pytest.raises(CheckpointError, match="not allowed"):
        load(tmp_path / "bad.mcn")
