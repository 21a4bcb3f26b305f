"""Shared CLI pieces: consoles, the error-to-exit mapping, logging, reused option types."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler

from mcn_compress.errors import MCNError

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

DEBUG_ENV = "MCN_DEBUG"


def error_line(message: str) -> None:
    """Print one red error line on stderr."""
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True, markup=True, emoji=False)


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Map library errors to one red line and exit 1 (``MCN_DEBUG=1`` shows the traceback)."""
    try:
        yield
    except MCNError as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        error_line(str(exc).replace("[", "\\["))
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        error_line("interrupted")
        raise typer.Exit(130) from None


def setup_logging(quiet: bool) -> None:
    """Route library logs through Rich on stderr; warnings only with ``--quiet``."""
    level = logging.WARNING if quiet else logging.INFO
    root = logging.getLogger("mcn_compress")
    root.handlers.clear()
    handler = RichHandler(console=err, show_time=False, show_path=False, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def print_json(data: Any) -> None:
    """Write ``data`` as JSON on stdout (plain, machine-readable)."""
    typer.echo(json.dumps(data, indent=2, default=str))


JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print a JSON result on stdout instead of tables.")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output file (written atomically).")]
