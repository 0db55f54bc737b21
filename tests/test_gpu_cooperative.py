"""Cooperative CUDA + llvm models on a real GPU (skipped without one)."""

import warnings

import numpy as np
import pytest

import mulayer

from .conftest import max_rel_error, onnxruntime_reference, outputs_from_threads, sqnr_db

pytestmark = pytest.mark.gpu

GPU = "cuda -arch=sm_90"
INT8_TINY_DB = 25.0  # as in test_cooperative: 3 quantized layers, fp16 GPU parts


def _calibration(shape, count=8):
    rng = np.random.default_rng(123)
    return {"input": rng.standard_normal((count, *shape[1:])).astype("float32")}


@pytest.fixture(scope="module")
def coop_cuda(tiny_onnx, tmp_path_factory):
    compiled = mulayer.compile(
        str(tiny_onnx),
        target=f"mulayer -ratio=0.5, {GPU}, llvm",
        calibration=_calibration((1, 3, 32, 32)),
    )
    path = tmp_path_factory.mktemp("gpu") / "coop.mulayer"
    compiled.export(path)
    return path


def test_split_cuda_llvm_runs_and_matches(tiny_onnx, coop_cuda):
    model = mulayer.load(coop_cuda)
    assert model.metadata["cpu_weights"]["count"] > 0
    inputs = model.random_inputs(seed=np.random.randint(1 << 30))
    out = list(model(inputs).values())[0]
    ref = onnxruntime_reference(tiny_onnx, inputs)[0]
    assert np.all(np.isfinite(out))
    assert sqnr_db(out, ref) > INT8_TINY_DB


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_split_cuda_llvm_fp32_cpu_parts(tiny_onnx, tmp_path, ratio):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = mulayer.compile(str(tiny_onnx), target=f"mulayer -ratio={ratio}, {GPU}, llvm")
    compiled.export(tmp_path / "m.mulayer")
    model = mulayer.load(tmp_path / "m.mulayer")
    inputs = model.random_inputs(seed=np.random.randint(1 << 30))
    out = list(model(inputs).values())[0]
    ref = onnxruntime_reference(tiny_onnx, inputs)[0]
    assert max_rel_error(out, ref) < 2e-2  # fp16 GPU parts


def test_trace_uses_device_events(coop_cuda):
    model = mulayer.load(coop_cuda)
    trace, summary = model.trace(model.random_inputs(seed=1), warmup=2)
    assert summary.device_events
    tracks = {e["tid"] for e in trace["traceEvents"] if e["ph"] == "X"}
    assert {1, 2, 3} <= tracks  # CPU kernels, GPU kernels (events), GPU launches
    assert summary.kernel_us["gpu"] > 0 and summary.kernel_us["cpu"] > 0


def test_threads_match_serial_calls(coop_cuda):
    model = mulayer.load(coop_cuda)
    inputs = [model.random_inputs(seed=s) for s in range(8)]
    serial = [list(model(x).values())[0] for x in inputs]
    for got, want in zip(outputs_from_threads(model, inputs), serial, strict=True):
        assert np.array_equal(got, want)


def test_gpu_only_with_cuda_graph_matches(tiny_onnx, tmp_path):
    compiled = mulayer.compile(str(tiny_onnx), target=f"{GPU}, llvm")
    assert compiled.metadata()["cuda_graph"]
    compiled.export(tmp_path / "g.mulayer")
    model = mulayer.load(tmp_path / "g.mulayer")
    for seed in (1, 2):  # the second call replays the captured graph
        inputs = model.random_inputs(seed=seed)
        out = list(model(inputs).values())[0]
        ref = onnxruntime_reference(tiny_onnx, inputs)[0]
        assert max_rel_error(out, ref) < 2e-2
