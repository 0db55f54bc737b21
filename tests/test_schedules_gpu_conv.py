"""The tensor-core conv rule's tiles and split-K: CUDA code here, numerics on a GPU (``-m gpu``)."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import tvm
from tvm import relax, s_tir

from mulayer.schedules.conv2d_analysis import find_conv2d
from mulayer.schedules.gpu_conv2d import (
    DEFAULT_TILE,
    LARGE_NHWC_FLOPS,
    NARROW_ENV,
    Conv2dTensorCore,
    ConvTile,
    choose_tile,
    legacy_tile,
    split_k_choices,
)
from mulayer.schedules.testing import (
    ConvCase,
    build_prim_func,
    conv2d_module,
    conv2d_reference,
    prim_funcs,
    standard_pipeline,
)

CUDA = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host={"kind": "llvm"})

# 3x3, strided, 1x1, odd channels and sizes, a 7x7 stem, a small-spatial deep layer.
CASES = [
    ConvCase(64, 14, 14, 64),
    ConvCase(64, 15, 15, 128, stride=2),
    ConvCase(256, 7, 7, 64, k=1, pad=0),
    ConvCase(72, 9, 11, 80),
    ConvCase(3, 32, 32, 64, k=7, stride=2, pad=3),
    ConvCase(512, 7, 7, 512),
]
# Fewer than 64 output channels (J tiles of 16/32/48, the output padded to them): GoogLeNet's
# and SqueezeNet's 1x1 reductions, a 3x3 on 16 inputs, a 3-channel stem (K = 27), 40 outputs
# (not a multiple of 16), 8 outputs, odd sizes.
NARROW_CASES = [
    ConvCase(96, 13, 13, 16, k=1, pad=0),
    ConvCase(128, 14, 14, 24, k=1, pad=0),
    ConvCase(16, 14, 14, 48),
    ConvCase(3, 30, 30, 32, stride=2),
    ConvCase(72, 9, 11, 40, k=1, pad=0),
    ConvCase(64, 7, 7, 8, k=1, pad=0),
]
# (name, tile): None is the default (choose_tile); splits only where they divide C.
TILES = [
    ("default", None),
    ("legacy", "legacy"),
    ("32x64_s2", ConvTile(1, 2, 2, 2, 4, 2)),
    ("128x64_s4", ConvTile(4, 2, 2, 2, 4, 4)),
    ("64x64k32_s3", ConvTile(2, 2, 2, 2, 2, 3)),
    ("32x64_pixel", ConvTile(1, 2, 2, 2, 4, a_by_pixel=True)),
    ("64x128_pixel_s2", ConvTile(2, 2, 4, 2, 4, 2, a_by_pixel=True)),
    ("32x64_pixel_tap", ConvTile(1, 2, 2, 2, 4, a_by_pixel=True, k_by_tap=True)),
    ("128x64_tap_s2", ConvTile(4, 2, 2, 2, 4, 2, k_by_tap=True)),
]
NARROW_TILES = [
    ("default", None),
    ("32x16", ConvTile(1, 2, 1, 1, 4)),
    ("128x48_pixel", ConvTile(2, 4, 1, 3, 4, a_by_pixel=True)),
    ("64x32k32_s2_pixel", ConvTile(2, 2, 1, 2, 2, 2, a_by_pixel=True)),
    ("64x48_pixel_tap", ConvTile(2, 2, 1, 3, 4, a_by_pixel=True, k_by_tap=True)),
]


def _nchw_to(layout: str, shape: tuple) -> tuple:
    """An NCHW (or OIHW) shape in ``layout`` (NHWC / OHWI)."""
    return (shape[0], *shape[2:], shape[1]) if layout == "NHWC" else shape


def _residual_module(case: ConvCase, layout: str = "NCHW") -> relax.Function:
    """``relu(cast_fp16(conv(x, w) + b) + r)``: a ResNet block's second conv, fused."""
    oh, ow = case.out_hw
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(_nchw_to(layout, (1, case.c, case.h, case.w)), "float16"))
    w = relax.Var(
        "w", relax.TensorType(_nchw_to(layout, (case.f, case.c, case.k, case.k)), "float16")
    )
    b = relax.Var("b", relax.TensorType(_nchw_to(layout, (1, case.f, 1, 1)), "float32"))
    r = relax.Var("r", relax.TensorType(_nchw_to(layout, (1, case.f, oh, ow)), "float16"))
    layouts = {"data_layout": "NHWC", "kernel_layout": "OHWI"} if layout == "NHWC" else {}
    with bb.function("main", [x, w, b, r]):
        with bb.dataflow():
            y = bb.emit(
                relax.op.nn.conv2d(
                    x, w, strides=case.stride, padding=case.pad, out_dtype="float32", **layouts
                )
            )
            y = bb.emit(relax.op.astype(relax.op.add(y, b), "float16"))
            y = bb.emit(relax.op.nn.relu(relax.op.add(y, r)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _conv_func(
    case: ConvCase, out_dtype: str = "float32", residual: bool = False, layout: str = "NCHW"
):
    if residual:
        mod = _residual_module(case, layout)
    else:
        cast = "float16" if out_dtype == "float32" else None
        mod = conv2d_module(case, "float16", out_dtype=out_dtype, cast_to=cast, layout=layout)
    (func,) = prim_funcs(standard_pipeline(mod)).values()
    return func


def _schedule(func, tile):
    if tile == "legacy":
        tile = legacy_tile(find_conv2d(s_tir.Schedule(func)))
    with CUDA:
        return Conv2dTensorCore(tile).apply(func, CUDA, False)


def _applies(case: ConvCase, tile) -> bool:
    return not isinstance(tile, ConvTile) or case.c % tile.split_k == 0


def _cuda_source(lib) -> str:
    return "\n".join(m.inspect_source() for m in lib.imports if m.kind == "cuda")


def test_split_k_is_two_kernels_with_the_epilogue_in_the_second():
    func = _conv_func(ConvCase(512, 7, 7, 512))
    sch = _schedule(func, ConvTile(1, 2, 2, 2, 4, 8))
    src = _cuda_source(build_prim_func(sch.mod["main"], CUDA))
    *_, gemm, total = src.split('extern "C" __global__')
    assert src.count('extern "C" __global__') == 4  # two declarations, two definitions
    assert "wmma::mma_sync" in gemm and "blockIdx.z" in gemm  # the chunk on blockIdx.z
    assert "wmma" not in total and "b_ptr" in total and "max(" in total  # bias, relu


def test_split_k_source_compiles_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not shutil.which(nvcc):
        pytest.skip("nvcc not installed")
    func = _conv_func(ConvCase(256, 14, 14, 256), residual=True)
    sch = _schedule(func, ConvTile(1, 2, 2, 2, 4, 4))
    src = tmp_path / "k.cu"
    src.write_text(_cuda_source(build_prim_func(sch.mod["main"], CUDA)))
    subprocess.run(
        [nvcc, "-arch=sm_90", "-cubin", "-o", str(tmp_path / "k.cubin"), str(src)],
        check=True,
        capture_output=True,
    )


def test_default_tiles_split_small_spatial_layers_only():
    def tile(case):
        return choose_tile(find_conv2d(s_tir.Schedule(_conv_func(case))))

    deep = tile(ConvCase(512, 7, 7, 512))
    wide = tile(ConvCase(64, 56, 56, 64))
    assert deep.split_k > 1 and 512 % deep.split_k == 0
    assert wide.split_k == 1
    for case in CASES:
        assert tile(case).launchable


def test_large_channels_last_convs_take_four_warps_along_i():
    """NHWC convs of at least LARGE_NHWC_FLOPS get the 128x64 block the H100 sweep measured
    faster on them; smaller ones and NCHW keep the 32x64 default, with the same split-K."""

    def tile(case, layout):
        sch = s_tir.Schedule(_conv_func(case, layout=layout))
        return choose_tile(find_conv2d(sch, layouts=("NCHW", "NHWC")))

    for case in (ConvCase(256, 56, 56, 256), ConvCase(512, 28, 28, 512)):
        assert case.flops >= LARGE_NHWC_FLOPS
        big, nchw = tile(case, "NHWC"), tile(case, "NCHW")
        assert (big.i_warps, nchw.i_warps) == (4, DEFAULT_TILE[0]) and big.launchable
    small = ConvCase(64, 56, 56, 64)
    assert small.flops < LARGE_NHWC_FLOPS and tile(small, "NHWC").i_warps == DEFAULT_TILE[0]


def test_unlaunchable_tile_is_refused():
    # 64x64 tiles with K step 64: 36 KB dynamic + 17 KB static shared memory (> 48 KB).
    assert not ConvTile(2, 2, 2, 2, 4).launchable
    assert ConvTile(2, 2, 2, 2, 2).launchable
    assert _schedule(_conv_func(ConvCase(64, 14, 14, 64)), ConvTile(2, 2, 2, 2, 4)) is None


def test_split_choices_divide_channels_and_fill_k_steps():
    info = find_conv2d(s_tir.Schedule(_conv_func(ConvCase(512, 7, 7, 512))))
    choices = split_k_choices(info, 64)
    assert 8 in choices and 16 in choices
    for split in choices:
        chunk = 512 // split * 9
        assert 512 % split == 0 and -(-chunk // 64) * 64 <= chunk * 9 / 8


def _run_poisoned_cuda(lib, inputs, out_shape) -> np.ndarray:
    dev = tvm.cuda()
    out = tvm.runtime.tensor(np.full(out_shape, np.nan, "float16"), dev)
    lib["main"](*[tvm.runtime.tensor(a, dev) for a in inputs], out)
    return out.numpy().astype("float64")


def _check(got: np.ndarray, ref: np.ndarray) -> None:
    assert np.isfinite(got).all(), "an output element was not written"
    np.testing.assert_allclose(got, ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())


def _fresh_case(case: ConvCase, epilogue: str) -> tuple[list[np.ndarray], np.ndarray, str]:
    """Fresh NCHW inputs (x, w, b[, residual]), the float64 reference output, the acc type."""
    rng = np.random.default_rng()
    oh, ow = case.out_hw
    x = rng.standard_normal((1, case.c, case.h, case.w)).astype("float16")
    w = (
        rng.standard_normal((case.f, case.c, case.k, case.k)) / np.sqrt(case.c * case.k**2)
    ).astype("float16")
    acc = "float16" if epilogue == "fp16_acc" else "float32"
    b = rng.standard_normal((1, case.f, 1, 1)).astype(acc)
    conv = conv2d_reference(x, w, case) + b.astype("float64")
    inputs = [x, w, b]
    if epilogue == "residual":
        r = rng.standard_normal((1, case.f, oh, ow)).astype("float16")
        inputs.append(r)
        return inputs, np.maximum(conv.astype("float16").astype("float64") + r, 0), acc
    return inputs, np.maximum(conv, 0), acc


NUMERICS = [(c, *t) for c in CASES for t in TILES] + [
    (c, *t) for c in NARROW_CASES for t in NARROW_TILES
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("case", "name", "tile"), NUMERICS, ids=[f"{c}-{n}" for c, n, _ in NUMERICS]
)
@pytest.mark.parametrize("epilogue", ["bias_relu", "residual", "fp16_acc"])
def test_tensor_core_conv_numerics(case, name, tile, epilogue, monkeypatch):
    monkeypatch.setenv(NARROW_ENV, "1")  # the narrow cases' default tiles
    if not tvm.cuda().exist:
        pytest.skip("no CUDA device")
    if not _applies(case, tile):
        pytest.skip(f"split {tile.split_k} does not divide {case.c} channels")
    inputs, ref, acc = _fresh_case(case, epilogue)
    func = _conv_func(case, acc, residual=epilogue == "residual")
    sch = _schedule(func, tile)
    assert sch is not None, f"the rule does not apply to {case} with {name}"
    lib = build_prim_func(sch.mod["main"], CUDA)
    _check(_run_poisoned_cuda(lib, inputs, (1, case.f, *case.out_hw)), ref)


# Channels-last convs (ChannelsLastGPU): the default tile, split-K and a wide tile.
NHWC_TILES = [t for t in TILES if t[0] in ("default", "32x64_s2", "128x64_s4", "64x64k32_s3")]
NHWC_NUMERICS = [(c, *t) for c in CASES for t in NHWC_TILES]


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("case", "name", "tile"), NHWC_NUMERICS, ids=[f"{c}-{n}" for c, n, _ in NHWC_NUMERICS]
)
@pytest.mark.parametrize("epilogue", ["bias_relu", "residual", "fp16_acc"])
def test_channels_last_conv_numerics(case, name, tile, epilogue):
    if not tvm.cuda().exist:
        pytest.skip("no CUDA device")
    if not _applies(case, tile):
        pytest.skip(f"split {tile.split_k} does not divide {case.c} channels")
    inputs, ref, acc = _fresh_case(case, epilogue)
    func = _conv_func(case, acc, residual=epilogue == "residual", layout="NHWC")
    sch = _schedule(func, tile)
    assert sch is not None, f"the rule does not apply to NHWC {case} with {name}"
    lib = build_prim_func(sch.mod["main"], CUDA)
    nhwc = [np.ascontiguousarray(a.transpose(0, 2, 3, 1)) for a in inputs]
    got = _run_poisoned_cuda(lib, nhwc, (1, *case.out_hw, case.f))
    _check(got, ref.transpose(0, 2, 3, 1))


NHWC_VECTOR_CASES = [
    *CASES,
    ConvCase(64, 14, 14, 128),  # split-K into 32-channel chunks: K steps of 32
    ConvCase(96, 28, 28, 128),
    ConvCase(480, 14, 14, 192, k=1, pad=0),
]


@pytest.mark.parametrize("case", NHWC_VECTOR_CASES, ids=str)
def test_channels_last_conv_takes_the_rule_with_vector_loads(case):
    """NHWC convs are recognised (K = row, column, channel); their activations are copied into
    shared memory as 16-byte vectors where a K step stays inside one tap (channels a multiple
    of 32; for 1x1 convs, of 8) and their weights wherever the channels are a multiple of 8."""
    func = _conv_func(case, layout="NHWC")
    info = find_conv2d(s_tir.Schedule(func), layouts=("NCHW", "NHWC"))
    assert info is not None and info.layout == "NHWC"
    assert (info.f, info.cg, info.kh, info.oh) == (case.f, case.c, case.k, case.out_hw[0])
    assert find_conv2d(s_tir.Schedule(func)) is None  # NCHW-only callers do not see it
    sch = _schedule(func, None)
    assert sch is not None
    src = _cuda_source(build_prim_func(sch.mod["main"], CUDA))
    assert "wmma::mma_sync" in src
    vector_x = case.c % (8 if case.k == 1 else 32) == 0
    assert ("*(uint4*)(x_ptr" in src) == vector_x
    assert ("*(uint4*)(w_ptr" in src) == (case.c % 8 == 0)


def test_conv_without_epilogue_is_not_split():
    # The sum over chunks needs a block after the conv to write the output from registers.
    case = ConvCase(512, 7, 7, 512)
    mod = conv2d_module(case, "float16", epilogue="none")
    (func,) = prim_funcs(standard_pipeline(mod)).values()
    sch = _schedule(func, ConvTile(1, 2, 2, 2, 4, 8))
    src = _cuda_source(build_prim_func(sch.mod["main"], CUDA))
    assert src.count('extern "C" __global__') == 2 and "wmma::mma_sync" in src


@pytest.mark.parametrize("case", NARROW_CASES, ids=str)
def test_narrow_outputs_take_the_tensor_core_rule(case, monkeypatch):
    """With the switch on, convs with fewer than 64 output channels get a J tile of whole
    fragments covering them (not dlight's rules), one that launches; off (the default until
    the narrow tiles have run on a GPU), they stay with dlight."""
    from mulayer.schedules.apply import claiming_rule

    func = _conv_func(case)
    monkeypatch.delenv(NARROW_ENV, raising=False)
    assert not isinstance(claiming_rule(func, CUDA), Conv2dTensorCore)
    monkeypatch.setenv(NARROW_ENV, "1")
    assert isinstance(claiming_rule(func, CUDA), Conv2dTensorCore)
    tile = choose_tile(find_conv2d(s_tir.Schedule(func)))
    assert tile.launchable
    assert case.f <= tile.tile_j < case.f + 16


@pytest.mark.parametrize(
    ("case", "tile"),
    [
        (ConvCase(16, 14, 14, 48), None),
        (ConvCase(3, 30, 30, 32, stride=2), None),
        (ConvCase(72, 9, 11, 40, k=1, pad=0), ConvTile(2, 4, 1, 3, 4, a_by_pixel=True)),
        (ConvCase(256, 14, 14, 256), ConvTile(2, 2, 4, 2, 4, 2, a_by_pixel=True)),
        (ConvCase(72, 9, 11, 80), ConvTile(1, 2, 2, 2, 4, 4, a_by_pixel=True, k_by_tap=True)),
    ],
    ids=str,
)
def test_narrow_and_pixel_major_sources_compile_with_nvcc(tmp_path, case, tile, monkeypatch):
    monkeypatch.setenv(NARROW_ENV, "1")  # the narrow cases' default tiles
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not shutil.which(nvcc):
        pytest.skip("nvcc not installed")
    sch = _schedule(_conv_func(case, residual=True), tile)
    src = tmp_path / "k.cu"
    code = _cuda_source(build_prim_func(sch.mod["main"], CUDA))
    assert "wmma::mma_sync" in code
    src.write_text(code)
    subprocess.run(
        [nvcc, "-arch=sm_90", "-cubin", "-o", str(tmp_path / "k.cubin"), str(src)],
        check=True,
        capture_output=True,
    )


def test_pixel_major_loads_put_threads_on_neighbouring_pixels():
    """With ``a_by_pixel`` the input index of the im2col load is ``... + threadIdx.x`` (a
    warp reads neighbouring input columns); by default threadIdx.x steps along K (a gather of
    one element per channel and tap)."""
    func = _conv_func(ConvCase(64, 14, 14, 64))

    def x_loads(tile: ConvTile) -> list[str]:
        src = _cuda_source(build_prim_func(_schedule(func, tile).mod["main"], CUDA))
        return [line for line in src.splitlines() if "x_ptr[" in line]

    pixel = x_loads(ConvTile(1, 2, 2, 2, 4, a_by_pixel=True))
    default = x_loads(ConvTile(1, 2, 2, 2, 4))
    assert pixel and default
    for line in pixel:
        assert "+ ((int)threadIdx.x))" in line
        assert "threadIdx.x) &" not in line and "threadIdx.x) >>" not in line
    assert all("threadIdx.x) & 15" in line for line in default)
