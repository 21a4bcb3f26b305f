"""MCN W1A8 against int8 post-training quantization in onnxruntime (docs/design.md 4.10).

Table 1, latency: for each model (timm, ``pretrained=False`` weights: latency does not depend
on their values), at 224x224, four ONNX files with a symbolic batch:

- ``float32``: the float model (BatchNorm folded);
- ``int8 PTQ``: that file through ``onnxruntime.quantization.quantize_static`` (QDQ,
  per-channel int8 weights, uint8 activations, MinMax) on the calibration images;
- ``MCN W1A32``: the K=4 keep MCN, ``export -f onnx`` (``--compute auto``, planned for T);
- ``MCN W1A8``: the same MCN, ``export -f onnx --activations int8`` (planned for T), its
  ranges from the same calibration images.

Each file runs in its own Python process with T intra-op threads (one onnxruntime session
per process: sessions in one process share the cores with each other's spinning thread
pools), the processes alternating file by file for ``--repeats`` rounds (in a new order each
round); a process times ``--runs`` runs after 5 warm-up runs and prints their median; the
table gives the median over rounds, its ratio to int8 PTQ, and the file's bytes. Run it on an
otherwise idle machine: a busy second core makes 2-thread numbers meaningless.

Table 2, accuracy (``--quickstart DIR``, the folder `mcn-compress quickstart` wrote): top-1 on
the Fashion-MNIST test set of its float model as float32 and int8 PTQ, and of its MCN as W1A32
and W1A8, the int8 ranges from 256 training images.

Usage:
    python benchmarks/versus_int8.py                              # resnet18, resnet50, mbv2
    python benchmarks/versus_int8.py --models resnet18 --threads 1 --batches 1 --repeats 3
    python benchmarks/versus_int8.py --models "" --quickstart runs/quickstart
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

from mcn_compress import MCNConfig, convert, export_onnx, load, load_float_model

CHILD = r"""
import sys, time, statistics, numpy as np, onnxruntime as ort
options = ort.SessionOptions()
options.intra_op_num_threads = int(sys.argv[2])
options.inter_op_num_threads = 1
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
info = session.get_inputs()[0]
shape = [int(sys.argv[4])] + [int(d) for d in info.shape[1:]]
x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
for _ in range(5):
    session.run(None, {info.name: x})
times = []
for _ in range(int(sys.argv[3])):
    start = time.perf_counter()
    session.run(None, {info.name: x})
    times.append(time.perf_counter() - start)
