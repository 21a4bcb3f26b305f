"""The CLI never loses a user's file and answers bad input with one line: outputs that are
inputs, unwritable outputs found before the work, hostile or odd paths, bad options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import mcn_compress.models
from mcn_compress.cli import app
from mcn_compress.formats import atomic
from mcn_compress.training.lock import RunLock
from mcn_compress.training.run_dir import RUN_RECIPE, read_run


def _run(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def _one_line(result: Any, *fragments: str) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("w") / "w.pt"
    model = mcn_compress.models.load_float_model("test_resnet", pretrained=False)
    torch.save(model.state_dict(), path)
    return path


def test_convert_refuses_to_write_over_its_weights(weights: Path) -> None:
    content = weights.read_bytes()
    _one_line(
        _run("convert", "test_resnet", "--weights", str(weights), "-o", str(weights)),
        "also the input --weights",
    )
    assert weights.read_bytes() == content


def test_export_refuses_to_write_over_its_checkpoint(weights: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "m.pt"
    assert (
        _run("convert", "test_resnet", "--weights", str(weights), "-o", str(ckpt), "-q").exit_code
        == 0
    )
    content = ckpt.read_bytes()
    for fmt in ("packed", "onnx"):
        _one_line(_run("export", str(ckpt), "-f", fmt, "-o", str(ckpt)), "also the input MODEL")
    assert ckpt.read_bytes() == content


def test_an_unwritable_output_is_found_before_the_model_is_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(atomic.tempfile, "mkstemp", refuse)
    monkeypatch.setattr(mcn_compress.models, "load_float_model", never)
    _one_line(
        _run("convert", "resnet50", "--no-pretrained", "-o", str(tmp_path / "m.pt")),
        "cannot write",
        "Permission denied",
    )


@pytest.mark.parametrize(("option", "value"), [("--num-classes", "-5"), ("--in-chans", "0")])
def test_non_positive_sizes_are_refused(option: str, value: str, tmp_path: Path) -> None:
    _one_line(
        _run(
            "convert", "test_resnet", "--no-pretrained", option, value, "-o", str(tmp_path / "m.pt")
        ),
        option,
        "positive integer",
    )
    assert not (tmp_path / "m.pt").exists()


def test_weights_that_are_a_folder_or_random_bytes_are_named_as_such(tmp_path: Path) -> None:
    line = _one_line(
        _run("convert", "test_resnet", "--weights", str(tmp_path), "-o", str(tmp_path / "m.pt"))
    )
    assert "is a directory" in line and "does not exist" not in line
    noise = tmp_path / "noise.pt"
    noise.write_bytes(bytes(range(256)) * 16)
    line = _one_line(
        _run("convert", "test_resnet", "--weights", str(noise), "-o", str(tmp_path / "m.pt"))
    )
    assert "pickled" not in line and "not a .pt/.pth/.safetensors state dict" in line


def test_paths_with_rich_markup_print_as_written(weights: Path, tmp_path: Path) -> None:
    (tmp_path / "a[").mkdir()
    odd = tmp_path / "a[" / "]b[bold].pt"  # as typed: out/a[/]b[bold].pt
    result = _run("convert", "test_resnet", "--weights", str(weights), "-o", str(odd))
    assert result.exit_code == 0, result.output
    assert odd.is_file() and "a[/]b[bold].pt" in "".join(result.stdout.split())
    report = _run("report", str(odd))
    assert report.exit_code == 0, report.output
    assert "]b[bold].pt" in "".join(report.stdout.split())
    missing = _run("report", str(tmp_path / "a[" / "]gone[red].pt"))
    _one_line(missing, "]gone[red].pt")


def test_an_unreadable_calibration_image_is_one_line(weights: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    _one_line(
        _run(
            "convert",
            "test_resnet",
            "--weights",
            str(weights),
            "--calibrate-data",
            str(images),
            "-o",
            str(tmp_path / "m.pt"),
        ),
        "cannot read image",
        "broken.png",
    )
    assert not (tmp_path / "m.pt").exists()


def test_a_run_in_progress_is_called_so(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / RUN_RECIPE).write_text("model: {}\n")
    with RunLock(run), pytest.raises(Exception, match="in progress"):
        read_run(run)
    with pytest.raises(Exception, match="stopped before its first checkpoint"):
        read_run(run)
