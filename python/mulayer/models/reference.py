"""The fp32 reference every output check compares against: onnxruntime on the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def onnxruntime_session(model_path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session for ``model_path`` (``threads``: intra-op threads)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def onnxruntime_outputs(model_path: str | Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of onnxruntime (CPU fp32) for ``inputs``, in graph order."""
    return onnxruntime_session(model_path).run(None, inputs)


def max_rel_error(actual, expected) -> float:
    """``max |actual - expected| / max |expected|``."""
    scale = float(np.abs(expected).max()) or 1.0
    return float(np.abs(np.asarray(actual) - np.asarray(expected)).max()) / scale
