"""Steps the CPU conv2d and matmul schedules share (fp32 vectors, VNNI / Arm dot product, AMX).

Each rule picks its own tile sizes and inner loop order; these helpers do the common moves:

- :func:`pack_weight`: the conv weight repacked for the inner loops, as a layout-rewrite stage
  (precomputed for constants), walked in destination order when it runs per call;
- :func:`pack_input_channels`: the (padded) input as ``NC/k HW k``;
- :func:`blocked_accumulator`: a local accumulator laid out ``N, F/v, H, W, v`` with the
  elementwise epilogue fused into its write-back;
- :func:`parallel_conv_tiles`: rows or channel tiles outer (by weight size), one parallel loop
  balanced for :data:`TARGET_THREADS` where the shape allows (:func:`parallel_part`);
- :func:`tile_matmul`: the register tiling of a matmul with a packed B.
"""

from __future__ import annotations

from collections.abc import Sequence

from tvm import s_tir
from tvm.s_tir.schedule import LoopRV, SBlockRV

from ._util import LAYOUT_REWRITE_PREPROC, const_int, inline_epilogue_into
from .conv2d_analysis import Conv2dInfo, data_producer
from .matmul_analysis import MatmulInfo

# Weights up to this size are assumed to stay in the per-core L2 across output rows.
WEIGHT_CACHE_BYTES = 1 << 20
# Threads a conv's parallel loop is balanced for at batch 1: the 16-core Xeon of the GPU machine.
# A loop of T equal tasks runs in ceil(T / threads) rounds of static chunks, so its use of the
# threads is T / (threads * ceil(T / threads)): 7 row tasks (ResNet's 7x7 stage) use 44% of 16
# threads, one pixel tile (a pointwise conv on a 7x7 map) 6% of 16 and 50% of 2.
TARGET_THREADS = 16
# The balance below which a rule adds channel tiles to its parallel loop (14 or 28 rows: 0.875,
# 49 pixel tiles: 0.77). Splitting further costs a shared input pack at the root: 20-80% slower
# on MobileNetV2's 28x28 pointwise convs at 2 threads (development machine).
MIN_BALANCE = 0.75