print(1e3 * statistics.median(times))
"""

CALIBRATION_IMAGES = 256
KINDS = ("float32", "int8 PTQ", "MCN W1A32", "MCN W1A8")


def _float_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = load_float_model(name, pretrained=False).eval()
    with torch.no_grad():  # timm zero-inits the last BN scale of each block: make it 1
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d) and not module.weight.any():
                module.weight.fill_(1.0)
    return model


def _time(path: Path, threads: int, runs: int, batch: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(threads), str(runs), str(batch)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def int8_ptq(float_onnx: Path, out: Path, images: list[torch.Tensor]) -> Path:
    """``quantize_static`` of ``float_onnx`` (the settings `--activations int8` uses)."""
    import onnx

    from mcn_compress.formats.onnx_w1a8 import ImageReader, quantize_qdq

    proto = onnx.load(float_onnx)
    reader = ImageReader(proto.graph.input[0].name, images, len(images))
    onnx.save(quantize_qdq(proto, reader), out)
    return out


def _files(
    name: str, folder: Path, threads: int, images: list[torch.Tensor], size: int
) -> dict[str, Path]:
    model = _float_model(name)
    float_path = folder / f"{name}-float32.onnx"
    if not float_path.exists():
        export_onnx(model, float_path, weights="folded", input_size=size, dynamic_batch=True)
        int8_ptq(float_path, folder / f"{name}-int8.onnx", images)
    mcn = convert(model, MCNConfig(planes=4)).eval()
    common = {"input_size": size, "dynamic_batch": True, "threads": threads, "compute": "auto"}
    w1a32 = export_onnx(mcn, folder / f"{name}-w1a32-{threads}.onnx", **common)
    w1a8 = export_onnx(
        mcn,
        folder / f"{name}-w1a8-{threads}.onnx",
        activations="int8",
        calibration=images,
        calibration_images=len(images),
        **common,
    )
    return dict(
        zip(KINDS, (float_path, folder / f"{name}-int8.onnx", w1a32.path, w1a8.path), strict=True)
    )


def latency_table(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    images = [torch.randn(1, 3, args.size, args.size) for _ in range(args.images)]
    print(
        "| model | threads | batch | "
        + " | ".join(f"{k} ms" for k in KINDS)
        + " | W1A8 / int8 PTQ | W1A32 / int8 PTQ | bytes: "
        + " / ".join(KINDS)
        + " |"
    )
    print("|---|---|---|" + "---|" * (len(KINDS) + 3))
    with tempfile.TemporaryDirectory() as tmp:
        for name in [m for m in args.models.split(",") if m]:
            for threads in (int(t) for t in args.threads.split(",")):
                files = _files(name, Path(tmp), threads, images, args.size)
                for batch in (int(b) for b in args.batches.split(",")):
                    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
                    for round_ in range(args.repeats):  # a new order each round
                        for index in range(len(KINDS)):
                            kind = KINDS[(index + round_) % len(KINDS)]
                            times[kind].append(_time(files[kind], threads, args.runs, batch))
                    ms = {kind: statistics.median(times[kind]) for kind in KINDS}
                    ptq = ms["int8 PTQ"]
                    sizes = " / ".join(f"{files[k].stat().st_size:,}" for k in KINDS)
                    row = [
                        name,
                        str(threads),
                        str(batch),
                        *(f"{ms[k]:.2f}" for k in KINDS),
                        f"**{ms['MCN W1A8'] / ptq:.3f}**",
                        f"{ms['MCN W1A32'] / ptq:.3f}",
                        sizes,
                    ]
                    print("| " + " | ".join(row) + " |", flush=True)


def _top1(path: Path, images: torch.Tensor, labels: torch.Tensor) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    correct = 0
    for start in range(0, len(images), 256):
        x = images[start : start + 256].numpy()
        logits = session.run(None, {name: x})[0]
        correct += int((np.argmax(logits, 1) == labels[start : start + 256].numpy()).sum())
    return 100.0 * correct / len(images)


def accuracy_table(folder: Path) -> None:
    from mcn_compress.data import build_datasets
    from mcn_compress.training.recipe import DataRecipe

    float_ckpt = next(p for p in (folder / "float/best.pt", folder / "float/last.pt") if p.exists())
    float_model, mcn = load(float_ckpt).eval(), load(folder / "mcn/best.pt").eval()
    recipe = DataRecipe(dataset="fashion_mnist", augment=False, train_samples=CALIBRATION_IMAGES)
    train, test = build_datasets(recipe, mcn, seed=0)
    calib = [train[i][0].unsqueeze(0) for i in range(len(train))]
    images = torch.stack([test[i][0] for i in range(len(test))])
    labels = torch.tensor([int(test[i][1]) for i in range(len(test))])
    print("| model | top-1 | file bytes |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        size = tuple(images.shape[1:])
        rows = {
            "float32": export_onnx(
                float_model,
                Path(tmp, "f.onnx"),
                weights="folded",
                input_size=size,
                dynamic_batch=True,
            ).path,
        }
        rows["int8 PTQ"] = int8_ptq(rows["float32"], Path(tmp, "q.onnx"), calib)
        rows["MCN W1A32"] = export_onnx(
            mcn, Path(tmp, "w1a32.onnx"), compute="auto", input_size=size, dynamic_batch=True
        ).path
        rows["MCN W1A8"] = export_onnx(
            mcn,
            Path(tmp, "w1a8.onnx"),
            activations="int8",
            calibration=calib,
            calibration_images=len(calib),
            compute="auto",
            input_size=size,
            dynamic_batch=True,
        ).path
        for kind, path in rows.items():
            top1 = _top1(path, images, labels)
            print(f"| {kind} | {top1:.2f} | {path.stat().st_size:,} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="resnet18,resnet50,mobilenetv2_100")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=64, help="calibration images (random)")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quickstart", type=Path, help="also the Fashion-MNIST top-1 table")
    args = parser.parse_args()
    torch.set_num_threads(1)  # no OpenMP pool of this process spinning beside the timed ones
    latency_table(args)
    if args.quickstart is not None:
        accuracy_table(args.quickstart)


if __name__ == "__main__":
    main()
