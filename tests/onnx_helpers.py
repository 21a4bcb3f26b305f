"""Shared by the ONNX tests: run a file in onnxruntime, compare outputs by relative norm."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def as_array(value: torch.Tensor | np.ndarray) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def rel_norm(got: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray) -> float:
    """``||got - ref|| / ||ref||`` over all elements."""
    got, ref = as_array(got), as_array(ref)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def ort_run(path: Path, x: torch.Tensor | np.ndarray) -> np.ndarray:
    """The first output of ``path`` on ``x`` in onnxruntime's CPU provider, one thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: as_array(x)})[0]
