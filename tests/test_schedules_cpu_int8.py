"""CPU int8 (u8 x s8 -> s32) rules: bit-exact numerics, dot-product instructions in the asm."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm

from mulayer.schedules import apply_schedules
from mulayer.schedules._util import has_cpu_feature, leaf_blocks
from mulayer.schedules.cpu_amx import (
    Conv2dInt8AMX,
    amx_intrinsics,
    amx_usable,
    fits_amx,
    host_exposes_amx,
    request_amx_permission,
    schedule_conv2d_amx,
    tile_shape,
)
from mulayer.schedules.cpu_int8 import (
    Conv2dInt8Depthwise,
    Conv2dInt8DotProduct,
    MatmulInt8DotProduct,
)
from mulayer.schedules.cpu_tiling import MIN_BALANCE, TARGET_THREADS, balance, parallel_part
from mulayer.schedules.testing import (
    ConvCase,
    build_prim_func,
    conv2d_module,
    conv2d_reference,
    matmul_module,
    prim_funcs,
    requant_reference,
    run_poisoned,
    standard_pipeline,
)

HOST = tvm.target.Target(
    {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": 2}
)
# Runs on any x86-64 with AVX2: exercises the int32 vector fallbacks.
NO_VNNI = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
VNNI = tvm.target.Target(
    {"kind": "llvm", "mcpu": "sapphirerapids", "mattr": ["-amx-int8", "-amx-tile"], "num-cores": 2}
)
AMX = tvm.target.Target(
    {"kind": "llvm", "mcpu": "sapphirerapids", "mattr": ["+amx-int8", "+amx-tile"], "num-cores": 2}
)
AVX_VNNI = tvm.target.Target({"kind": "llvm", "mcpu": "alderlake", "num-cores": 2})
host_has_vnni = pytest.mark.skipif(
    not has_cpu_feature(HOST, "avx512vnni"), reason="host CPU lacks AVX-512 VNNI"
)
host_has_avx2 = pytest.mark.skipif(not has_cpu_feature(HOST, "avx2"), reason="needs AVX2")
host_has_amx = pytest.mark.skipif(not host_exposes_amx(), reason="host OS exposes no AMX")

INT8_CONV_CASES = [
    ConvCase(64, 28, 28, 64),  # VNNI, 3x3
    ConvCase(32, 14, 14, 48, k=1, pad=0),  # VNNI, pointwise, 3 channel tiles
    ConvCase(16, 15, 15, 32, stride=2),  # VNNI, strided, odd size
    ConvCase(64, 9, 9, 64, groups=4),  # VNNI, grouped (16 in / 16 out per group)
    ConvCase(16, 12, 12, 32, dilation=2, pad=2, n=2),  # VNNI, dilated, batch 2
    ConvCase(32, 11, 11, 40),  # 40 output channels: 8-lane VNNI (AVX512VL)
    ConvCase(1152, 3, 10, 1024, k=1, pad=0),  # weights > 1 MB: channel tiles outer
    ConvCase(3, 20, 20, 16, k=7, stride=2, pad=3),  # 3 input channels: fallback
    ConvCase(32, 18, 18, 32, groups=32),  # depthwise: Conv2dInt8Depthwise
    ConvCase(12, 9, 9, 20),  # 20 output channels: fallback
    ConvCase(16, 16, 16, 96, k=1, pad=0),  # pointwise expand: pixels in the lanes
    ConvCase(24, 8, 12, 72, k=1, pad=0, n=2),  # pixel lanes: rows of 12 (vectors span rows)
    ConvCase(8, 4, 4, 20, k=1, pad=0),  # pixel lanes: 20 output channels (no channel lanes)
    ConvCase(64, 8, 8, 16, k=1, pad=0),  # pixel lanes: projection (C > F)
    ConvCase(16, 7, 7, 40, k=1, pad=0),  # pixel lanes, 49 pixels padded to 64
    ConvCase(32, 7, 7, 48, k=1, pad=0, n=2),  # pixel lanes, 49 padded to 64, batch 2
    ConvCase(16, 6, 6, 32, k=1, pad=1),  # pixel lanes, zero-padded 1x1 (8 x 8 outputs)
    ConvCase(64, 7, 7, 96, k=1, pad=0),  # pixel lanes, 1 pixel tile: channel tiles parallel
    ConvCase(16, 11, 11, 32, k=1, pad=0, n=2),  # pixel lanes, rows of 11 padded to 16
]
# Channel-lane convs whose 7 rows get channel tiles in the parallel loop (input packed at root);
# a zero-padded 1x1 on 14 x 14 outputs, which the padded-row pixel lanes leave to channel lanes.
GRAIN_CASES = [
    ConvCase(32, 7, 7, 64),
    ConvCase(32, 14, 14, 64, stride=2, n=2),
    ConvCase(16, 12, 12, 32, k=1, pad=1),
]
# Pointwise convs that take the pixels-in-lanes schedule (cpu_int8_pointwise) on VNNI.
PIXEL_LANE_CASES = INT8_CONV_CASES[-9:]


def _int8_inputs(case: ConvCase, rng):
    x = rng.integers(0, 256, (case.n, case.c, case.h, case.w)).astype("uint8")
    w = rng.integers(-128, 128, (case.f, case.c // case.groups, case.k, case.k)).astype("int8")
    b = rng.integers(-5000, 5000, (1, case.f, 1, 1)).astype("int32")
    return x, w, b


def _conv_int8(case: ConvCase, target, epilogue: str):
    mod = conv2d_module(case, dtype="uint8", w_dtype="int8", out_dtype="int32", epilogue=epilogue)
    mod = apply_schedules(standard_pipeline(mod), target, fold_packing=False)
    (func,) = prim_funcs(mod).values()
    assert func.attrs.get("tirx.is_scheduled")
    return func


@host_has_vnni
@pytest.mark.parametrize("case", INT8_CONV_CASES + GRAIN_CASES, ids=str)
def test_conv2d_int8_bit_exact(case: ConvCase):
    x, w, b = _int8_inputs(case, np.random.default_rng())
    lib = build_prim_func(_conv_int8(case, HOST, "bias"), HOST)
    oh, ow = case.out_hw
    out = run_poisoned(lib, [x, w, b], (case.n, case.f, oh, ow), "int32")
    ref = conv2d_reference(x, w, case, "int64") + b
    np.testing.assert_array_equal(out, ref)


@host_has_vnni
@pytest.mark.parametrize(
    "case",
    [
        INT8_CONV_CASES[0],
        INT8_CONV_CASES[8],
        *PIXEL_LANE_CASES[:2],
        *PIXEL_LANE_CASES[-4:],
        INT8_CONV_CASES[1],
        *GRAIN_CASES,
    ],
    ids=str,
)
def test_conv2d_int8_requantize_epilogue(case: ConvCase):
    x, w, b = _int8_inputs(case, np.random.default_rng())
    lib = build_prim_func(_conv_int8(case, HOST, "requant"), HOST)
    oh, ow = case.out_hw
    scale = np.linspace(1e-4, 2e-3, case.f, dtype="float32").reshape(1, case.f, 1, 1)
    out = run_poisoned(lib, [x, w, b, scale], (case.n, case.f, oh, ow), "uint8")
    acc = conv2d_reference(x, w, case, "int64").astype("int32")
    np.testing.assert_array_equal(out, requant_reference(acc, b))


@host_has_avx2
@pytest.mark.parametrize("case", [INT8_CONV_CASES[0], INT8_CONV_CASES[7]], ids=str)
def test_conv2d_int8_without_vnni_bit_exact(case: ConvCase):
    x, w, b = _int8_inputs(case, np.random.default_rng())
    func = _conv_int8(case, NO_VNNI, "bias")
    lib = build_prim_func(func, NO_VNNI)
    assert "vpdpbusd" not in lib.inspect_source("asm")
    oh, ow = case.out_hw
    out = run_poisoned(lib, [x, w, b], (case.n, case.f, oh, ow), "int32")
    np.testing.assert_array_equal(out, conv2d_reference(x, w, case, "int64") + b)


DEPTHWISE_CASES = [
    ConvCase(32, 18, 18, 32, groups=32),
    ConvCase(48, 17, 17, 48, stride=2, groups=48),  # stride 2, odd size: phase-split copy
    ConvCase(16, 28, 28, 16, stride=2, groups=16),
    ConvCase(24, 9, 9, 24, k=5, pad=2, groups=24),
    ConvCase(16, 12, 12, 16, stride=2, pad=0, groups=16),  # no padding stage: a copy
    ConvCase(16, 15, 15, 16, stride=2, dilation=2, pad=2, groups=16, n=2),
]


@host_has_avx2
@pytest.mark.parametrize("epilogue", ["bias", "requant"])
@pytest.mark.parametrize("case", DEPTHWISE_CASES, ids=str)
@pytest.mark.parametrize("target", [HOST, NO_VNNI], ids=["host", "haswell"])
def test_depthwise_int8_bit_exact(case: ConvCase, epilogue: str, target):
    _check_depthwise_int8(case, epilogue, target)


def _check_depthwise_int8(case: ConvCase, epilogue: str, target) -> None:
    raw = prim_funcs(
        standard_pipeline(conv2d_module(case, "uint8", "int8", "int32", epilogue=epilogue))
    ).popitem()[1]
    sch = Conv2dInt8Depthwise().apply(raw, target, False)
    assert sch is not None
    _check_int8_numerics(case, build_prim_func(sch.mod["main"], target), epilogue)


# MobileNetV2's stride-1 depthwise row widths (56/28/14/7), batch 2: the tile spans whole rows,
# so the write-back is one vector loop over rows x columns (no per-row tail).
WHOLE_ROW_DEPTHWISE_CASES = [
    ConvCase(16, 56, 56, 16, groups=16, n=2),
    ConvCase(32, 28, 28, 32, groups=32, n=2),
    ConvCase(48, 14, 14, 48, groups=48, n=2),
    ConvCase(40, 7, 7, 40, groups=40, n=2),
]


def _write_back_vector_extents(func) -> list[int]:
    """Extents of the vectorised loops around the blocks that write the conv's output."""
    sch = tvm.s_tir.Schedule(func)
    out = sch.mod["main"].params[-1].name
    return [
        int(sch.get(lp).extent)
        for block in leaf_blocks(sch)
        if any(w.source.name == out for w in sch.get(block).writes)
        for lp in sch.get_loops(block)
        if sch.get(lp).kind == tvm.tirx.ForKind.VECTORIZED
    ]


