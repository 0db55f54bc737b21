"""CPU int8 rules: u8 x s8 -> s32 conv2d and matmul on dot-product instructions.

The quantizer emits ``R.nn.conv2d(u8 NCHW, s8 OIHW, out_dtype="int32")`` and
``R.matmul(u8 [M, K], s8 [K, N], out_dtype="int32")`` followed by elementwise requantize ops.
After legalization the conv is ``acc[n, f, y, x] += i32(pad[n, c, ...]) * i32(w[f, rc, ...])``.

``Conv2dInt8DotProduct`` (x86 AVX-512 VNNI ``vpdpbusd``)
    One instruction adds, for 16 output channels at once, the dot product of 4 consecutive
    input channels of one pixel (u8, broadcast) with a 16x4 block of weights (s8). So:

    - the padding stage writes the input as NCHW4c (``[N, C/4, H, W, 4]``);
    - the weight is packed to OIHW16o4i (``[O/16, I/4, KH, KW, 16, 4]``), a layout-rewrite
      stage that ``SplitLayoutRewritePreproc`` + ``FoldConstant`` precompute for constants;
    - each task accumulates 16 channels x ``xi`` pixels of int32 in registers (one zmm per
      pixel), reduction over ``I/4 x KH x KW`` dot-product steps;
    - the requantize epilogue runs on the tile while it is in registers.

    Needs ``C/groups % 4 == 0`` and ``O/groups % 16 == 0`` (``% 8`` uses the 256-bit form at
    half the rate: align the CPU slice of a channel split to 16); other shapes use the int32
    fallbacks.
``MatmulInt8DotProduct``
    The same for matmul: B packed to ``[N/16, K/4, 16, 4]``, A read 4 bytes at a time.

On AArch64 with ``+dotprod`` (and ``+i8mm`` for the mixed-sign ``usdot``), the same schedules
tensorize with the Arm intrinsic instead (see :mod:`._intrin`); targets without any of these
fall back to the generic int32 vector rules in :mod:`.cpu_conv2d` and :mod:`.cpu_dense`.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.target import Target

from ._intrin import DotProductIntrin, dot_product_intrin
from ._util import (
    is_cpu_target,
    largest_divisor,
    logger,
    new_schedule,
    num_vector_registers,
)
from .base import CPUScheduleRule, finish_cpu_schedule
from .conv2d_analysis import Conv2dInfo, find_conv2d
from .cpu_dense import pack_b
from .cpu_tiling import (
    blocked_accumulator,
    pack_input_channels,
    pack_weight,
    parallel_conv_tiles,
    tile_matmul,
)
from .matmul_analysis import MatmulInfo, find_matmul


def _is_u8s8s32(in_dtype: str, w_dtype: str, out_dtype: str) -> bool:
    return in_dtype in ("uint8", "int8") and w_dtype == "int8" and out_dtype == "int32"


class Conv2dInt8DotProduct(CPUScheduleRule):
    """u8 x s8 -> s32 NCHW conv2d on VNNI / Arm dot product (see module doc)."""

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        if not is_cpu_target(target):
            return None
        sch = new_schedule(func)
        info = find_conv2d(sch)
        if info is None or not _is_u8s8s32(info.in_dtype, info.w_dtype, info.out_dtype):
            return None
        intrin = dot_product_intrin(target, info.in_dtype, info.w_dtype, lanes_divide=info.fg)
        if intrin is None or info.cg % intrin.k != 0:
            return None
        # One accumulator register per pixel; keep a few registers for operands.
        xi = largest_divisor(info.ow, num_vector_registers(target) - 4)
        schedule_conv2d_dot_product(sch, info, target, intrin, xi)
        return sch


def schedule_conv2d_dot_product(
    sch: s_tir.Schedule,
    info: Conv2dInfo,
    target: Target,
    intrin: DotProductIntrin,
    xi: int,
) -> None:
    """Tensorize the conv with ``intrin`` (lanes output channels x k input channels)."""
    conv = info.block
    lanes, kk = intrin.lanes, intrin.k

    # Step 1. Weights to OIHW{lanes}o{k}i (precomputable), input to NCHW{k}c.
    pack_weight(sch, info, lanes, kk)
    pad = pack_input_channels(sch, info, kk)

    # Step 2. int32 accumulators laid out (pixel, channel-vector); epilogue fused.
    acc_out = blocked_accumulator(sch, info, lanes)

    # Step 3. Tile: parallel rows (or channel tiles) | xo | rc/k, ry, rx | xi | fi, rci.
    n, f, y, x, rc, ry, rx = sch.get_loops(conv)
    fo, fi = sch.split(f, [None, lanes])
    rco, rci = sch.split(rc, [None, kk])
    xo, xi_l = sch.split(x, [None, xi])
    weight_bytes = info.f * info.cg * info.kh * info.kw
    outer, rows_outer = parallel_conv_tiles(
        sch, weight_bytes, acc_out, n, y, fo, xo, [rco, ry, rx], [xi_l, fi, rci]
    )
    if rows_outer:  # pack just the rows a task reads (see cpu_conv2d)
        sch.compute_at(pad, outer, preserve_unit_loops=True)

    # Step 4. Tensorize the (channel-vector x k) step; leftovers parallel.
    init = sch.decompose_reduction(conv, rco)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(fi, intrin.name)
    sch.unroll(xi_l)
    finish_cpu_schedule(
        sch, target, skip={info.name, info.name + "_init", sch.get(acc_out).name_hint}
    )
    logger.debug("conv2d %s: %s xi=%d", info.name, intrin.name, xi)


class MatmulInt8DotProduct(CPUScheduleRule):
    """u8 x s8 -> s32 matmul on VNNI / Arm dot product (see module doc)."""

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        if not is_cpu_target(target):
            return None
        sch = new_schedule(func)
        info = find_matmul(sch)
        if info is None or not _is_u8s8s32(info.in_dtype, info.b_dtype, info.out_dtype):
            return None
        intrin = dot_product_intrin(target, info.in_dtype, info.b_dtype, lanes_divide=info.n)
        if intrin is None or info.k % intrin.k != 0:
            return None
        m = info.extents[-3] if len(info.extents) >= 3 else 1
        # Register tile: mi rows x nv vectors of columns.
        nv = largest_divisor(info.n // intrin.lanes, 4)
        mi = largest_divisor(m, max(1, (num_vector_registers(target) - 8) // nv))
        schedule_matmul_dot_product(sch, info, target, intrin, mi=mi, nv=nv)
        return sch


def schedule_matmul_dot_product(
    sch: s_tir.Schedule,
    info: MatmulInfo,
    target: Target,
    intrin: DotProductIntrin,
    mi: int,
    nv: int,
) -> None:
    """Tensorize the matmul with ``intrin``; B packed to ``[N/lanes, K/k, lanes, k]``."""
    pack = pack_b(sch, info, intrin.lanes, inner_k=intrin.k)
    acc_out, ii, (jv, ji), ko = tile_matmul(sch, info, mi, [nv, intrin.lanes], intrin.k)
    init = sch.decompose_reduction(info.block, ko)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(ji, intrin.name)
    if ii is not None:
        sch.unroll(ii)
    sch.unroll(jv)
    pack_loops = sch.get_loops(pack)
    if len(pack_loops) >= 2:
        sch.parallel(pack_loops[0])
    finish_cpu_schedule(
        sch, target, skip={info.name, info.name + "_init", sch.get(acc_out).name_hint}
    )
    logger.debug("matmul %s: %s mi=%d nv=%d", info.name, intrin.name, mi, nv)
