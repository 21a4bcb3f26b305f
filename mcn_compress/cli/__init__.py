"""Command-line interface: `mcn-compress COMMAND` (one thin module per command)."""

from __future__ import annotations

from typing import Annotated

import typer

from mcn_compress.cli._common import Command, setup_logging
from mcn_compress.cli.convert import convert_command
from mcn_compress.cli.export import export_command
from mcn_compress.cli.finetune import finetune_command
from mcn_compress.cli.quickstart import quickstart_command
from mcn_compress.cli.report import report_command
from mcn_compress.version import __version__

app = typer.Typer(
    name="mcn-compress",
    help="Turn pretrained classifiers into Modulated Convolutional Networks (1-bit filters).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: rewrapped to the terminal, no boxes
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mcn-compress {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show version.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more detail.")] = False,
) -> None:
    """mcn-compress: convert, fine-tune, report and export binarized networks."""
    setup_logging(quiet=not verbose)


COMMANDS = {
    "convert": (convert_command, "Convert a float classifier into an MCN checkpoint."),
    "finetune": (finetune_command, "Fine-tune an MCN with the MCN loss (a YAML recipe)."),
    "quickstart": (quickstart_command, "The whole job on Fashion-MNIST, offline, on a CPU."),
    "export": (export_command, "Export a packed 1-bit file or ONNX."),
    "report": (report_command, "Sizes, accuracy and latency of models and runs."),
}
for _name, (_function, _short) in COMMANDS.items():
    app.command(_name, cls=Command, short_help=_short)(_function)


def main() -> None:
    """Console-script entry point."""
    app()
