"""Fine-tuning run folders: file names, metrics files, float-run checkpoints, reading runs back."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import pickle
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mcn_compress.errors import CheckpointError, MCNError, first_line
from mcn_compress.formats.atomic import atomic_write
from mcn_compress.formats.checkpoint import checkpoint_dict, read_checkpoint
from mcn_compress.info import ModelSource, info_of, update_info
from mcn_compress.models import build_model

_logger = logging.getLogger(__name__)
RUN_CHECKPOINTS = ("best.pt", "last.pt")


RUN_METRICS = "metrics.jsonl"
RUN_METRICS_CSV = "metrics.csv"


RUN_RECIPE = "recipe.yaml"


@dataclass(frozen=True)
class RunDir:
    """A fine-tuning run directory: the checkpoint to report, the rows of metrics.jsonl and
    the run's ``runtime.seed`` (from recipe.yaml; it fixes the synthetic data and the
    validation subset, so an evaluation with the run's data settings sees the run's images)."""

    path: Path
    checkpoint: Path
    metrics: list[dict[str, Any]]
    seed: int | None = None

    def _val_top1(self) -> list[float]:
        return [float(r["val_top1"]) for r in self.metrics if is_number(r.get("val_top1"))]

    @property
    def final_top1(self) -> float | None:
        """``val_top1`` of the last epoch (percent), None without metrics."""
        values = self._val_top1()
        return values[-1] if values else None

    @property
    def best_top1(self) -> float | None:
        """Best ``val_top1`` over the epochs (percent), None without metrics."""
        values = self._val_top1()
        return max(values) if values else None

    @property
    def epochs(self) -> int | None:
        return len(self.metrics) if self.metrics else None


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (one JSON object per line, `EpochMetrics` keys)."""
    path = Path(path)
    rows = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}:{number} is not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise CheckpointError(f"{path}:{number} is not a JSON object")
        rows.append(row)
    return rows


def read_run(path: str | Path) -> RunDir:
    """The run directory ``path`` as written by ``mcn-compress finetune``: its ``best.pt``
    (else ``last.pt``) and the rows of its ``metrics.jsonl`` (empty when absent)."""
    path = Path(path)
    checkpoint = next((path / n for n in RUN_CHECKPOINTS if (path / n).is_file()), None)
    if checkpoint is None:
        raise CheckpointError(
            f"{path} is a directory but not a fine-tuning run: expected "
            f"{' or '.join(RUN_CHECKPOINTS)} (with {RUN_METRICS}) as written by mcn-compress "
            "finetune"
        )
    metrics_path = path / RUN_METRICS
    metrics = read_metrics(metrics_path) if metrics_path.is_file() else []
    return RunDir(path, checkpoint, metrics, _recipe_seed(path / RUN_RECIPE))


def _recipe_seed(path: Path) -> int | None:
    """``runtime.seed`` of a resolved recipe file; None when absent or unreadable."""
    import yaml

    if not path.is_file():
        return None
    try:
        recipe = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        _logger.warning("%s not readable (%s): using the default seed", path, exc)
        return None
    runtime = recipe.get("runtime") if isinstance(recipe, dict) else None
    seed = runtime.get("seed") if isinstance(runtime, dict) else None
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def _load_float_run(path: Path) -> nn.Module | None:
    """The float model of a float fine-tuning run's checkpoint, None if ``path`` is not one."""
    from mcn_compress.training.run_dir import FLOAT_FORMAT

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != FLOAT_FORMAT:
        return None
    if not isinstance(data.get("model"), dict) or not isinstance(data.get("state_dict"), dict):
        raise CheckpointError(f"{path} is corrupt: its model description or weights are missing")
    try:
        source = ModelSource.from_dict(data["model"])
        model = build_model(source, pretrained=False)
        model.load_state_dict(data["state_dict"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is corrupt: bad model description ({exc})") from exc
    except MCNError as exc:
        raise CheckpointError(f"{path}: cannot rebuild the model: {exc}") from exc
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path}: state dict does not fit the model: {first_line(exc)}"
        ) from exc
    update_info(model, source=source)
    return model.eval()


def load_run_model(run: RunDir) -> nn.Module:
    """The model of a run's checkpoint: an MCN checkpoint, or the float model of a float run."""
    from mcn_compress.formats.load import load

    try:
        return load(run.checkpoint)
    except CheckpointError:
        model = _load_float_run(run.checkpoint)
        if model is None:
            raise
        return model


LAST = "last.pt"


BEST = "best.pt"


FLOAT_FORMAT = "mcn-compress.float-run"


def run_finished(run_dir: Path, epochs: int) -> bool:
    path = run_dir / LAST
    if not path.is_file():
        return False
    try:
        state = torch.load(path, map_location="cpu", weights_only=True).get("train_state", {})
    except Exception:  # noqa: BLE001 - an unreadable file means "train again"
        return False
    return int(state.get("epoch", 0)) >= epochs


def read_history(run_dir: Path) -> list[EpochMetrics]:
    data = torch.load(run_dir / LAST, map_location="cpu", weights_only=True)
    return [EpochMetrics(**m) for m in data["train_state"]["history"]]


TRAIN_LOSS_KEYS = ("loss", "softmax", "filter", "center", "distill")
"""The training loss and its weighted parts, as `EpochMetrics` and the progress bar name them."""


@dataclass
class EpochMetrics:
    """One row of ``metrics.jsonl``: training loss and its parts, validation accuracy, speed."""

    epoch: int
    loss: float
    softmax: float
    filter: float
    center: float
    distill: float
    train_top1: float
    val_loss: float
    val_top1: float
    val_top5: float
    lr: float
    images_per_sec: float
    seconds: float


def write_metrics(run_dir: Path, history: Sequence[EpochMetrics]) -> None:
    """Write ``metrics.jsonl`` (one JSON object per epoch) and ``metrics.csv``, atomically."""
    rows = [asdict(m) for m in history]
    lines = "".join(json.dumps(row) + "\n" for row in rows)
    atomic_write(run_dir / RUN_METRICS, lambda tmp: tmp.write_text(lines))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[f.name for f in dataclasses.fields(EpochMetrics)])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(run_dir / RUN_METRICS_CSV, lambda tmp: tmp.write_text(buffer.getvalue()))


def run_checkpoint(
    model: nn.Module,
    train_state: dict[str, Any],
    *,
    parent: str | None = None,
    metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A run's ``last.pt`` / ``best.pt``: the MCN checkpoint (docs/design.md section 4) of a
    converted model, or a float-run dict (`FLOAT_FORMAT`) of a float one, with its
    ``train_state`` for resuming."""
    extra = {"train_state": train_state}
    info = info_of(model)
    if info.config is not None:
        return checkpoint_dict(model, parent=parent, metrics=metrics, extra=extra)
    return {
        "format": FLOAT_FORMAT,
        "version": 1,
        "model": info.source.to_dict() if info.source is not None else None,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metadata": {"metrics": dict(metrics or {})},
        **extra,
    }


def read_resume_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint a run resumes from (MCN or float run); it must hold a ``train_state``."""
    if not path.is_file():
        raise CheckpointError(f"cannot resume: {path} does not exist")
    try:
        data = read_checkpoint(path, map_location="cpu")
    except CheckpointError:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("format") != FLOAT_FORMAT:
            raise
    if not isinstance(data.get("train_state"), dict):
        raise CheckpointError(f"cannot resume from {path}: it holds no training state")
    return data
