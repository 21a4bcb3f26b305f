"""Rich renderings of library results (no computation beyond formatting)."""

from __future__ import annotations

from rich.table import Table

from mcn_compress.passes.summary import ConversionSummary


def human_bits(bits: int) -> str:
    """Bits as a human-readable byte size."""
    size = bits / 8
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def layer_table(summary: ConversionSummary) -> Table:
    """One row per conv: converted (with reconstruction error) or float (with the reason)."""
    table = Table(title=f"Layers (K={summary.planes}, width {summary.width})", show_lines=False)
    table.add_column("layer", no_wrap=True)
    table.add_column("shape", justify="right", no_wrap=True)
    table.add_column("kind")
    table.add_column("rel. error", justify="right")
    table.add_column("reason", overflow="fold")
    for layer in summary.layers:
        kh, kw = layer.kernel_size
        shape = f"{layer.out_channels}x{layer.in_channels // layer.groups}x{kh}x{kw}"
        if layer.converted:
            error = f"{layer.rel_error:.3f}" if layer.rel_error is not None else "-"
            table.add_row(layer.name, shape, "[green]MCN[/]", error, "")
        else:
            table.add_row(layer.name, shape, "[yellow]float[/]", "-", layer.reason)
    return table


def summary_table(summary: ConversionSummary, title: str = "Summary") -> Table:
    """Totals: layer counts, binary and float parameters, conv-weight compression."""
    table = Table(title=title, show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("converted convs", str(len(summary.converted)))
    table.add_row("float convs", str(len(summary.kept_float)))
    table.add_row("binary parameters (1 bit)", f"{summary.binary_params:,}")
    table.add_row("float parameters", f"{summary.float_params:,}")
    table.add_row(
        "conv weights",
        f"{human_bits(summary.conv_float_bits)} -> {human_bits(summary.conv_mcn_bits)}",
    )
    table.add_row("conv-weight compression", f"{summary.conv_compression:.1f}x")
    if not summary.traced:
        table.add_row("[yellow]FX trace[/]", f"failed, module swap used ({summary.trace_error})")
    return table
