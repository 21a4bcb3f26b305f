"""The Fashion-MNIST benchmark's table over seeds: mean, sample sd, paired differences."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from mcn_compress.experiments.fashion_mnist import VariantResult

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fashion_mnist.py"
_spec = importlib.util.spec_from_file_location("fashion_mnist_benchmark", _SCRIPT)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _result(label: str, top1: float, bits: int = 100) -> VariantResult:
    return VariantResult(label, top1, 99.0, bits, 3200, 250.0, 15.0, Path("."))


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip("|").split("|")]


def test_several_seeds_give_mean_sd_and_paired_differences() -> None:
    k4 = [_result("k4", t) for t in (90.0, 90.5, 89.5)]
    ablation = [_result("ablation", t) for t in (89.0, 90.5, 89.9)]
    lines = bench.table([k4, ablation], reference=k4)
    head = _cells(lines[0])
    assert head[:4] == ["variant", "top-1", "top-1 per seed", "vs keep K=4 (paired)"]
    row = dict(zip(head, _cells(lines[3]), strict=True))
    values = [89.0, 90.5, 89.9]
    mean = sum(values) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)  # sample sd (n - 1)
    assert row["top-1"] == f"{mean:.2f} ± {sd:.2f}"
    assert row["top-1 per seed"] == "89.00 / 90.50 / 89.90"
    diffs = [-1.0, 0.0, 0.4]
    dmean = sum(diffs) / 3
    dsd = math.sqrt(sum((d - dmean) ** 2 for d in diffs) / 2)
    assert row["vs keep K=4 (paired)"] == f"{dmean:.2f} ± {dsd:.2f}"  # negative: sign kept
    assert row["vs float"] == "1/32"
    assert _cells(lines[2])[3] == "-"  # the reference row against itself


def test_one_seed_keeps_the_single_run_table() -> None:
    lines = bench.table([[_result("float", 91.25, bits=3200)], [_result("k4", 90.35)]], None)
    assert _cells(lines[0])[:2] == ["variant", "top-1"] and "top-1 per seed" not in lines[0]
    assert _cells(lines[2])[1] == "91.25" and _cells(lines[2])[6] == "1"
    assert _cells(lines[3])[1] == "90.35"


def test_positive_differences_carry_a_plus_sign() -> None:
    assert bench.signed([0.5, 0.1]) == "+0.30 ± 0.28"
