"""Module versions survive files (`formats.state_dict`): checkpoints and packed files of
modules whose ``_load_from_state_dict`` reads ``version`` load again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from mcn_compress import MCNConfig, convert, export_packed, load, load_float_model, save
from mcn_compress.formats.state_dict import loadable_state_dict, plain_state_dict


class Versioned(nn.Module):
    """Refuses weights written without its version (like torchvision's MNASNet does)."""

    _version = 3

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def _load_from_state_dict(
        self, state_dict: Any, prefix: str, local_metadata: Any, *args: Any
    ) -> None:
        if local_metadata.get("version") != 3:
            raise ValueError(f"version should be 3, got {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def test_module_versions_survive_a_weights_only_round_trip(tmp_path: Path) -> None:
    model = nn.Sequential(Versioned(), nn.ReLU())
    tensors, versions = plain_state_dict(model)
    assert versions["0"] == {"version": 3}
    torch.save({"state": tensors, "versions": versions}, tmp_path / "f.pt")
    data = torch.load(tmp_path / "f.pt", weights_only=True)
    fresh = nn.Sequential(Versioned(), nn.ReLU())
    fresh.load_state_dict(loadable_state_dict(data["state"], data["versions"]))
    assert torch.equal(fresh[0].conv.weight, model[0].conv.weight)
    with pytest.raises(ValueError, match="version should be 3"):
        fresh.load_state_dict(loadable_state_dict(data["state"], None))


def test_torchvision_mnasnet_checkpoint_and_packed_file_load(tmp_path: Path) -> None:
    float_model = load_float_model("tv:mnasnet0_5", pretrained=False, num_classes=10).eval()
    mcn = convert(float_model, MCNConfig(planes=4)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = mcn(x)
        assert torch.equal(load(save(mcn, tmp_path / "m.pt"))(x), expected)
        assert torch.equal(load(export_packed(mcn, tmp_path / "m.mcn"))(x), expected)
