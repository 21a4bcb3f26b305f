"""Loading float models: names, suggestions, offline errors, local weights files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mcn_compress import ModelLoadError, info_of, load_float_model
from mcn_compress.models import suggest_names


def test_timm_and_torchvision_names() -> None:
    timm_model = load_float_model("resnet10t", pretrained=False, num_classes=3, in_chans=1)
    assert info_of(timm_model).source.library == "timm"
    assert timm_model.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 3)
    tv_model = load_float_model("tv:resnet18", pretrained=False, num_classes=4)
    assert info_of(tv_model).source.library == "torchvision"
    assert info_of(tv_model).source.display_name == "tv:resnet18"
    assert tv_model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 4)


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(ModelLoadError, match=r"unknown model 'resnet181'.*resnet18"):
        load_float_model("resnet181", pretrained=False)
    assert "tv:mobilenet_v2" in suggest_names("tv:mobilenet_v22")
    with pytest.raises(ModelLoadError, match="unknown model"):
        load_float_model("tv:no_such_net", pretrained=False)
    with pytest.raises(ModelLoadError, match="in-chans"):
        load_float_model("tv:resnet18", pretrained=False, in_chans=1)


def _trained_state(num_classes: int = 6) -> dict[str, torch.Tensor]:
    model = load_float_model("resnet10t", pretrained=False, num_classes=num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model.state_dict()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".pth"])
def test_local_weights_round_trip(suffix: str, tmp_path: Path) -> None:
    state = _trained_state()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    elif suffix == ".pth":  # a training checkpoint wrapping the state dict, DDP prefixes
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    else:
        torch.save(state, path)
    model = load_float_model("resnet10t", weights=path, num_classes=6)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert info_of(model).source.weights == str(path)


def test_weights_that_do_not_fit(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save(_trained_state(num_classes=6), path)
    with pytest.raises(ModelLoadError, match=r"does not fit resnet10t: 2 shape mismatches"):
        load_float_model("resnet10t", weights=path, num_classes=10)
    with pytest.raises(ModelLoadError, match="missing keys"):
        load_float_model("resnet18", weights=path, num_classes=6)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_float_model("resnet10t", weights=tmp_path / "nope.pt")


class _Payload:
    marker = ""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {_Payload.marker}",))


def test_weights_with_pickled_code_are_refused(tmp_path: Path) -> None:
    _Payload.marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.pt"
    torch.save({"x": _Payload()}, path)
    with pytest.raises(ModelLoadError, match="pickled code is refused"):
        load_float_model("resnet10t", weights=path)
    assert not (tmp_path / "pwned").exists()
