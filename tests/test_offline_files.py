"""Opening a file never reaches the network (issue 21, family 3; docs/design.md 4.5): a
checkpoint, packed file or run whose model description names a Hugging Face Hub model is
refused with a line saying how to go on, before timm is called and without any socket."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from hostile import one_line, run

from mcn_compress import export_packed, load, load_float_model, save
from mcn_compress.errors import CheckpointError
from mcn_compress.info import ModelSource, info_of, update_info
from mcn_compress.training.run_dir import LAST, run_checkpoint

HUB = "hf-hub:someone/some-repo"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every DNS lookup, socket connection and timm model build is recorded and refused."""
    attempts: list[str] = []

    def refuse(what: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            attempts.append(what)
            raise AssertionError(f"{what} was called while a file was opened")

        return call

    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "gethostbyname", refuse("gethostbyname"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    monkeypatch.setattr(timm, "create_model", refuse("timm.create_model"))
    yield attempts
    assert attempts == []


@pytest.fixture
def hub_files(files: dict[str, Any], tmp_path: Path) -> dict[str, Path]:
    """A checkpoint, a packed file and a float run whose model source is a hub name."""
    model = load(files["ckpt"])
    kwargs = info_of(model).source.kwargs  # type: ignore[union-attr]
    update_info(model, source=ModelSource("timm", HUB, kwargs))
    made = {"ckpt": save(model, tmp_path / "hub.pt"), "packed": tmp_path / "hub.mcn"}
    export_packed(model, made["packed"])
    underscore = load(files["ckpt"])
    update_info(underscore, source=ModelSource("timm", "hf_hub:someone/other", kwargs))
    made["underscore"] = save(underscore, tmp_path / "hub2.pt")
    float_model = load_float_model("test_resnet", pretrained=False)
    update_info(float_model, source=ModelSource("timm", HUB, {}))
    made["run"] = tmp_path / "run"
    made["run"].mkdir()
    torch.save(run_checkpoint(float_model, {"epoch": 1}), made["run"] / LAST)
    return made


def test_library_load_refuses_hub_sources_offline(
    hub_files: dict[str, Path], no_network: list[str]
) -> None:
    for key in ("ckpt", "packed", "underscore"):
        with pytest.raises(CheckpointError) as info:
            load(hub_files[key])
        message = str(info.value)
        assert "Hugging Face Hub" in message and "--weights" in message, message
        assert "\n" not in message


def test_cli_commands_refuse_hub_sources_offline(
    hub_files: dict[str, Path], no_network: list[str], tmp_path: Path
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {{checkpoint: {hub_files['ckpt']}}}\n"
        "data: {dataset: synthetic, train_samples: 8, val_samples: 8, workers: 0}\n"
        f"output: {{dir: {tmp_path / 'out'}}}\n"
    )
    before = sorted(p.name for p in tmp_path.iterdir())
    for args in (
        ("report", str(hub_files["ckpt"])),
        ("report", str(hub_files["packed"])),
        ("report", str(hub_files["run"])),
        ("export", str(hub_files["ckpt"]), "-o", str(tmp_path / "o.mcn")),
        ("export", str(hub_files["packed"]), "-f", "onnx", "-o", str(tmp_path / "o.onnx")),
        ("finetune", str(hub_files["packed"]), "-r", str(recipe)),
        ("finetune", "-r", str(recipe)),
    ):
        one_line(run(*args), "Hugging Face Hub", "mcn-compress convert")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
