"""Factored vs dense ONNX at each onnxruntime thread count (docs/design.md section 4.8).

For each model (timm, ``pretrained=False``, K=4 keep) the MCN is exported twice per thread
count T: ``--compute dense`` and ``--compute auto --threads T`` (the default export, planned for
T threads). Each file then runs in its own Python process with T intra-op threads (one
onnxruntime session per process: sessions of one process would share the cores with each
other's spinning thread pools), the processes alternating file by file for ``--repeats``
rounds; a process times ``--runs`` runs after 5 warm-up runs and reports their median, and the
table gives the median over rounds and the ratio auto / dense. Outputs of the two files are
checked against the PyTorch model (1e-4 relative). Run it on an otherwise idle machine: a busy
second core makes every 2-thread number meaningless.

Usage:
    python benchmarks/onnx_threads.py                       # resnet50, resnet18, densenet121
    python benchmarks/onnx_threads.py --models resnet34 --threads 1,2,4 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mcn_compress import MCNConfig, convert, export_onnx, load_float_model

CHILD = r"""
import sys, time, statistics, numpy as np, onnxruntime as ort
options = ort.SessionOptions()
options.intra_op_num_threads = int(sys.argv[2])
options.inter_op_num_threads = 1
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name
x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
for _ in range(5):
    session.run(None, {name: x})
times = []
for _ in range(int(sys.argv[3])):
    start = time.perf_counter()
    session.run(None, {name: x})
    times.append(time.perf_counter() - start)
print(1e3 * statistics.median(times))
"""


def _mcn(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = load_float_model(name, pretrained=False).eval()
    with torch.no_grad():  # timm zero-inits the last BN scale of each block: make it 1
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d) and not module.weight.any():
                module.weight.fill_(1.0)
    return convert(model, MCNConfig(planes=4)).eval()


def _time(path: Path, threads: int, runs: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(threads), str(runs)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def _check(model: nn.Module, path: Path) -> None:
    import onnxruntime as ort

    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = model(x).numpy()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    del session
    error = float(np.abs(got - ref).max() / np.abs(ref).max())
    assert error <= 1e-4, f"{path.name}: relative error {error:.2e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="resnet50,resnet18,densenet121")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    counts = [int(t) for t in args.threads.split(",")]
    torch.set_num_threads(1)  # no OpenMP pool of this process spinning beside the timed ones
    print("| model | threads | dense ms | auto ms | auto / dense | speed-up | layers factored |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model = _mcn(name)
            dense = export_onnx(model, Path(tmp) / "dense.onnx", compute="dense", input_size=224)
            _check(model, dense.path)
            for threads in counts:
                auto = export_onnx(
                    model,
                    Path(tmp) / f"auto{threads}.onnx",
                    compute="auto",
                    threads=threads,
                    input_size=224,
                )
                _check(model, auto.path)
                times: dict[str, list[float]] = {"dense": [], "auto": []}
                for _ in range(args.repeats):
                    times["dense"].append(_time(dense.path, threads, args.runs))
                    times["auto"].append(_time(auto.path, threads, args.runs))
                d, a = (statistics.median(times[k]) for k in ("dense", "auto"))
                count = f"{len(auto.factored_layers)} of {len(auto.packed_layers)}"
                row = [name, str(threads), f"{d:.2f}", f"{a:.2f}", f"**{a / d:.3f}**"]
                print("| " + " | ".join([*row, f"{d / a:.2f}x", count]) + " |", flush=True)


if __name__ == "__main__":
    main()
