"""CPU fp32 schedule rules: numerics against numpy on fresh inputs, every output written."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax, tirx

from mulayer.schedules import apply_schedules, cpu_rules
from mulayer.schedules.cpu_conv2d import Conv2dChannelVector, Conv2dWidthVector
from mulayer.schedules.cpu_dense import MatmulCPU
from mulayer.schedules.testing import (
    ConvCase,
    build_prim_func,
    conv2d_module,
    conv2d_reference,
    matmul_module,
    prim_funcs,
    run_poisoned,
    standard_pipeline,
)

TARGET = tvm.target.Target(
    {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": 2}
)

CONV_CASES = [
    ConvCase(64, 56, 56, 64),  # ResNet-18 3x3
    ConvCase(3, 32, 32, 16, k=7, stride=2, pad=3),  # stem-like, 3 input channels
    ConvCase(32, 14, 14, 64, k=1, pad=0),  # pointwise
    ConvCase(48, 15, 15, 32, stride=2),  # strided, odd spatial size
    ConvCase(64, 9, 9, 64, groups=4),  # grouped, 16 channels per group
    ConvCase(32, 20, 20, 32, groups=32),  # depthwise
    ConvCase(16, 17, 17, 32, groups=16, stride=2),  # depthwise, multiplier 2, strided
    ConvCase(5, 13, 11, 7),  # odd channels everywhere
    ConvCase(6, 9, 9, 12, pad=0, groups=3),  # grouped, 4 out channels per group
    ConvCase(16, 12, 12, 32, dilation=2, pad=2),  # dilated
    ConvCase(64, 7, 7, 64, n=2),  # batch 2, short rows
    ConvCase(1024, 6, 6, 512, k=1, pad=0, stride=2),  # weights > 1 MB: channel tiles outer
]


def _scheduled_single(mod: tvm.IRModule) -> tirx.PrimFunc:
    funcs = prim_funcs(mod)
    assert len(funcs) == 1, list(funcs)
    (func,) = funcs.values()
    assert func.attrs.get("tirx.is_scheduled"), "not scheduled"
    return func


def _has_loop_kind(func: tirx.PrimFunc, kind: str) -> bool:
    """Whether the printed function has a loop of ``kind`` (parallel, vectorized, ...)."""
    return f"T.{kind}(" in func.script()


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv2d_fp32_matches_numpy(case: ConvCase):
    rng = np.random.default_rng()
    x = rng.standard_normal((case.n, case.c, case.h, case.w)).astype("float32")
    w = rng.standard_normal((case.f, case.c // case.groups, case.k, case.k)).astype("float32")
    b = rng.standard_normal((1, case.f, 1, 1)).astype("float32")
    mod = apply_schedules(standard_pipeline(conv2d_module(case)), TARGET, fold_packing=False)
    func = _scheduled_single(mod)
    assert _has_loop_kind(func, "parallel")
    assert _has_loop_kind(func, "vectorized")
    lib = build_prim_func(func, TARGET)
    oh, ow = case.out_hw
    out = run_poisoned(lib, [x, w, b], (case.n, case.f, oh, ow), "float32")
    ref = np.maximum(conv2d_reference(x, w, case) + b, 0)
    assert not np.isnan(out).any(), "some outputs were never written"
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize(
    ("case", "rule"),
    [
        (ConvCase(64, 56, 56, 64), Conv2dChannelVector),
        (ConvCase(32, 14, 14, 64, k=1, pad=0), Conv2dChannelVector),
        (ConvCase(32, 20, 20, 32, groups=32), Conv2dWidthVector),
        (ConvCase(5, 13, 11, 7), Conv2dWidthVector),
    ],
    ids=str,
)
def test_conv2d_rule_choice(case: ConvCase, rule):
    mod = standard_pipeline(conv2d_module(case))
    (func,) = prim_funcs(mod).values()
    for candidate in cpu_rules(TARGET):
        if candidate.apply(func, TARGET, False) is not None:
            assert isinstance(candidate, rule)
            return
    pytest.fail("no rule applied")


def test_conv2d_unfused_and_no_epilogue():
    case = ConvCase(24, 10, 10, 32)
    rng = np.random.default_rng()
    x = rng.standard_normal((1, 24, 10, 10)).astype("float32")
    w = rng.standard_normal((32, 24, 3, 3)).astype("float32")
    mod = apply_schedules(
        standard_pipeline(conv2d_module(case, epilogue="none"), fuse=False),
        TARGET,
        fold_packing=False,
    )
    func = prim_funcs(mod)["conv2d"]
    assert func.attrs.get("tirx.is_scheduled")
    out = run_poisoned(build_prim_func(func, TARGET), [x, w], (1, 32, 10, 10), "float32")
    np.testing.assert_allclose(out, conv2d_reference(x, w, case), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    ("m", "k", "n", "transpose_w"),
    [
        (1, 512, 1000, False),
        (4, 64, 48, False),
        (7, 33, 19, False),
        (16, 128, 256, True),
        (3, 40, 10, True),
    ],
)
def test_matmul_fp32_matches_numpy(m, k, n, transpose_w):
    rng = np.random.default_rng()
    x = rng.standard_normal((m, k)).astype("float32")
    w = rng.standard_normal((n, k) if transpose_w else (k, n)).astype("float32")
    b = rng.standard_normal((n,)).astype("float32")
    mod = standard_pipeline(matmul_module(m, k, n, transpose_w=transpose_w))
    mod = apply_schedules(mod, TARGET, fold_packing=False)
    funcs = prim_funcs(mod)
    fused = next(f for name, f in funcs.items() if "matmul" in name)
    assert fused.attrs.get("tirx.is_scheduled")
    # The matmul rule (not the fallback) claimed it.
    raw = next(
        f
        for name, f in prim_funcs(
            standard_pipeline(matmul_module(m, k, n, transpose_w=transpose_w))
        ).items()
        if "matmul" in name
    )
    assert MatmulCPU().apply(raw, TARGET, False) is not None
    rhs = w.T if transpose_w else w
    if transpose_w:
        lib = tvm.compile(mod, target=TARGET)
        vm = relax.VirtualMachine(lib, tvm.cpu())
        out = vm["main"](*[tvm.runtime.tensor(a) for a in (x, w, b)]).numpy()
    else:
        out = run_poisoned(build_prim_func(fused, TARGET), [x, w, b], (m, n), "float32")
        assert not np.isnan(out).any()
    ref = x.astype("float64") @ rhs + b
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("fold", [True, False])
def test_weight_packing_folds_at_compile_time(fold):
    """Bound weights: apply_schedules packs them once, at compile time (unless told not to)."""
    case = ConvCase(32, 16, 16, 32)
    rng = np.random.default_rng()
    x = rng.standard_normal((1, 32, 16, 16)).astype("float32")
    w = rng.standard_normal((32, 32, 3, 3)).astype("float32")
    b = rng.standard_normal((1, 32, 1, 1)).astype("float32")
    mod = standard_pipeline(conv2d_module(case, params={"w": w, "b": b}))
    mod = apply_schedules(mod, TARGET, fold_packing=fold)
    names = list(prim_funcs(mod))
    if fold:
        assert names == ["fused_conv2d_add_relu_prepacked"]
    else:
        assert names == ["fused_conv2d_add_relu"]
    vm = relax.VirtualMachine(tvm.compile(mod, target=TARGET), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x)).numpy()
    ref = np.maximum(conv2d_reference(x, w, case) + b, 0)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-3)


def test_weight_parameters_keep_packing_in_the_kernel():
    """Unbound weights cannot be packed at compile time: one kernel, packing inside, correct."""
    case = ConvCase(16, 8, 8, 32)
    rng = np.random.default_rng()
    x = rng.standard_normal((1, 16, 8, 8)).astype("float32")
    w = rng.standard_normal((32, 16, 3, 3)).astype("float32")
    b = rng.standard_normal((1, 32, 1, 1)).astype("float32")
    mod = apply_schedules(standard_pipeline(conv2d_module(case)), TARGET)
    assert list(prim_funcs(mod)) == ["fused_conv2d_add_relu"]
    vm = relax.VirtualMachine(tvm.compile(mod, target=TARGET), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in (x, w, b)]).numpy()
    ref = np.maximum(conv2d_reference(x, w, case) + b, 0)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-3)


def _pool_softmax_module() -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16, 15, 15), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            m = bb.emit(relax.op.nn.max_pool2d(x, 3, 2, 1))
            a = bb.emit(relax.op.nn.avg_pool2d(m, 2, 1, 0))
            g = bb.emit(relax.op.nn.adaptive_avg_pool2d(a, (1, 1)))
            r = bb.emit(relax.op.reshape(g, (1, 16)))
            s = bb.emit(relax.op.nn.softmax(relax.op.multiply(r, r)))
            out = bb.emit_output(relax.Tuple([a, s]))
        bb.emit_func_output(out)
    return bb.get()


def test_pooling_and_elementwise_fallback():
    mod = standard_pipeline(_pool_softmax_module())
    ref_vm = relax.VirtualMachine(tvm.compile(mod, target=TARGET), tvm.cpu())
    sched = apply_schedules(mod, TARGET)
    funcs = prim_funcs(sched)
    assert all(f.attrs.get("tirx.is_scheduled") for f in funcs.values())
    assert any(_has_loop_kind(f, "parallel") for f in funcs.values())
    vm = relax.VirtualMachine(tvm.compile(sched, target=TARGET), tvm.cpu())
    x = tvm.runtime.tensor(
        np.random.default_rng().standard_normal((1, 16, 15, 15)).astype("float32")
    )
    got, want = vm["main"](x), ref_vm["main"](x)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g.numpy(), r.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("dtype", "shape"),
    [("uint8", (1, 16, 14, 14)), ("float32", (1, 8, 28, 28)), ("uint8", (1, 8, 7, 7))],
)
def test_pooling_fallback_is_parallel(dtype, shape):
    """Regression: the window-reduction schedule decomposed the reduction before ``parallel``,
    which then failed and left the pooling kernel serial and scalar (4 ms of GoogLeNet int8)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.max_pool2d(x, 3, 1, 1))
        bb.emit_func_output(out)
    mod = standard_pipeline(bb.get())
    sched = apply_schedules(mod, TARGET)
    (func,) = prim_funcs(sched).values()
    assert _has_loop_kind(func, "parallel")
    if shape[-1] % 2 == 0:  # a width with a vector split
        assert _has_loop_kind(func, "vectorized")
    rng = np.random.default_rng()
    data = rng.integers(0, 256, shape) if dtype == "uint8" else rng.standard_normal(shape)
    data = tvm.runtime.tensor(data.astype(dtype))
    got = relax.VirtualMachine(tvm.compile(sched, target=TARGET), tvm.cpu())["main"](data)
    want = relax.VirtualMachine(tvm.compile(mod, target=TARGET), tvm.cpu())["main"](data)
    np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_failing_rule_is_skipped(monkeypatch):
    def boom(self, func, target, tunable):
        raise RuntimeError("rule bug")

    monkeypatch.setattr(Conv2dChannelVector, "apply", boom)
    mod = apply_schedules(
        standard_pipeline(conv2d_module(ConvCase(16, 8, 8, 16))), TARGET, fold_packing=False
    )
    # The next rule (width-vector) took over; the build still works.
    func = _scheduled_single(mod)
    tvm.compile(mod, target=TARGET)
    assert _has_loop_kind(func, "parallel")


