"""Fine-tuning run folders: file names, metrics files, float-run checkpoints, reading runs back."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mcn_compress.errors import (
    CheckpointError,
    MCNError,
    OutputError,
    RunFolderError,
    first_line,
)
from mcn_compress.formats.atomic import atomic_write
from mcn_compress.formats.checkpoint import (
    check_digest,
    checkpoint_dict,
    load_plain,
    validate_checkpoint,
)
from mcn_compress.formats.digest import DIGEST_KEY, content_digest
from mcn_compress.formats.state_dict import loadable_state_dict, plain_state_dict
from mcn_compress.info import ModelSource, info_of, update_info
from mcn_compress.limits import file_problem
from mcn_compress.models import rebuild_model
from mcn_compress.training.lock import RunLock, lock_holder

_logger = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.pt"
RUN_CHECKPOINTS = (BEST, LAST)
RUN_METRICS = "metrics.jsonl"
RUN_METRICS_CSV = "metrics.csv"


RUN_RECIPE = "recipe.yaml"
FLOAT_FORMAT = "mcn-compress.float-run"
FLOAT_VERSION = 2  # 2: sha256 of the content, state-dict module versions


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
        except RecursionError as exc:
            raise CheckpointError(f"{path}:{number} nests too deep") from exc
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
        holder = lock_holder(path)
        if holder is not None or (path / RUN_RECIPE).is_file():
            state = f"in progress ({holder})" if holder else "stopped before its first checkpoint"
            raise CheckpointError(
                f"{path} is a fine-tuning run {state}: it has no {BEST} or {LAST} yet; report "
                "it once its first epoch has finished"
            )
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

    from mcn_compress.training.recipe import MAX_SEED
    from mcn_compress.training.safe_yaml import MAX_YAML_BYTES, load_yaml

    if file_problem(path) is not None:
        return None
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise OSError(f"larger than {MAX_YAML_BYTES:,} bytes")
        recipe = load_yaml(path.read_text(), str(path))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, MCNError) as exc:
        _logger.warning("%s not readable (%s): using the default seed", path, exc)
        return None
    runtime = recipe.get("runtime") if isinstance(recipe, dict) else None
    seed = runtime.get("seed") if isinstance(runtime, dict) else None
    valid = isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= MAX_SEED
    if seed is not None and not valid:
        _logger.warning("%s: runtime.seed %.40r is not valid: using the default", path, seed)
    return seed if valid else None


def read_float_run(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The dict of a float run's checkpoint (`FLOAT_FORMAT`), checksum checked; None when
    ``path`` is a torch file of another format. Damaged or unsafe files raise `CheckpointError`."""
    data = load_plain(path, map_location)
    return data if _valid_float_run(data, path) else None


def _valid_float_run(data: Any, path: Path) -> bool:
    """Whether ``data`` (read from ``path``) is a float run's dict; damage raises."""
    if not isinstance(data, dict) or data.get("format") != FLOAT_FORMAT:
        return False
    if not isinstance(data.get("model"), dict) or not isinstance(data.get("state_dict"), dict):
        raise CheckpointError(f"{path} is corrupt: its model description or weights are missing")
    check_digest(data, path)
    return True


def _load_float_run(path: Path) -> nn.Module | None:
    """The float model of a float fine-tuning run's checkpoint, None if ``path`` is not one."""
    data = read_float_run(path)
    if data is None:
        return None
    try:
        source = ModelSource.from_dict(data["model"])
        model = rebuild_model(source)
        model.load_state_dict(
            loadable_state_dict(data["state_dict"], data.get("state_dict_metadata"))
        )
    except (KeyError, TypeError, ValueError) as exc:
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
    state, module_versions = plain_state_dict(model)
    data = {
        "format": FLOAT_FORMAT,
        "version": FLOAT_VERSION,
        "model": info.source.to_dict() if info.source is not None else None,
        "state_dict": state,
        "state_dict_metadata": module_versions,
        "metadata": {"metrics": dict(metrics or {})},
        **extra,
    }
    data[DIGEST_KEY] = content_digest(data)
    return data


