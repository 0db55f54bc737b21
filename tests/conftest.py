"""Shared fixtures; `gpu` tests skip where no CUDA GPU is present."""

from __future__ import annotations

import pytest

from mulayer.models.reference import max_rel_error, onnxruntime_outputs

__all__ = ["max_rel_error", "onnxruntime_reference", "sqnr_db"]


def _has_cuda() -> bool:
    import tvm

    return bool(tvm.cuda(0).exist)


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_onnx(model_dir):
    from mulayer.models.zoo import save_model

    path = model_dir / "tiny.onnx"
    save_model("tiny", path)
    return path


@pytest.fixture(scope="session")
def resnet18_onnx(model_dir):
    from mulayer.models.zoo import save_model

    path = model_dir / "resnet18.onnx"
    save_model("resnet18", path)
    return path


def onnxruntime_reference(model_path, inputs):
    """Outputs of onnxruntime (CPU fp32) for ``inputs``, in graph order."""
    return onnxruntime_outputs(model_path, inputs)


def sqnr_db(actual, expected) -> float:
    """Signal-to-noise ratio of ``actual`` against ``expected`` in dB."""
    import numpy as np

    expected = np.asarray(expected, dtype=np.float64)
    noise = float(((np.asarray(actual, dtype=np.float64) - expected) ** 2).sum())
    return float("inf") if noise == 0 else 10 * np.log10(float((expected**2).sum()) / noise)


def outputs_from_threads(model, inputs: list) -> list:
    """First output of ``model`` for each of ``inputs``, every call on its own thread at once."""
    import threading

    results: list = [None] * len(inputs)

    def work(i):
        results[i] = list(model(inputs[i]).values())[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results
