"""`mcn-compress report PATH [PATH ...]`: sizes (real files), counts, latency and accuracy.

Numbers come from `mcn_compress.profile` (profiles, accuracy, training curves); this module only
parses the options and renders the numbers as a Rich table (one column per model), Markdown,
JSON or CSV, with a progress bar while models are evaluated.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, get_args

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from mcn_compress.cli._common import (
    JsonOpt,
    QuietOpt,
    cli_errors,
    err,
    errors_only,
    out,
    print_json,
)
from mcn_compress.cli.render import calibration_text
from mcn_compress.errors import ConfigError
from mcn_compress.training.recipe import DatasetName

if TYPE_CHECKING:
    from mcn_compress.profile import LayerProfile, ModelProfile
    from mcn_compress.training.recipe import DataRecipe


DataChoice = Enum(  # type: ignore[misc]
    "DataChoice", {name: name for name in get_args(DatasetName)}, type=str
)
"""The recipe's ``data.dataset`` choices (`training.recipe.DatasetName`), as Typer choices."""


class ReportFormat(str, Enum):
    table = "table"
    markdown = "markdown"
    json = "json"
    csv = "csv"


def _int(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _packed(p: ModelProfile) -> str:
    if p.packed_bytes is None:
        return "-"
    return f"{p.packed_bytes:,}" + (" (float16)" if p.float16 else "")


# (title, human-readable value) for each reported quantity, in display order
ROWS: list[tuple[str, Callable[[ModelProfile], str]]] = [
    ("architecture", lambda p: p.architecture),
    ("K (planes)", lambda p: "-" if p.planes is None else str(p.planes)),
    ("width", lambda p: p.width or "-"),
    ("MCN layers", lambda p: _int(p.converted_layers)),
    ("float layers", lambda p: _int(p.float_layers)),
    ("binary params", lambda p: _int(p.binary_params)),
    ("float params", lambda p: _int(p.float_params)),
    ("float buffers", lambda p: _int(p.float_buffers)),
    ("input file bytes", lambda p: _int(p.input_bytes)),
    ("float32 original bytes", lambda p: _int(p.float32_bytes)),
    ("packed bytes", _packed),
    ("float layer weights stored as", lambda p: p.float_layer_dtype if p.kind == "mcn" else "-"),
    ("theoretical min bytes", lambda p: _int(p.min_bytes)),
    ("overhead vs min", lambda p: "-" if p.overhead is None else f"{p.overhead:+.2%}"),
    ("within 1% + 16 KiB", lambda p: _yes_no(p.within_bound)),
    ("compression vs float32", lambda p: "-" if p.ratio is None else f"{p.ratio:.2f}x"),
    ("conv MACs per image", lambda p: _int(p.conv_macs)),
    ("conv MACs, factored", lambda p: _int((p.factored or {}).get("conv_macs"))),
    ("conv weight bytes held (dense / factored)", lambda p: _held(p.factored)),
]
ONNX_ROWS: list[tuple[str, Callable[[ModelProfile], str]]] = [
    ("ONNX file bytes", lambda p: _int((p.onnx or {}).get("bytes"))),
    ("ONNX weights / compute", lambda p: _onnx_pair(p.onnx, "weights", "compute")),
    ("ONNX activations / threads", lambda p: _onnx_pair(p.onnx, "activations", "threads")),
]
CALIBRATION_ROW: tuple[str, Callable[[ModelProfile], str]] = (
    "calibration",
    lambda p: calibration_text(
        {
            "calibration_images": p.calibration_images,
            "calibration_steps": p.calibration_steps,
            "calibration_kl": p.calibration_kl,
            "calibration_top1": p.calibration_top1,
        }
    ),
)
LATENCY_ROW: tuple[str, Callable[[ModelProfile], str]] = (
    "latency ms/image",
    lambda p: "-" if p.latency_ms is None else f"{p.latency_ms:.2f}",
)
FACTORED_LATENCY_ROW: tuple[str, Callable[[ModelProfile], str]] = (
    "latency ms/image, factored",
    lambda p: _ms((p.factored or {}).get("latency_ms")),
)
RUN_ROWS: list[tuple[str, Callable[[ModelProfile], str]]] = [
    ("run epochs", lambda p: _int(p.run_epochs)),
    ("run final val top-1 %", lambda p: _percent(p.run_final_top1)),
    ("run best val top-1 %", lambda p: _percent(p.run_best_top1)),
]
ACCURACY_ROWS: list[tuple[str, Callable[[ModelProfile], str]]] = [
    ("eval data", lambda p: p.eval_dataset or "-"),
    ("eval images", lambda p: _int(p.eval_samples)),
    ("top-1 %", lambda p: _percent(p.top1)),
    ("top-5 %", lambda p: _percent(p.top5)),
]
LAYER_COLUMNS: list[tuple[str, Callable[[LayerProfile], str]]] = [
    ("layer", lambda r: r.name),
    ("kind", lambda r: r.kind),
    ("shape", lambda r: "x".join(map(str, r.shape)) or "-"),
    ("bits", lambda r: _int(r.bits)),
    ("float params", lambda r: _int(r.float_params)),
    ("rel. error", lambda r: "-" if r.rel_error is None else f"{r.rel_error:.4f}"),
    ("factored form", lambda r: (r.factored or {}).get("form", "-")),
    ("MACs dense / factored", lambda r: _pair(r.factored, "dense_macs", "macs")),
]


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else "yes" if value else "NO"


def _onnx_pair(onnx: dict[str, Any] | None, first: str, second: str) -> str:
    if onnx is None:
        return "-"
    return f"{onnx.get(first) or '-'} / {onnx.get(second) or '-'}"


def _held(factored: dict[str, Any] | None) -> str:
    """Float32 conv weight bytes a runtime holds, dense and factored (design.md 4.8)."""
    return _pair(factored, "dense_weight_bytes", "weight_bytes")


def _pair(values: dict[str, Any] | None, first: str, second: str) -> str:
    if not values or values.get(first) is None:
        return "-"
    return f"{values[first]:,} / {values[second]:,}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _rows(profiles: Sequence[ModelProfile]) -> list[tuple[str, Callable[[ModelProfile], str]]]:
    """The rows that have a value for some model: latency, run metrics, accuracy if measured."""
    rows = list(ROWS)
    if any(p.onnx is not None for p in profiles):
        at = [title for title, _ in rows].index("packed bytes") + 1
        rows[at:at] = ONNX_ROWS
    if any(p.calibration_images for p in profiles):
        rows.append(CALIBRATION_ROW)
    if any(p.latency_ms is not None for p in profiles):
        rows.append(LATENCY_ROW)
    if any((p.factored or {}).get("latency_ms") is not None for p in profiles):
        rows.append(FACTORED_LATENCY_ROW)
    if any(p.run_dir is not None for p in profiles):
        rows.extend(RUN_ROWS)
    if any(p.eval_dataset is not None for p in profiles):
        rows.extend(ACCURACY_ROWS)
    return rows


def summary_table(profiles: Sequence[ModelProfile]) -> Table:
    """One row per quantity, one column per model: before and after side by side."""
    table = Table(title="Model size (real files)")
    table.add_column("", no_wrap=True)
    for p in profiles:
        table.add_column(escape(p.label), justify="right", overflow="fold")
    for title, value in _rows(profiles):
        table.add_row(title, *(escape(value(p)) for p in profiles))
    return table


def layer_table(profile: ModelProfile) -> Table:
    """Per-layer bits, float parameters and reconstruction error of one model."""
    table = Table(title=escape(f"Layers of {profile.label}"))
    for i, (title, _) in enumerate(LAYER_COLUMNS):
        table.add_column(title, justify="left" if i < 2 else "right", no_wrap=i in (0, 2))
    for row in profile.layers or []:
        table.add_row(*(escape(value(row)) for _, value in LAYER_COLUMNS))
    return table


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


def to_markdown(profiles: Sequence[ModelProfile]) -> str:
    """One Markdown row per model, then (if profiled) one layer table per model."""
    rows = _rows(profiles)
    parts = [
        _markdown_table(
            ["model", *(title for title, _ in rows)],
            [[p.label, *(value(p) for _, value in rows)] for p in profiles],
        )
    ]
    for p in profiles:
        if p.layers is not None:
            parts.append(f"#### Layers of {p.label}")
            parts.append(
                _markdown_table(
                    [title for title, _ in LAYER_COLUMNS],
                    [[value(r) for _, value in LAYER_COLUMNS] for r in p.layers],
                )
            )
    return "\n\n".join(parts)


def to_csv(profiles: Sequence[ModelProfile]) -> str:
    """CSV of the raw numbers, one row per model (the keys of `ModelProfile.to_dict`).

    With per-layer profiles a second CSV section follows after an empty line: one row per
    layer with the model's label in the first column.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    dicts = [{k: v for k, v in p.to_dict().items() if k != "layers"} for p in profiles]
    keys = list(dicts[0]) if dicts else []
    writer.writerow(keys)
    for d in dicts:
        writer.writerow([_csv_value(d[k]) for k in keys])
    if any(p.layers is not None for p in profiles):
        writer.writerow([])
        writer.writerow(["model", "name", "kind", "shape", "bits", "float_params", "rel_error"])
        for p in profiles:
            for r in p.layers or []:
                writer.writerow(
                    [
                        p.label,
                        r.name,
                        r.kind,
                        "x".join(map(str, r.shape)),
                        r.bits,
                        r.float_params,
                        _csv_value(r.rel_error),
                    ]
                )
    return buffer.getvalue().rstrip("\n")


def _csv_value(value: Any) -> Any:
    return "" if value is None else value


class EvalProgress:
    """A Rich progress display: a spinner while measuring, one bar per model evaluation."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, TaskID] = {}

    def __call__(self, label: str, done: int, total: int) -> None:
        if label not in self.tasks:
            self.tasks[label] = self.progress.add_task(
                f"top-1/top-5 {label}", total=total, unit="images"
            )
        self.progress.update(self.tasks[label], completed=done, total=total)


def _progress(disable: bool) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=disable,
    )


