"""Tests of `mcn_compress.report` (profiles, accuracy, run directories, training curves) and
`mcn-compress report` (rendering).

Expected numbers are counted here from the float model and the raw checkpoint (DESIGN.md
section 2: a converted conv keeps ``out/K * in * kh * kw`` signs and ``K * kh * kw`` M values),
file sizes are read from files the test writes itself, accuracies are recounted with a naive
loop over single samples, and run numbers are read from the run's own ``metrics.jsonl``.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from synthetic_run import synthetic_recipe
from torch import nn
from torch.utils.data import Dataset, TensorDataset
from typer.testing import CliRunner

from mcn_compress.checkpoint import save
from mcn_compress.cli import app
from mcn_compress.cli.report import DataChoice
from mcn_compress.config import MCNConfig
from mcn_compress.convert import convert
from mcn_compress.data import DEBIAN_FASHION_MNIST, SyntheticImages
from mcn_compress.errors import CheckpointError, ConfigError, DataError
from mcn_compress.export import export_packed
from mcn_compress.models import load_float_model
from mcn_compress.recipe import DataRecipe, DatasetName, recipe_from_dict
from mcn_compress.report import (
    ModelProfile,
    accuracy,
    evaluate_accuracy,
    plot_training_curves,
    profile_paths,
)
from mcn_compress.train import FLOAT_FORMAT, EpochMetrics, Trainer

K = 4
SLACK = 16 * 1024
NAME = "test_resnet"


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A float model with its weights in a local file, its checkpoint and packed file."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("report")
    float_model = load_float_model(NAME, pretrained=False)
    weights = root / "float.safetensors"
    save_file({k: v.contiguous() for k, v in float_model.state_dict().items()}, str(weights))
    float_model = load_float_model(NAME, weights=weights).eval()
    model = convert(float_model, MCNConfig(planes=K))
    ckpt = save(model, root / "model.pt")
    packed = export_packed(model, root / "model.mcn")
    return {"float": float_model, "ckpt": ckpt, "packed": packed, "root": root}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory written by a real (short) `Trainer` run."""
    root = tmp_path_factory.mktemp("runs") / "run"
    trainer = Trainer(recipe_from_dict(synthetic_recipe(root)))
    trainer.fit()
    trainer.close()
    return root


def metrics_rows(run: Path) -> list[dict[str, Any]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def naive_accuracy(model: nn.Module, dataset: Dataset[Any], k: int) -> float:
    """Percent of samples whose target logit has fewer than ``k`` strictly larger logits,
    one sample at a time."""
    hits = 0
    model.eval()
    with torch.no_grad():
        for i in range(len(dataset)):  # type: ignore[arg-type]
            image, label = dataset[i]
            logits = model(image[None])[0].tolist()
            hits += sum(v > logits[label] for v in logits) < k
    return 100 * hits / len(dataset)  # type: ignore[arg-type]


def tiny_classifier(classes: int = 10, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, classes),
    )


