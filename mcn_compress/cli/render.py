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
    if summary.calibration_images:
        table.add_row("calibration", calibration_text(summary.to_dict()))
    if not summary.traced:
        table.add_row("[yellow]FX trace[/]", f"failed, module swap used ({summary.trace_error})")
    return table


def calibration_text(conversion: dict[str, object]) -> str:
    """The calibration of a conversion summary's `to_dict` (also as stored in checkpoint
    metadata) in words: images, distillation steps, KL; "-" when it was not calibrated."""
    images = conversion.get("calibration_images") or 0
    if not images:
        return "-"
    steps = conversion.get("calibration_steps") or 0
    text = f"{images:,} images, " + (f"{steps:,} distillation steps" if steps else "BatchNorm only")
    kl = conversion.get("calibration_kl")
    if isinstance(kl, list | tuple) and len(kl) == 2:
        text += f", KL to float {kl[0]:.3f} -> {kl[1]:.3f}"
    top1 = conversion.get("calibration_top1")
    if isinstance(top1, int | float):
        text += f", top-1 {top1:.2f}%"
    return text
