"""`mcn-compress report PATH [PATH ...]`: sizes (real files), counts and latency, side by side.

Numbers come from `mcn_compress.report` (profiles); this module only renders them as a Rich
table (one column per model), Markdown, JSON or CSV.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from mcn_compress.cli._common import cli_errors, err, out, print_json
from mcn_compress.report import LayerProfile, ModelProfile


class ReportFormat(str, Enum):
    table = "table"
    markdown = "markdown"
    json = "json"
    csv = "csv"


def _int(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


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
    ("theoretical min bytes", lambda p: _int(p.min_bytes)),
    ("overhead vs min", lambda p: f"{p.overhead:+.2%}"),
    ("within 1% + 16 KiB", lambda p: "yes" if p.within_bound else "NO"),
    ("compression vs float32", lambda p: f"{p.ratio:.2f}x"),
]
LATENCY_ROW: tuple[str, Callable[[ModelProfile], str]] = (
    "latency ms/image",
    lambda p: "-" if p.latency_ms is None else f"{p.latency_ms:.2f}",
)
LAYER_COLUMNS: list[tuple[str, Callable[[LayerProfile], str]]] = [
    ("layer", lambda r: r.name),
    ("kind", lambda r: r.kind),
    ("shape", lambda r: "x".join(map(str, r.shape)) or "-"),
    ("bits", lambda r: _int(r.bits)),
    ("float params", lambda r: _int(r.float_params)),
    ("rel. error", lambda r: "-" if r.rel_error is None else f"{r.rel_error:.4f}"),
]


def _rows(profiles: Sequence[ModelProfile]) -> list[tuple[str, Callable[[ModelProfile], str]]]:
    with_latency = any(p.latency_ms is not None for p in profiles)
    return [*ROWS, LATENCY_ROW] if with_latency else list(ROWS)


def summary_table(profiles: Sequence[ModelProfile]) -> Table:
    """One row per quantity, one column per model: before and after side by side."""
    table = Table(title="Model size (real files)")
    table.add_column("", no_wrap=True)
    for p in profiles:
        table.add_column(p.label, justify="right", overflow="fold")
    for title, value in _rows(profiles):
        table.add_row(title, *(value(p) for p in profiles))
    return table


def layer_table(profile: ModelProfile) -> Table:
    """Per-layer bits, float parameters and reconstruction error of one model."""
    table = Table(title=f"Layers of {profile.label}")
    for i, (title, _) in enumerate(LAYER_COLUMNS):
        table.add_column(title, justify="left" if i < 2 else "right", no_wrap=i in (0, 2))
    for row in profile.layers or []:
        table.add_row(*(value(row) for _, value in LAYER_COLUMNS))
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


def report_command(
    paths: Annotated[
        list[Path],
        typer.Argument(help="MCN checkpoints (.pt) and packed files (.mcn).", show_default=False),
    ],
    fmt: Annotated[ReportFormat, typer.Option("--format", "-f", help="Output format.")] = (
        ReportFormat.table
    ),
    per_layer: Annotated[
        bool, typer.Option("--per-layer", help="Add a table of layers per model.")
    ] = False,
    latency: Annotated[
        bool, typer.Option("--latency", help="Time one image through each eval model (CPU).")
    ] = False,
    input_size: Annotated[
        int | None,
        typer.Option("--input-size", min=8, help="Image side for --latency (default: model's)."),
    ] = None,
    float16: Annotated[
        bool, typer.Option("--float16", help="Measure packed files with float16 float parts.")
    ] = False,
) -> None:
    """Report what each model costs, measured on real files written to a temp directory.

    For each model: architecture, K, width, layer and parameter counts, the float32 original's
    file, the packed file, the theoretical minimum (bits / 8 + 4 bytes per float value) and the
    compression ratio. The float original comes first, so before and after stand side by side.

    Examples:

      mcn-compress report model.pt

      mcn-compress report model.pt model.mcn --per-layer --format markdown

      mcn-compress report model.pt --latency --input-size 224 --format json
    """
    from mcn_compress.report import profile_paths

    with cli_errors():
        with (
            err.status("Measuring", spinner="dots") if fmt is ReportFormat.table else nullcontext()
        ):
            profiles = profile_paths(
                paths,
                float16=float16,
                per_layer=per_layer,
                latency=latency,
                input_size=input_size,
            )
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