#: option name of each recipe data key (for error messages)
DATA_OPTIONS = {
    "root": "--data-root",
    "image_size": "--image-size",
    "batch_size": "--batch-size",
    "workers": "--workers",
    "val_samples": "--val-samples",
}


def data_recipe(dataset: DataChoice | None, **options: Any) -> DataRecipe | None:
    """The `DataRecipe` of the ``--data`` options (None without ``--data``); its validation
    errors are reported with the option names."""
    from mcn_compress.passes.planner import default_threads
    from mcn_compress.training.recipe import DataRecipe

    given = {k: v for k, v in options.items() if v is not None}
    if dataset is None:
        if given:
            names = ", ".join(DATA_OPTIONS[k] for k in given)
            raise ConfigError(f"{names} only apply with --data DATASET")
        return None
    given.setdefault("workers", min(4, default_threads()))
    try:
        return DataRecipe(dataset=dataset.value, **given)
    except ConfigError as exc:
        problems = getattr(exc, "problems", None)
        if not problems:
            raise
        raise ConfigError(
            "; ".join(f"{DATA_OPTIONS.get(k, k)}: {m}" if k else m for k, m in problems)
        ) from exc


def output_format(fmt: ReportFormat | None, json_output: bool) -> ReportFormat | None:
    """The format to print: ``--json`` is ``--format json``; None is the default table (not
    printed with ``--quiet``)."""
    if json_output:
        if fmt not in (None, ReportFormat.json):
            raise ConfigError(f"--json prints JSON; drop --format {fmt.value} or --json")
        return ReportFormat.json
    return fmt


