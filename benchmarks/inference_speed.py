"""Inference speed of the factored compute (docs/design.md section 4.8): float vs MCN dense vs
MCN factored, in PyTorch eager and onnxruntime (CPU), measured in one process.

Engines per row: PyTorch eager (float model in eval mode; MCN model in eval mode, which
convolves with the cached dense Q; `optimize_for_inference`, factored where the rule says so,
BatchNorm folded) and onnxruntime (float model exported as ONNX; MCN ``--compute dense``; MCN
``--compute auto``, the export default). Every ratio compares runs of one process, interleaved
in ``--rounds`` rounds of ``--runs`` runs each after warm-up, as medians; "f/d per round" is the
range of the factored / dense ratio over the rounds (each round's medians), to show the
noise. "MACs f/d" is the conv MACs of the factored model over the dense one's (converted
convs only; float convs equal).

Models use ``pretrained=False`` (no network). timm's random init zeroes the last BatchNorm scale
of every residual block (``zero_init_last``); those scales are set to 1 so that no conv weight
folds to zero (the exporter would merge equal all-zero weights). Threads: ``--threads`` (default
1) for torch and onnxruntime's intra-op pool, for stable numbers on a shared machine; the
factored models are planned for that thread count (`optimize_for_inference(threads=)`,
`export_onnx(threads=)`).

Usage:
    python benchmarks/inference_speed.py --quick
    python benchmarks/inference_speed.py --models resnet18,resnet50 --batches 1 --variants keep4
    python benchmarks/inference_speed.py   # all models, K = 2, 4, 8, expand K=2, batch 1, 8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from mcn_compress import (
    MCNConfig,
    convert,
    export_onnx,
    info_of,
    load_float_model,
    optimize_for_inference,
)

MODELS = {  # name -> (input size, in_chans)
    "resnet18": (224, 3),
    "resnet50": (224, 3),
    "mobilenetv2_100": (224, 3),
    "mcn_resnet_small": (28, 1),
}
VARIANTS = {  # label -> MCNConfig kwargs
    "keep2": {"planes": 2},
    "keep4": {"planes": 4},
    "keep8": {"planes": 8},
    "expand2": {"planes": 2, "width": "expand"},
}
QUICK = [("resnet18", "keep4", 1), ("resnet50", "keep4", 1), ("resnet18", "expand2", 1)]


def _float_model(name: str) -> nn.Module:
    _, chans = MODELS[name]
    model = load_float_model(name, pretrained=False, in_chans=chans).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d) and not module.weight.any():
                module.weight.fill_(1.0)
    return model


def _session(path: Path, threads: int) -> Callable[[np.ndarray], object]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"input": x})


def _interleaved(
    calls: dict[str, Callable[[], object]], runs: int, rounds: int, warmup: int
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Median seconds per call over all runs, and per round, the calls interleaved round by
    round."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[list[float]]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            this_round = []
            for _ in range(runs):
                start = time.perf_counter()
                call()
                this_round.append(time.perf_counter() - start)
            times[name].append(this_round)
    medians = {
        name: statistics.median(t for r in rounds_ for t in r) for name, rounds_ in times.items()
    }
    per_round = {name: [statistics.median(r) for r in rounds_] for name, rounds_ in times.items()}
    return medians, per_round


def _rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))


def measure(
    name: str, variant: str, batches: list[int], args: argparse.Namespace, root: Path
) -> list[list[str]]:
    size, chans = MODELS[name]
    torch.manual_seed(0)
    float_model = _float_model(name)
    mcn = convert(float_model, MCNConfig(**VARIANTS[variant])).eval()
    fast = optimize_for_inference(mcn, input_size=size, threads=args.threads)
    plan = info_of(fast).plan
    assert plan is not None
    macs = plan.macs / plan.dense_macs
    paths = {
        "float": export_onnx(
            float_model, root / "float.onnx", weights="folded", input_size=size, dynamic_batch=True
        ).path,
        "dense": export_onnx(
            mcn, root / "dense.onnx", compute="dense", input_size=size, dynamic_batch=True
        ).path,
        "factored": export_onnx(
            mcn,
            root / "factored.onnx",
            compute="auto",
            input_size=size,
            dynamic_batch=True,
            threads=args.threads,
        ).path,
    }
    sessions = {key: _session(path, args.threads) for key, path in paths.items()}
    rows = []
    for batch in batches:
        x = torch.randn(batch, chans, size, size)
        xn = x.numpy()
        with torch.no_grad():
            ref = mcn(x).numpy()
            assert _rel_error(fast(x).numpy(), ref) <= 1e-4, "eager factored is off"
        for key in ("dense", "factored"):
            error = _rel_error(sessions[key](xn)[0], ref)  # type: ignore[index]
            assert error <= 1e-4, f"ORT {key}: relative error {error:.2e}"

        def eager(model: nn.Module, x: torch.Tensor = x) -> Callable[[], object]:
            def call() -> object:
                with torch.inference_mode():
                    return model(x)

            return call

        calls: dict[str, Callable[[], object]] = {
            "eager float": eager(float_model),
            "eager dense": eager(mcn),
            "eager factored": eager(fast),
        }
        calls |= {f"ort {key}": (lambda s=sess, xn=xn: s(xn)) for key, sess in sessions.items()}
        med, per_round = _interleaved(calls, args.runs, args.rounds, args.warmup)
        for engine in ("eager", "ort"):
            f, d, q = (med[f"{engine} {k}"] * 1e3 for k in ("float", "dense", "factored"))
            ratios = [
                fq / fd
                for fq, fd in zip(
                    per_round[f"{engine} factored"], per_round[f"{engine} dense"], strict=True
                )
            ]
            rows.append(
                [
                    name,
                    variant,
                    str(batch),
                    "PyTorch eager" if engine == "eager" else "ORT CPU",
                    f"{f:.2f}",
                    f"{d:.2f}",
                    f"{q:.2f}",
                    f"**{q / d:.3f}**",
                    f"{min(ratios):.3f}-{max(ratios):.3f}",
                    f"{d / f:.3f}",
                    f"{q / f:.3f}",
                    f"{macs:.3f}",
                ]
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="resnet18/50 keep K=4, r18 expand")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    if args.quick:
        jobs = [(m, v, [b]) for m, v, b in QUICK]
    else:
        jobs = [(m, v, batches) for m in args.models.split(",") for v in args.variants.split(",")]
    header = [
        "model",
        "variant",
        "batch",
        "engine",
        "float ms",
        "dense ms",
        "factored ms",
        "factored / dense",
        "f/d per round",
        "dense / float",
        "factored / float",
        "MACs f/d",
    ]
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {args.threads} thread(s)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for name, variant, bs in jobs:
            for row in measure(name, variant, bs, args, Path(tmp)):
                print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
