"""GPU depthwise conv2d (NCHW, one input channel per group), epilogue fused.

dlight has no rule for depthwise convs: its ``GeneralReduction`` claims them and launches one
256-thread block per output element to sum its 9 window terms: 25-340 µs per MobileNetV2
layer on an H100, 0.03x cuDNN. A depthwise conv is memory-bound (9 multiply-adds per output),
so the schedule is about memory traffic and enough threads:

- each thread computes ``vec`` adjacent outputs along W in registers (fp32 or the conv's
  accumulator type), so the ``kw + (vec - 1) * stride`` inputs of a row are loaded once for all
  of them and each weight once per thread;
- by default a block is ``threads`` consecutive (channel, row, W chunk) triples and reads its
  inputs from global memory (the L1 cache serves the overlap between neighbouring threads);
- with ``shared=True`` a block covers whole output rows of one channel (or whole channels),
  and its input tile (halo included, padding computed on the fly) is first copied to shared
  memory by all threads, coalesced;
- the epilogue (cast, bias, relu/clip, residual add, cast) is inlined into the register
  write-back, so every output element is written once.

Applies to fp16 and fp32 NCHW depthwise convs (``C/groups == 1``, any channel multiplier),
any kernel size, stride, padding and dilation, batch >= 1.

NHWC depthwise convs (one output per channel; what
:class:`~mulayer.passes.channels_last.ChannelsLastGPU` makes of them) take
:func:`schedule_depthwise_nhwc` instead: each thread computes :data:`NHWC_LANES` adjacent
channels of one output pixel, so its input loads and output stores are vectors along the
contiguous channel axis (the OHWI weights, ``kh * kw`` elements apart per channel, are gathered;
the cache serves them).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.target import Target

from ._util import SCHEDULE_ERRORS, largest_divisor, logger, new_schedule
from .base import GPUScheduleRule
from .conv2d_analysis import Conv2dInfo, data_producer, find_conv2d

DTYPES = ("float16", "float32")
NHWC_LANES = 4  # channels per thread of an NHWC depthwise conv (8-byte fp16 vectors)
NHWC_THREADS = 128


@dataclass(frozen=True)
class DepthwiseTile:
    """Work split of one depthwise conv.

    Attributes
    ----------
    vec : int
        Adjacent outputs along W per thread.
    threads : int
        Threads per block (at most: a shared-memory block covers whole output rows).
    shared : bool
        Stage each block's input tile in shared memory.
    """

    vec: int = 2
    threads: int = 128
    shared: bool = False


def choose_tile(info: Conv2dInfo) -> DepthwiseTile:
    """The default tile: registers only, 128 threads, 2 outputs per thread where W is even
    (4 for 5x5 and wider stride-1 windows, whose rows overlap more).

    Measured on an H100 (docs/results.md, "GPU depthwise rule"): within 10% of the best of 15
    tiles on every MobileNetV2 layer; shared-memory staging was never better for 3x3 windows.
    """
    wide = info.kw >= 5 and info.stride[1] == 1
    vec = next(v for v in ((4, 2, 1) if wide else (2, 1)) if info.ow % v == 0)
    return DepthwiseTile(vec=vec)


class DepthwiseConv2d(GPUScheduleRule):
    """Depthwise conv2d (NCHW, or NHWC with one output per channel) with a fused epilogue, on
    SIMT cores (see module doc).

    ``tile``: a fixed :class:`DepthwiseTile` (benchmarks); None picks one per shape.
    """

    def __init__(self, tile: DepthwiseTile | None = None):
        self.tile = tile

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        if not self.is_target_available(target):
            return None
        sch = new_schedule(func)
        info = find_conv2d(sch, layouts=("NCHW", "NHWC"))
        if info is None or not info.is_depthwise:
            return None
        if info.in_dtype not in DTYPES or info.w_dtype not in DTYPES:
            return None
        try:
            if info.layout == "NHWC":
                return schedule_depthwise_nhwc(sch, info)
            return schedule_depthwise(sch, info, self.tile or choose_tile(info))
        except (*SCHEDULE_ERRORS, AssertionError) as err:  # dlight's inliner asserts
            logger.debug("depthwise conv: schedule failed (%s)", err)
            return None


def schedule_depthwise(
    sch: s_tir.Schedule, info: Conv2dInfo, tile: DepthwiseTile
) -> s_tir.Schedule:
    """Schedule the depthwise conv block ``info.block`` and its epilogue (see module doc)."""
    conv = info.block
    pad = data_producer(sch, info)

    # Step 1. Accumulate in registers; the epilogue joins the register write-back.
    acc = sch.cache_write(conv, 0, "local")
    _inline_consumers(sch, acc)

    # Step 2. Tile: (batch, channel, row, W chunk) -> threads; vec outputs along W per thread.
    n, f, y, x, rc, ry, rx = sch.get_loops(conv)
    xo, xv = sch.split(x, [None, tile.vec])
    if tile.shared:
        # A block: channels x rows x all of W, its input tile (with halo) in shared memory.
        w_threads = -(-info.ow // tile.vec)
        rows = largest_divisor(info.oh, max(1, tile.threads // w_threads))
        chans = 1
        if rows == info.oh:
            chans = largest_divisor(info.f, max(1, tile.threads // (rows * w_threads)))
        fo, fi = sch.split(f, [None, chans])
        yo, yi = sch.split(y, [None, rows])
        sch.reorder(n, fo, yo, fi, yi, xo, rc, ry, rx, xv)
        bx, tx = sch.fuse(n, fo, yo), sch.fuse(fi, yi, xo)
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        stage = sch.cache_read(conv, info.data_read, "shared")
        sch.compute_at(stage, bx)
        if pad is not None:
            sch.compute_inline(pad)  # padding computed while staging
        copy = sch.fuse(*sch.get_loops(stage)[1:])
        _, ctx = sch.split(copy, [None, chans * rows * w_threads])
        sch.bind(ctx, "threadIdx.x")
    else:
        # A block: ``threads`` consecutive (channel, row, W chunk) triples; inputs from global.
        if pad is not None:
            sch.compute_inline(pad)  # padding becomes a predicate on the load
        sch.reorder(n, f, y, xo, rc, ry, rx, xv)
        bx, tx = sch.split(sch.fuse(n, f, y, xo), [None, tile.threads])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
    sch.reverse_compute_at(acc, tx)

    # Step 3. Unroll the window and the W chunk (register reuse across xv and rx).
    init = sch.decompose_reduction(conv, rc)
    for block in (conv, init, acc):
        _unroll_inner(sch, block, tx)
    return sch


def schedule_depthwise_nhwc(sch: s_tir.Schedule, info: Conv2dInfo) -> s_tir.Schedule:
    """NHWC depthwise: one thread per (pixel, :data:`NHWC_LANES` channels), vectors along C."""
    conv = info.block
    pad = data_producer(sch, info)
    lanes = next(n for n in (NHWC_LANES, 2, 1) if info.f % n == 0)  # CUDA: even fp16 vectors

    # Step 1. Accumulate in registers; the epilogue joins the register write-back.
    acc = sch.cache_write(conv, 0, "local")
    _inline_consumers(sch, acc)
    if pad is not None:
        sch.compute_inline(pad)  # padding becomes a predicate on the load

    # Step 2. (batch, row, column, channel group) -> threads; the lanes innermost.
    n, y, x, f, ry, rx, rc = sch.get_loops(conv)
    fo, fv = sch.split(f, [None, lanes])
    sch.reorder(n, y, x, fo, rc, ry, rx, fv)
    bx, tx = sch.split(sch.fuse(n, y, x, fo), [None, NHWC_THREADS])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    sch.reverse_compute_at(acc, tx)

    # Step 3. Unroll the window; vectors over the lanes (products, init, write-back).
    sch.vectorize(fv)  # before the init is split off: vectorize needs a complete reduction
    init = sch.decompose_reduction(conv, rc)
    for block in (conv, init, acc):
        inner = _inner_loops(sch, block, tx)  # the lanes last (the loop may be gone at 1 lane)
        if inner and int(sch.get(inner[-1]).extent) == lanes:
            if block != conv:  # the product's lanes are vectorized already
                sch.vectorize(inner[-1])
            inner = inner[:-1]
        for loop in inner:
            sch.unroll(loop)
    return sch


def _inner_loops(sch: s_tir.Schedule, block, outer) -> list:
    """The loops of ``block`` below the thread loop ``outer``."""
    loops = list(sch.get_loops(block))
    outer_stmt = sch.get(outer)
    return loops[[sch.get(lp).same_as(outer_stmt) for lp in loops].index(True) + 1 :]


def _unroll_inner(sch: s_tir.Schedule, block, outer) -> None:
    """Unroll every loop of ``block`` below the thread loop ``outer``."""
    for loop in _inner_loops(sch, block, outer):
        sch.unroll(loop)


def _inline_consumers(sch: s_tir.Schedule, block) -> None:
    """Inline the epilogue chain into ``block`` (the register write-back)."""
    from tvm.s_tir.dlight.gpu.matmul import auto_inline_consumer_chain

    auto_inline_consumer_chain(sch, block)
