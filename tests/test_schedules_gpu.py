"""GPU rules: the CUDA/OpenCL code is generated here (no GPU needed); numerics need a GPU."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import tvm
from tvm import relax

from mulayer.schedules import apply_schedules
from mulayer.schedules.gpu_conv2d import MIN_OUT_CHANNELS, NARROW_ENV
from mulayer.schedules.testing import (
    ConvCase,
    conv2d_module,
    conv2d_reference,
    prim_funcs,
    standard_pipeline,
)

CUDA = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host={"kind": "llvm"})
OPENCL = tvm.target.Target({"kind": "opencl"}, host={"kind": "llvm"})

GPU_CASES = [
    ConvCase(64, 56, 56, 64),
    ConvCase(128, 28, 28, 128),
    ConvCase(3, 64, 64, 32, k=7, stride=2, pad=3),
    ConvCase(32, 28, 28, 32, groups=32),
    ConvCase(5, 13, 11, 7),
]

needs_gpu = pytest.mark.gpu


def _device_modules(ex, kind: str) -> list:
    def walk(m):
        yield m
        for sub in m.imports:
            yield from walk(sub)

    return [m for m in walk(ex.mod) if m.kind == kind]


def _compile(case: ConvCase, target, dtype="float16", out_dtype=None):
    mod = standard_pipeline(conv2d_module(case, dtype=dtype, out_dtype=out_dtype))
    mod = apply_schedules(mod, target)
    assert all(f.attrs.get("tirx.is_scheduled") for f in prim_funcs(mod).values())
    return mod, tvm.compile(mod, target=target)


# (case, tensor cores expected): no tensor cores for the depthwise conv (DepthwiseConv2d); the
# narrow convs (32 and 7 outputs) take the tensor-core rule with their J tile padded to 32 / 16
# where MULAYER_GPU_NARROW_CONV=1, dlight's rules otherwise (the default).
TENSOR_CORE = [True, True, True, False, True]


@pytest.mark.parametrize("narrow", [False, True], ids=["narrow_off", "narrow_on"])
@pytest.mark.parametrize(("case", "wmma"), zip(GPU_CASES, TENSOR_CORE, strict=True), ids=str)
def test_cuda_conv_compiles_to_device_code(case, wmma, narrow, monkeypatch):
    monkeypatch.setenv(NARROW_ENV, "1" if narrow else "0")
    wmma = wmma and (narrow or case.f >= MIN_OUT_CHANNELS)
    _, ex = _compile(case, CUDA)
    (cuda,) = _device_modules(ex, "cuda")
    src = cuda.inspect_source()
    assert "__global__" in src
    assert ("wmma::mma_sync" in src) == wmma


@pytest.mark.parametrize("out_dtype", ["float16", "float32"])
def test_cuda_tensor_core_accumulator_follows_out_dtype(out_dtype):
    mod, ex = _compile(ConvCase(64, 14, 14, 64), CUDA, out_dtype=out_dtype)
    (cuda,) = _device_modules(ex, "cuda")
    src = cuda.inspect_source()
    acc = "float" if out_dtype == "float32" else "half"
    assert f"wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, {acc}>" in src


def test_cuda_source_compiles_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not shutil.which(nvcc):
        pytest.skip("nvcc not installed")
    _, ex = _compile(ConvCase(128, 28, 28, 128), CUDA)
    (cuda,) = _device_modules(ex, "cuda")
    src = tmp_path / "k.cu"
    src.write_text(cuda.inspect_source())
    subprocess.run(
        [nvcc, "-arch=sm_90", "-cubin", "-o", str(tmp_path / "k.cubin"), str(src)],
        check=True,
        capture_output=True,
    )


@pytest.mark.parametrize("case", GPU_CASES[:2], ids=str)
def test_opencl_conv_generates_kernels(case):
    _, ex = _compile(case, OPENCL)
    (cl,) = _device_modules(ex, "opencl")
    assert "__kernel" in cl.inspect_source()


@needs_gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
@pytest.mark.parametrize("out_dtype", [None, "float32"])
def test_cuda_conv_numerics(case, out_dtype):
    if not tvm.cuda().exist:
        pytest.skip("no CUDA device")
    rng = np.random.default_rng()
    x = rng.standard_normal((case.n, case.c, case.h, case.w)).astype("float16")
    w = (rng.standard_normal((case.f, case.c // case.groups, case.k, case.k)) * 0.1).astype(
        "float16"
    )
    acc = out_dtype or "float16"
    b = rng.standard_normal((1, case.f, 1, 1)).astype(acc)
    _, ex = _compile(case, CUDA, out_dtype=out_dtype)
    dev = tvm.cuda()
    vm = relax.VirtualMachine(ex, dev)
    out = vm["main"](*[tvm.runtime.tensor(a, dev) for a in (x, w, b)]).numpy()
    ref = np.maximum(conv2d_reference(x, w, case) + b, 0)
    np.testing.assert_allclose(out.astype("float64"), ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())