def read_resume_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint a run resumes from (MCN or float run); it must hold a ``train_state``.
    Every problem (missing, truncated, unsafe, damaged, no state) is one `CheckpointError`."""
    if not path.is_file():
        if path.name == LAST and any((path.parent / n).exists() for n in RUN_FILES):
            raise CheckpointError(
                f"cannot resume: the run in {path.parent} stopped before its first checkpoint "
                f"(no {LAST}); start it again with --overwrite instead of --resume"
            )
        raise CheckpointError(f"cannot resume: {path} does not exist")
    try:
        data = load_plain(path)  # read once: a float run's dict, or an MCN checkpoint
        if not _valid_float_run(data, path):
            data = validate_checkpoint(data, path)
    except CheckpointError as exc:
        raise CheckpointError(f"cannot resume: {exc}") from exc
    if not isinstance(data.get("train_state"), dict):
        raise CheckpointError(f"cannot resume from {path}: it holds no training state")
    return data


RUN_FILES = (BEST, LAST, RUN_METRICS, RUN_METRICS_CSV, RUN_RECIPE)
"""The files a run writes: a folder holding any of them holds a run."""

RESUMABLE_CHANGES = (
    "optim.epochs",
    "data.workers",
    "runtime.device",
    "runtime.compile",
    "runtime.compile_mode",
    "output.dir",
)
"""Recipe keys that may differ when a run is resumed (more epochs, another machine, compiled
or eager: the same maths)."""


def claim_run_dir(
    run_dir: Path, *, resume: bool, overwrite: bool, start: str | Path | None = None
) -> RunLock:
    """Make ``run_dir`` this run's own before any work: create it, lock it (`RunLock`), and
    refuse to start a new run where one already is (unless ``overwrite``, which removes the
    old run's files) or to write over ``start``, the checkpoint the run starts from.

    Raises `OutputError` (a file in the way, not creatable or writable) or `RunFolderError`.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputError(f"output.dir {run_dir} is a file; choose a folder")
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output.dir {run_dir}: {exc.strerror or exc}") from exc
    if start is not None and Path(start).resolve().parent == run_dir.resolve() and not resume:
        raise RunFolderError(
            f"the run starts from {start}, inside its own output.dir {run_dir}: the new run "
            "would write over it; choose another output.dir"
        )
    lock = RunLock(run_dir).acquire()
    lock.remove_empty_dir = created  # a run that fails before it writes leaves no folder
    try:
        existing = [name for name in RUN_FILES if (run_dir / name).exists()]
        if existing and not resume:
            if not overwrite and not (run_dir / LAST).exists():
                raise RunFolderError(
                    f"{run_dir} holds a run that stopped before its first checkpoint "
                    f"({', '.join(existing)}, no {LAST}): there is nothing to resume; start it "
                    "again with --overwrite, or choose another output.dir"
                )
            if not overwrite:
                raise RunFolderError(
                    f"{run_dir} already holds a run ({', '.join(existing)}): resume it with "
                    "--resume, replace it with --overwrite, or choose another output.dir"
                )
            for name in existing:
                (run_dir / name).unlink()
            _logger.warning("--overwrite: removed %s from %s", ", ".join(existing), run_dir)
    except BaseException:
        lock.release()
        raise
    return lock


def _flatten(recipe: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim.lr": 0.1, ...}``: nested sections flattened to dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in recipe.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def recipe_changes(
    saved: dict[str, Any],
    current: dict[str, Any],
    saved_written: dict[str, Any] | None = None,
    current_written: dict[str, Any] | None = None,
) -> list[str]:
    """``"key: old -> new"`` for every recipe value that differs between ``saved`` and
    ``current`` (resolved recipes, nested sections flattened), except `RESUMABLE_CHANGES`.

    With the recipes as the user wrote them (``*_written``, `recipe.recipe_to_dict` with
    ``as_written``), a key differs only when it differs both resolved and as written: a value
    derived from a resumable one (a warmup clamped below a run's ``epochs``) may change, and a
    run resumed from its own resolved recipe.yaml is the same run. The message shows what was
    written.
    """
    old, new = _flatten(saved), _flatten(current)
    both = saved_written is not None and current_written is not None
    old_w = _flatten(saved_written) if both else old  # type: ignore[arg-type]
    new_w = _flatten(current_written) if both else new  # type: ignore[arg-type]
    return [
        f"{key}: {old_w.get(key)!r} -> {new_w.get(key)!r}"
        for key in sorted(set(old) | set(new) | set(old_w) | set(new_w))
        if key not in RESUMABLE_CHANGES
        and old.get(key) != new.get(key)
        and old_w.get(key) != new_w.get(key)
    ]


def last_good(run_dir: Path) -> str:
    """Where a stopped run can be resumed from, in words."""
    if (run_dir / LAST).is_file():
        return f"the last good checkpoint is {run_dir / LAST}"
    return f"no checkpoint was written yet to {run_dir} (it stopped in its first epoch)"
