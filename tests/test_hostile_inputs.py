"""Bad weights, special input files, unclear situations (issue 21, families 4-6): one clear
line, exit 1, nothing written; ``-q`` prints nothing on success."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import typer
from hostile import one_line, run
from PIL import Image

import mcn_compress.smallnets  # noqa: F401  (registers mcn_resnet_tiny with timm)
from mcn_compress.cli._common import cli_errors
from mcn_compress.errors import DataError
from mcn_compress.training.run_dir import RUN_RECIPE


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The float state dict of test_resnet, built by timm directly."""
    return timm.create_model("test_resnet", pretrained=False).state_dict()


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda t: t.view(-1).__setitem__(0, float("nan")), "holds 1 NaN or infinite value"),
        (lambda t: t.fill_(float("inf")), "NaN or infinite values"),
        (lambda t: t.fill_(float("nan")), "NaN or infinite values"),
        (None, "is complex (complex64)"),
    ],
)
def test_broken_weights_are_refused_naming_the_tensor(
    edit: Any, words: str, state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    key = "layer2.0.conv1.weight"
    broken = {k: v.clone() for k, v in state.items()}
    if edit is None:
        broken[key] = broken[key].to(torch.complex64)
    else:
        edit(broken[key])
    torch.save(broken, tmp_path / "w.pt")
    out = str(tmp_path / "m.pt")
    result = run("convert", "test_resnet", "--weights", str(tmp_path / "w.pt"), "-o", out)
    one_line(result, f"tensor {key}", words)
    assert "Warning" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]


def test_inputs_that_are_not_regular_files_are_named_and_never_read(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    results: list[Any] = []

    def work() -> None:  # a reader that opened the FIFO would block here for ever
        out = str(tmp_path / "m.pt")
        results.append(run("convert", "test_resnet", "--weights", "/dev/zero", "-o", out))
        results.append(run("export", str(fifo), "-o", str(tmp_path / "m.mcn")))
        results.append(run("report", str(fifo)))
        results.append(run("finetune", str(fifo), "-r", str(tmp_path / "r.yaml")))

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "a command blocked on a FIFO"
    one_line(results[0], "/dev/zero is a character device, not a regular file")
    for result in results[1:]:
        one_line(result, "pipe.pt is a FIFO (named pipe), not a regular file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe.pt"]


def _synthetic_recipe(tmp_path: Path, run_dir: Path, warmup: int = 0) -> Path:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {name: mcn_resnet_tiny, pretrained: false, num_classes: 4, in_chans: 1}\n"
        "data: {dataset: synthetic, image_size: 16, batch_size: 16, workers: 0, "
        "train_samples: 32, val_samples: 16}\n"
        f"optim: {{epochs: 1, warmup_epochs: {warmup}}}\n"  # 5: a warning without -q
        f"output: {{dir: {run_dir}}}\n"
    )
    return recipe


def test_finetune_quiet_prints_nothing_on_success(tmp_path: Path) -> None:
    recipe = _synthetic_recipe(tmp_path, tmp_path / "run", warmup=5)
    result = run("finetune", "-r", str(recipe), "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and result.stderr == ""
    assert (tmp_path / "run" / "last.pt").is_file()


def test_a_run_that_stopped_before_its_first_checkpoint_says_what_to_do(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / RUN_RECIPE).write_text("# written before the first epoch crashed\n")
    recipe = _synthetic_recipe(tmp_path, run_dir)
    line = one_line(run("finetune", "-r", str(recipe)), "stopped before its first checkpoint")
    assert "--overwrite" in line and "resume it" not in line
    line = one_line(run("finetune", "-r", str(recipe), "--resume"), "stopped before its first")
    assert "--overwrite" in line
    assert sorted(p.name for p in run_dir.iterdir()) == [RUN_RECIPE]


def test_two_input_channels_with_rgb_calibration_images(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (40 * i, 80, 120)).save(folder / f"{i}.png")
    one_line(
        run(
            "convert", "test_resnet", "--no-pretrained", "--in-chans", "2",
            "--calibrate-data", str(folder), "-o", str(tmp_path / "m.pt"),
        ),
        "takes 2 input channels",
        "1 (gray) or 3 (RGB)",
    )  # fmt: skip
    assert not (tmp_path / "m.pt").exists()


def test_an_error_from_a_loader_worker_is_its_own_line(capsys: pytest.CaptureFixture[str]) -> None:
    from torch._utils import ExceptionWrapper

    try:
        raise DataError("cannot read image a.png: image file is truncated")
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(typer.Exit), cli_errors():
        wrapped.reraise()  # as the loader does in the main process: the traceback in the text
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["error: cannot read image a.png: image file is truncated"]
