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
    fallbacks. Pointwise expand convs take :mod:`.cpu_int8_pointwise` instead (pixels in the
    lanes, so that the requantize write-back is contiguous).
``MatmulInt8DotProduct``
    The same for matmul: B packed to ``[N/16, K/4, 16, 4]``, A read 4 bytes at a time.
``Conv2dInt8Depthwise``
    Depthwise u8 x s8 -> s32 convs (one input and one output channel per group) have no
    channel reduction to feed a dot product: they multiply-add in int32 vectors along the
    output width. One task per channel plane: it pads the plane into a small buffer (for
    stride 2 split into even and odd columns, so that every tap reads a contiguous run), then
    accumulates a tile of rows x columns in registers and requantizes it on the way out.

On AArch64 with ``+dotprod`` (and ``+i8mm`` for the mixed-sign ``usdot``), the same schedules
tensorize with the Arm intrinsic instead (see :mod:`._intrin`); targets without any of these
fall back to the generic int32 vector rules in :mod:`.cpu_conv2d` and :mod:`.cpu_dense`.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.target import Target

from ._intrin import DotProductIntrin, dot_product_intrin, pixel_dot_product_intrin
from ._util import (
    SCHEDULE_ERRORS,
    copy_plane,
    inline_epilogue_into,
    is_cpu_target,
    largest_divisor,
    logger,
    new_schedule,
    num_vector_registers,
    vector_bits,
)
from .base import CPUScheduleRule, finish_cpu_schedule
from .conv2d_analysis import Conv2dInfo, data_producer, find_conv2d
from .cpu_dense import pack_b
from .cpu_int8_pointwise import fits_pixel_lanes, schedule_pointwise_pixel_lanes
from .cpu_tiling import (
    blocked_accumulator,
    pack_in_destination_order,
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
        pixels = pixel_dot_product_intrin(target, info.in_dtype, info.w_dtype)
        if pixels is not None and fits_pixel_lanes(info):
            try:
                schedule_pointwise_pixel_lanes(sch, info, target, pixels)
                return sch
            except SCHEDULE_ERRORS as err:  # keep the channel-lane schedule below
                logger.debug("conv2d %s: no pixel lanes: %s", info.name, err)
                sch = new_schedule(func)
                info = find_conv2d(sch)
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
    pack_in_destination_order(sch, pad, kk)

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


# Stride-1 depthwise tiles of whole rows (MobileNetV2's 56/28/14/7-wide layers on AVX-512)
# write back in one vector loop over rows x columns: the rows are contiguous in the
# accumulator and the NCHW output, so the per-row partial vector (28 = 16 + 12, 14, 7) goes.
# Kernels alone, 2 threads: 28/14/7-wide layers 1.27 -> 1.08 ms summed (docs/results.md).
# Off: one vector loop per row (the comparison baseline). Stride 2 is left per row: one
# quick A/B was 12-22% faster on 56/28-wide outputs but 5-42% slower on 14/7-wide ones.
FLAT_WRITE_BACK = True


class Conv2dInt8Depthwise(CPUScheduleRule):
    """Depthwise u8 x s8 -> s32 NCHW conv2d in int32 vectors along the width (see module doc).

    Measured on MobileNetV2's 17 depthwise layers (2-core AVX-512 VNNI machine, 2 threads):
    3.51 -> 1.63 ms summed against the width-vector fallback, 1.35 -> 0.37 ms on the 112x112
    stride-2 layer, whose strided reads that rule leaves to scalar code (docs/results.md).
    """

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        if not is_cpu_target(target):
            return None
        sch = new_schedule(func)
        info = find_conv2d(sch)
        if (
            info is None
            or not _is_u8s8s32(info.in_dtype, info.w_dtype, info.out_dtype)
            or not info.is_depthwise
            or info.fg != 1
        ):
            return None
        # Register tile: up to 4 vectors of columns, rows while the tile stays within half the
        # registers (larger tiles spilled on 28- and 56-wide rows).
        lanes = vector_bits(target) // 32
        xi = largest_divisor(info.ow, 4 * lanes)
        yi = largest_divisor(info.oh, max(1, lanes * num_vector_registers(target) // 4 // xi))
        schedule_depthwise_int8(sch, info, target, yi, xi)
        return sch


def schedule_depthwise_int8(
    sch: s_tir.Schedule, info: Conv2dInfo, target: Target, yi: int, xi: int
) -> None:
    """One task per channel plane; a ``yi`` x ``xi`` int32 register tile (see the rule)."""
    conv = info.block
    sw = info.stride[1]
    # Step 1. The plane's padded copy: per task, columns split by phase for strides > 1.
    pad = data_producer(sch, info)
    if pad is None and sw > 1:
        pad = sch.cache_read(conv, info.data_read, "global")
    if pad is not None and sw > 1:
        # (An odd width pads the odd-phase half by one unused column.)
        width = int(sch.get(pad).writes[0].source.shape[3])
        sch.transform_layout(
            pad,
            ("write", 0),
            lambda n, c, h, w: (n, c, h, w % sw, w // sw),
            pad_value=0 if width % sw else None,
        )

    # Step 2. int32 accumulator tile in registers, the epilogue fused into its write-back.
    acc_out = sch.cache_write(conv, 0, "local")
    inline_epilogue_into(sch, acc_out)

    # Step 3. Tile: parallel (n, channel) | yo, xo | ry, rx | yi (unrolled), xi (vector).
    n, f, y, x, rc, ry, rx = sch.get_loops(conv)
    yo, yi_l = sch.split(y, [None, yi])
    xo, xi_l = sch.split(x, [None, xi])
    sch.reorder(n, f, yo, xo, rc, ry, rx, yi_l, xi_l)
    sch.reverse_compute_at(acc_out, xo, preserve_unit_loops=True)
    outer = sch.fuse(n, f)
    sch.parallel(outer)
    if pad is not None:
        sch.compute_at(pad, outer, preserve_unit_loops=True)
        copy_plane(sch, pad, sw)
    sch.unroll(yi_l)
    sch.vectorize(xi_l)

    # Step 4. Vector init and write-back.
    init = sch.decompose_reduction(conv, rc)
    sch.vectorize(sch.get_loops(init)[-1])
    if FLAT_WRITE_BACK and info.stride[1] == 1:
        # The tile's rows are contiguous in the accumulator and in the NCHW output when the
        # tile spans whole rows: one vector loop over rows x columns (no per-row tail).
        rows, cols = sch.get_loops(acc_out)[-2:]
        sch.vectorize(sch.fuse(rows, cols) if xi == info.ow else cols)
    else:
        sch.vectorize(sch.get_loops(acc_out)[-1])
    finish_cpu_schedule(
        sch, target, skip={info.name, info.name + "_init", sch.get(acc_out).name_hint}
    )
    logger.debug("conv2d %s: depthwise int8 yi=%d xi=%d stride=%d", info.name, yi, xi, sw)
