"""CPU (llvm) schedules for NCHW conv2d in floating point (and the integer fallbacks).

Two rules, tried in this order:

``Conv2dChannelVector``
    Regular and grouped convs whose output channels per group split into whole SIMD vectors.
    The weight is repacked to ``O/vo, I, KH, KW, vo`` (a layout-rewrite stage on the weight that
    ``SplitLayoutRewritePreproc`` + ``FoldConstant`` can precompute) and each thread computes an
    output tile of ``vo`` channels x ``yi`` rows x ``xi`` columns held in registers: one weight
    vector load and one broadcast input scalar per FMA. Bias/activation/requantize epilogues are
    applied to the tile while it is still in registers.

``Conv2dWidthVector``
    Everything else (depthwise, channel multiplier 1..3, odd channel counts): vectorise along the
    output width, broadcast the weight scalar, and accumulate a tile of channels x width in
    registers.

Both parallelise the outer loops over ``num-cores`` threads and keep padding as a separate,
parallel stage (it reads/writes each input element once).
"""

from __future__ import annotations

import contextlib

from tvm import s_tir, tirx
from tvm.target import Target

from ._util import (
    SCHEDULE_ERRORS,
    VECTOR_DTYPES,
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
from .cpu_tiling import blocked_accumulator, pack_weight, parallel_conv_tiles


def _lanes(target: Target, dtype: str) -> int:
    bits = int("".join(ch for ch in dtype if ch.isdigit()) or 32)
    return max(1, vector_bits(target) // bits)


def _pick_row_tile(info: Conv2dInfo, budget: int) -> tuple[int, int]:
    """Pick (yi, xi): a register tile of output rows x columns with ``yi * xi <= budget``.

    Prefer a long run of columns (contiguous in NCHW); add rows when the width is short.
    """
    xi = largest_divisor(info.ow, budget)
    yi = largest_divisor(info.oh, max(1, budget // xi))
    return yi, xi


class Conv2dChannelVector(CPUScheduleRule):
    """NCHW conv2d, vectorised over output channels with a packed weight (see module doc)."""

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        if not is_cpu_target(target):
            return None
        sch = new_schedule(func)
        info = find_conv2d(sch)
        if info is None or info.out_dtype not in VECTOR_DTYPES:
            return None
        lanes = _lanes(target, info.out_dtype)
        # Step 1. Pick the channel vector: whole SIMD vectors that fit in one group.
        if info.fg % lanes == 0:
            vo = lanes
        elif info.fg % (lanes // 2) == 0 and lanes >= 8:
            vo = lanes // 2
        else:
            return None
        regs = num_vector_registers(target)
        yi, xi = _pick_row_tile(info, regs - 6)
        # Short rows (7x7, 14x14): two channel vectors per pixel keep enough FMAs in flight.
        if yi * xi < 12 and info.fg % (2 * vo) == 0:
            vo *= 2
            yi, xi = _pick_row_tile(info, (regs - 6) // 2)
        schedule_channel_vector(sch, info, target, vo=vo, yi=yi, xi=xi)
        return sch


def schedule_channel_vector(
    sch: s_tir.Schedule, info: Conv2dInfo, target: Target, vo: int, yi: int, xi: int
) -> None:
    """Apply the channel-vector conv schedule (see :class:`Conv2dChannelVector`)."""
    conv = info.block
    # Step 1. Pack the weight to O/vo, I, KH, KW, vo (a preprocessing stage on the constant).
    pack_weight(sch, info, vo)

    # Step 2. Accumulate into a register tile laid out (y, x, channel-vector).
    acc_out = blocked_accumulator(sch, info, vo)

    # Step 3. Tile: parallel (n, yo[, fo]) | xo | reduction | yi, xi (unrolled), fi (vector).
    n, f, y, x, rc, ry, rx = sch.get_loops(conv)
    fo, fi = sch.split(f, [None, vo])
    yo, yi_l = sch.split(y, [None, yi])
    xo, xi_l = sch.split(x, [None, xi])
    weight_bytes = info.f * info.cg * info.kh * info.kw * 4
    outer, rows_outer = parallel_conv_tiles(
        sch, weight_bytes, acc_out, n, yo, fo, xo, [rc, ry, rx], [yi_l, xi_l, fi]
    )
    if rows_outer:
        # Pad (or copy) just the input rows a task reads, into a small contiguous buffer. (With
        # channel tiles outer, every tile would pad the rows again: pad once instead.)
        pad_rows_at(sch, info, outer)
    sch.unroll(yi_l)
    sch.unroll(xi_l)
    lanes = _lanes(target, info.out_dtype)
    if vo > lanes:
        fi_o, fi = sch.split(fi, [None, lanes])
        sch.unroll(fi_o)
    sch.vectorize(fi)
    init = sch.decompose_reduction(conv, rc)
    init_loops = sch.get_loops(init)
    sch.vectorize(init_loops[-1])

    # Step 4. Everything else (padding, weight pack, leftovers) is parallel + vectorised.
    finish_cpu_schedule(
        sch, target, skip={info.name, info.name + "_init", sch.get(acc_out).name_hint}
    )
    logger.debug("conv2d %s: channel-vector vo=%d yi=%d xi=%d", info.name, vo, yi, xi)


def pad_rows_at(sch: s_tir.Schedule, info: Conv2dInfo, loop) -> None:
    """Move the padding stage under ``loop`` so each iteration pads only the rows it reads.

    The padded buffer then shrinks to one task's rows (cache-resident, contiguous) instead of
    a full copy of the input. No-op when the conv reads its input directly.
    """
    pad = data_producer(sch, info)
    if pad is None:
        return
    try:
        sch.compute_at(pad, loop, preserve_unit_loops=True)
    except SCHEDULE_ERRORS:
        return
    with contextlib.suppress(*SCHEDULE_ERRORS):
        sch.vectorize(sch.get_loops(pad)[-1])


class Conv2dWidthVector(CPUScheduleRule):
    """NCHW conv2d vectorised along the output width (depthwise and odd shapes)."""

    generic = True  # every conv shape; the first candidate for tuning

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        if not is_cpu_target(target):
            return None
        sch = new_schedule(func)
        info = find_conv2d(sch)
        if info is None:
            return None
        lanes = _lanes(target, info.out_dtype)
        regs = num_vector_registers(target)
        # Step 1. Width tile: up to 4 vectors of columns; channels of one group share the
        # input rows, so tile them (depthwise: one channel, more channels only spill).
        xi = largest_divisor(info.ow, 4 * lanes)
        vectors_per_row = -(-xi // lanes)
        fi = largest_divisor(info.fg, max(1, (regs - 8) // vectors_per_row))
        # Rows per task: enough that padding rows again per task stays cheap.
        yi = largest_divisor(info.oh, 8)
        schedule_width_vector(sch, info, target, fi=fi, yi=yi, xi=xi)
        return sch


def schedule_width_vector(
    sch: s_tir.Schedule, info: Conv2dInfo, target: Target, fi: int, yi: int, xi: int
) -> None:
    """Apply the width-vector conv schedule (see :class:`Conv2dWidthVector`)."""
    conv = info.block
    acc_out = sch.cache_write(conv, 0, "local")
    inline_epilogue_into(sch, acc_out)
    n, f, y, x, rc, ry, rx = sch.get_loops(conv)
    fo, fi_l = sch.split(f, [None, fi])
    yo, yi_l = sch.split(y, [None, yi])
    xo, xi_l = sch.split(x, [None, xi])
    sch.reorder(n, fo, yo, yi_l, xo, rc, ry, rx, fi_l, xi_l)
    sch.reverse_compute_at(acc_out, xo, preserve_unit_loops=True)
    outer = sch.fuse(n, fo, yo)
    sch.parallel(outer)
    pad_rows_at(sch, info, outer)
    sch.unroll(fi_l)
    sch.vectorize(xi_l)
    init = sch.decompose_reduction(conv, rc)
    sch.vectorize(sch.get_loops(init)[-1])
    wb_loops = sch.get_loops(acc_out)
    sch.vectorize(wb_loops[-1])
    finish_cpu_schedule(
        sch, target, skip={info.name, info.name + "_init", sch.get(acc_out).name_hint}
    )
    logger.debug("conv2d %s: width-vector fi=%d yi=%d xi=%d", info.name, fi, yi, xi)