@host_has_avx2
@pytest.mark.parametrize("epilogue", ["bias", "bias_relu", "requant"])
@pytest.mark.parametrize("case", WHOLE_ROW_DEPTHWISE_CASES, ids=str)
@pytest.mark.parametrize("target", [HOST, NO_VNNI], ids=["host", "haswell"])
def test_depthwise_int8_whole_rows_bit_exact(case: ConvCase, epilogue: str, target):
    _check_depthwise_int8(case, epilogue, target)


@pytest.mark.parametrize("case", WHOLE_ROW_DEPTHWISE_CASES, ids=str)
def test_depthwise_int8_write_back_spans_rows(case: ConvCase):
    """On 16-lane AVX-512 these tiles are whole rows, several of them: the write-back is one
    vector loop over rows x columns (was one per row, ending in a partial vector)."""
    raw = prim_funcs(
        standard_pipeline(conv2d_module(case, "uint8", "int8", "int32", epilogue="requant"))
    ).popitem()[1]
    sch = Conv2dInt8Depthwise().apply(raw, VNNI, False)
    assert sch is not None
    extents = _write_back_vector_extents(sch.mod["main"])
    ow = case.out_hw[1]
    assert extents and all(e % ow == 0 and e > ow for e in extents), extents


@pytest.mark.parametrize(
    ("case", "dtypes", "expect"),
    [
        (DEPTHWISE_CASES[0], ("uint8", "int8", "int32"), True),
        (ConvCase(16, 10, 10, 32, groups=16), ("uint8", "int8", "int32"), False),  # multiplier 2
        (INT8_CONV_CASES[0], ("uint8", "int8", "int32"), False),  # dense conv: VNNI rule
        (DEPTHWISE_CASES[0], ("float32", "float32", "float32"), False),
    ],
    ids=["u8-depthwise", "multiplier-2", "dense", "fp32"],
)
def test_depthwise_int8_claims(case, dtypes, expect):
    raw = prim_funcs(standard_pipeline(conv2d_module(case, *dtypes))).popitem()[1]
    assert (Conv2dInt8Depthwise().apply(raw, HOST, False) is not None) == expect