def expected_counts(float_model: nn.Module, layers: list[str]) -> dict[str, int]:
    """Counts of the MCN model derived from the float model and the converted layer names."""
    modules = dict(float_model.named_modules())
    convs = [modules[name] for name in layers]
    params = sum(p.numel() for p in float_model.parameters())
    buffers = sum(b.numel() for b in float_model.buffers() if b.is_floating_point())
    weights = sum(c.weight.numel() for c in convs)
    mfilters = sum(K * c.kernel_size[0] * c.kernel_size[1] for c in convs)
    weight_layers = sum(isinstance(m, nn.Conv2d | nn.Linear) for m in float_model.modules())
    int_bytes = sum(
        b.numel() * b.element_size() for b in float_model.buffers() if not b.is_floating_point()
    )
    float_params = params - weights + mfilters
    return {
        "binary_params": weights // K,
        "float_params": float_params,
        "float_buffers": buffers,
        "converted_layers": len(convs),
        "float_layers": weight_layers - len(convs),
        "min_bytes": math.ceil(weights // K / 8) + 4 * (float_params + buffers) + int_bytes,
        "float32_min": 4 * (params + buffers) + int_bytes,
    }


def layers_of(ckpt: Path) -> list[str]:
    return list(torch.load(ckpt, weights_only=True)["layers"])


# --------------------------------------------------------------------------------------------
# profiles
# --------------------------------------------------------------------------------------------
def test_profiles_match_independent_counts_and_real_files(files: dict[str, Any]) -> None:
    profiles = profile_paths([files["ckpt"], files["packed"]])
    assert [p.kind for p in profiles] == ["float", "mcn", "mcn"]  # float original first, once
    expected = expected_counts(files["float"], layers_of(files["ckpt"]))
    float_row, ckpt_row, packed_row = profiles

    assert float_row.architecture == NAME and float_row.binary_params == 0
    assert float_row.converted_layers == 0
    assert float_row.float_layers == expected["float_layers"] + expected["converted_layers"]
    assert float_row.min_bytes == expected["float32_min"]
    assert float_row.packed_bytes is None and float_row.ratio == 1.0

    packed_size = files["packed"].stat().st_size
    for row in (ckpt_row, packed_row):
        assert row.architecture == NAME and row.planes == K and row.width == "keep"
        for key in ("binary_params", "float_params", "float_buffers", "converted_layers"):
            assert getattr(row, key) == expected[key], key
        assert row.float_layers == expected["float_layers"]
        assert row.min_bytes == expected["min_bytes"]
        assert row.packed_bytes == packed_size
        assert row.float32_bytes == float_row.float32_bytes
        assert row.ratio == pytest.approx(float_row.float32_bytes / packed_size)
        assert row.within_bound and row.min_bytes <= packed_size
    assert ckpt_row.input_bytes == files["ckpt"].stat().st_size
    assert packed_row.input_bytes == packed_size
    f32 = expected["float32_min"]
    assert f32 <= float_row.float32_bytes <= f32 * 1.01 + SLACK


def test_float16_measures_half_floats(files: dict[str, Any]) -> None:
    row = profile_paths([files["ckpt"]], float16=True)[1]
    expected = expected_counts(files["float"], layers_of(files["ckpt"]))
    floats = expected["float_params"] + expected["float_buffers"]
    assert row.float16
    assert row.min_bytes == expected["min_bytes"] - 2 * floats
    out = export_packed(row_model(files["ckpt"]), files["root"] / "fp16.mcn", float16=True)
    assert row.packed_bytes == out.stat().st_size


def row_model(path: Path) -> nn.Module:
    from mcn_compress.checkpoint import load

    return load(path)


def naive_q(conv_weight: torch.Tensor, mfilter: torch.Tensor) -> torch.Tensor:
    """``Q[h*K + j, c] = sign(C[h, c]) * M[j]`` with a loop over planes j (sign(0) = +1)."""
    signs = torch.where(conv_weight >= 0, 1.0, -1.0)
    planes = [signs * mfilter[j] for j in range(mfilter.shape[0])]
    return torch.stack(planes, dim=1).reshape(-1, *conv_weight.shape[1:])


def test_per_layer_rows_sum_to_totals_and_errors_use_float_weights(
    files: dict[str, Any],
) -> None:
    profiles = profile_paths([files["packed"]], per_layer=True)
    row = profiles[1]
    assert row.layers is not None
    assert sum(r.bits for r in row.layers) == row.binary_params
    assert sum(r.float_params for r in row.layers) == row.float_params
    state = torch.load(files["ckpt"], weights_only=True)["state_dict"]
    float_state = files["float"].state_dict()
    layers = set(layers_of(files["ckpt"]))
    by_name = {r.name: r for r in row.layers}
    for name in layers:
        w0 = float_state[f"{name}.weight"]
        q = naive_q(state[f"{name}.weight"], state[f"{name}.mfilter"])
        expected = float(torch.linalg.vector_norm(w0 - q) / torch.linalg.vector_norm(w0))
        assert by_name[name].kind == "mcn"
        assert by_name[name].shape == tuple(w0.shape)
        assert by_name[name].bits == w0.numel() // K
        assert by_name[name].rel_error == pytest.approx(expected, rel=1e-5)
    assert all(r.rel_error is None for r in row.layers if r.name not in layers)
    assert profiles[0].layers is not None
    assert all(r.bits == 0 and r.rel_error is None for r in profiles[0].layers)


def test_per_layer_error_unavailable_without_float_weights(tmp_path: Path) -> None:
    model = convert(load_float_model(NAME, pretrained=False), MCNConfig(planes=K))
    ckpt = save(model, tmp_path / "random.pt")
    row = profile_paths([ckpt], per_layer=True)[1]
    assert row.layers and all(r.rel_error is None for r in row.layers)


def test_latency_is_measured(files: dict[str, Any]) -> None:
    profiles = profile_paths([files["packed"]], latency=True, input_size=32)
    assert all(p.latency_ms is not None and p.latency_ms > 0 for p in profiles)


def test_directory_without_run_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(CheckpointError, match=r"not a fine-tuning run: expected best\.pt or last"):
        profile_paths([tmp_path])


# --------------------------------------------------------------------------------------------
# accuracy
# --------------------------------------------------------------------------------------------
def test_accuracy_matches_a_naive_loop_on_synthetic_data() -> None:
    model = tiny_classifier().train()
    cfg = DataRecipe(dataset="synthetic", image_size=16, batch_size=16, workers=0, val_samples=60)
    calls: list[tuple[int, int]] = []
    top1, top5 = evaluate_accuracy(model, cfg, lambda done, total: calls.append((done, total)))
    # build_datasets' synthetic validation split: seed 0, the model's classes and channels
    reference = SyntheticImages(60, 10, 1, 16, seed=0, split="val")
    assert top1 == pytest.approx(naive_accuracy(model, reference, 1))
    assert top5 == pytest.approx(naive_accuracy(model, reference, 5))
    assert 0 < top1 < top5 < 100  # neither trivial
    assert calls == [(0, 60), (16, 60), (32, 60), (48, 60), (60, 60)]
    model.train()
    evaluate_accuracy(model, cfg)
    assert model.training  # mode restored


def test_accuracy_refuses_labels_beyond_the_outputs() -> None:
    data = TensorDataset(torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 7, 1]))
    with pytest.raises(DataError, match="label 7 is out of range for a model with 4 outputs"):
        accuracy(tiny_classifier(classes=4), data, batch_size=4)


