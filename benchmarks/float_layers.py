"""What ``export --float-layers float16|int8`` (docs/design.md section 4.9) costs and saves on
one trained model: file bytes, output error on random input and top-1 on a dataset's
validation split, for the packed file and for ONNX (run in onnxruntime).

For each format the model is exported with float32, float16 and int8 float layers; the packed
files are loaded back with `mcn_compress.load` (int8 dequantized to float32), the ONNX files run
in onnxruntime (CPU). The relative error is ``||y - y_float32|| / ||y_float32||`` over
``--random`` random inputs, against the float32 export of the same format.

Usage: python benchmarks/float_layers.py MODEL [--dataset fashion_mnist] [--data-root DIR]
       [--val-samples N] [--opset 18]

Example (the quickstart's model): python benchmarks/float_layers.py runs/quickstart/model.mcn
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from mcn_compress import export_onnx, export_packed, load
from mcn_compress.evaluate import accuracy, validation_set
from mcn_compress.module_utils import resolve_input_shape
from mcn_compress.training.recipe import DataRecipe

MODES = ("float32", "float16", "int8")


class OrtModel(nn.Module):
    """An onnxruntime session behind an `nn.Module` forward, for `evaluate.accuracy`."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        options = ort.SessionOptions()
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input: x.detach().cpu().numpy().astype(np.float32)})
        return torch.from_numpy(out[0])


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", type=Path, help="MCN checkpoint (.pt) or packed file (.mcn)")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--val-samples", type=int, default=None)
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--random", type=int, default=8, help="random inputs for the error")
    args = parser.parse_args()
    model = load(args.model)
    data = DataRecipe(
        dataset=args.dataset, root=args.data_root, val_samples=args.val_samples, workers=0
    )
    val = validation_set(model, data)
    shape = resolve_input_shape(model, None)
    x = torch.randn((args.random, *shape), generator=torch.Generator().manual_seed(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for fmt in ("packed", "onnx"):
            runners: dict[str, nn.Module] = {}
            sizes: dict[str, int] = {}
            for mode in MODES:
                if fmt == "packed":
                    path = export_packed(model, root / f"{mode}.mcn", float_layers=mode)
                    runners[mode] = load(path)
                else:
                    path = export_onnx(
                        model,
                        root / f"{mode}.onnx",
                        opset=args.opset,
                        dynamic_batch=True,
                        float_layers=mode,
                    ).path
                    runners[mode] = OrtModel(path)
                sizes[mode] = path.stat().st_size
            with torch.no_grad():
                ref = runners["float32"](x)
                top1_ref = None
                for mode in MODES:
                    y = runners[mode](x)
                    error = float((y - ref).norm() / ref.norm())
                    top1, _ = accuracy(runners[mode], val, batch_size=256)
                    top1_ref = top1 if top1_ref is None else top1_ref
                    rows.append(
                        [
                            fmt,
                            mode,
                            f"{sizes[mode]:,}",
                            f"{sizes['float32'] / sizes[mode]:.2f}x",
                            f"{error:.2e}",
                            f"{top1:.2f}",
                            f"{top1 - top1_ref:+.2f}",
                        ]
                    )
    print(f"### Float layers at 16 / 8 bits: {args.model} on {args.dataset} ({len(val)} images)\n")
    header = ["format", "float layers", "bytes", "vs float32", "rel. error", "top-1 %", "delta"]
    print(_table(header, rows))


if __name__ == "__main__":
    main()
