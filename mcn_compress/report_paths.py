"""`profile_paths`: the rows of `mcn-compress report` for the files a user names.

Checkpoints, packed files and run folders are loaded and profiled (`profile.profile_model`),
each MCN model preceded by its float original. ONNX files (``.onnx``) are read without
PyTorch's help: their size, layout and metadata (`formats.onnx_runtime.read_onnx_info`) and,
with a dataset, their top-1 / top-5 through onnxruntime (`formats.onnx_runtime.OnnxClassifier`),
measured on the same validation images as the PyTorch models (docs/design.md section 6).
Numbers only: nothing here prints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from mcn_compress.evaluate import accuracy, validation_set
from mcn_compress.formats.onnx_runtime import OnnxClassifier, OnnxInfo, read_onnx_info
from mcn_compress.info import ModelSource, info_of
from mcn_compress.nn.mcconv import MCConv2d
from mcn_compress.profile import ModelProfile, float32_file_bytes, float_original, profile_model
from mcn_compress.training.run_dir import RunDir, load_run_model, read_run

if TYPE_CHECKING:
    from mcn_compress.training.recipe import DataRecipe

#: ``progress(label, done, total)``: images evaluated so far for the model of row ``label``
LabeledProgressFn = Callable[[str, int, int], None]


def _source_key(source: ModelSource) -> tuple[str, str, str]:
    return source.library, source.name, repr(sorted(source.kwargs.items()))


def _load_path(p: Path) -> tuple[nn.Module, RunDir | None]:
    from mcn_compress.formats.load import load

    if p.is_dir():
        run = read_run(p)
        return load_run_model(run), run
    return load(p), None


def is_onnx(path: Path) -> bool:
    return path.suffix.lower() == ".onnx" and not path.is_dir()


def onnx_profile(info: OnnxInfo, label: str) -> ModelProfile:
    """The row of an ONNX file: its bytes and metadata; the float32 original's bytes when the
    file names its model (rebuilt offline, random weights: sizes do not depend on them)."""
    source = info.source
    rebuilt = float_original(source, False) if source is not None else None
    planes = info.meta("planes")
    return ModelProfile(
        label=label,
        kind="onnx",
        architecture=source.display_name if source is not None else "(ONNX graph)",
        planes=int(planes) if planes and planes.isdigit() else None,
        width=None,
        mcn1=False,
        converted_layers=None,
        float_layers=None,
        binary_params=None,
        float_params=None,
        float_buffers=None,
        float32_bytes=float32_file_bytes(rebuilt[0]) if rebuilt is not None else None,
        packed_bytes=None,
        min_bytes=None,
        path=str(info.path),
        input_bytes=info.bytes,
        onnx={
            "bytes": info.bytes,
            "weights": info.meta("weights"),
            "compute": info.meta("compute"),
            "activations": info.meta("activations") or "float32",
            "threads": info.meta("threads"),
            "float_layers": info.meta("float_layers"),
            "input_shape": list(info.input_shape),
        },
    )


def profile_paths(
    paths: Sequence[str | Path],
    *,
    float16: bool = False,
    per_layer: bool = False,
    latency: bool = False,
    input_size: int | None = None,
    data: DataRecipe | None = None,
    progress: LabeledProgressFn | None = None,
    seed: int = 0,
) -> list[ModelProfile]:
    """Profiles of checkpoints, packed files, ONNX files and run directories, each MCN model
    preceded by its float original.

    The float original is rebuilt from the stored description (random weights: sizes and
    latency do not depend on them) and listed once per distinct architecture, before the first
    model derived from it. Per-layer reconstruction errors and accuracy use its real weights
    when the description names a local weights file that still exists (otherwise its accuracy
    stays None). For a packed file stored with float16 the packed size is measured with
    float16 too. A run directory is reported through its ``best.pt`` (else ``last.pt``), with
    the final and best validation top-1 of its ``metrics.jsonl``. An ONNX file is reported by
    its size and metadata, and evaluated through onnxruntime at the image size of its input.

    With ``data`` every model is evaluated on that dataset's validation split
    (`validation_set`, `accuracy`); ``progress(label, done, total)`` reports each evaluation.
    ``seed`` picks the validation subset (and the synthetic data); a run directory uses its
    recipe's ``runtime.seed`` instead, for itself and for its float original.
    """
    loaded: list[tuple[Path, nn.Module | OnnxInfo, RunDir | None]] = []
    for path in map(Path, paths):  # read every file first: a bad one stops before any work
        loaded.append(
            (path, read_onnx_info(path), None) if is_onnx(path) else (path, *_load_path(path))
        )
    profiles: list[ModelProfile] = []
    seen: set[tuple[str, str, str]] = set()

    def evaluate(
        model: nn.Module, profile: ModelProfile, seed: int, cfg: DataRecipe | None = data
    ) -> None:
        if cfg is None:
            return
        val = validation_set(model, cfg, seed=seed, name=profile.label)

        def report(done: int, total: int) -> None:
            if progress is not None:
                progress(profile.label, done, total)

        profile.top1, profile.top5 = accuracy(
            model, val, batch_size=cfg.batch_size, workers=cfg.workers, progress=report
        )
        profile.eval_dataset = cfg.dataset
        profile.eval_samples = len(val)  # type: ignore[arg-type]

    def float_row(source: ModelSource, eval_seed: int) -> nn.Module | None:
        """List the float original once; its model when its real weights were loaded."""
        rebuilt = float_original(source, with_weights=per_layer or data is not None)
        if rebuilt is None:
            return None
        original, weighted = rebuilt
        key = _source_key(source)
        if key not in seen:
            seen.add(key)
            row = profile_model(
                original,
                f"{source.display_name} (float)",
                per_layer=per_layer,
                latency=latency,
                input_size=input_size,
            )
            if weighted:
                evaluate(original, row, eval_seed)
            profiles.append(row)
        return original if weighted else None

    for p, item, run in loaded:
        eval_seed = run.seed if run is not None and run.seed is not None else seed
        if isinstance(item, OnnxInfo):
            if item.source is not None:
                float_row(item.source, eval_seed)
            profile = onnx_profile(item, str(p))
            if data is not None:
                size = data.image_size or item.input_shape[2]
                evaluate(
                    OnnxClassifier(item),
                    profile,
                    eval_seed,
                    dataclasses.replace(data, image_size=size),
                )
            profiles.append(profile)
            continue
        model = item
        info = info_of(model)
        source = info.source
        is_mcn = any(isinstance(m, MCConv2d) for m in model.modules())
        reference = None
        if isinstance(source, ModelSource) and is_mcn:
            reference = float_row(source, eval_seed)
        file = run.checkpoint if run is not None else p
        profile = profile_model(
            model,
            str(p),
            float16=float16 or info.packed_float16,
            float_layers=info.packed_float_layers,
            per_layer=per_layer,
            latency=latency,
            input_size=input_size,
            reference=reference,
            path=file,
        )
        if run is not None:
            profile.run_dir = str(run.path)
            profile.run_epochs = run.epochs
            profile.run_final_top1 = run.final_top1
            profile.run_best_top1 = run.best_top1
        evaluate(model, profile, eval_seed)
        profiles.append(profile)
    return profiles


__all__ = ["LabeledProgressFn", "is_onnx", "onnx_profile", "profile_paths"]
