"""GPU depthwise conv rule: which PrimFuncs it claims, CUDA that nvcc accepts, numerics on a GPU."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import tvm
from tvm import relax

from mulayer.schedules.apply import claiming_rule
from mulayer.schedules.gpu_depthwise import DepthwiseConv2d, DepthwiseTile
from mulayer.schedules.testing import (
    ConvCase,
    build_prim_func,
    conv2d_module,
    conv2d_reference,
    prim_funcs,
    standard_pipeline,
)

CUDA = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host={"kind": "llvm"})
LLVM = tvm.target.Target({"kind": "llvm"})

# Odd channel counts and sizes, strides 1 and 2, 3x3 and 5x5, a channel multiplier of 2,
# dilation 2, batch 2 (MobileNetV2's 96x112x112/2 and 144x56x56/1 are in the benchmark).
CASES = [
    ConvCase(13, 17, 15, 13, k=3, stride=1, pad=1, groups=13),
    ConvCase(24, 20, 19, 24, k=3, stride=2, pad=1, groups=24),
    ConvCase(7, 9, 11, 7, k=5, stride=1, pad=2, groups=7),
    ConvCase(40, 14, 14, 40, k=5, stride=2, pad=2, groups=40),
    ConvCase(9, 10, 10, 18, k=3, stride=1, pad=1, groups=9),
    ConvCase(6, 12, 12, 6, k=3, stride=1, pad=2, groups=6, dilation=2),
    ConvCase(5, 8, 8, 5, k=3, stride=2, pad=0, groups=5, n=2),
]
EPILOGUES = ["bias_relu6", "bias_residual", "none"]
TILES = [
    None,
    DepthwiseTile(vec=1, threads=64),
    DepthwiseTile(vec=4, threads=256),
    DepthwiseTile(vec=2, threads=128, shared=True),
    DepthwiseTile(vec=4, threads=256, shared=True),
]


def _in_layout(shape: tuple, layout: str) -> tuple:
    """An NCHW (OIHW) shape in ``layout`` (NHWC: channels last, OHWI weights)."""
    return (shape[0], *shape[2:], shape[1]) if layout == "NHWC" else shape


def depthwise_module(case: ConvCase, epilogue: str, layout: str = "NCHW") -> tvm.IRModule:
    """``main(x, w, b, r)`` as the GPU build fuses it: fp16 conv accumulated in fp32, cast to
    fp16, then bias and relu6 (``clip``), bias and a residual add, or nothing."""
    oh, ow = case.out_hw
    bb = relax.BlockBuilder()

    def var(name, shape):
        return relax.Var(name, relax.TensorType(_in_layout(shape, layout), "float16"))

    x = var("x", (case.n, case.c, case.h, case.w))
    w = var("w", (case.f, 1, case.k, case.k))
    b = var("b", (1, case.f, 1, 1))
    r = var("r", (case.n, case.f, oh, ow))
    layouts = {"data_layout": "NHWC", "kernel_layout": "OHWI"} if layout == "NHWC" else {}
    params = [x, w] if epilogue == "none" else [x, w, b] + ([r] if "residual" in epilogue else [])
    with bb.function("main", params):
        with bb.dataflow():
            y = bb.emit(
                relax.op.nn.conv2d(
                    x,
                    w,
                    strides=case.stride,
                    padding=case.pad,
                    dilation=case.dilation,
                    groups=case.groups,
                    out_dtype="float32",
                    **layouts,
                )
            )
            y = bb.emit(relax.op.astype(y, "float16"))
            if epilogue != "none":
                y = bb.emit(relax.op.add(y, b))
            if epilogue == "bias_relu6":
                y = bb.emit(relax.op.clip(y, 0, 6))
            if epilogue == "bias_residual":
                y = bb.emit(relax.op.add(y, r))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def depthwise_func(
    case: ConvCase, epilogue: str = "bias_relu6", layout: str = "NCHW"
) -> tvm.tirx.PrimFunc:
    (func,) = prim_funcs(standard_pipeline(depthwise_module(case, epilogue, layout))).values()
    return func


# NHWC depthwise (ChannelsLastGPU): one output per channel only.
NHWC_CASES = [c for c in CASES if c.f == c.c]


def test_claims_depthwise_convs_with_their_epilogues():
    for case in CASES:
        for epilogue in EPILOGUES:
            func = depthwise_func(case, epilogue)
            assert isinstance(claiming_rule(func, CUDA), DepthwiseConv2d), (case, epilogue)


def test_claims_the_benchmark_layer_with_fp32_bias():
    case = ConvCase(96, 112, 112, 96, stride=2, groups=96)
    mod = conv2d_module(case, "float16", out_dtype="float32", cast_to="float16")
    (func,) = prim_funcs(standard_pipeline(mod)).values()
    assert isinstance(claiming_rule(func, CUDA), DepthwiseConv2d)


@pytest.mark.parametrize(
    "case",
    [
        ConvCase(16, 14, 14, 32, groups=1),  # dense conv
        ConvCase(16, 14, 14, 16, groups=4),  # grouped, 4 input channels per group
        ConvCase(16, 14, 14, 32, k=1, pad=0, groups=2),
    ],
    ids=str,
)
def test_leaves_other_convs_alone(case):
    mod = conv2d_module(case, "float16", out_dtype="float32", cast_to="float16")
    (func,) = prim_funcs(standard_pipeline(mod)).values()
    with CUDA:
        assert DepthwiseConv2d().apply(func, CUDA, False) is None


def test_leaves_pooling_matmul_and_cpu_targets_alone():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16, 14, 14), "float16"))
    m = relax.Var("m", relax.TensorType((1, 64), "float16"))
    k = relax.Var("k", relax.TensorType((64, 32), "float16"))
    with bb.function("main", [x, m, k]):
        with bb.dataflow():
            p = bb.emit(relax.op.nn.max_pool2d(x, 3, 1, 1))
            g = bb.emit(relax.op.mean(x, axis=[2, 3]))
            d = bb.emit(relax.op.matmul(m, k))
            out = bb.emit_output(relax.Tuple([p, g, d]))
        bb.emit_func_output(out)
    funcs = prim_funcs(standard_pipeline(bb.get()))
    assert len(funcs) == 3
    with CUDA:
        for func in funcs.values():
            assert DepthwiseConv2d().apply(func, CUDA, False) is None
    with LLVM:
        assert DepthwiseConv2d().apply(depthwise_func(CASES[0]), LLVM, False) is None


@pytest.mark.parametrize("tile", TILES, ids=str)
def test_cuda_source_compiles_with_nvcc(tile, tmp_path):
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not shutil.which(nvcc):
        pytest.skip("nvcc not installed")
    for i, case in enumerate(CASES[:4]):
        with CUDA:
            sch = DepthwiseConv2d(tile).apply(depthwise_func(case), CUDA, False)
        assert sch is not None
        src = build_prim_func(sch.mod["main"], CUDA).imports[0].inspect_source()
        assert "__global__" in src
        assert ("__shared__" in src) == bool(tile and tile.shared)
        path = tmp_path / f"k{i}.cu"
        path.write_text(src)
        subprocess.run(
            [nvcc, "-arch=sm_90", "-cubin", "-w", "-o", str(path.with_suffix(".cubin")), str(path)],
            check=True,
            capture_output=True,
        )


@pytest.mark.parametrize("case", NHWC_CASES, ids=str)
def test_nhwc_depthwise_loads_vectors_of_channels(case, tmp_path):
    """NHWC depthwise convs take the rule; channels divisible by 4 load 4-wide fp16 vectors; the
    source compiles for sm_90."""
    func = depthwise_func(case, "bias_residual", layout="NHWC")
    assert isinstance(claiming_rule(func, CUDA), DepthwiseConv2d)
    with CUDA:
        sch = DepthwiseConv2d().apply(func, CUDA, False)
    src = build_prim_func(sch.mod["main"], CUDA).imports[0].inspect_source()
    assert ("*(half4*)(x_ptr" in src) == (case.c % 4 == 0)
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if shutil.which(nvcc):
        path = tmp_path / "k.cu"
        path.write_text(src)
        subprocess.run(
            [nvcc, "-arch=sm_90", "-cubin", "-w", "-o", str(path.with_suffix(".cubin")), str(path)],
            check=True,
            capture_output=True,
        )


def test_opencl_source_is_generated():
    opencl = tvm.target.Target({"kind": "opencl"}, host={"kind": "llvm"})
    for tile in TILES:
        with opencl:
            sch = DepthwiseConv2d(tile).apply(
                depthwise_func(CASES[1], "bias_residual"), opencl, False
            )
        assert sch is not None
        assert "__kernel" in build_prim_func(sch.mod["main"], opencl).imports[0].inspect_source()


def _inputs(case: ConvCase, epilogue: str, rng) -> dict[str, np.ndarray]:
    oh, ow = case.out_hw
    return {
        "x": rng.standard_normal((case.n, case.c, case.h, case.w)).astype("float16"),
        "w": (rng.standard_normal((case.f, 1, case.k, case.k)) * 0.5).astype("float16"),
        "b": rng.standard_normal((1, case.f, 1, 1)).astype("float16"),
        "r": rng.standard_normal((case.n, case.f, oh, ow)).astype("float16"),
    }


def _reference(case: ConvCase, epilogue: str, data: dict[str, np.ndarray]) -> np.ndarray:
    y = conv2d_reference(data["x"], data["w"], case).astype("float16").astype("float64")
    if epilogue != "none":
        y = y + data["b"]
    if epilogue == "bias_relu6":
        y = np.clip(y, 0, 6)
    if epilogue == "bias_residual":
        y = y + data["r"]
    return y


@pytest.mark.gpu
@pytest.mark.parametrize("tile", TILES, ids=str)
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cuda_depthwise_numerics(case, epilogue, tile):
    if not tvm.cuda().exist:
        pytest.skip("no CUDA device")
    func = depthwise_func(case, epilogue)
    with CUDA:
        sch = DepthwiseConv2d(tile).apply(func, CUDA, False)
    assert sch is not None
    lib = build_prim_func(sch.mod["main"], CUDA)
    data = _inputs(case, epilogue, np.random.default_rng())
    names = [p.name for p in func.params[:-1]]
    inputs = [data[name] for name in names]  # the fused function keeps the Relax var names
    dev = tvm.cuda()
    oh, ow = case.out_hw
    out = run_poisoned_on(lib, inputs, (case.n, case.f, oh, ow), dev)
    assert np.isfinite(out).all(), "some outputs were never written"
    ref = _reference(case, epilogue, data)
    np.testing.assert_allclose(out.astype("float64"), ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max())


@pytest.mark.gpu
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("case", NHWC_CASES, ids=str)
def test_cuda_nhwc_depthwise_numerics(case, epilogue):
    if not tvm.cuda().exist:
        pytest.skip("no CUDA device")
    func = depthwise_func(case, epilogue, layout="NHWC")
    with CUDA:
        sch = DepthwiseConv2d().apply(func, CUDA, False)
    assert sch is not None
    lib = build_prim_func(sch.mod["main"], CUDA)
    data = _inputs(case, epilogue, np.random.default_rng())
    nhwc = {k: np.ascontiguousarray(v.transpose(0, 2, 3, 1)) for k, v in data.items()}
    inputs = [nhwc[p.name] for p in func.params[:-1]]
    oh, ow = case.out_hw
    out = run_poisoned_on(lib, inputs, (case.n, oh, ow, case.f), tvm.cuda())
    assert np.isfinite(out).all(), "some outputs were never written"
    ref = _reference(case, epilogue, data).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(out.astype("float64"), ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max())


def run_poisoned_on(lib, inputs, out_shape, dev) -> np.ndarray:
    """Call ``lib`` on ``dev`` with the output filled with NaN first."""
    args = [tvm.runtime.tensor(a, dev) for a in inputs]
    out = tvm.runtime.tensor(np.full(out_shape, np.nan, "float16"), dev)
    lib["main"](*args, out)
    return out.numpy()


@pytest.mark.gpu
def test_cuda_mobilenet_block_through_apply_schedules():
    """A depthwise layer built by the whole flow (fusion, apply_schedules, VM) on the GPU."""
    if not tvm.cuda().exist:
        pytest.skip("no CUDA device")
    from mulayer.schedules import apply_schedules

    case = ConvCase(32, 28, 28, 32, groups=32)
    mod = standard_pipeline(depthwise_module(case, "bias_relu6"))
    mod = apply_schedules(mod, CUDA)
    ex = tvm.compile(mod, target=CUDA)
    data = _inputs(case, "bias_relu6", np.random.default_rng())
    dev = tvm.cuda()
    vm = relax.VirtualMachine(ex, dev)
    out = vm["main"](*[tvm.runtime.tensor(data[k], dev) for k in ("x", "w", "b")]).numpy()
    ref = _reference(case, "bias_relu6", data)
    np.testing.assert_allclose(out.astype("float64"), ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max())