def balance(tasks: int, threads: int = TARGET_THREADS) -> float:
    """The share of ``threads`` that a parallel loop of ``tasks`` equal tasks keeps busy."""
    return tasks / (threads * -(-tasks // threads))


def parallel_part(tasks: int, extent: int, threads: int = TARGET_THREADS) -> int:
    """How much of a loop of ``extent`` to add to ``tasks`` parallel tasks: the smallest
    divisor ``d`` of ``extent`` with ``balance(tasks * d) >= MIN_BALANCE``, else the smallest
    with the best balance."""
    divisors = [d for d in range(1, extent + 1) if extent % d == 0]
    for d in divisors:
        if balance(tasks * d, threads) >= MIN_BALANCE:
            return d
    return max(divisors, key=lambda d: (balance(tasks * d, threads), -d))


def pack_weight(
    sch: s_tir.Schedule,
    info: Conv2dInfo,
    o_lanes: int,
    i_lanes: int = 1,
    i_tile: int | None = None,
) -> SBlockRV:
    """Repack the OIHW weight for the inner loops; return the packing block.

    Layout ``O/ol, I/il, KH, KW, ol[, il]``: ``o_lanes`` output channels innermost but for
    ``i_lanes`` input channels (one dot-product group; omitted when 1). fp32: ``(vo)``, VNNI:
    ``(16, 4)``. With ``i_tile`` (AMX: a tile row of ``kt`` input channels) the layout is
    ``O/ol, I/kt, KH, KW, kt/il, ol, il``. The copy is annotated as a layout-rewrite stage.
    """
    ol, il = o_lanes, i_lanes

    def index_map(o, i, h, w):
        if i_tile is not None:
            return (o // ol, i // i_tile, h, w, i % i_tile // il, o % ol, i % il)
        if il > 1:
            return (o // ol, i // il, h, w, o % ol, i % il)
        return (o // ol, i, h, w, o % ol)

    wpack = sch.cache_read(info.block, info.weight_read, "global")
    sch.transform_layout(info.block, ("read", info.weight_read), index_map)
    sch.annotate(wpack, LAYOUT_REWRITE_PREPROC, 1)
    # When the pack is not folded away it runs per call: walk it in destination order.
    o, i, h, w = sch.get_loops(wpack)
    oo, oi = sch.split(o, [None, ol])
    if i_tile is not None:
        io, ig, ii = sch.split(i, [None, i_tile // il, il])
        sch.reorder(oo, io, h, w, ig, oi, ii)
    elif il > 1:
        io, ii = sch.split(i, [None, il])
        sch.reorder(oo, io, h, w, oi, ii)
    else:
        io = i
        sch.reorder(oo, i, h, w, oi)
    sch.parallel(sch.fuse(oo, io))
    return wpack


def pack_input_channels(sch: s_tir.Schedule, info: Conv2dInfo, k: int) -> SBlockRV:
    """Have the padding stage (or a copy, without padding) write the input as ``NC/k HW k``."""
    pad = data_producer(sch, info)
    if pad is None:
        pad = sch.cache_read(info.block, info.data_read, "global")
    sch.transform_layout(pad, ("write", 0), lambda n, c, h, w: (n, c // k, h, w, c % k))
    return pad


def blocked_accumulator(sch: s_tir.Schedule, info: Conv2dInfo, lanes: int) -> SBlockRV:
    """Accumulate in a local ``N, F/lanes, H, W, lanes`` buffer; return its write-back block,
    into which the elementwise epilogue (bias, activation, requantize) is inlined."""
    acc_out = sch.cache_write(info.block, 0, "local")
    sch.transform_layout(
        info.block, ("write", 0), lambda n, f, y, x: (n, f // lanes, y, x, f % lanes)
    )
    return inline_epilogue_into(sch, acc_out)


def parallel_conv_tiles(
    sch: s_tir.Schedule,
    weight_bytes: int,
    acc_out: SBlockRV,
    n: LoopRV,
    y: LoopRV,
    fo: LoopRV,
    xo: LoopRV,
    reduction: Sequence[LoopRV],
    inner: Sequence[LoopRV],
) -> tuple[LoopRV, bool]:
    """Order ``n, y, fo, xo | reduction | inner`` and fuse the outer loops into a parallel one.

    Rows outer when the weights fit :data:`WEIGHT_CACHE_BYTES` (input rows are then reused by
    every channel tile while hot; parallel over ``n, y``, and over as many channel tiles as
    :func:`parallel_part` adds when the rows leave threads idle), channel tiles outer otherwise
    (each tile's weights stay hot; parallel over ``n, fo, y``). The accumulator's write-back
    goes under ``xo``. Returns the parallel loop and whether a task may pack its own input
    rows (rows outer and no channel tiles in the parallel loop: those would pack the rows again).
    """
    rows_outer = weight_bytes <= WEIGHT_CACHE_BYTES
    if rows_outer:
        n_rows, rows, tiles = (const_int(sch.get(lp).extent) for lp in (n, y, fo))
        part = 1 if None in (n_rows, rows, tiles) else parallel_part(n_rows * rows, tiles)
        parallel = [n, y]
        if part > 1:
            fo_par, fo = sch.split(fo, [part, None])
            parallel.append(fo_par)
        sch.reorder(*parallel, fo, xo, *reduction, *inner)
    else:
        sch.reorder(n, fo, y, xo, *reduction, *inner)
        parallel = [n, fo, y]
    sch.reverse_compute_at(acc_out, xo, preserve_unit_loops=True)
    outer = sch.fuse(*parallel)
    sch.parallel(outer)
    return outer, rows_outer and len(parallel) == 2


def pack_in_destination_order(sch: s_tir.Schedule, pad: SBlockRV, k: int) -> None:
    """Walk an ``N, C, H, W -> N, C/k, H, W, k`` input pack in destination order (``k``
    unrolled innermost: k channel planes read, k consecutive bytes written).

    At the root it is parallel over ``N, C/k``, and over the rows too where those leave
    :data:`TARGET_THREADS` idle: a task then writes whole rows of ``W x k`` bytes. (Left to the
    generic rule, the pack runs in source order, parallel over channel rows, and up to four
    threads write the 64 bytes of one AMX pixel: at 16 threads on the Xeon a 256 -> 512 stride-2
    conv at 14x14 took 606 µs on AMX against 61 on VNNI, docs/results.md.)
    """
    *outer, n, c, h, w = sch.get_loops(pad)
    c4, ck = sch.split(c, [None, k])
    sch.reorder(c4, h, w, ck)
    sch.unroll(ck)
    if outer:
        return
    groups = [const_int(sch.get(loop).extent) for loop in (n, c4)]
    few = None not in groups and groups[0] * groups[1] < TARGET_THREADS
    sch.parallel(sch.fuse(n, c4, h) if few else sch.fuse(n, c4))


def tile_matmul(
    sch: s_tir.Schedule,
    info: MatmulInfo,
    mi: int,
    j_factors: Sequence[int],
    k_factor: int | None = None,
) -> tuple[SBlockRV, LoopRV | None, list[LoopRV], LoopRV]:
    """Register-tile a matmul: ``batch, jo, io`` parallel | ``ko`` | ``ii, j inner, k inner``.

    ``j`` splits by ``j_factors`` (innermost last), ``i`` by ``mi`` (when there is an ``i``),
    ``k`` by ``k_factor`` if given (its inner part goes innermost). j is outer of i:
    consecutive tasks reuse one packed panel of B from cache. The accumulator is local, with
    the epilogue inlined into its write-back. Returns ``(write-back block, ii or None, the j
    inner loops, the outer k loop)``.
    """
    block = info.block
    acc_out = inline_epilogue_into(sch, sch.cache_write(block, 0, "local"))
    *batch, j, k = sch.get_loops(block)
    if batch:
        *batch, i = batch
        io, ii = sch.split(i, [None, mi])
    else:
        io = ii = None
    jo, *j_inner = sch.split(j, [None, *j_factors])
    k_inner = []
    if k_factor is not None:
        k, ki = sch.split(k, [None, k_factor])
        k_inner = [ki]
    outer = [*batch, jo, io] if io is not None else [jo]
    inner = [ii, *j_inner, *k_inner] if ii is not None else [*j_inner, *k_inner]
    sch.reorder(*outer, k, *inner)
    sch.reverse_compute_at(acc_out, outer[-1], preserve_unit_loops=True)
    sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    return acc_out, ii, j_inner, k
