"""ONNX export goals (docs/design.md section 6): file size and onnxruntime CPU latency of the packed
layout against the folded one and the packed ``.mcn`` file, timm resnet18 at K = 4.

Goals: packed ONNX within 5% of the ``.mcn`` file's bytes; packed latency within 1.1x of folded
(the bits are unpacked once, when the session is created, not per inference).

The float model is built with ``pretrained=False``. timm's random init zeroes the last
BatchNorm scale of every residual block (``zero_init_last``); folded into the conv those
weights would be all zero and the exporter would merge equal initializers, which a trained model
never allows, so those scales are reset to 1 before conversion. Latency: median over ``--runs``
single-image (224 x 224) runs after session creation and ``--warmup`` runs, the two layouts
interleaved in ``--rounds`` rounds, with 1 intra-op thread and with onnxruntime's default.

Usage: python benchmarks/onnx_export.py [--model resnet18] [--planes 4] [--runs 50]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from mcn_compress import MCNConfig, convert, export_onnx, export_packed, load_float_model


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _session(path: Path, threads: int) -> tuple[ort.InferenceSession, float]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0 = onnxruntime's default
    start = time.perf_counter()
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return sess, time.perf_counter() - start


def _latencies(
    paths: dict[str, Path], x: np.ndarray, threads: int, runs: int, warmup: int, rounds: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median latency (s) and session creation time (s) per layout, layouts interleaved."""
    sessions = {name: _session(path, threads) for name, path in paths.items()}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for sess, _ in sessions.values():
        for _ in range(warmup):
            sess.run(None, {"input": x})
    per_round = max(1, runs // rounds)
    for _ in range(rounds):
        for name, (sess, _) in sessions.items():
            for _ in range(per_round):
                start = time.perf_counter()
                sess.run(None, {"input": x})
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return medians, {name: created for name, (_, created) in sessions.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--planes", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    float_model = load_float_model(args.model, pretrained=False).eval()
    with torch.no_grad():
        for module in float_model.modules():
            if isinstance(module, nn.BatchNorm2d) and not module.weight.any():
                module.weight.fill_(1.0)
    model = convert(float_model, MCNConfig(planes=args.planes)).eval()
    x = np.random.default_rng(0).standard_normal((1, 3, args.size, args.size), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        mcn_path = export_packed(model, root / "model.mcn")
        paths: dict[str, Path] = {}
        export_s: dict[str, float] = {}
        for weights in ("packed", "folded"):
            start = time.perf_counter()
            paths[weights] = export_onnx(
                model, root / f"{weights}.onnx", weights=weights, input_size=args.size
            ).path
            export_s[weights] = time.perf_counter() - start
        sizes = {"mcn": mcn_path.stat().st_size} | {k: p.stat().st_size for k, p in paths.items()}
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        for weights, path in paths.items():
            out = _session(path, 1)[0].run(None, {"input": x})[0]
            err = float(np.abs(out - ref).max() / np.abs(ref).max())
            assert err <= 1e-4, f"{weights}: relative error {err:.2e} against PyTorch"
        latency = {
            threads: _latencies(paths, x, threads, args.runs, args.warmup, args.rounds)
            for threads in (1, 0)
        }

    print(f"## ONNX export: timm {args.model}, K={args.planes}, input 1x3x{args.size}x{args.size}")
    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}, CPU execution provider\n")
    rows = [
        [".mcn (packed 1-bit file)", f"{sizes['mcn']:,}", "1.000", "-"],
        [
            "ONNX, packed weights",
            f"{sizes['packed']:,}",
            f"{sizes['packed'] / sizes['mcn']:.3f}",
            f"{export_s['packed']:.1f}",
        ],
        [
            "ONNX, folded weights",
            f"{sizes['folded']:,}",
            f"{sizes['folded'] / sizes['mcn']:.3f}",
            f"{export_s['folded']:.1f}",
        ],
    ]
    print(_table(["file", "bytes", "/ .mcn", "export s"], rows))
    print()
    rows = []
    for threads, (medians, created) in latency.items():
        label = "1" if threads == 1 else "default"
        rows.append(
            [
                label,
                f"{medians['packed'] * 1e3:.2f}",
                f"{medians['folded'] * 1e3:.2f}",
                f"{medians['packed'] / medians['folded']:.3f}",
                f"{created['packed'] * 1e3:.0f} / {created['folded'] * 1e3:.0f}",
            ]
        )
    print(
        _table(
            [
                "intra-op threads",
                "packed ms (median)",
                "folded ms (median)",
                "packed / folded",
                "session creation ms (packed / folded)",
            ],
            rows,
        )
    )
    ratio = sizes["packed"] / sizes["mcn"]
    worst = max(m["packed"] / m["folded"] for m, _ in latency.values())
    print(
        f"\ngoals: size packed ONNX / .mcn = {ratio:.3f} (<= 1.05: "
        f"{'met' if ratio <= 1.05 else 'NOT met'}); latency packed / folded, worst = "
        f"{worst:.3f} (<= 1.1: {'met' if worst <= 1.1 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
