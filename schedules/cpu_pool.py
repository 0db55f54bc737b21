"""CPU pooling over NCHW windows (max and average pools) one channel plane per task.

After legalization a pool is a padding stage and one ``S S S S R R`` reduction block that reads
``pad[n, c, y*sh + ry, x*sw + rx]``. The fallback rule (:mod:`.cpu_generic`) inlines the
padding into the reduction, so every tap of its width vector checks the bounds, and for stride 2
reads every second element: ResNet-50's uint8 stem max pool (64 x 112^2 -> 56^2) took 0.53 ms
at 2 threads on the development machine.

``PoolPlanes``, as :class:`~.cpu_int8.Conv2dInt8Depthwise` does for convs: one task per
``(n, c)`` plane pads its plane into a small buffer (for strides above 1 split into column
phases, so that every tap reads a contiguous run), then reduces a rows x columns tile in
registers and writes it back through the fused epilogue (a requantizing pool's rescale).
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.schedule import SBlockRV
from tvm.target import Target

from ._util import (
    SCHEDULE_ERRORS,
    const_int,
    copy_plane,
    inline_epilogue_into,
    is_cpu_target,
    iter_kinds,
    largest_divisor,
    leaf_blocks,
    logger,
    new_schedule,
    vector_bits,
)
from .base import CPUScheduleRule, finish_cpu_schedule
from .conv2d_analysis import _stride_of

# Bytes of a pool's register tile (rows x columns of the output, in the output dtype).
TILE_BYTES = 512


def _find_pool(sch: s_tir.Schedule) -> tuple[SBlockRV, int] | None:
    """The one ``S S S S R R`` window block and its column stride, or None."""
    windows = [b for b in leaf_blocks(sch) if iter_kinds(sch.get(b)) == "SSSSRR"]
    if len(windows) != 1:
        return None
    block = sch.get(windows[0])
    out = block.writes[0].source
    inputs = [r for r in block.reads if not r.source.same_as(out)]
    if len(inputs) != 1 or len(inputs[0].region) != 4 or len(out.shape) != 4:
        return None
    x_var = block.iter_vars[3].var
    stride = _stride_of(inputs[0].region[3].min, x_var)
    if stride is None or stride < 1 or any(const_int(d) is None for d in out.shape):
        return None
    if const_int(out.shape[2]) * const_int(out.shape[3]) == 1:  # global pools: the fallback's
        return None
    return windows[0], stride


class PoolPlanes(CPUScheduleRule):
    """NCHW max / average pools, one channel plane per task (see module doc)."""

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        if not is_cpu_target(target):
            return None
        sch = new_schedule(func)
        found = _find_pool(sch)
        if found is None:
            return None
        try:
            schedule_pool_planes(sch, found[0], found[1], target)
        except SCHEDULE_ERRORS as err:  # leave it to the fallback rule
            logger.debug("pool: no plane schedule: %s", err)
            return None
        return sch


def _input_producer(sch: s_tir.Schedule, block: SBlockRV) -> SBlockRV | None:
    """The spatial block (padding) that writes the pool's input, if any."""
    for producer in sch.get_producers(block):
        if "R" not in iter_kinds(sch.get(producer)):
            return producer
    return None


def schedule_pool_planes(sch: s_tir.Schedule, pool: SBlockRV, sw: int, target: Target) -> None:
    """Parallel ``(n, c)`` planes; padded plane copy (column phases); register tile."""
    out = sch.get(pool).writes[0].source
    oh, ow = (const_int(d) for d in out.shape[2:])
    # Step 1. The plane's padded copy, columns split by phase for strides > 1.
    pad = _input_producer(sch, pool)
    if pad is None:
        reads = [r.source for r in sch.get(pool).reads]
        pad = sch.cache_read(
            pool, next(i for i, b in enumerate(reads) if not b.same_as(out)), "global"
        )
    if sw > 1:
        # (An odd width pads the odd-phase half by one column that no tap reads.)
        buf = sch.get(pad).writes[0].source
        fill = 0.0 if "float" in str(buf.dtype) else 0
        sch.transform_layout(
            pad,
            ("write", 0),
            lambda n, c, h, w: (n, c, h, w % sw, w // sw),
            pad_value=fill if int(buf.shape[3]) % sw else None,
        )

    # Step 2. Accumulator tile in registers, the epilogue fused into its write-back.
    acc_out = sch.cache_write(pool, 0, "local")
    inline_epilogue_into(sch, acc_out)

    # Step 3. Tile: parallel (n, c) | yo, xo | ry, rx | yi (unrolled), xi (vector).
    item_bytes = max(1, out.dtype.bits // 8)
    xi = largest_divisor(ow, vector_bits(target) // 8 // item_bytes)
    yi = largest_divisor(oh, max(1, TILE_BYTES // (xi * item_bytes)))
    n, c, y, x, ry, rx = sch.get_loops(pool)
    yo, yi_l = sch.split(y, [None, yi])
    xo, xi_l = sch.split(x, [None, xi])
    sch.reorder(n, c, yo, xo, ry, rx, yi_l, xi_l)
    sch.reverse_compute_at(acc_out, xo, preserve_unit_loops=True)
    outer = sch.fuse(n, c)
    sch.parallel(outer)
    sch.compute_at(pad, outer, preserve_unit_loops=True)
    copy_plane(sch, pad, sw)
    sch.unroll(yi_l)
    sch.vectorize(xi_l)

    # Step 4. Vector init and write-back; leftovers parallel.
    init = sch.decompose_reduction(pool, ry)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(acc_out)[-1])
    names = {sch.get(b).name_hint for b in (pool, init, acc_out, pad)}
    finish_cpu_schedule(sch, target, skip=names)
    logger.debug("pool: planes yi=%d xi=%d stride=%d", yi, xi, sw)
