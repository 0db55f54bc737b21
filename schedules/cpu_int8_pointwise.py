"""Pointwise (1x1) u8 x s8 -> s32 convs with pixels in the VNNI lanes (AVX-512 VNNI).

:class:`~.cpu_int8.Conv2dInt8DotProduct` puts 16 output channels of one pixel in a register.
The NCHW output wants pixels contiguous, so its write-back gathers each channel's pixels from
the register tile (``vpgatherdd``) and requantizes them 8 at a time, with a scalar tail. On
MobileNetV2's expand convs (16 -> 96 channels at 112x112), whose reduction is short (C/4 dot
products per output), that write-back took 85% of the time (``perf``, docs/results.md).

Here a register holds 16 consecutive pixels of one output channel instead:

- the input is packed to ``N, C/4, H*W, 4`` (height and width flattened, 4 channels per
  pixel), so 16 pixels x 4 channels are 64 contiguous bytes, one ``vpdpbusd`` operand;
- the weight (``O/ft, I/4, 1, 1, ft, 4``, precomputed for constants) gives one output
  channel's 4 weights as a 32-bit broadcast;
- each task accumulates ``ft`` channels x ``pt`` vectors of 16 pixels over ``C/4`` steps;
- the accumulator is ``N, F, H*W``, so the fused requantize epilogue reads 16 contiguous
  int32 and writes 16 contiguous output bytes per channel: no gather and no scalar tail
  (``H*W`` flattened makes rows of any width contiguous).

Scope: 1x1, stride 1, ``groups == 1``, ``C % 4 == 0``, and ``H*W % 16 == 0``, or rows
narrower than 8 (``H*W`` then padded to whole vectors with ``pad_einsum``: see
:data:`PADDED_BELOW_WIDTH`), or rows of 8-15 pixels with ``F >= C`` (each row padded to one
vector, ``N, C/4, H, 16, 4``: see :data:`ROW_PADDED_WIDTHS`).
The input pack walks pixels outer of the 4 channels of a group (LLVM vectorises it into
16-byte loads and interleaving stores); walked the other way it was a byte scatter that cost
projection convs (``C > F``) more than the write-back saved (docs/results.md "CPU int8
kernels, session 4").
"""

from __future__ import annotations

from dataclasses import replace

from tvm import s_tir
from tvm.s_tir.schedule import SBlockRV
from tvm.target import Target

from ._intrin import DotProductIntrin
from ._util import inline_epilogue_into, largest_divisor, logger
from .base import finish_cpu_schedule
from .conv2d_analysis import Conv2dInfo, data_producer
from .cpu_tiling import MIN_BALANCE, balance, pack_weight, parallel_part

PIXEL_LANES = 16
# Accumulator registers of a task's tile (of 32 zmm; the rest hold operands).
TILE_REGISTERS = 24
# H*W not a multiple of 16 is padded to one (zeros in, the extra outputs dropped) only for
# rows narrower than this, where the channel-lane rule's tile of one row's pixels is too small
# to use its registers: on MobileNetV2 (2-core machine) the 7x7 layers ran 1.1-1.6x faster
# padded (49 -> 64 pixels), the 14x14 ones 1.1-1.4x slower (196 -> 208).
PADDED_BELOW_WIDTH = 8
# Row widths padded to one vector each (14x14 maps: 196 -> 224 pixels), for convs with at least
# as many output as input channels. Flattened and padded to 208 the 14x14 layers were slower
# than the channel-lane rule (their last tile's write-back partial); with rows of 16 and tiles
# of 2 rows, every write-back a whole row of 14 bytes, expand convs ran 1.2-1.6x faster than
# channel lanes (64 -> 384, 96 -> 576, 256 -> 1024 at 14x14) and projections (576 -> 96,
# 1024 -> 256) 1.1-1.2x slower (2-core development machine, 2 threads, kernels alone).
ROW_PADDED_WIDTHS = range(PADDED_BELOW_WIDTH, PIXEL_LANES)


def fits_pixel_lanes(info: Conv2dInfo, row_padding: bool = True) -> bool:
    """Whether :func:`schedule_pointwise_pixel_lanes` applies (see module doc); without
    ``row_padding``, for the shapes that need no padded rows (the ones AMX leaves to it)."""
    return (
        info.kh == 1
        and info.kw == 1
        and info.stride == (1, 1)
        and info.groups == 1
        and info.cg % 4 == 0
        and (
            (info.oh * info.ow) % PIXEL_LANES == 0
            or info.ow < PADDED_BELOW_WIDTH
            or (row_padding and info.ow in ROW_PADDED_WIDTHS and info.f >= info.cg)
        )
    )


