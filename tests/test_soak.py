"""Concurrency and soak: one loaded model called from 8 threads, and many calls in a loop."""

import importlib.util
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

import mulayer

from .conftest import max_rel_error, onnxruntime_reference

THREADS = 8
CALLS_PER_THREAD = 4
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "soak.py"


def _soak_module():
    spec = importlib.util.spec_from_file_location("soak", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(
    scope="module",
    params=[
        "llvm",
        "mulayer -ratio=0.5, llvm, llvm",
        pytest.param("cuda, llvm", marks=pytest.mark.gpu),
        pytest.param("mulayer -ratio=0.5, cuda, llvm", marks=pytest.mark.gpu),
    ],
)
def loaded(request, tiny_onnx, tmp_path_factory):
    artifact = tmp_path_factory.mktemp("soak") / "tiny.mulayer"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no calibration data: the CPU parts stay fp32
        mulayer.compile(str(tiny_onnx), target=request.param).export(artifact)
    return mulayer.load(artifact)


def test_threads_give_the_serial_results(loaded, tiny_onnx):
    seed = np.random.randint(1 << 30)
    inputs = [loaded.random_inputs(seed + i) for i in range(THREADS * CALLS_PER_THREAD)]
    serial = [loaded(x) for x in inputs]
    results: list = [None] * len(inputs)
    start = threading.Barrier(THREADS)

    def work(first: int) -> None:
        start.wait()  # all threads call at once
        for i in range(first, len(inputs), THREADS):
            results[i] = loaded(inputs[i])

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for want, got in zip(serial, results, strict=True):
        assert want.keys() == got.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])  # bit for bit
    # And the serial results are right.
    tolerance = 1e-4 if loaded.mode == "cpu" else 2e-2  # the GPU parts compute in fp16
    reference = onnxruntime_reference(tiny_onnx, inputs[0])[0]
    assert max_rel_error(next(iter(serial[0].values())), reference) < tolerance


def test_short_soak_keeps_memory_and_results(loaded):
    # The CI version of scripts/soak.py (10,000 inferences there): a leak of one input copy per
    # call (12 KiB here) would show as >= 12 KiB per inference.
    # Two windows: a leak grows the RSS in both, a one-off growth of the allocator's arena
    # (about 1.7 MiB once in a full-suite run, 5.9 KiB over 300 calls) in one only.
    soak = _soak_module().soak
    first = soak(loaded, inferences=300, warmup=200)
    second = soak(loaded, inferences=300, warmup=0)
    for result in (first, second):
        assert result["checked_outputs_mismatched"] == 0
    steady = min((first, second), key=lambda r: r["growth_bytes_per_inference"])
    assert steady["growth_bytes_per_inference"] < 4096, (first, second)
    assert steady["growth_percent"] < 1.0, (first, second)
