"""Shared CLI pieces: consoles, the error-to-exit mapping, logging, reused option types."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from typer.core import TyperCommand

from mcn_compress.errors import ConfigError, MCNError, first_line

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

DEBUG_ENV = "MCN_DEBUG"


def error_line(message: str) -> None:
    """Print one red error line on stderr."""
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True, markup=True, emoji=False)


def _message(exc: BaseException) -> str:
    """The message of ``exc`` on one line. An error raised in a DataLoader worker comes back
    as "Caught DataError in DataLoader worker process 0. Original Traceback ...": its last
    line holds the original message."""
    text = str(exc).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.partition(": ")[2] or last
    return " ".join(line.strip() for line in text.splitlines()) or type(exc).__name__


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Map library errors to one red line and exit 1 (``MCN_DEBUG=1`` shows the traceback)."""
    try:
        yield
    except MCNError as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        error_line(_message(exc).replace("[", "\\["))
        raise typer.Exit(1) from None
    except OSError as exc:  # a file the library did not name itself: still one line
        if os.environ.get(DEBUG_ENV):
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        error_line(f"{where}{exc.strerror or first_line(exc)}".replace("[", "\\["))
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


def errors_only(quiet: bool) -> None:
    """With ``--quiet``, library logs below ERROR are dropped too: -q prints errors only."""
    if quiet:
        logging.getLogger("mcn_compress").setLevel(logging.ERROR)


def print_json(data: Any) -> None:
    """Write ``data`` as JSON on stdout (plain, machine-readable)."""
    typer.echo(json.dumps(data, indent=2, default=str))


JsonOpt = Annotated[
    bool,
    typer.Option("--json", help="Print one JSON document on stdout (nothing else there)."),
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="Print nothing but errors (one line on stderr).")
]
OutOpt = Annotated[
    Path, typer.Option("--out", "-o", metavar="FILE", help="Output file (written atomically).")
]


def _metavar(param: Any) -> str:
    """A plain value name for an option that names none: its choices, N for integers, X for
    numbers, PATH for paths, TEXT otherwise (never Typer's ``<int>`` hints). Reads Typer's type
    descriptor (Typer >= 0.25) or click's parameter type (older Typer)."""
    desc = getattr(param, "type_descriptor", None)
    kind = getattr(param, "type", None)
    choices = getattr(desc, "choices", None) or getattr(kind, "choices", None)
    if choices:
        return "|".join(str(getattr(c, "value", c)) for c in choices)
    annotation = getattr(desc, "annotation", None)
    name = str(getattr(kind, "name", ""))
    if annotation is int or name.startswith("integer"):
        return "N"
    if annotation is float or name.startswith("float"):
        return "X"
    if getattr(desc, "is_path", False) or name == "path":
        return "PATH"
    return "TEXT"


class Command(TyperCommand):
    """A command whose ``--help`` is click's plain layout: paragraphs rewrapped to the terminal,
    flags without a value hint, value options with a plain name (``--planes K``), arguments
    by their upper-case name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            option = param.param_type_name == "option"
            if option and getattr(param, "is_flag", False):
                param.metavar = ""
            elif param.metavar is None:
                param.metavar = _metavar(param) if option else (param.name or "ARG").upper()

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        """``[OPTIONS] MODEL`` (Typer writes a required argument as ``{MODEL}``)."""
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = str(param.metavar) if param.required else f"[{param.metavar}]"
                pieces.append(name + ("..." if param.nargs != 1 else ""))
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        """The Arguments and Options sections; an argument is listed by its name alone."""
        args, opts = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                name = str(param.metavar) + ("..." if param.nargs != 1 else "")
                args.append((name, record[1]))
            else:
                opts.append(record)
        for title, rows in (("Arguments", args), ("Options", opts)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def parse_input_size(text: str | None) -> tuple[int, ...] | None:
    """``224``, ``224,192`` or ``3,224,224`` (``x`` also separates) -> a tuple of ints."""
    if text is None:
        return None
    parts = [p.strip() for p in re.split(r"[,x]", text.strip())]
    if not 1 <= len(parts) <= 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(
            f"--input-size {text!r}: give S, H,W or C,H,W as positive integers (e.g. 3,224,224)"
        )
    return tuple(int(p) for p in parts)