@pytest.mark.parametrize(
    ("target", "case", "expect"),
    [
        (VNNI, INT8_CONV_CASES[0], True),
        (VNNI, INT8_CONV_CASES[8], False),  # depthwise: no dot product
        (AVX_VNNI, ConvCase(16, 10, 10, 8), True),  # 256-bit AVX-VNNI, 8 channels
        (NO_VNNI, INT8_CONV_CASES[0], False),
    ],
    ids=["vnni", "vnni-depthwise", "avx-vnni", "haswell"],
)
def test_conv2d_int8_asm_uses_vpdpbusd(target, case, expect):
    func = _conv_int8(case, target, "bias")
    asm = build_prim_func(func, target).inspect_source("asm")
    assert ("vpdpbusd" in asm) == expect
    claimed = Conv2dInt8DotProduct().apply(
        prim_funcs(
            standard_pipeline(conv2d_module(case, dtype="uint8", w_dtype="int8", out_dtype="int32"))
        ).popitem()[1],
        target,
        False,
    )
    assert (claimed is not None) == expect


@pytest.mark.parametrize(
    ("case", "pixels"),
    [
        *((case, True) for case in PIXEL_LANE_CASES),
        (INT8_CONV_CASES[1], True),  # 14 x 14 = 196 pixels: rows padded to 16
        (ConvCase(96, 14, 14, 32, k=1, pad=0), False),  # 14 x 14 projection: channel lanes
        (ConvCase(16, 8, 8, 64, k=1, pad=0, stride=2), False),  # strided
        (INT8_CONV_CASES[0], False),  # 3x3
    ],
    ids=str,
)
def test_pointwise_pixel_lanes_claims(case: ConvCase, pixels: bool):
    """Expand 1x1 convs put 16 pixels in a register: the write-back has no gather."""
    func = _conv_int8(case, VNNI, "requant")
    asm = build_prim_func(func, VNNI).inspect_source("asm")
    assert "vpdpbusd" in asm
    if pixels:
        assert "vpgatherdd" not in asm
    # The packed input is N, C/4, H*W, 4 (pixels flattened, padded to whole vectors of 16)
    # only on the pixel-lane path.
    oh, ow = case.out_hw
    flat = f"T.int64({case.c // 4}), T.int64({-(-oh * ow // 16) * 16}), T.int64(4)"
    if (oh * ow) % 16 and 8 <= ow < 16:  # rows padded to a vector each
        flat = f"T.int64({case.c // 4}), T.int64({oh}), T.int64(16), T.int64(4)"
    assert (flat in func.script()) == pixels


