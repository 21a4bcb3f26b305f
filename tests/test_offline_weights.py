"""Published weights offline (docs/design.md section 5, `mcn_compress.hub`): one probe and
no retry loop, weights in the local caches still load, errors name only the options of the
command, and the data is looked for before any weights are fetched."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
import yaml
from safetensors.torch import save_file
from synthetic_run import synthetic_recipe
from typer.testing import CliRunner

import mcn_compress.models
from mcn_compress import hub
from mcn_compress.cli import app
from mcn_compress.errors import ModelLoadError, WeightsUnavailable
from mcn_compress.info import ModelSource
from mcn_compress.models import load_float_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No host answers the probe; the Hub and torch.hub caches are empty folders in tmp_path;
    a name lookup or a connection fails the test."""

    def no_network(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the network was reached")

    monkeypatch.setattr(hub, "can_reach", lambda *args, **kwargs: False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the probe decides
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch"))
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return tmp_path


def _one_error(result: Any) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("name", "host"),
    [("resnet10t", "huggingface.co"), ("tv:squeezenet1_1", "download.pytorch.org")],
)
def test_offline_fails_at_once_naming_the_host_and_no_option(
    name: str, host: str, offline: Path, caplog: pytest.LogCaptureFixture
) -> None:
    start = time.perf_counter()
    with caplog.at_level(logging.INFO), pytest.raises(WeightsUnavailable) as caught:
        load_float_model(name, pretrained=True)
    assert time.perf_counter() - start < 15  # the hub's retry loop alone took ~25 s per file
    message = str(caught.value)
    assert f"{host} cannot be reached" in message and "not in the local cache" in message
    assert "--" not in message  # the library names no option; each command adds its own
    assert not any("Retrying" in r.getMessage() for r in caplog.records)
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # the switch was put back
    with pytest.raises(ModelLoadError, match="Hugging Face Hub, which cannot be reached"):
        load_float_model("hf-hub:timm/resnet18.a1_in1k", pretrained=False)  # its config


def test_weights_in_the_local_caches_load_offline(offline: Path) -> None:
    # the Hub's cache layout: refs/main names the snapshot that holds the file
    timm_state = load_float_model("test_resnet", pretrained=False).state_dict()
    timm_state = {
        k: torch.randn_like(v) if v.is_floating_point() else v for k, v in timm_state.items()
    }
    repo = offline / "hf" / "models--timm--test_resnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    save_file(timm_state, str(repo / "snapshots" / COMMIT / "model.safetensors"))
    loaded = load_float_model("test_resnet", pretrained=True).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in timm_state.items())

    # torch.hub's cache: checkpoints/<the URL's file name>
    tv_state = load_float_model("tv:squeezenet1_1", pretrained=False).state_dict()
    tv_state = {k: torch.randn_like(v) for k, v in tv_state.items()}
    source = ModelSource("torchvision", "squeezenet1_1")
    url = hub.weights_url(source)
    assert url is not None and hub.published_host(source, True) == "download.pytorch.org"
    (offline / "torch" / "checkpoints").mkdir(parents=True)
    torch.save(tv_state, offline / "torch" / "checkpoints" / Path(url).name)
    loaded = load_float_model("tv:squeezenet1_1", pretrained=True).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in tv_state.items())


def test_each_command_names_its_own_options(offline: Path) -> None:
    out = offline / "m.pt"
    line = _one_error(CliRunner().invoke(app, ["convert", "resnet10t", "-o", str(out), "-q"]))
    assert "--weights FILE" in line and "--no-pretrained" in line
    assert not out.exists()

    recipe = synthetic_recipe(offline / "run")
    recipe["model"].update(name="resnet10t", pretrained=True, in_chans=3)
    path = offline / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    line = _one_error(CliRunner().invoke(app, ["finetune", "--recipe", str(path), "-q"]))
    assert "--set model.weights=FILE" in line and "--set model.pretrained=false" in line
    assert "--no-pretrained" not in line and "--weights" not in line
    assert not (offline / "run").exists()  # a run that could not start leaves no folder


@pytest.mark.parametrize("dataset", ["imagefolder", "cifar10", "fashion_mnist"])
def test_data_is_looked_for_before_any_model_is_built(
    dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a model was built before the data was looked for")

    monkeypatch.setattr(mcn_compress.models, "load_float_model", never)
    recipe = synthetic_recipe(tmp_path / "run")
    recipe["model"].update(name="resnet18", pretrained=True)
    recipe["data"] = {"dataset": dataset, "root": str(tmp_path / "no-data")}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    line = _one_error(CliRunner().invoke(app, ["finetune", "--recipe", str(path)]))
    assert "no-data" in line and "not found" in line


def test_the_probe_opens_one_connection_within_its_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert hub.can_reach("127.0.0.1", port, timeout=2.0)
    start = time.perf_counter()
    assert not hub.can_reach("127.0.0.1", port, timeout=2.0)  # closed now: refused
    assert time.perf_counter() - start < 2.5