def _check_plot(plot: Path | None, paths: Sequence[Path]) -> None:
    """Refuse --plot before any work: non-run paths, runs without metrics, missing matplotlib."""
    from mcn_compress.formats.atomic import check_writable
    from mcn_compress.plot import plot_format
    from mcn_compress.training.run_dir import RUN_METRICS, read_run

    if plot is None:
        return
    not_runs = [str(p) for p in paths if not p.is_dir()]
    if not_runs:
        raise ConfigError(
            f"--plot draws training curves of run directories; {', '.join(not_runs)} "
            f"{'is not one' if len(not_runs) == 1 else 'are not'}"
        )
    plot_format(plot)
    check_writable(plot)
    for path in paths:
        if not read_run(path).metrics:
            raise ConfigError(f"--plot: {path / RUN_METRICS} is missing or empty: nothing to plot")


def report_command(
    paths: Annotated[
        list[Path],
        typer.Argument(
            metavar="PATHS",
            help="MCN checkpoints (.pt), packed files (.mcn) and fine-tuning run directories.",
            show_default=False,
        ),
    ],
    fmt: Annotated[
        ReportFormat | None,
        typer.Option(
            "--format",
            "-f",
            help="Output format (default: table; --json is --format json).",
            show_default=False,
        ),
    ] = None,
    per_layer: Annotated[
        bool, typer.Option("--per-layer", help="Add a table of layers per model.")
    ] = False,
    latency: Annotated[
        bool,
        typer.Option(
            "--latency",
            help="Time one image through each eval model (CPU); MCN models also factored.",
        ),
    ] = False,
    input_size: Annotated[
        int | None,
        typer.Option(
            "--input-size", min=8, metavar="N", help="Image side for --latency (default: model's)."
        ),
    ] = None,
    float16: Annotated[
        bool, typer.Option("--float16", help="Measure packed files with float16 float parts.")
    ] = False,
    data: Annotated[
        DataChoice | None,
        typer.Option(
            "--data",
            metavar="DATASET",
            help="Also measure top-1/top-5 on the validation split of this dataset: "
            + ", ".join(get_args(DatasetName))
            + ".",
            show_default=False,
        ),
    ] = None,
    data_root: Annotated[
        str | None,
        typer.Option(
            "--data-root",
            metavar="DIR",
            help="Dataset folder (recipe data.root).",
            show_default=False,
        ),
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            "--image-size", help="Image side for --data (default: dataset's).", show_default=False
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size", help="Batch size for --data (default: 128).", show_default=False
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            help="Data loader workers for --data (default: 4, at most the CPU cores).",
            show_default=False,
        ),
    ] = None,
    val_samples: Annotated[
        int | None,
        typer.Option(
            "--val-samples",
            help="Evaluate on a fixed random subset of this many validation images.",
            show_default=False,
        ),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            metavar="FILE",
            help="Draw loss and top-1 per epoch of the run directories into this image "
            "(needs the plot extra: matplotlib).",
            show_default=False,
        ),
    ] = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Report what each model costs, measured on real files written to a temp directory.

    For each model: architecture, K, width, layer and parameter counts, the float32 original's
    file, the packed file, the theoretical minimum (bits / 8 + 4 bytes per float value) and the
    compression ratio. The float original comes first, so before and after stand side by side.
    A run directory of `mcn-compress finetune` is reported through its best.pt (else last.pt),
    with the final and best validation top-1 of its metrics.jsonl. With --data, each model's
    top-1 and top-5 accuracy on the validation split (the float original's only when its
    weights file is known and still exists).

    A packed file exported with --float-layers float16 or int8 is measured as stored (its size
    and minimum count those weights at 2 bytes, or 1 byte + a scale per output channel) and
    evaluated as stored (loading turns them back into float32, rounding included), so reporting
    the float32 and the int8 file side by side with --data shows what int8 float layers cost in
    bytes and in accuracy.

    With -q nothing is printed but errors, unless a format is asked for (--format, --json):
    scripts get the document alone.

    Examples:

    \b
      mcn-compress report model.pt
      mcn-compress report model.pt model.mcn --per-layer --format markdown
      mcn-compress report model.pt --latency --input-size 224 --json
      mcn-compress report runs/fmnist --data fashion_mnist --val-samples 1000
      mcn-compress report model.mcn model-int8.mcn --data fashion_mnist
      mcn-compress report runs/k4 runs/k2 --plot curves.png
    """
    from mcn_compress.limits import file_problem, long_component, shorten
    from mcn_compress.plot import plot_training_curves
    from mcn_compress.report_paths import profile_paths

    errors_only(quiet)
    with cli_errors():
        fmt = output_format(fmt, json_output)
        data_cfg = data_recipe(
            data,
            root=data_root,
            image_size=image_size,
            batch_size=batch_size,
            workers=workers,
            val_samples=val_samples,
        )
        for path in paths:  # before anything stats them: a name the OS refuses is one line
            if long_component(path) is not None:
                raise ConfigError(f"{shorten(path)} {file_problem(path)}")
        _check_plot(plot, paths)
        # machine formats stay quiet on stderr; a non-terminal gets no live display at all
        machine = fmt in (ReportFormat.json, ReportFormat.csv)
        with _progress(disable=quiet or machine or not err.is_interactive) as progress:
            measuring = progress.add_task("measuring", total=None, unit="")
            profiles = profile_paths(
                paths,
                float16=float16,
                per_layer=per_layer,
                latency=latency,
                input_size=input_size,
                data=data_cfg,
                progress=EvalProgress(progress),
            )
            progress.remove_task(measuring)
        if plot is not None:
            plot_training_curves(paths, plot)
    if fmt is None and quiet:  # -q alone: errors only (a format asked for is still printed)
        return
    if fmt is ReportFormat.json:
        print_json({"models": [p.to_dict() for p in profiles]})
    elif fmt is ReportFormat.csv:
        typer.echo(to_csv(profiles))
    elif fmt is ReportFormat.markdown:
        typer.echo(to_markdown(profiles))
    else:
        out.print(summary_table(profiles))
        for p in profiles:
            if p.layers is not None:
                out.print(layer_table(p))
