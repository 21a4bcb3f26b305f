"""`mcn-compress convert` through Typer's runner: success paths and every documented error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mcn_compress import load, load_float_model
from mcn_compress.cli import app
from mcn_compress.nn.mcconv import MCConv2d

runner = CliRunner()


def _run(*args: str) -> object:
    return runner.invoke(app, list(args))


def _assert_one_line_error(result: object, *fragments: str) -> None:
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _reconstruction_error(w0: torch.Tensor, signs: torch.Tensor, m: torch.Tensor) -> float:
    """||W0 - Q||^2 with Q[h*K + j, c] = B[h, c] * M[j] (docs/design.md section 2)."""
    q = (signs.unsqueeze(1) * m.unsqueeze(0).unsqueeze(2)).reshape(w0.shape)
    return float((w0 - q).pow(2).sum())


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 'pretrained' float resnet10t: random init plus structure, saved as a state dict."""
    torch.manual_seed(1)
    model = load_float_model("resnet10t", pretrained=False, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 4:
                p.mul_(1.0 + 0.5 * torch.randn(p.shape[0], 1, 1, 1).abs())
    path = tmp_path_factory.mktemp("w") / "resnet10t.pth"
    torch.save(model.state_dict(), path)
    return path


def test_convert_json_and_checkpoint(weights_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    result = _run(
        "convert",
        "resnet10t",
        "--weights",
        str(weights_file),
        "--num-classes",
        "10",
        "--planes",
        "2",
        "--out",
        str(out),
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    model = load(out)
    converted = [n for n, m in model.named_modules() if isinstance(m, MCConv2d)]
    assert data["converted_layers"] == len(converted) == 13
    assert data["planes"] == 2
    assert data["binary_params"] == sum(model.get_submodule(n).weight.numel() for n in converted)
    assert {x["name"] for x in data["layers"] if x["converted"]} == set(converted)


def test_weights_give_least_squares_optimal_m(weights_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    result = _run(
        "convert",
        "resnet10t",
        "--weights",
        str(weights_file),
        "--num-classes",
        "10",
        "--out",
        str(out),
        "--quiet",
    )
    assert result.exit_code == 0 and result.stdout == ""
    w0 = torch.load(weights_file, weights_only=True)
    model = load(out)
    gen = torch.Generator().manual_seed(0)
    for name, mod in model.named_modules():
        if not isinstance(mod, MCConv2d):
            continue
        original = w0[f"{name}.weight"].double()
        signs = torch.where(mod.weight.detach() >= 0, 1.0, -1.0).double()
        k = mod.planes

        m0 = mod.mfilter.detach().double()
        base = _reconstruction_error(original, signs, m0)
        for _ in range(6):
            direction = torch.randn(m0.shape, generator=gen, dtype=torch.float64)
            for eps in (1e-3, -1e-3):
                perturbed = m0 + eps * direction * m0.abs().mean()
                assert _reconstruction_error(original, signs, perturbed) >= base * (1 - 1e-9)
        assert m0.shape == (k, *mod.kernel_size)


def test_table_output(tmp_path: Path) -> None:
    result = _run(
        "convert", "resnet10t", "--no-pretrained", "-k", "4", "-o", str(tmp_path / "m.pt")
    )
    assert result.exit_code == 0, result.stderr
    assert "conv-weight compression" in result.stdout
    assert "stem (first conv" in result.stdout
    assert "layer4.0.conv2" in result.stdout


def test_calibration_from_image_folder(weights_file: Path, tmp_path: Path) -> None:
    from PIL import Image

    images = tmp_path / "imgs" / "sub"
    images.mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (40, 30), color=(40 * i, 255 - 30 * i, 7 * i)).save(images / f"{i}.png")
    plain, calibrated = tmp_path / "a.pt", tmp_path / "b.pt"
    base = ("convert", "resnet10t", "--weights", str(weights_file), "--num-classes", "10", "-q")
    assert _run(*base, "--out", str(plain)).exit_code == 0
    result = _run(
        *base,
        "--out",
        str(calibrated),
        "--calibrate-data",
        str(tmp_path / "imgs"),
        "--calibrate-steps",
        "0",
        "--batch-size",
        "3",
    )
    assert result.exit_code == 0, result.stderr
    a, b = load(plain).state_dict(), load(calibrated).state_dict()
    assert not torch.equal(a["bn1.running_mean"], b["bn1.running_mean"])
    assert torch.equal(a["layer1.0.conv1.weight"], b["layer1.0.conv1.weight"])


def test_unknown_model(tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    result = _run("convert", "resnet181", "--no-pretrained", "--out", str(out))
    _assert_one_line_error(result, "unknown model", "resnet18")
    assert not out.exists()


@pytest.mark.parametrize("k", ["0", "-3"])
def test_bad_planes(k: str, tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    _assert_one_line_error(
        _run("convert", "resnet10t", "--no-pretrained", "--planes", k, "--out", str(out)), "planes"
    )
    assert not out.exists()


def test_expand_width_converts_and_reloads(tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    result = _run(
        "convert",
        "resnet10t",
        "--no-pretrained",
        "--width",
        "expand",
        "-k",
        "2",
        "-o",
        str(out),
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["width"] == "expand"
    model = load(out)
    layer = model.get_submodule("layer1.0.conv1")
    assert isinstance(layer, MCConv2d) and layer.in_channels == 2 * 64
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_unknown_width(tmp_path: Path) -> None:
    result = _run(
        "convert", "resnet10t", "--no-pretrained", "--width", "wide", "-o", str(tmp_path / "m.pt")
    )
    _assert_one_line_error(result, "width must be one of keep, expand")


def test_nothing_convertible(tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    result = _run("convert", "resnet10t", "--no-pretrained", "--only", "nomatch", "-o", str(out))
    _assert_one_line_error(result, "nothing to convert")
    result = _run("convert", "resnet10t", "--no-pretrained", "--planes", "7", "-o", str(out))
    _assert_one_line_error(result, "nothing to convert")
    assert list(tmp_path.iterdir()) == []


def test_output_not_writable(tmp_path: Path) -> None:
    result = _run("convert", "resnet10t", "--no-pretrained", "-o", str(tmp_path / "no" / "m.pt"))
    _assert_one_line_error(result, "does not exist")
    result = _run("convert", "resnet10t", "--no-pretrained", "-o", str(tmp_path))
    _assert_one_line_error(result, "is a directory")


def test_weights_that_do_not_fit(weights_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    result = _run("convert", "resnet10t", "--weights", str(weights_file), "-o", str(out))
    _assert_one_line_error(result, "does not fit", "--num-classes")
    assert not out.exists()


def test_offline_pretrained_and_bad_calibration_dir(tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    _assert_one_line_error(_run("convert", "resnet10t", "-o", str(out)), "--no-pretrained")
    (tmp_path / "empty").mkdir()
    result = _run(
        "convert",
        "resnet10t",
        "--no-pretrained",
        "-o",
        str(out),
        "--calibrate-data",
        str(tmp_path / "empty"),
    )
    _assert_one_line_error(result, "no images found")
    assert not out.exists()


def test_help_and_version() -> None:
    result = _run("convert", "--help")
    assert result.exit_code == 0 and "--planes" in result.stdout and "Examples" in result.stdout
    assert _run("--version").stdout.startswith("mcn-compress ")


# --- calibration: BatchNorm + label-free distillation (docs/design.md section 2.10) ---------
TINY = ("mcn_resnet_tiny", "--no-pretrained", "--num-classes", "10", "--in-chans", "1")


def _conversion(path: Path) -> dict:
    from mcn_compress.info import info_of

    return info_of(load(path)).metadata["conversion"]


@pytest.mark.parametrize("width", ["keep", "expand"])
def test_calibrate_synthetic_distills_and_records(width: str, tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    args = ("--calibrate-data", "synthetic", "--calibrate-images", "48", "--batch-size", "16")
    result = _run(
        "convert", *TINY, "--width", width, "-k", "2", *args, "--calibrate-steps", "4",
        "-o", str(out), "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["calibration_images"], data["calibration_steps"]) == (48, 4)
    assert len(data["calibration_kl"]) == 2
    saved = _conversion(out)
    assert (saved["calibration_images"], saved["calibration_steps"]) == (48, 4)


def test_calibrate_table_and_image_folder_uses_all_images(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        Image.new("L", (30, 30), color=40 * i).save(folder / f"{i}.png")
    out = tmp_path / "m.pt"
    result = _run(
        "convert", *TINY, "--calibrate-data", str(folder), "--calibrate-steps", "2",
        "--batch-size", "2", "-o", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "5 images, 2 distillation steps" in result.stdout
    assert _conversion(out)["calibration_images"] == 5


def test_calibrate_fashion_mnist_subset(tmp_path: Path) -> None:
    from mcn_compress.errors import DataError
    from mcn_compress.fashion_mnist import find_fashion_mnist

    try:
        find_fashion_mnist()
    except DataError as exc:
        pytest.skip(str(exc))
    out = tmp_path / "m.pt"
    result = _run(
        "convert", *TINY, "--calibrate-data", "fashion_mnist", "--calibrate-images", "32",
        "--calibrate-steps", "0", "-o", str(out), "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["calibration_images"], data["calibration_steps"]) == (32, 0)


def test_calibrate_bad_inputs(tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    base = ("convert", *TINY, "-o", str(out))
    _assert_one_line_error(
        _run(*base, "--calibrate-data", str(tmp_path / "nope")), "neither a directory"
    )
    _assert_one_line_error(_run(*base, "--calibrate-data", "cifar10"), "root")
    bad_device = _run(*base, "--calibrate-data", "synthetic", "--device", "tpu")
    _assert_one_line_error(bad_device, "--device")
    if not torch.cuda.is_available():
        _assert_one_line_error(
            _run(*base, "--calibrate-data", "synthetic", "--device", "cuda"), "no CUDA"
        )
    assert _run(*base, "--calibrate-steps", "-1").exit_code != 0
    assert not out.exists()


def test_calibration_at_the_trained_size_and_channels(tmp_path: Path) -> None:
    """A 1-channel timm model whose pretrained config says 3x176x176: gray images are
    normalised for one channel, at --input-size when given (issue: a broadcast crash)."""
    from PIL import Image

    from mcn_compress.calibration_data import calibration_data

    folder = tmp_path / "gray"
    folder.mkdir()
    for index in range(6):
        Image.new("L", (28, 28), color=128).save(folder / f"{index}.png")
    model = load_float_model("resnet10t", pretrained=False, in_chans=1, num_classes=10)
    mean, std = (0.485 + 0.456 + 0.406) / 3, (0.229 + 0.224 + 0.225) / 3  # ImageNet's, 1 channel
    expected = (128 / 255 - mean) / std
    for size, shape in [((28, 28), (1, 28, 28)), (None, (1, 176, 176))]:
        batch = next(iter(calibration_data(folder, model, 6, 6, input_hw=size)))
        assert tuple(batch.shape[1:]) == shape
        assert torch.allclose(batch, torch.full_like(batch, expected), atol=1e-5)
    weights = tmp_path / "w.pth"
    torch.save(model.state_dict(), weights)
    args = ["convert", "resnet10t", "--in-chans", "1", "--num-classes", "10", "--weights"]
    args += [str(weights), "--calibrate-data", str(folder), "--calibrate-steps", "1"]
    ok = CliRunner().invoke(app, [*args, "--input-size", "28", "-o", str(tmp_path / "m.pt")])
    assert ok.exit_code == 0, ok.stderr
    bad = CliRunner().invoke(app, [*args, "--input-size", "3,28,28", "-o", str(tmp_path / "n.pt")])
    assert bad.exit_code == 1 and "takes 1 channels" in bad.stderr
    assert not (tmp_path / "n.pt").exists()


def test_calibrate_val_records_the_top1_after_calibration(tmp_path: Path) -> None:
    from mcn_compress.data import build_datasets
    from mcn_compress.training.recipe import DataRecipe

    out = tmp_path / "m.pt"
    args = ["convert", "mcn_resnet_tiny", "--no-pretrained", "--num-classes", "4"]
    args += ["--in-chans", "1", "--calibrate-data", "synthetic", "--calibrate-images", "64"]
    result = CliRunner().invoke(app, [*args, "--calibrate-steps", "3", "--json", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    reported = json.loads(result.stdout)["calibration_top1"]
    model = load(out).eval()
    _, val = build_datasets(DataRecipe(dataset="synthetic", val_samples=2000), model)
    with torch.no_grad():
        hits = sum(
            int(model(val[i][0][None]).argmax(1).item() == val[i][1]) for i in range(len(val))
        )
    assert reported == pytest.approx(100.0 * hits / len(val))
    bad = CliRunner().invoke(app, [*args, "--calibrate-val", "mnist", "-o", str(tmp_path / "n.pt")])
    assert bad.exit_code == 1 and "--calibrate-val" in bad.stderr
