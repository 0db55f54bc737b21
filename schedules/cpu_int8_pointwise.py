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

Scope: 1x1, stride 1, no padding, ``groups == 1``, ``C % 4 == 0``, ``H*W % 16 == 0``.
The input pack walks pixels outer of the 4 channels of a group (LLVM vectorises it into
16-byte loads and interleaving stores); walked the other way it was a byte scatter that cost
projection convs (``C > F``) more than the write-back saved (docs/results.md "CPU int8
kernels, session 4").
"""

from __future__ import annotations

from tvm import s_tir
from tvm.target import Target

from ._intrin import DotProductIntrin
from ._util import inline_epilogue_into, largest_divisor, logger
from .base import finish_cpu_schedule
from .conv2d_analysis import Conv2dInfo, data_producer
from .cpu_tiling import pack_weight

PIXEL_LANES = 16
# Accumulator registers of a task's tile (of 32 zmm; the rest hold operands).
TILE_REGISTERS = 24


def fits_pixel_lanes(info: Conv2dInfo) -> bool:
    """Whether :func:`schedule_pointwise_pixel_lanes` applies (see module doc)."""
    return (
        info.kh == 1
        and info.kw == 1
        and info.stride == (1, 1)
        and info.groups == 1
        and info.cg % 4 == 0
        and (info.oh * info.ow) % PIXEL_LANES == 0
    )


def schedule_pointwise_pixel_lanes(
    sch: s_tir.Schedule, info: Conv2dInfo, target: Target, intrin: DotProductIntrin
) -> None:
    """Tensorize a pointwise conv with ``intrin`` (16 pixels x 4 input channels per step)."""
    conv = info.block
    width, vectors = info.ow, info.oh * info.ow // PIXEL_LANES
    pt = largest_divisor(vectors, 4)
    ft = largest_divisor(info.f, max(1, TILE_REGISTERS // pt))

    # Step 1. Weight to O/ft, I/4, 1, 1, ft, 4 (precomputable); input to N, C/4, H*W, 4.
    pack_weight(sch, info, ft, 4)
    pad = data_producer(sch, info)
    if pad is None:
        pad = sch.cache_read(conv, info.data_read, "global")
    sch.transform_layout(pad, ("write", 0), lambda n, c, h, w: (n, c // 4, h * width + w, c % 4))
    sch.transform_block_layout(pad, lambda n, c, h, w: (n, c, h * width + w))

    # Step 2. Accumulator N, F, H*W (pixels contiguous); the epilogue fused into its write-back.
    acc_out = sch.cache_write(conv, 0, "local")
    sch.transform_layout(conv, ("write", 0), lambda n, f, h, w: (n, f, h * width + w))
    inline_epilogue_into(sch, acc_out)
    sch.transform_block_layout(
        conv, lambda n, f, h, w, rc, ry, rx: (n, f, h * width + w, rc, ry, rx)
    )
    sch.transform_block_layout(acc_out, lambda n, f, h, w: (n, f, h * width + w))

    # Step 3. Tile: parallel (n, pixel tiles) | channel tiles | C/4 | ft, pt (unrolled) | 16 x 4.
    n, f, p, rc, ry, rx = sch.get_loops(conv)
    fo, fi = sch.split(f, [None, ft])
    po, pv, pi = sch.split(p, [None, pt, PIXEL_LANES])
    rco, rci = sch.split(rc, [None, 4])
    sch.reorder(n, po, fo, rco, ry, rx, fi, pv, pi, rci)
    outer = sch.fuse(n, po)
    sch.parallel(outer)
    sch.reverse_compute_at(acc_out, fo, preserve_unit_loops=True)
    # Pack the task's pixels: pixels outer of the 4 channels of a group, so that LLVM turns
    # the copy into 16-byte loads from 4 channel planes and interleaving stores.
    sch.compute_at(pad, outer, preserve_unit_loops=True)
    *_, pack_c, pack_p = sch.get_loops(pad)
    pack_c4, pack_k = sch.split(pack_c, [None, 4])
    sch.reorder(pack_c4, pack_p, pack_k)
    sch.unroll(pack_k)

    # Step 4. Tensorize; vector init and write-back (16 pixels of one channel at a time).
    init = sch.decompose_reduction(conv, rco)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(pi, intrin.name)
    sch.unroll(fi)
    sch.unroll(pv)
    _, inner = sch.split(sch.get_loops(acc_out)[-1], [None, PIXEL_LANES])
    sch.vectorize(inner)
    skip = {info.name, info.name + "_init", sch.get(acc_out).name_hint, sch.get(pad).name_hint}
    finish_cpu_schedule(sch, target, skip=skip)
    logger.debug("conv2d %s: pixel lanes ft=%d pt=%d", info.name, ft, pt)