def test_scheduled_functions_are_left_alone():
    mod = standard_pipeline(conv2d_module(ConvCase(16, 8, 8, 16)))
    gv = next(g for g, f in mod.functions_items() if isinstance(f, tirx.PrimFunc))
    mod[gv] = mod[gv].with_attr("tirx.is_scheduled", True)
    after = apply_schedules(mod, TARGET)
    tvm.ir.assert_structural_equal(after[gv], mod[gv])


def test_input_module_not_modified():
    mod = standard_pipeline(conv2d_module(ConvCase(16, 8, 8, 16)))
    before = mod.script()
    apply_schedules(mod, TARGET)
    assert mod.script() == before


def test_function_target_attribute_wins():
    """A PrimFunc carrying a cuda target gets GPU thread bindings even with an llvm default."""
    mod = standard_pipeline(conv2d_module(ConvCase(16, 8, 8, 16), dtype="float16"))
    cuda = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host={"kind": "llvm"})
    gv = next(g for g, f in mod.functions_items() if isinstance(f, tirx.PrimFunc))
    mod[gv] = mod[gv].with_attr("target", cuda)
    func = apply_schedules(mod, TARGET)[gv]
    assert func.attrs.get("tirx.is_scheduled")
    assert func.attrs["target"].kind.name == "cuda"  # the attribute survives scheduling
    assert _has_loop_kind(func, "thread_binding")