def test_accuracy_wraps_a_model_that_cannot_take_the_images() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(5, 3))
    data = TensorDataset(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(DataError, match=r"cannot run on images of shape \(1, 8, 8\)"):
        accuracy(model, data)


fashion_files = [
    DEBIAN_FASHION_MNIST / f"t10k-{n}-idx{d}-ubyte.gz" for n, d in (("images", 3), ("labels", 1))
]
needs_fashion = pytest.mark.skipif(
    not all(f.is_file() for f in fashion_files),
    reason=f"Fashion-MNIST absent from {DEBIAN_FASHION_MNIST}: "
    "apt-get install -y dataset-fashion-mnist",
)


def read_idx_gz(path: Path) -> np.ndarray:
    """IDX parsed here, independently of `data.read_idx` (uint8 data, big-endian dims)."""
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@needs_fashion
def test_accuracy_on_the_fashion_mnist_test_set_matches_raw_pixels() -> None:
    """A bias-free linear model whose class rows sum to zero ranks classes the same on raw
    pixels / 255 as on normalised ones (``(x - m) / s`` shifts every logit by the same amount
    times zero and scales by ``1 / s``), so the reference is computed from the raw IDX files."""
    torch.manual_seed(0)
    weights = torch.randn(10, 28 * 28, dtype=torch.float64)
    weights -= weights.mean(dim=1, keepdim=True)
    identity = nn.Conv2d(1, 1, 1, bias=False)  # a conv so the data has the model's 1 channel
    linear = nn.Linear(28 * 28, 10, bias=False)
    with torch.no_grad():
        identity.weight.fill_(1.0)
        linear.weight.copy_(weights)
    model = nn.Sequential(identity, nn.Flatten(), linear)
    cfg = DataRecipe(dataset="fashion_mnist", batch_size=500, workers=0)
    top1, top5 = evaluate_accuracy(model, cfg)

    images = torch.from_numpy(read_idx_gz(fashion_files[0]).reshape(-1, 28 * 28) / 255.0)
    labels = torch.from_numpy(read_idx_gz(fashion_files[1]).astype(np.int64))
    logits = images @ weights.T
    target = logits.gather(1, labels[:, None])
    eps = 1e-6 * float(logits.abs().max())  # float32 model vs float64 reference: near-ties
    above_surely = (logits > target + eps).sum(1)  # strictly larger however rounding goes
    above_maybe = (logits > target - eps).sum(1) - 1  # minus the target itself
    for k, measured in ((1, top1), (5, top5)):
        low = 100 * float((above_maybe < k).sum()) / len(labels)
        high = 100 * float((above_surely < k).sum()) / len(labels)
        assert low <= measured <= high, (k, low, measured, high)
        assert high - low < 0.1


@needs_fashion
def test_fashion_mnist_with_more_classes_than_outputs_is_refused() -> None:
    cfg = DataRecipe(dataset="fashion_mnist", workers=0, val_samples=10)
    with pytest.raises(DataError, match="fashion_mnist has 10 classes but the model predicts 4"):
        evaluate_accuracy(tiny_classifier(classes=4), cfg)


# --------------------------------------------------------------------------------------------
# run directories
# --------------------------------------------------------------------------------------------
def test_run_dir_reports_its_best_checkpoint_and_metrics(run_dir: Path) -> None:
    rows = metrics_rows(run_dir)
    float_row, row = profile_paths([run_dir])
    assert float_row.kind == "float" and float_row.run_dir is None
    assert float_row.run_best_top1 is None and float_row.top1 is None
    assert row.label == row.run_dir == str(run_dir)
    assert row.path == str(run_dir / "best.pt")
    assert row.input_bytes == (run_dir / "best.pt").stat().st_size
    assert row.run_epochs == len(rows) == 2
    assert row.run_final_top1 == rows[-1]["val_top1"]
    assert row.run_best_top1 == max(r["val_top1"] for r in rows)
    direct = profile_paths([run_dir / "best.pt"])[1]
    for key in ("binary_params", "float_params", "packed_bytes", "min_bytes"):
        assert getattr(row, key) == getattr(direct, key), key


def test_run_dir_evaluated_with_its_data_reproduces_its_best_val_top1(run_dir: Path) -> None:
    """Same data settings and the run's seed (from recipe.yaml): the very images the run
    validated on, so best.pt scores the best val_top1 of metrics.jsonl."""
    data = DataRecipe(dataset="synthetic", image_size=28, batch_size=32, workers=0, val_samples=64)
    calls: list[tuple[str, int, int]] = []
    float_row, row = profile_paths([run_dir], data=data, progress=lambda *args: calls.append(args))
    assert row.top1 == pytest.approx(max(r["val_top1"] for r in metrics_rows(run_dir)))
    assert row.top5 == 100.0  # 4 classes
    assert (row.eval_dataset, row.eval_samples) == ("synthetic", 64)
    assert float_row.top1 is None and float_row.eval_dataset is None  # random weights: not run
    assert calls[0] == (str(run_dir), 0, 64) and calls[-1] == (str(run_dir), 64, 64)


def test_run_dir_without_best_falls_back_to_last(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("best.pt", "metrics.*"))
    row = profile_paths([copy])[1]
    assert row.path == str(copy / "last.pt")
    assert row.run_dir == str(copy)
    assert (row.run_epochs, row.run_final_top1, row.run_best_top1) == (None, None, None)


def test_float_run_dir_is_one_float_row(tmp_path: Path) -> None:
    """A float fine-tuning run (hand-written best.pt in the float-run format, metrics.jsonl)."""
    torch.manual_seed(0)
    model = load_float_model("mcn_resnet_small", pretrained=False, num_classes=4, in_chans=1)
    run = tmp_path / "float-run"
    run.mkdir()
    torch.save(
        {
            "format": FLOAT_FORMAT,
            "version": 1,
            "model": model.mcn_source.to_dict(),
            "state_dict": model.state_dict(),
            "metadata": {"metrics": {}},
        },
        run / "best.pt",
    )
    zeros = dict.fromkeys(EpochMetrics.__dataclass_fields__, 0.0)
    rows = [{**zeros, "epoch": 1, "val_top1": 62.5}, {**zeros, "epoch": 2, "val_top1": 50.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = DataRecipe(dataset="synthetic", image_size=28, batch_size=16, workers=0, val_samples=24)
    (row,) = profile_paths([run], data=data)
    assert row.kind == "float" and row.label == str(run)
    assert (row.run_epochs, row.run_final_top1, row.run_best_top1) == (2, 50.0, 62.5)
    reference = SyntheticImages(24, 4, 1, 28, seed=0, split="val")  # no recipe.yaml: seed 0
    assert row.top1 == pytest.approx(naive_accuracy(model, reference, 1))


def test_bad_metrics_line_is_named(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    with (copy / "metrics.jsonl").open("a") as f:
        f.write("{not json\n")
    with pytest.raises(CheckpointError, match=r"metrics\.jsonl:3 is not valid JSON"):
        profile_paths([copy])


# --------------------------------------------------------------------------------------------
# training curves
# --------------------------------------------------------------------------------------------
def test_plot_training_curves_writes_an_image(run_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is not installed")
    from matplotlib.image import imread

    out = plot_training_curves([run_dir, run_dir], tmp_path / "curves.png")
    image = imread(out)
    assert image.ndim == 3 and image.shape[1] > image.shape[0] > 200  # two panels side by side
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # no temporary file left


def test_plot_without_matplotlib_says_which_extra(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.ticker"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ConfigError, match=r"pip install 'mcn-compress\[plot\]'"):
        plot_training_curves([run_dir], tmp_path / "curves.png")
    result = run(str(run_dir), "--plot", str(tmp_path / "curves.png"))
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "error: plotting needs matplotlib: install the plot extra: pip install 'mcn-compress[plot]'"
    ]
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# CLI: formats carry the same numbers
# --------------------------------------------------------------------------------------------
def run(*args: str) -> Any:
    return CliRunner().invoke(app, ["report", *args], env={"COLUMNS": "250"})


def parse_int(cell: str) -> int | None:
    token = cell.split()[0] if cell.split() else "-"
    return None if token == "-" else int(token.replace(",", ""))


def table_rows(text: str) -> dict[str, list[str]]:
    """First Rich table of ``text``: row title -> cells (one per model)."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("└"):
            break
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            rows[cells[0]] = cells[1:]
    return rows


NUMERIC = {
    "binary params": "binary_params",
    "float params": "float_params",
    "float buffers": "float_buffers",
    "MCN layers": "converted_layers",
    "float layers": "float_layers",
    "input file bytes": "input_bytes",
    "float32 original bytes": "float32_bytes",
    "packed bytes": "packed_bytes",
    "theoretical min bytes": "min_bytes",
    "run epochs": "run_epochs",
    "eval images": "eval_samples",
}
PERCENT = {
    "run final val top-1 %": "run_final_top1",
    "run best val top-1 %": "run_best_top1",
    "top-1 %": "top1",
    "top-5 %": "top5",
}
EVAL = ["--data", "synthetic", "--image-size", "32", "--val-samples", "16", "--workers", "0"]


def percent_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def test_cli_json_csv_table_markdown_agree(files: dict[str, Any], run_dir: Path) -> None:
    """Checkpoint, packed file and run directory, evaluated on synthetic data: every format
    carries the same sizes, run metrics and accuracies."""
    paths = [str(files["ckpt"]), str(files["packed"]), str(run_dir), *EVAL]
    res_json = run(*paths, "--format", "json", "--per-layer")
    assert res_json.exit_code == 0, res_json.output
    assert res_json.stderr == ""
    models = json.loads(res_json.stdout)["models"]
    assert [m["kind"] for m in models] == ["float", "mcn", "mcn", "float", "mcn"]
    expected = expected_counts(files["float"], layers_of(files["ckpt"]))
    assert models[1]["binary_params"] == expected["binary_params"]
    assert models[2]["packed_bytes"] == files["packed"].stat().st_size
    # the test_resnet original has its weights file: evaluated; the run's original has none
    assert [m["top1"] is None for m in models] == [False, False, False, True, False]
    assert models[4]["run_best_top1"] == max(r["val_top1"] for r in metrics_rows(run_dir))
    assert models[4]["eval_dataset"] == "synthetic" and models[4]["eval_samples"] == 16

    res_csv = run(*paths, "--format", "csv", "--per-layer")
    assert res_csv.exit_code == 0, res_csv.output
    summary_part, layer_part = res_csv.stdout.split("\n\n")
    rows = list(csv.DictReader(io.StringIO(summary_part)))
    assert len(rows) == 5
    for row, model in zip(rows, models, strict=True):
        for key in (*NUMERIC.values(), "eval_dataset"):
            assert row[key] == ("" if model[key] is None else str(model[key])), key
        for key in ("ratio", *PERCENT.values()):
            assert (None if row[key] == "" else float(row[key])) == model[key], key
    layer_rows = list(csv.DictReader(io.StringIO(layer_part)))
    assert len(layer_rows) == sum(len(m["layers"]) for m in models)
    bits = sum(int(r["bits"]) for r in layer_rows if r["model"] == str(files["packed"]))
    assert bits == models[2]["binary_params"]

    res_table = run(*paths)
    assert res_table.exit_code == 0, res_table.output
    table = table_rows(res_table.stdout)
    for title, key in NUMERIC.items():
        assert [parse_int(c) for c in table[title]] == [m[key] for m in models], title
    for title, key in PERCENT.items():
        assert table[title] == [percent_cell(m[key]) for m in models], title
    assert table["eval data"] == [m["eval_dataset"] or "-" for m in models]
    assert table["compression vs float32"] == [f"{m['ratio']:.2f}x" for m in models]

    res_md = run(*paths, "--format", "markdown")
    assert res_md.exit_code == 0, res_md.output
    lines = [ln for ln in res_md.stdout.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    md_rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    assert len(md_rows) == 5
    for cells, model in zip(md_rows, models, strict=True):
        for title, key in NUMERIC.items():
            assert parse_int(cells[header.index(title)]) == model[key], title
        for title, key in PERCENT.items():
            assert cells[header.index(title)] == percent_cell(model[key]), title


def test_cli_without_runs_or_data_has_no_such_rows(files: dict[str, Any]) -> None:
    result = run(str(files["packed"]))
    assert result.exit_code == 0, result.output
    assert not set(table_rows(result.stdout)) & {*PERCENT, "run epochs", "eval images"}


def test_cli_progress_bar_on_a_terminal(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On an interactive stderr the evaluation draws a bar per model (off in tests otherwise)."""
    from rich.console import Console

    import mcn_compress.cli.report as cli_report

    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, force_interactive=True, width=150)
    monkeypatch.setattr(cli_report, "err", terminal)
    result = run(str(run_dir), *EVAL, "--batch-size", "4", "--format", "markdown")
    assert result.exit_code == 0, result.output
    assert f"top-1/top-5 {run_dir}" in screen.getvalue()
    assert "16/16" in screen.getvalue()


def test_cli_dataset_choices_are_the_recipes() -> None:
    assert [c.value for c in DataChoice] == list(get_args(DatasetName))


def test_cli_plot_writes_the_image(run_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is not installed")
    out = tmp_path / "curves.png"
    result = run(str(run_dir), "--plot", str(out), "--format", "json")
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(result.stdout)["models"][1]["run_epochs"] == 2


def test_cli_table_per_layer_and_latency(files: dict[str, Any]) -> None:
    result = run(str(files["packed"]), "--per-layer", "--latency", "--input-size", "32")
    assert result.exit_code == 0, result.output
    assert "Layers of" in result.stdout and "latency ms/image" in result.stdout
    rows = table_rows(result.stdout)
    assert all(float(c) > 0 for c in rows["latency ms/image"])


# --------------------------------------------------------------------------------------------
# CLI: bad input
# --------------------------------------------------------------------------------------------
def bad_input(kind: str, files: dict[str, Any], root: Path) -> Path:
    packed = files["packed"].read_bytes()
    path = root / f"{kind}.mcn"
    if kind == "missing":
        return root / "absent.pt"
    if kind == "directory":
        path.mkdir()
    elif kind == "text":
        path.write_text("not a model")
    elif kind == "foreign_safetensors":
        save_file({"w": torch.ones(2)}, str(path))
    elif kind == "foreign_torch":
        torch.save([1, 2, 3], path)
    elif kind == "truncated_packed":
        path.write_bytes(packed[: len(packed) - 100])
    elif kind == "truncated_checkpoint":
        path.write_bytes(files["ckpt"].read_bytes()[:1000])
    elif kind == "corrupt_packed":
        data = bytearray(packed)
        data[-50] ^= 0x01
        path.write_bytes(bytes(data))
    else:
        raise AssertionError(kind)
    return path


@pytest.mark.parametrize(
    "kind",
    [
        "missing",
        "directory",
        "text",
        "foreign_safetensors",
        "foreign_torch",
        "truncated_packed",
        "truncated_checkpoint",
        "corrupt_packed",
    ],
)
@pytest.mark.parametrize("fmt", ["table", "json"])
def test_cli_bad_input_one_line_no_output(
    kind: str, fmt: str, files: dict[str, Any], tmp_path: Path
) -> None:
    bad = bad_input(kind, files, tmp_path)
    result = run(str(files["packed"]), str(bad), "--format", fmt)  # good file first
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and bad.name in lines[0], lines
    assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ([bad.name] if bad.exists() else [])


def test_cli_unknown_format_option_is_refused(files: dict[str, Any]) -> None:
    result = run(str(files["packed"]), "--format", "xml")
    assert result.exit_code != 0
    assert result.stdout == ""


def cli_error(result: Any) -> str:
    """The single error line of a failed run (asserting there is exactly one, no stdout)."""
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    return lines[0]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--val-samples", "10"], "--val-samples only apply with --data DATASET"),
        (["--data", "synthetic", "--val-samples", "0"], "--val-samples: expected a positive"),
        (["--data", "synthetic", "--image-size", "4"], "--image-size: expected an integer >= 8"),
        (["--data", "imagefolder"], "--data-root: required for dataset imagefolder"),
        (["--data", "fashion_mnist", "--data-root", "/nonexistent"], "Fashion-MNIST not found"),
        (["--data", "cifar10", "--data-root", "/nonexistent"], "CIFAR-10 not found"),
    ],
)
def test_cli_bad_data_options(files: dict[str, Any], options: list[str], message: str) -> None:
    assert message in cli_error(run(str(files["packed"]), *options))


@needs_fashion
def test_cli_dataset_with_more_classes_than_the_model(run_dir: Path) -> None:
    line = cli_error(run(str(run_dir), "--data", "fashion_mnist", "--val-samples", "10"))
    assert f"fashion_mnist has 10 classes but {run_dir} predicts 4" in line


@pytest.mark.parametrize("case", ["model_file", "no_metrics", "bad_suffix"])
def test_cli_bad_plot_leaves_no_file(
    case: str, files: dict[str, Any], run_dir: Path, tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is not installed")
    out = tmp_path / ("curves.xyz" if case == "bad_suffix" else "curves.png")
    if case == "model_file":
        target, message = files["ckpt"], "--plot draws training curves of run directories"
    elif case == "no_metrics":
        target, message = tmp_path / "run", "metrics.jsonl is missing or empty"
        shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("metrics.*"))
    else:
        target, message = run_dir, "cannot plot to"
    assert message in cli_error(run(str(target), "--plot", str(out)))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_profile_to_dict_round_trips_json(files: dict[str, Any]) -> None:
    profiles = profile_paths([files["packed"]])
    data = json.loads(json.dumps([p.to_dict() for p in profiles]))
    assert data[1]["packed_bytes"] == files["packed"].stat().st_size
    assert isinstance(profiles[1], ModelProfile)


def test_expand_report_counts_float_original_and_k_squared_macs(tmp_path: Path) -> None:
    """width expand: the float original's size is the unwidened model's; conv MACs grow ~K^2."""
    from mcn_compress import MCNConfig, convert, load_float_model, save

    float_model = load_float_model("mcn_resnet_small", pretrained=False).eval()
    expected_float_bytes = 4 * sum(
        v.numel() for v in float_model.state_dict().values() if v.is_floating_point()
    )

    def naive_macs(model: torch.nn.Module) -> int:
        total = 0

        def hook(mod: torch.nn.Module, _: object, out: torch.Tensor) -> None:
            nonlocal total
            total += out[0].numel() * mod.weight[0].numel()

        handles = [
            m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)
        ]
        with torch.no_grad():
            model(torch.zeros(1, 1, 28, 28))
        for h in handles:
            h.remove()
        return total

    keep_macs = naive_macs(float_model)
    profiles = {}
    for width in ("keep", "expand"):
        path = save(
            convert(float_model, MCNConfig(planes=2, width=width)), tmp_path / f"{width}.pt"
        )
        result = CliRunner().invoke(app, ["report", str(path), "--format", "json"])
        assert result.exit_code == 0, result.stderr
        rows = json.loads(result.stdout)["models"]
        profiles[width] = next(r for r in rows if r["kind"] == "mcn")
    for width in ("keep", "expand"):
        got = profiles[width]["float32_bytes"]
        assert expected_float_bytes <= got <= expected_float_bytes + 16 * 1024, width
    assert profiles["keep"]["conv_macs"] == keep_macs
    ratio = profiles["expand"]["conv_macs"] / keep_macs
    assert 3.5 < ratio <= 4.0  # K^2 = 4 on the converted convs; the float stem is not widened
