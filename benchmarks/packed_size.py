"""Bytes on disk of a converted timm resnet18 (K=4, width keep) against the float32 original
and the theoretical minimum (docs/design.md section 6), and which parts the packed bytes go to.

Writes the float32 original (safetensors and a torch state dict), the MCN checkpoint and the
packed file with and without ``--float16`` and with ``--float-layers float16|int8`` (the stem
and classifier weights at 16 or 8 bits, docs/design.md section 4.9) into a temporary folder,
checks that the packed files load back (identical outputs for float32, close otherwise) and
prints Markdown tables.

Usage: python benchmarks/packed_size.py [--model resnet18] [--planes 4] [--num-classes N]
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from mcn_compress import MCNConfig, convert, export_packed, info_of, load, load_float_model, save
from mcn_compress.formats.quantize import float_layer_weight_keys, stored_weight_bytes
from mcn_compress.nn.mcconv import MCConv2d
from mcn_compress.passes.policy import REASON_STEM
from mcn_compress.profile import size_bound, storage_counts


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _parts(model: nn.Module, bytes_per_float: int, float_layers: str = "float32") -> dict[str, int]:
    """Bytes of the theoretical minimum by part: signs, M-Filters, BN, stem, classifier, other;
    with ``float_layers`` the float layers' weights as stored (design.md 4.9)."""
    layer_keys = float_layer_weight_keys(model) if float_layers != "float32" else set()
    modules = dict(model.named_modules())
    summary = info_of(model).summary
    stems = {r.name for r in summary.layers if r.reason == REASON_STEM}
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    heads = {n for n, m in modules.items() if head is not None and m is head}
    parts = dict.fromkeys(
        ["signs (1 bit)", "M-Filters", "BatchNorm", "stem conv", "classifier", "other float"], 0
    )
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        module = modules[owner]
        size = bytes_per_float if value.is_floating_point() else value.element_size()
        nbytes = value.numel() * size
        if key in layer_keys:
            nbytes = stored_weight_bytes(value.shape, float_layers)
        if isinstance(module, MCConv2d) and leaf == "weight":
            parts["signs (1 bit)"] += math.ceil(value.numel() / 8)
        elif isinstance(module, MCConv2d) and leaf == "mfilter":
            parts["M-Filters"] += nbytes
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            parts["BatchNorm"] += nbytes
        elif owner in stems:
            parts["stem conv"] += nbytes
        elif owner in heads:
            parts["classifier"] += nbytes
        else:
            parts["other float"] += nbytes
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--planes", type=int, default=4)
    parser.add_argument("--num-classes", type=int, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    float_model = load_float_model(
        args.model, pretrained=False, num_classes=args.num_classes
    ).eval()
    model = convert(float_model, MCNConfig(planes=args.planes, width="keep")).eval()
    x = torch.randn(2, 3, 64, 64)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        state = {k: v.contiguous() for k, v in float_model.state_dict().items()}
        save_file(state, str(root / "float.safetensors"))
        torch.save(state, root / "float.pth")
        save(model, root / "model.pt")
        export_packed(model, root / "model.mcn")
        export_packed(model, root / "model16.mcn", float16=True)
        export_packed(model, root / "layers16.mcn", float_layers="float16")
        export_packed(model, root / "layers8.mcn", float_layers="int8")
        with torch.no_grad():
            expected = model(x)
            exact = torch.equal(load(root / "model.mcn")(x), expected)
            diff16 = float((load(root / "model16.mcn")(x) - expected).abs().max())
            err8 = float((load(root / "layers8.mcn")(x) - expected).norm() / expected.norm())
        sizes = {p.name: p.stat().st_size for p in root.iterdir()}

    float32 = sizes["float.safetensors"]
    float_min = storage_counts(float_model, 4).min_bytes
    min32 = storage_counts(model).min_bytes
    min16 = storage_counts(model, 2).min_bytes
    min_layers16 = storage_counts(model, None, "float16").min_bytes
    min_layers8 = storage_counts(model, None, "int8").min_bytes
    rows = []
    for label, name, minimum in [
        ("float32 original (.safetensors)", "float.safetensors", float_min),
        ("float32 original (.pth state dict)", "float.pth", float_min),
        ("MCN checkpoint .pt (latent C, training state)", "model.pt", None),
        ("packed .mcn", "model.mcn", min32),
        ("packed .mcn --float16", "model16.mcn", min16),
        ("packed .mcn --float-layers float16", "layers16.mcn", min_layers16),
        ("packed .mcn --float-layers int8", "layers8.mcn", min_layers8),
    ]:
        size = sizes[name]
        if minimum is None:
            rows.append([label, f"{size:,}", "-", "-", "-", f"{float32 / size:.2f}x"])
            continue
        bound = size_bound(minimum)
        rows.append(
            [
                label,
                f"{size:,}",
                f"{minimum:,}",
                f"{size - minimum:+,} ({size / minimum - 1:+.2%})",
                f"{bound:,} ({'ok' if size <= bound else 'EXCEEDED'})",
                f"{float32 / size:.2f}x",
            ]
        )
    title = f"{args.model}, K={args.planes}, width keep"
    print(f"### Size on disk: {title}\n")
    header = ["file", "bytes", "theoretical min", "over min", "bound 1% + 16 KiB", "vs float32"]
    print(_table(header, rows))
    print(
        f"\npacked outputs identical to the checkpoint's: {exact}; "
        f"float16 max |diff|: {diff16:.2e} (outputs max |y| {float(expected.abs().max()):.2e}); "
        f"--float-layers int8 relative error ||y8 - y|| / ||y||: {err8:.2e}\n"
    )

    columns = [
        ("float32", "model.mcn", _parts(model, 4)),
        ("float16", "model16.mcn", _parts(model, 2)),
        ("int8 float layers", "layers8.mcn", _parts(model, 4, "int8")),
    ]
    for _, name, parts in columns:
        parts["file framing (header, padding)"] = sizes[name] - sum(parts.values())
    first = columns[0][2]
    part_rows = [
        [part]
        + [
            cell
            for _, name, parts in columns
            for cell in (f"{parts[part]:,}", f"{parts[part] / sizes[name]:.1%}")
        ]
        for part in sorted(first, key=first.__getitem__, reverse=True)
    ]
    header = ["part"] + [c for label, _, _ in columns for c in (f"{label} bytes", "share")]
    print("### Where the packed bytes go\n")
    print(_table(header, part_rows))


if __name__ == "__main__":
    main()