def schedule_pointwise_pixel_lanes(
    sch: s_tir.Schedule, info: Conv2dInfo, target: Target, intrin: DotProductIntrin
) -> None:
    """Tensorize a pointwise conv with ``intrin`` (16 pixels x 4 input channels per step)."""
    conv = info.block
    width, pixels = info.ow, info.oh * info.ow
    rows_padded = pixels % PIXEL_LANES != 0 and width in ROW_PADDED_WIDTHS
    vectors = info.oh if rows_padded else -(-pixels // PIXEL_LANES)
    # Pixel tile: up to 4 vectors, fewer where that balances the parallel loop better (padded
    # rows: 2, measured faster than 1 and than 7).
    pt = (
        largest_divisor(vectors, 2)
        if rows_padded
        else next(
            (
                t
                for t in (4, 2, 1)
                if vectors % t == 0 and balance(info.n * vectors // t) >= MIN_BALANCE
            ),
            largest_divisor(vectors, 4),
        )
    )
    ft = largest_divisor(info.f, max(1, TILE_REGISTERS // pt))

    # Steps 1-2. Input to N, C/4, H*W, 4 and accumulator N, F, H*W (pixels contiguous, H*W
    # padded to whole vectors), the epilogue fused into its write-back; weight to
    # O/ft, I/4, 1, 1, ft, 4 (precomputable).
    if pixels % PIXEL_LANES == 0:
        pad, acc_out = _flatten_pixels(sch, info, width)
        pack_weight(sch, info, ft, 4)
    elif rows_padded:
        pad, acc_out = _flatten_row_padded_pixels(sch, info)
        reads = [r.source for r in sch.get(conv).reads]
        weight_read = next(i for i, b in enumerate(reads) if b.same_as(info.weight))
        pack_weight(sch, replace(info, weight_read=weight_read), ft, 4)
    else:
        pad, acc_out = _flatten_padded_pixels(sch, info, width, vectors * PIXEL_LANES)
        reads = [r.source for r in sch.get(conv).reads]
        weight_read = next(i for i, b in enumerate(reads) if b.same_as(info.weight))
        pack_weight(sch, replace(info, weight_read=weight_read), ft, 4)
    if rows_padded:
        sch.transform_layout(pad, ("write", 0), lambda n, c, h, w: (n, c // 4, h, w, c % 4))
    else:
        sch.transform_layout(pad, ("write", 0), lambda n, c, p: (n, c // 4, p, c % 4))

    # Step 3. Tile: parallel (n, pixel tiles[, channel tiles]) | channel tiles | C/4 |
    # ft, pt (unrolled) | 16 x 4. Channel tiles join the parallel loop where the pixel tiles
    # leave threads idle (7x7 maps: one tile of 4 vectors; see cpu_tiling.parallel_part).
    fo, fi = sch.split(sch.get_loops(conv)[1], [None, ft])
    if rows_padded:  # rows of one vector; no 1x1 tap loops
        n, _, _, h, pi, rc = sch.get_loops(conv)
        po, pv = sch.split(h, [None, pt])
        taps = []
    else:
        n, _, _, p, rc, *taps = sch.get_loops(conv)
        po, pv, pi = sch.split(p, [None, pt, PIXEL_LANES])
    rco, rci = sch.split(rc, [None, 4])
    part = parallel_part(info.n * (vectors // pt), info.f // ft)
    pack_per_task = part == 1
    if pack_per_task:
        sch.reorder(n, po, fo, rco, *taps, fi, pv, pi, rci)
        outer = sch.fuse(n, po)
    else:
        fo_par, fo = sch.split(fo, [part, None])
        sch.reorder(n, po, fo_par, fo, rco, *taps, fi, pv, pi, rci)
        outer = sch.fuse(n, po, fo_par)
    sch.parallel(outer)
    sch.reverse_compute_at(acc_out, fo, preserve_unit_loops=True)
    # Pack the task's pixels (or, with channel tiles parallel, the whole input once): pixels
    # outer of the 4 channels of a group, so that LLVM turns the copy into 16-byte loads from
    # 4 channel planes and interleaving stores.
    if pack_per_task:
        sch.compute_at(pad, outer, preserve_unit_loops=True)
    if rows_padded:
        sch.fuse(*sch.get_loops(pad)[-2:])
    *pack_outer, pack_c, pack_p = sch.get_loops(pad)
    pack_c4, pack_k = sch.split(pack_c, [None, 4])
    sch.reorder(pack_c4, pack_p, pack_k)
    sch.unroll(pack_k)
    if not pack_per_task:
        sch.parallel(sch.fuse(*pack_outer, pack_c4) if pack_outer else pack_c4)

    # Step 4. Tensorize; vector init and write-back (16 pixels of one channel at a time).
    init = sch.decompose_reduction(conv, rco)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(pi, intrin.name)
    sch.unroll(fi)
    sch.unroll(pv)
    if rows_padded:  # one row of the output per vector
        sch.vectorize(sch.get_loops(acc_out)[-1])
    elif pixels % PIXEL_LANES == 0:  # (else the last tile's write-back is partial: LLVM's)
        _, inner = sch.split(sch.get_loops(acc_out)[-1], [None, PIXEL_LANES])
        sch.vectorize(inner)
    skip = {info.name, info.name + "_init", sch.get(acc_out).name_hint, sch.get(pad).name_hint}
    finish_cpu_schedule(sch, target, skip=skip)
    logger.debug("conv2d %s: pixel lanes ft=%d pt=%d", info.name, ft, pt)


def _flatten_pixels(sch: s_tir.Schedule, info: Conv2dInfo, width: int) -> tuple[SBlockRV, SBlockRV]:
    """Conv, input copy and accumulator over ``N, *, H*W``; returns (input copy, write-back)."""
    conv = info.block
    pad = data_producer(sch, info)
    if pad is None:
        pad = sch.cache_read(conv, info.data_read, "global")
    sch.transform_layout(pad, ("write", 0), lambda n, c, h, w: (n, c, h * width + w))
    sch.transform_block_layout(pad, lambda n, c, h, w: (n, c, h * width + w))
    acc_out = sch.cache_write(conv, 0, "local")
    sch.transform_layout(conv, ("write", 0), lambda n, f, h, w: (n, f, h * width + w))
    inline_epilogue_into(sch, acc_out)
    sch.transform_block_layout(
        conv, lambda n, f, h, w, rc, ry, rx: (n, f, h * width + w, rc, ry, rx)
    )
    sch.transform_block_layout(acc_out, lambda n, f, h, w: (n, f, h * width + w))
    return pad, acc_out


def _flatten_padded_pixels(
    sch: s_tir.Schedule, info: Conv2dInfo, width: int, padded: int
) -> tuple[SBlockRV, SBlockRV]:
    """As :func:`_flatten_pixels` with ``H*W`` padded to ``padded`` pixels (``pad_einsum``:
    the input copy writes zeros past ``H*W``, the write-back reads the first ``H*W``)."""
    conv = info.block
    pad = data_producer(sch, info)
    if pad is not None:  # a pointwise conv's pad_temp is a plain copy
        sch.compute_inline(pad)
        reads = [r.source for r in sch.get(conv).reads]
        data_read = next(i for i, b in enumerate(reads) if not b.same_as(info.weight))
    else:
        data_read = info.data_read
    flat = sch.reindex_cache_read(
        conv,
        data_read,
        "global",
        lambda n, f, y, x, rc, ry, rx: (n, rc, (y + ry) * width + x + rx),
    )
    acc_out = sch.cache_write(conv, 0, "local")
    sch.transform_layout(conv, ("write", 0), lambda n, f, h, w: (n, f, h * width + w))
    inline_epilogue_into(sch, acc_out)
    sch.transform_block_layout(
        conv, lambda n, f, h, w, rc, ry, rx: (n, f, h * width + w, rc, ry, rx)
    )
    sch.transform_block_layout(acc_out, lambda n, f, h, w: (n, f, h * width + w))
    padded_input = _pad_pixels(sch, conv, flat, [1, info.f, padded, info.cg, 1, 1], padded)
    return padded_input, acc_out


def _flatten_row_padded_pixels(sch: s_tir.Schedule, info: Conv2dInfo) -> tuple[SBlockRV, SBlockRV]:
    """Input copy and accumulator over ``N, *, H, 16``: each row padded to one vector
    (``pad_einsum``: the input copy writes zeros in columns ``W..15``, the write-back reads
    columns ``0..W-1``). The conv block loses its unit 1x1 tap loops: ``N, F, H, 16, C``."""
    conv = info.block
    pad = data_producer(sch, info)
    if pad is not None:  # a plain copy, or the zero padding of a padded 1x1 conv
        sch.compute_inline(pad)
    sch.transform_block_layout(conv, lambda n, f, y, x, rc, ry, rx: (n, f, y, x, rc))
    reads = [r.source for r in sch.get(conv).reads]
    data_read = next(i for i, b in enumerate(reads) if not b.same_as(info.weight))
    flat = sch.reindex_cache_read(conv, data_read, "global", lambda n, f, y, x, rc: (n, rc, y, x))
    acc_out = sch.cache_write(conv, 0, "local")
    inline_epilogue_into(sch, acc_out)
    extents = [1, info.f, info.oh, PIXEL_LANES, info.cg]
    padded_input = _pad_pixels(sch, conv, flat, extents, PIXEL_LANES)
    return padded_input, acc_out


def _pad_pixels(
    sch: s_tir.Schedule, conv: SBlockRV, flat: SBlockRV, extents: list[int], pixels: int
) -> SBlockRV:
    """``pad_einsum`` the conv to ``extents``, whose innermost input axis becomes ``pixels``
    long: the write-back reads the padded accumulator in place, the flattened input copy is
    inlined into the padded one, which is returned."""
    sch.pad_einsum(conv, extents)
    (copy_out,) = sch.get_consumers(conv)  # padded accumulator -> unpadded: read in place
    sch.compute_inline(copy_out)
    (padded_input,) = [
        b for b in sch.get_producers(conv) if sch.get(b).writes[0].source.shape[-1] == pixels
    ]
    sch.compute_inline(flat)
    return padded_input
