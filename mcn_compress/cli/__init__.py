"""Command-line interface: `mcn-compress COMMAND` (one thin module per command)."""

from __future__ import annotations

from typing import Annotated

import typer

from mcn_compress.cli._common import setup_logging
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


app.command("convert")(convert_command)
app.command("finetune")(finetune_command)
app.command("quickstart")(quickstart_command)
app.command("export")(export_command)
app.command("report")(report_command)


def main() -> None:
    """Console-script entry point."""
    app()
