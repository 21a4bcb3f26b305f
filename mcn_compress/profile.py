"""Size and speed profiles of float and MCN models, measured on real files (numbers only).

Every byte count here is the size of a file written to a temporary directory (docs/design.md
section 6): the float32 original as a safetensors file of its state dict, the MCN model as its
packed file (`mcn_compress.formats.packed`). Next to them stands the theoretical minimum

    sign bits / 8 + (4 bytes, or 2 with float16) per stored float value + integer buffer bytes

where the stored float values are every float parameter and buffer other than the latent C
(M-Filters, biases, float layers, BatchNorm statistics), and a float value's bytes are those of
its stored dtype (4 for float32 models). A file is "within bound" when it is at most
``1.01 * minimum + 16 KiB``.

Also here: conv MACs, the factored-compute costs read from the plan of
`optimize_for_inference` (`factored_profile`, docs/design.md section 4.8), eval latency, and
`profile_paths`, which profiles checkpoints, packed files and run folders
(`training.run_dir.read_run`) with their float originals and, given a dataset, their top-1 /
top-5 (`evaluate.accuracy`). Rendering lives in `mcn_compress.cli.report`; training curves in
`mcn_compress.plot`.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mcn_compress.errors import MCNError
from mcn_compress.info import ModelSource, info_of, update_info
from mcn_compress.models import build_model, load_weights
from mcn_compress.module_utils import resolve_input_shape
from mcn_compress.nn.init import relative_error
from mcn_compress.nn.mcconv import MCConv2d
from mcn_compress.passes.factored import optimize_for_inference
from mcn_compress.storage import size_bound, storage_counts

if TYPE_CHECKING:
    pass

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerProfile:
    """One module that owns parameters or buffers: its stored bits and float parameters.

    ``shape`` is the weight shape of the layer as the float original has it (for an MCN layer
    ``(out, in // groups, kh, kw)``); ``bits`` counts its 1-bit signs; ``rel_error`` is
    ``||W0 - Q|| / ||W0||`` against the float original's weights when they are available.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    bits: int
    float_params: int
    rel_error: float | None = None
    factored: dict[str, Any] | None = None  # MCN layer: form, dense and factored MACs, weights

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "shape": list(self.shape),
            "bits": self.bits,
            "float_params": self.float_params,
            "rel_error": self.rel_error,
            "factored": self.factored,
        }


FACTORED_KEYS = ("dense_conv_macs", "conv_macs", "dense_weight_bytes", "weight_bytes", "latency_ms")


@dataclass
class ModelProfile:
    """What one model costs: parameter counts, real file sizes, theoretical minimum, latency.

    ``kind`` is ``"float"`` for the float original (``packed_bytes`` is then None and the file
    compared with the minimum is the float32 file) or ``"mcn"``. For a run directory,
    ``run_final_top1`` / ``run_best_top1`` are the last and best ``val_top1`` of its
    ``metrics.jsonl`` (percent). ``top1`` / ``top5`` (percent) are measured on
    ``eval_samples`` validation images of ``eval_dataset``; None when not evaluated (for the
    float original, when its real weights are not available).
    """

    label: str
    kind: str
    architecture: str
    planes: int | None
    width: str | None
    mcn1: bool
    converted_layers: int | None  # None for an ONNX file (kind "onnx")
    float_layers: int | None
    binary_params: int | None
    float_params: int | None
    float_buffers: int | None
    float32_bytes: int | None  # None when the float original cannot be rebuilt
    packed_bytes: int | None
    min_bytes: int | None
    float16: bool = False
    float_layer_dtype: str = "float32"  # how the packed file stores float layer weights (4.9)
    path: str | None = None
    input_bytes: int | None = None
    latency_ms: float | None = None
    run_dir: str | None = None
    run_epochs: int | None = None
    run_final_top1: float | None = None
    run_best_top1: float | None = None
    eval_dataset: str | None = None
    eval_samples: int | None = None
    top1: float | None = None
    top5: float | None = None
    conv_macs: int | None = None
    factored: dict[str, Any] | None = None  # MCN: `factored_profile`
    calibration_images: int | None = None  # unlabeled images calibrated on after conversion
    calibration_steps: int | None = None  # label-free distillation steps on them
    calibration_kl: list[float] | None = None  # KL to the float model before / after them
    calibration_top1: float | None = None  # top-1 right after calibration, when measured
    onnx: dict[str, Any] | None = None  # an ONNX file: its layout, compute, activations, threads
    layers: list[LayerProfile] | None = field(default=None, repr=False)

    @property
    def file_bytes(self) -> int | None:
        """The file this row ships: the packed or ONNX file, or the float32 file for the
        original."""
        if self.onnx is not None:
            return int(self.onnx["bytes"])
        return self.packed_bytes if self.packed_bytes is not None else self.float32_bytes

    @property
    def bound_bytes(self) -> int | None:
        return None if self.min_bytes is None else size_bound(self.min_bytes)

    @property
    def within_bound(self) -> bool | None:
        if self.file_bytes is None or self.bound_bytes is None:
            return None
        return self.file_bytes <= self.bound_bytes

    @property
    def overhead(self) -> float | None:
        """``file_bytes / min_bytes - 1``: the fraction spent beyond the theoretical minimum."""
        if self.min_bytes is None or self.file_bytes is None:
            return None
        return self.file_bytes / self.min_bytes - 1 if self.min_bytes else 0.0

    @property
    def ratio(self) -> float | None:
        """Compression against the float32 original: ``float32_bytes / file_bytes``."""
        if self.float32_bytes is None or not self.file_bytes:
            return None
        return self.float32_bytes / self.file_bytes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form with the derived numbers (``layers`` only when profiled)."""
        data: dict[str, Any] = {
            "label": self.label,
            "kind": self.kind,
            "path": self.path,
            "architecture": self.architecture,
            "planes": self.planes,
            "width": self.width,
            "mcn1": self.mcn1,
            "converted_layers": self.converted_layers,
            "float_layers": self.float_layers,
            "binary_params": self.binary_params,
            "float_params": self.float_params,
            "float_buffers": self.float_buffers,
            "float16": self.float16,
            "float_layer_dtype": self.float_layer_dtype,
            "input_bytes": self.input_bytes,
            "float32_bytes": self.float32_bytes,
            "packed_bytes": self.packed_bytes,
            "min_bytes": self.min_bytes,
            "bound_bytes": self.bound_bytes,
            "within_bound": self.within_bound,
            "overhead": self.overhead,
            "ratio": self.ratio,
            "latency_ms": self.latency_ms,
            "run_dir": self.run_dir,
            "run_epochs": self.run_epochs,
            "run_final_top1": self.run_final_top1,
            "run_best_top1": self.run_best_top1,
            "eval_dataset": self.eval_dataset,
            "eval_samples": self.eval_samples,
            "top1": self.top1,
            "top5": self.top5,
            "conv_macs": self.conv_macs,
            **{f"factored_{k}": (self.factored or {}).get(k) for k in FACTORED_KEYS},
            "calibration_images": self.calibration_images,
            "calibration_steps": self.calibration_steps,
            "calibration_kl": self.calibration_kl,
            "calibration_top1": self.calibration_top1,
            "onnx": self.onnx,
        }
        if self.layers is not None:
            data["layers"] = [layer.to_dict() for layer in self.layers]
        return data


# --- counting -------------------------------------------------------------------------------
def _layer_counts(model: nn.Module) -> tuple[int, int]:
    """(converted `MCConv2d` layers, float `nn.Conv2d` and `nn.Linear` layers)."""
    converted = sum(isinstance(m, MCConv2d) for m in model.modules())
    kept = sum(isinstance(m, nn.Conv2d | nn.Linear) for m in model.modules())
    return converted, kept


def float32_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of ``model``'s float original, as float32 (integer buffers unchanged).

    For an MCN model in ``width: keep`` each `MCConv2d` folds back to the conv it replaced (a
    ``(out, in // groups, kh, kw)`` weight, no M-Filter): the same keys and shapes the float
    model has.
    """
    mcn = {n: m for n, m in model.named_modules() if isinstance(m, MCConv2d)}
    folded: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in mcn and leaf == "mfilter":
            continue
        if owner in mcn and leaf == "weight":
            layer = mcn[owner]
            value = torch.zeros(layer.out_channels, *layer.weight.shape[1:])
        if value.is_floating_point():
            value = value.to(torch.float32)
        folded[key] = value.detach().cpu().contiguous().clone()
    return folded


def _file_size(write: Any) -> int:
    with tempfile.TemporaryDirectory(prefix="mcn-report-") as tmp:
        path = Path(tmp) / "model"
        write(path)
        return path.stat().st_size


def float32_file_bytes(model: nn.Module) -> int:
    """Bytes of the float original written as a float32 safetensors file."""
    from safetensors.torch import save_file

    state = float32_state_dict(model)
    return _file_size(lambda path: save_file(state, str(path)))


def packed_file_bytes(
    model: nn.Module, float16: bool = False, float_layers: str = "float32"
) -> int:
    """Bytes of ``model``'s packed file (`formats.packed.export_packed`), written to a temp dir."""
    from mcn_compress.formats.packed import export_packed

    return _file_size(lambda p: export_packed(model, p, float16, float_layers=float_layers))


# --- per layer and latency ------------------------------------------------------------------
def _relative_error(w0: torch.Tensor, q: torch.Tensor) -> float | None:
    return relative_error(w0, q) if w0.shape == q.shape else None


def layer_profiles(model: nn.Module, reference: nn.Module | None = None) -> list[LayerProfile]:
    """One `LayerProfile` per module owning parameters or buffers, in registration order.

    With ``reference`` (the float original with its real weights) every MCN layer also gets
    ``||W0 - Q|| / ||W0||``; other layers and MCN layers without a reference get None.
    """
    ref_modules = dict(reference.named_modules()) if reference is not None else {}
    rows = []
    for name, module in model.named_modules():
        own_params = dict(module.named_parameters(recurse=False))
        own_buffers = dict(module.named_buffers(recurse=False))
        if not own_params and not own_buffers:
            continue
        rel_error = None
        if isinstance(module, MCConv2d):
            shape: tuple[int, ...] = (module.out_channels, *module.weight.shape[1:])
            bits = module.weight.numel()
            floats = sum(p.numel() for k, p in own_params.items() if k != "weight")
            w0 = getattr(ref_modules.get(name), "weight", None)
            if isinstance(w0, torch.Tensor):
                with torch.no_grad():
                    rel_error = _relative_error(w0.detach(), module.reconstruct().detach())
            kind = "mcn"
        else:
            weight = own_params.get("weight")
            shape = tuple(weight.shape) if weight is not None else ()
            bits = 0
            floats = sum(p.numel() for p in own_params.values() if p.is_floating_point())
            kind = type(module).__name__
        rows.append(LayerProfile(name or "(root)", kind, shape, bits, floats, rel_error))
    return rows


def conv_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> int | None:
    """Multiply-accumulates of every conv (float or MCN) for one image of ``input_shape``:
    output elements x (in_channels / groups) x kh x kw. In ``width: expand`` this shows the
    K^2 cost of the widened convs. None when the model does not run on such an input."""
    total = 0

    def count(module: nn.Module, _: object, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size  # type: ignore[misc]
        per_image = output.numel() // output.shape[0]
        total += per_image * (module.in_channels // module.groups) * kh * kw  # type: ignore[operator]

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d | MCConv2d)]
    handles = [m.register_forward_hook(count) for m in convs]
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
    except Exception as exc:  # noqa: BLE001 - any failure: MACs are simply not reported
        _logger.info("conv MACs not measured: %s", exc)
        return None
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    return total


def measure_latency(
    model: nn.Module, input_shape: tuple[int, int, int], repeats: int = 10, warmup: int = 2
) -> float:
    """Median milliseconds for one image (batch of 1) through ``model`` in eval mode."""
    was_training = model.training
    model.eval()
    x = torch.randn(1, *input_shape)
    times = []
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                start = time.perf_counter()
                model(x)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return 1000 * statistics.median(times)


def dense_conv_weight_floats(model: nn.Module) -> int:
    """Float conv weights a runtime holds for the dense model: every float conv's weight and
    every MCConv2d's Q, ``out * in // groups * kh * kw`` (docs/design.md section 4.8)."""
    total = 0
    for module in model.modules():
        if isinstance(module, MCConv2d):
            total += module.out_channels * module.weight[0].numel()
        elif isinstance(module, nn.Conv2d):
            total += module.weight.numel()
    return total


def factored_profile(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    conv_macs: int | None,
    latency: Callable[[nn.Module], float] | None = None,
) -> dict[str, Any]:
    """Dense and factored costs of an MCN model for one image of ``input_shape`` (JSON-ready),
    from the plan of `optimize_for_inference` (``info_of(fast).plan``, docs/design.md 4.8):
    ``conv_macs`` (all convs, factored where the plan says), ``dense_weight_bytes`` and
    ``weight_bytes`` (float32 conv weights a runtime holds), ``latency_ms`` (``latency(fast)``
    when a timing function is given) and per-layer ``layers`` {name: `LayerPlan` dict}.
    ``conv_macs`` is the dense model's total (`conv_macs`)."""
    fast = optimize_for_inference(model, input_size=input_shape)
    plan = info_of(fast).plan
    assert plan is not None
    dense = dense_conv_weight_floats(model)
    return {
        "dense_conv_macs": conv_macs,
        "conv_macs": None if conv_macs is None else conv_macs - plan.dense_macs + plan.macs,
        "dense_weight_bytes": 4 * dense,
        "weight_bytes": 4 * (dense - plan.dense_weight_floats + plan.weight_floats),
        "latency_ms": latency(fast) if latency is not None else None,
        "threads": plan.threads,
        "layers": {row.name: row.to_dict() for row in plan.layers},
    }


# --- profiles -------------------------------------------------------------------------------
def profile_model(
    model: nn.Module,
    label: str,
    *,
    float16: bool = False,
    per_layer: bool = False,
    latency: bool = False,
    input_size: int | None = None,
    reference: nn.Module | None = None,
    path: str | Path | None = None,
    float_layers: str = "float32",
) -> ModelProfile:
    """Profile an MCN model (or, with no `MCConv2d`, a float model) from real files.

    Args:
        model: a model from `convert` / `load`, or a float model.
        label: the name of its row.
        float16: measure the packed file with float16 float parts.
        per_layer: also compute `layer_profiles`.
        latency: also time one image through the eval model (`measure_latency`).
        input_size: image side for the latency run (default: the model's own).
        reference: the float original with its real weights, for per-layer errors.
        path: the file the model came from (its size is reported as ``input_bytes``).
        float_layers: measure the packed file with its float layer weights stored so (4.9).
    """
    is_mcn = any(isinstance(m, MCConv2d) for m in model.modules())
    converted, kept = _layer_counts(model)
    float16 = float16 and is_mcn
    # the float original is measured as a float32 file, an MCN model as its packed file
    float_layers = float_layers if is_mcn else "float32"
    counts = storage_counts(model, 2 if float16 else None if is_mcn else 4, float_layers)
    info = info_of(model)
    source, config = info.source, info.config
    float_model: nn.Module | None = model
    if is_mcn and config is not None and config.width == "expand":
        # folding widened convs would count K^2 too much: measure the rebuilt float original
        rebuilt = float_original(source, False) if isinstance(source, ModelSource) else None
        float_model = rebuilt[0] if rebuilt is not None else None
    profile = ModelProfile(
        label=label,
        kind="mcn" if is_mcn else "float",
        architecture=source.display_name
        if isinstance(source, ModelSource)
        else type(model).__name__,
        planes=config.planes if is_mcn and config is not None else None,
        width=config.width if is_mcn and config is not None else None,
        mcn1=bool(config.mcn1) if is_mcn and config is not None else False,
        converted_layers=converted,
        float_layers=kept,
        binary_params=counts.binary_params,
        float_params=counts.float_params,
        float_buffers=counts.float_buffers,
        float32_bytes=float32_file_bytes(float_model if float_model is not None else model),
        packed_bytes=packed_file_bytes(model, float16, float_layers) if is_mcn else None,
        min_bytes=counts.min_bytes,
        float16=float16,
        float_layer_dtype=float_layers,
        path=str(path) if path is not None else None,
        input_bytes=Path(path).stat().st_size if path is not None else None,
    )
    profile.conv_macs = conv_macs(model, resolve_input_shape(model, input_size))
    if is_mcn:  # dense vs factored MACs, weights held and latency (docs/design.md section 4.8)
        shape = resolve_input_shape(model, input_size)
        timing = (lambda m: measure_latency(m, shape)) if latency else None
        profile.factored = factored_profile(model, shape, profile.conv_macs, timing)
    conversion = info.metadata.get("conversion")  # as saved; a loaded model's summary is fresh
    if conversion is None and info.summary is not None:
        conversion = info.summary.to_dict()
    if isinstance(conversion, dict) and conversion.get("calibration_images"):
        profile.calibration_images = int(conversion["calibration_images"])
        profile.calibration_steps = int(conversion.get("calibration_steps") or 0)
        kl, top1 = conversion.get("calibration_kl"), conversion.get("calibration_top1")
        if isinstance(kl, list | tuple) and len(kl) == 2:
            profile.calibration_kl = [float(kl[0]), float(kl[1])]
        if isinstance(top1, int | float):
            profile.calibration_top1 = float(top1)
    if per_layer:
        profile.layers = layer_profiles(model, reference)
        rows = (profile.factored or {}).get("layers", {})
        profile.layers = [replace(r, factored=rows.get(r.name)) for r in profile.layers]
    if latency:
        profile.latency_ms = measure_latency(model, resolve_input_shape(model, input_size))
    return profile


def float_original(source: ModelSource, with_weights: bool) -> tuple[nn.Module, bool] | None:
    """Rebuild the float architecture (no downloads) and say whether its real weights were
    loaded: its local weights file is read when asked and the file still exists. None when the
    architecture cannot be built."""
    try:
        model = build_model(source, pretrained=False)
    except MCNError as exc:
        _logger.warning("float original %s not rebuilt: %s", source.display_name, exc)
        return None
    update_info(model, source=source)
    weighted = False
    if with_weights and source.weights and Path(source.weights).is_file():
        try:
            load_weights(model, source.weights, source.display_name)
            weighted = True
        except MCNError as exc:
            _logger.warning("float weights %s not usable: %s", source.weights, exc)
    return model.eval(), weighted