@pytest.mark.parametrize(
    ("mattr", "instr"),
    [(["+neon", "+dotprod"], "sdot"), (["+neon", "+dotprod", "+i8mm"], "usdot")],
)
def test_conv2d_int8_aarch64_dot_product_asm(mattr, instr):
    target = tvm.target.Target(
        {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": mattr, "num-cores": 4}
    )
    func = _conv_int8(ConvCase(32, 10, 10, 16), target, "bias")
    asm = build_prim_func(func, target).inspect_source("asm")
    assert re.search(rf"\b{instr}\b", asm)


def test_sdot_emulation_identity():
    """The +dotprod path computes u8*s8 as (a^0x80 as s8)*b + 64*b + 64*b: check the algebra."""
    a = np.arange(256, dtype=np.int64)
    b = np.arange(-128, 128, dtype=np.int64)
    shifted = (a ^ 0x80).astype(np.uint8).view(np.int8).astype(np.int64)
    np.testing.assert_array_equal(
        np.outer(shifted, b) + 2 * np.outer(np.full(256, 64), b), np.outer(a, b)
    )


@host_has_vnni
@pytest.mark.parametrize(
    ("m", "k", "n", "vnni"),
    [(1, 512, 1008, True), (7, 36, 32, True), (16, 256, 64, True), (3, 30, 20, False)],
)
def test_matmul_int8_bit_exact(m, k, n, vnni):
    rng = np.random.default_rng()
    x = rng.integers(0, 256, (m, k)).astype("uint8")
    w = rng.integers(-128, 128, (k, n)).astype("int8")
    b = rng.integers(-5000, 5000, (n,)).astype("int32")
    mod = matmul_module(m, k, n, dtype="uint8", w_dtype="int8", out_dtype="int32")
    raw = standard_pipeline(mod)
    assert (
        MatmulInt8DotProduct().apply(prim_funcs(raw).popitem()[1], HOST, False) is not None
    ) == vnni
    (func,) = prim_funcs(apply_schedules(raw, HOST, fold_packing=False)).values()
    lib = build_prim_func(func, HOST)
    assert ("vpdpbusd" in lib.inspect_source("asm")) == vnni
    out = run_poisoned(lib, [x, w, b], (m, n), "int32")
    np.testing.assert_array_equal(out, x.astype("int64") @ w.astype("int64") + b)


@pytest.mark.skipif(not has_cpu_feature(HOST, "avxvnni"), reason="host CPU lacks AVX-VNNI")
def test_conv2d_int8_avx_vnni_256_bit_exact():
    """8-lane AVX-VNNI (no AVX-512) on the host: alderlake's feature set is a subset here."""
    case = ConvCase(16, 10, 10, 24)
    x, w, b = _int8_inputs(case, np.random.default_rng())
    lib = build_prim_func(_conv_int8(case, AVX_VNNI, "bias"), AVX_VNNI)
    assert "vpdpbusd" in lib.inspect_source("asm")
    out = run_poisoned(lib, [x, w, b], (1, 24, 10, 10), "int32")
    np.testing.assert_array_equal(out, conv2d_reference(x, w, case, "int64") + b)


@host_has_vnni
def test_int8_weight_prepack_folds():
    from tvm import relax

    case = ConvCase(32, 12, 12, 32)
    x, w, b = _int8_inputs(case, np.random.default_rng())
    mod = conv2d_module(
        case,
        dtype="uint8",
        w_dtype="int8",
        out_dtype="int32",
        epilogue="bias",
        params={"w": w, "b": b},
    )
    mod = apply_schedules(standard_pipeline(mod), HOST)
    assert all("weight_prepack" not in name for name in prim_funcs(mod))
    assert any(name.endswith("_prepacked") for name in prim_funcs(mod))
    vm = relax.VirtualMachine(tvm.compile(mod, target=HOST), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(out, conv2d_reference(x, w, case, "int64") + b)


@host_has_vnni
def test_pad_input_channels_enables_dot_product_on_stem():
    from tvm import relax

    from mulayer.schedules.pad_channels import PadConvInputChannels

    case = ConvCase(3, 20, 20, 16, k=7, stride=2, pad=3)
    x, w, b = _int8_inputs(case, np.random.default_rng())
    mod = conv2d_module(case, "uint8", "int8", "int32", epilogue="bias", params={"w": w, "b": b})
    mod = standard_pipeline(PadConvInputChannels()(mod))
    conv = next(f for name, f in prim_funcs(mod).items() if "conv2d" in name)
    assert Conv2dInt8DotProduct().apply(conv, HOST, False) is not None
    vm = relax.VirtualMachine(tvm.compile(apply_schedules(mod, HOST), target=HOST), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(out, conv2d_reference(x, w, case, "int64") + b)


def _quantizer_form(c: int, h: int, f: int, rng) -> tuple[tvm.IRModule, np.ndarray]:
    """What QuantizeCPU emits: quantize, pad with the zero point, conv, correct, dequantize."""
    from tvm import relax

    s, zp = 0.05, 7
    wq = rng.integers(-128, 128, (f, c, 3, 3)).astype("int8")
    corr = (zp * wq.astype(np.int64).sum(axis=(1, 2, 3))).astype(np.int32).reshape(1, f, 1, 1)
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType((1, c, h, h), "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            q = bb.emit(relax.op.round(relax.op.divide(xv, relax.const(np.float32(s)))))
            q = bb.emit(relax.op.clip(relax.op.add(q, relax.const(np.float32(zp))), 0, 255))
            q = bb.emit(relax.op.astype(q, "uint8"))
            q = bb.emit(relax.op.nn.pad(q, [0, 0, 0, 0, 1, 1, 1, 1], pad_value=float(zp)))
            acc = bb.emit(relax.op.nn.conv2d(q, relax.const(wq), out_dtype="int32"))
            acc = bb.emit(relax.op.subtract(acc, relax.const(corr)))
            y = bb.emit(relax.op.astype(acc, "float32"))
            scale = np.full((1, f, 1, 1), s * 0.01, "float32")
            out = bb.emit_output(bb.emit(relax.op.multiply(y, relax.const(scale))))
        bb.emit_func_output(out)
    return bb.get(), rng.standard_normal((1, c, h, h)).astype("float32")


@host_has_vnni
def test_quantizer_form_is_bit_exact_against_unscheduled():
    from tvm import relax

    mod, x = _quantizer_form(32, 12, 48, np.random.default_rng())
    mod = standard_pipeline(mod)
    ref = relax.VirtualMachine(tvm.compile(mod, target=HOST), tvm.cpu())
    sched = apply_schedules(mod, HOST)
    conv = next(f for name, f in prim_funcs(mod).items() if name.startswith("fused_conv2d"))
    assert Conv2dInt8DotProduct().apply(conv, HOST, False) is not None
    vm = relax.VirtualMachine(tvm.compile(sched, target=HOST), tvm.cpu())
    xt = tvm.runtime.tensor(x)
    np.testing.assert_array_equal(vm["main"](xt).numpy(), ref["main"](xt).numpy())


AMX_CASES = [
    ConvCase(64, 14, 14, 64),  # 14-pixel tiles, 64 channels
    ConvCase(32, 9, 9, 48, k=1, pad=0),  # pointwise, read without padding
    ConvCase(96, 20, 20, 32),  # 48-channel tiles (96 = 2 x 48)
    ConvCase(16, 7, 7, 16, dilation=2, pad=2, n=2),  # dilated, batch 2, 16-channel tiles
    ConvCase(1152, 3, 10, 1024, k=1, pad=0),  # weights > 1 MB: channel tiles outer
    ConvCase(64, 28, 28, 32, stride=2),  # stride 2: tile rows every second pixel
    ConvCase(32, 15, 15, 48, stride=2, n=2),  # stride 2, odd size (8 output pixels a row)
]


def _schedule_amx(case: ConvCase, target, epilogue: str, emulate: bool):
    from mulayer.schedules._util import new_schedule
    from mulayer.schedules.conv2d_analysis import find_conv2d

    mod = standard_pipeline(conv2d_module(case, "uint8", "int8", "int32", epilogue=epilogue))
    (func,) = prim_funcs(mod).values()
    sch = new_schedule(func)
    info = find_conv2d(sch)
    assert fits_amx(info)
    intrin = amx_intrinsics(*tile_shape(info), emulate=emulate)
    return schedule_conv2d_amx(sch, info, target, intrin, emulated=emulate).mod["main"]


def _check_int8_numerics(case: ConvCase, lib, epilogue: str):
    """``lib`` (a u8 x s8 conv with a bias, bias + ReLU or requantize epilogue) against numpy,
    bit for bit."""
    x, w, b = _int8_inputs(case, np.random.default_rng())
    oh, ow = case.out_hw
    acc = conv2d_reference(x, w, case, "int64")
    if epilogue in ("bias", "bias_relu"):
        out = run_poisoned(lib, [x, w, b], (case.n, case.f, oh, ow), "int32")
        want = acc + b if epilogue == "bias" else np.maximum(acc + b, 0)
        np.testing.assert_array_equal(out, want)
    else:
        scale = np.linspace(1e-4, 2e-3, case.f, dtype="float32").reshape(1, case.f, 1, 1)
        out = run_poisoned(lib, [x, w, b, scale], (case.n, case.f, oh, ow), "uint8")
        np.testing.assert_array_equal(out, requant_reference(acc.astype("int32"), b))


@pytest.mark.parametrize("epilogue", ["bias", "requant"])
@pytest.mark.parametrize("case", AMX_CASES, ids=str)
def test_amx_schedule_bit_exact_with_emulated_tiles(case: ConvCase, epilogue: str):
    """The AMX schedule (layouts, tiling, tile store, epilogue) with plain-loop tiles: any CPU."""
    lib = build_prim_func(_schedule_amx(case, HOST, epilogue, emulate=True), HOST)
    _check_int8_numerics(case, lib, epilogue)


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        (AMX_CASES[0], True),
        (AMX_CASES[1], True),
        (ConvCase(64, 14, 14, 64, stride=2), True),  # stride 2: strided tile loads
        (ConvCase(64, 14, 14, 64, stride=3), False),  # stride 3: VNNI
        (ConvCase(4, 30, 30, 64, k=7, stride=2, pad=3), False),  # RGB stem: too few channels
        (ConvCase(32, 18, 18, 32, groups=32), False),  # depthwise
        (ConvCase(32, 11, 11, 40), False),  # 40 output channels
    ],
    ids=str,
)
def test_conv2d_int8_amx_asm_uses_tdpbusd(case: ConvCase, expect: bool):
    """Compile only (no AMX needed): the rule claims the conv and the asm has the tile ops."""
    func = _conv_int8(case, AMX, "requant")
    asm = build_prim_func(func, AMX).inspect_source("asm")
    found = set(re.findall(r"\b(tdpbusd|tileloadd|tilestored|ldtilecfg|tilezero)\b", asm))
    if expect:
        assert found == {"tdpbusd", "tileloadd", "tilestored", "ldtilecfg", "tilezero"}
        assert re.search(r"call\w*\s+\S*syscall", asm)  # asks Linux for AMX permission first
    else:
        assert not found
    raw = prim_funcs(
        standard_pipeline(conv2d_module(case, "uint8", "int8", "int32", epilogue="requant"))
    ).popitem()[1]
    assert (Conv2dInt8AMX().apply(raw, AMX, False) is not None) == expect


def test_amx_weight_packing_folds_at_compile_time():
    """Compile only: constant weights are packed for the tiles once, at build time."""
    case = AMX_CASES[0]
    _, w, b = _int8_inputs(case, np.random.default_rng())
    mod = conv2d_module(case, "uint8", "int8", "int32", epilogue="requant", params={"w": w, "b": b})
    (name,) = prim_funcs(apply_schedules(standard_pipeline(mod), AMX))
    assert name.endswith("_prepacked")


def test_amx_usable_gating():
    def target(**attrs):
        return tvm.target.Target({"kind": "llvm", **attrs})

    assert amx_usable(AMX)
    assert not amx_usable(VNNI)
    assert not amx_usable(target(mcpu="znver4"))
    assert not amx_usable(target(mcpu="icelake-server"))
    host_cpu = tvm.target.codegen.llvm_get_system_cpu()
    if has_cpu_feature(HOST, "amx-int8"):  # a target for this CPU: only if the OS exposes AMX
        assert amx_usable(target(mcpu=host_cpu)) == host_exposes_amx()
    other = "graniterapids" if host_cpu != "graniterapids" else "sapphirerapids"
    assert amx_usable(target(mcpu=other))  # cross-compiling for another AMX CPU


@host_has_amx
@pytest.mark.parametrize("epilogue", ["bias", "requant"])
@pytest.mark.parametrize("case", AMX_CASES, ids=str)
def test_amx_bit_exact_on_host(case: ConvCase, epilogue: str):
    """Real tiles: runs where the OS exposes AMX-INT8 (e.g. the GPU machine's Xeon). The
    kernel asks for AMX permission itself (no request_amx_permission() here)."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2})
    lib = build_prim_func(_schedule_amx(case, target, epilogue, emulate=False), target)
    assert "tdpbusd" in lib.inspect_source("asm")
    _check_int8_numerics(case, lib, epilogue)


def test_request_amx_permission_answers_without_crashing():
    assert request_amx_permission() in (True, False)  # False where the OS has no AMX


def _conv_parallel_extent(func) -> int:
    """Extent of the parallel loop around the conv's reduction block."""
    sch = tvm.s_tir.Schedule(func)
    (conv,) = [b for b in leaf_blocks(sch) if "conv2d_nchw_update" in sch.get(b).name_hint]
    extents = [
        int(sch.get(lp).extent)
        for lp in sch.get_loops(conv)
        if sch.get(lp).kind == tvm.tirx.ForKind.PARALLEL
    ]
    assert len(extents) == 1, extents
    return extents[0]


@pytest.mark.parametrize(
    ("case", "tasks"),
    [
        # ResNet-50's 7x7 stage: one pixel tile of 4 vectors (was 1 task), 7 rows (was 7).
        (ConvCase(2048, 7, 7, 512, k=1, pad=0), 16),
        (ConvCase(512, 7, 7, 2048, k=1, pad=0), 16),
        (ConvCase(160, 7, 7, 320), 14),
        # 14 rows or 49 pixel tiles balance 16 threads well enough: unchanged.
        (ConvCase(1024, 14, 14, 256, k=1, pad=0), 14),
        (ConvCase(24, 56, 56, 144, k=1, pad=0), 49),
        # MobileNetV2's 56x56 depthwise: one task per channel.
        (ConvCase(144, 56, 56, 144, groups=144), 144),
    ],
    ids=str,
)
def test_conv_parallel_grain_for_16_threads(case: ConvCase, tasks: int):
    """Batch-1 convs split into enough parallel tasks to keep 16 threads busy."""
    func = _conv_int8(case, VNNI, "requant")
    extent = _conv_parallel_extent(func)
    assert extent == tasks
    assert balance(extent, TARGET_THREADS) >= MIN_BALANCE


def test_parallel_part():
    assert balance(7, 16) == pytest.approx(7 / 16)
    assert balance(7, 2) == pytest.approx(7 / 8)
    assert parallel_part(7, 32) == 2  # 14 tasks
    assert parallel_part(1, 128) == 16
    assert parallel_part(14, 16) == 1
    assert parallel_part(1, 5) == 5  # the best there is


@pytest.mark.parametrize(
    ("case", "target"),
    [
        (ConvCase(64, 14, 14, 64), AMX),  # 14-pixel rows: the epilogue went scalar, then gathers
        (ConvCase(32, 16, 16, 64, k=1, pad=0), VNNI),  # pointwise, pixels in the lanes
    ],
    ids=["amx-3x3", "vnni-pointwise"],
)
def test_requantize_epilogue_rounds_in_vector_registers(case: ConvCase, target):
    """Compile only: the requantize rounding (``T.nearbyint``) is widened by TVM's vectorizer
    (``mulayer.schedules`` marks it vectorizable; TVM 0.27 left such loops scalar), so the
    epilogue rounds with ``vrndscaleps`` and reads its accumulators without gathers."""
    asm = build_prim_func(_conv_int8(case, target, "requant"), target).inspect_source("asm")
    assert re.search(r"\bvrndscaleps\s+\$\w+,\s*%[yz]mm", asm)
    assert not re.search(r"\bv\w*gather", asm)


def test_vectorized_nearbyint_is_widened():
    """TIR level: a ``T.vectorized`` loop around ``T.nearbyint`` becomes one vector call."""
    from tvm.script import tirx as T

    import mulayer.schedules  # noqa: F401  (registers the vectorizable ops)

    @T.prim_func(s_tir=True)
    def rounding(a: T.Buffer((4, 14), "float32"), out: T.Buffer((4, 14), "float32")):
        for c in range(4):
            for x in T.vectorized(14):
                out[c, x] = T.nearbyint(a[c, x])

    text = str(tvm.tirx.transform.VectorizeLoop()(tvm.IRModule({"main": rounding})))
    assert "T.nearbyint(a[c, T.Ramp(0, 1, 14)])" in text


@pytest.mark.parametrize(
    "case, tasks",
    [
        (ConvCase(256, 14, 14, 512, stride=2), 4 * 16),  # weights > 1 MB: channel tiles outer
        (ConvCase(256, 14, 14, 512, k=1, pad=0, stride=2), 4 * 14),  # 7 rows + channel halves
    ],
    ids=["3x3-channel-tiles-outer", "1x1-rows-and-channel-tiles"],
)
def test_amx_shared_pack_writes_whole_pixels(case: ConvCase, tasks: int):
    """Where channel tiles share one input pack (ResNet's 256 -> 512 stride-2 convs), the pack
    is parallel over channel groups x rows and writes each pixel's 64 channels in one task
    (innermost, unrolled), so no two threads write one cache line of it."""
    text = str(_schedule_amx(case, AMX, "requant", emulate=False))
    pack = text.index('T.sblock("pad_temp")')
    loops = text[text.rfind("T.parallel(", 0, pack) : pack]
    assert re.match(rf"T\.parallel\(T\.int64\({tasks}\)\)", loops)
    assert "T.unroll(T.int64(64))" in loops
    assert text.index("llvm.x86.tilezero") > pack  # packed before any tile is computed


@pytest.mark.parametrize("case", AMX_CASES, ids=str)
def test_amx_tiles_configured_once_per_task(case: ConvCase):
    """Compile-side: one ``ldtilecfg``, at the top of the parallel task that uses the tiles
    (not one per output tile); emulated tiles get none (no AMX to configure)."""
    text = str(_schedule_amx(case, AMX, "requant", emulate=False))
    assert text.count('"llvm.x86.ldtilecfg"') == 1
    configure = text.index('T.sblock("amx_configure_tiles")')
    first_tile = text.index('"llvm.x86.tilezero"')
    task = text.rfind("T.parallel(", 0, configure)
    assert configure < first_tile and task != -1
    assert "T.parallel(" not in text[configure:first_tile]  # the same task
    assert "ldtilecfg" not in str(_schedule_amx(case, AMX, "requant", emulate=True))
