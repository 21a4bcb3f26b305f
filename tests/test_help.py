"""``--help`` of every command at 80 columns: no Typer value hints, no stray spaces, prose
rewrapped (no line broken mid-sentence), and finetune names the recipe and a CPU run."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from mcn_compress.cli import app

COMMANDS = ["", "convert", "finetune", "export", "report", "quickstart"]


def _help(command: str) -> str:
    args = [command, "--help"] if command else ["--help"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    return result.stdout


def _prose(text: str) -> list[list[str]]:
    """The paragraphs of the description (before Arguments/Options/Commands) that are prose:
    indented by two spaces, not a verbatim block (examples, tables)."""
    head = re.split(r"^(?:Arguments|Options|Commands):$", text, flags=re.M)[0]
    paragraphs = [p.splitlines() for p in head.split("\n\n")[1:]]
    return [p for p in paragraphs if p and all(re.match(r"  \S", line) for line in p)]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_fits_80_columns_without_value_hints(command: str) -> None:
    text = _help(command)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert not re.search(r"<(bool|str|int|float|path|list)", text), text
    assert not re.search(r"\w [.,](?!\.)", text) and "{" not in text.splitlines()[0]
    assert not re.search(r"--\w[\w-]* \[?[A-Z]*\]? *<", text)
    for paragraph in _prose(text):  # wrapped by the formatter: only the last line is short
        assert all(len(line) >= 50 for line in paragraph[:-1]), paragraph


def test_finetune_help_names_the_recipe_and_a_cpu_run() -> None:
    text = _help("finetune")
    block = text[text.index("A recipe is YAML") : text.index("Examples:")]
    for section, key in [
        ("model", "num_classes"),
        ("data", "root"),
        ("optim", "epochs"),
        ("loss", "theta"),
        ("runtime", "device"),
        ("output", "dir"),
    ]:
        assert re.search(rf"^ +{section} +\S", block, flags=re.M), section
        assert key in block
    assert "--set runtime.device=cpu" in text and "recipes/imagenet.yaml" in text
    assert "DIR/train/<class>/*.jpg" in text


def test_help_needs_no_pytorch() -> None:
    """The CLI and the package root import PyTorch only when a command runs, so `--help`
    answers at once; the API still resolves its names on first use."""
    import subprocess
    import sys

    code = (
        "import sys, mcn_compress, mcn_compress.cli; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "mcn_compress.convert; assert 'torch' in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
