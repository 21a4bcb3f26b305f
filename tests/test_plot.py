"""Tests of `mcn_compress.plot`: training curves of run folders."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from report_helpers import run

from mcn_compress import (
    ConfigError,
)
from mcn_compress.plot import plot_training_curves


def test_plot_training_curves_writes_an_image(run_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is not installed")
    from matplotlib.image import imread

    out = plot_training_curves([run_dir, run_dir], tmp_path / "curves.png")
    image = imread(out)
    assert image.ndim == 3 and image.shape[1] > image.shape[0] > 200  # two panels side by side
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # no temporary file left


def test_plot_without_matplotlib_says_which_extra(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.ticker"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ConfigError, match=r"pip install 'mcn-compress\[plot\]'"):
        plot_training_curves([run_dir], tmp_path / "curves.png")
    result = run(str(run_dir), "--plot", str(tmp_path / "curves.png"))
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "error: plotting needs matplotlib: install the plot extra: pip install 'mcn-compress[plot]'"
    ]
    assert list(tmp_path.iterdir()) == []
