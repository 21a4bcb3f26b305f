"""Training curves of fine-tuning runs (matplotlib, the optional ``plot`` extra)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mcn_compress.errors import CheckpointError, ConfigError
from mcn_compress.training.run_dir import RUN_METRICS, RunDir, is_number, read_run

_logger = logging.getLogger(__name__)
PLOT_EXTRA_HINT = "install the plot extra: pip install 'mcn-compress[plot]'"


LOSS_KEYS = ("loss", "softmax", "filter", "center", "distill", "val_loss")
TOP1_KEYS = ("train_top1", "val_top1")


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ConfigError(f"plotting needs matplotlib: {PLOT_EXTRA_HINT}") from exc
    return Figure


def plot_format(path: str | Path) -> str:
    """The image format of ``path`` from its suffix (e.g. ``png``); `ConfigError` when
    matplotlib is missing or cannot write that format."""
    figure = _figure_class()
    supported = figure().canvas.get_supported_filetypes()
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in supported:
        raise ConfigError(
            f"cannot plot to {path}: use one of the suffixes {', '.join(sorted(supported))}"
        )
    return fmt


def plot_training_curves(runs: Sequence[RunDir | str | Path], path: str | Path) -> Path:
    """Draw loss parts and train / val top-1 per epoch of each run into ``path`` (atomically).

    Left panel: the loss and its weighted parts (log scale; parts that are zero throughout are
    left out) and the validation loss. Right panel: train and val top-1 in percent. With
    several runs each curve is labelled with its run directory.
    """
    from mcn_compress.formats.atomic import atomic_write

    fmt = plot_format(path)
    runs = [r if isinstance(r, RunDir) else read_run(r) for r in runs]
    for run in runs:
        if not run.metrics:
            raise CheckpointError(f"{run.path}/{RUN_METRICS} is missing or empty: nothing to plot")
    from matplotlib.ticker import MaxNLocator

    figure = _figure_class()(figsize=(11, 4.2), layout="constrained")
    loss_ax, top1_ax = figure.subplots(1, 2)
    markers = "osd^v<>"
    for i, run in enumerate(runs):
        prefix = f"{run.path.name}: " if len(runs) > 1 else ""
        marker = markers[i % len(markers)]
        for ax, keys in ((loss_ax, LOSS_KEYS), (top1_ax, TOP1_KEYS)):
            for j, key in enumerate(keys):
                points = [
                    (r["epoch"], r[key])
                    for r in run.metrics
                    if is_number(r.get("epoch")) and is_number(r.get(key))
                ]
                if ax is loss_ax:  # log scale: a part that is 0 (unused) is left out
                    points = [(e, v) for e, v in points if v > 0]
                if not points:
                    continue
                # loss parts: one colour per part; top-1: one colour per run, val dashed
                color = f"C{j}" if ax is loss_ax else f"C{i}"
                style = "--" if key.startswith("val") else "-"
                epochs, values = zip(*points, strict=True)
                ax.plot(epochs, values, style, color=color, marker=marker, ms=3, label=prefix + key)
    loss_ax.set(title="loss parts per epoch", xlabel="epoch", ylabel="loss")
    if loss_ax.lines:
        loss_ax.set_yscale("log")
    top1_ax.set(title="top-1 per epoch", xlabel="epoch", ylabel="top-1 (%)")
    for ax in (loss_ax, top1_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(fontsize="small")
    target = Path(path)
    atomic_write(target, lambda tmp: figure.savefig(tmp, format=fmt, dpi=120))
    _logger.info("training curves written to %s", target)
    return target
