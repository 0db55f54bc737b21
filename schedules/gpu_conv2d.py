"""CUDA fp16 conv2d on tensor cores: an implicit GEMM with wmma 16x16x16 fragments.

The legalized NCHW conv is viewed as ``C[I, J] += A[I, K] * B[J, K]`` with
``I = N*OH*OW`` (output pixels), ``J = F`` (output channels) and ``K = C/g*KH*KW``; ``A`` is the
im2col view of the padded input, never materialised: the padding and the im2col index math are
inlined into the global -> shared-memory copy. The structure follows TVM's
``dlight.gpu.MatmulTensorization`` (Apache-2.0): pad the GEMM to the tile, blockize the 16x16x16
product, stage A/B through shared memory with software pipelining, wmma fragments in registers,
accumulators written back through shared memory with the epilogue (bias, relu, cast) fused.

What differs:

- dlight's ``Matmul`` only tensorizes when I, J and K all exceed 64, so every conv with 64 (or
  fewer) output channels — ResNet's whole first stage — ran on SIMT cores. Here J only needs to
  reach 16, and the warp tile along J shrinks with it (64 output channels use a 128x64 tile
  instead of padding J to 128).
- Accumulation follows the conv's ``out_dtype``: fp32 accumulators for ``out_dtype=float32``,
  fp16 ones for ``float16``.
- Tiles per shape (:class:`ConvTile`, :func:`choose_tile`): 32x64 blocks of two warps by
  default, and split-K where the grid would leave SMs idle (batch-1 layers at 14x14 and 7x7
  have 16-28 blocks of 32x64 for 132 SMs). Split-K is a ``rfactor`` of the input channels:
  the chunk index becomes the GEMM's batch axis (``blockIdx.z``), the partial sums (in the
  accumulator type) go to a global buffer, and a second kernel adds them up, one thread per
  output element, with the epilogue (bias, residual add, relu, cast) fused there.
- NHWC convs (OHWI weights, ``MULAYER_GPU_LAYOUT=NHWC``): K is (kernel row, column, channel),
  contiguous in memory, so both shared-memory copies are 16-byte vectors where a K step stays
  inside one tap (:func:`nhwc_k_step`, and split-K chunks of whole steps).

Grouped convs are left to dlight's SIMT rules (their GEMM is block-diagonal), depthwise ones to
:class:`~.gpu_depthwise.DepthwiseConv2d`.
Numerics need a GPU: see ``tests/test_schedules_gpu.py`` (``-m gpu``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from tvm import s_tir, tirx
from tvm.target import Target

from ._intrin import load_tvm_tensor_intrinsics
from ._util import logger
from .base import GPUScheduleRule
from .conv2d_analysis import Conv2dInfo, find_conv2d

# wmma fragment shape and the smallest GEMM extents (output pixels, K) worth a tensor-core
# tile. Output channels need no minimum: J is padded to the J tile (16, 32, 48 or 64 wide, see
# choose_tile). Narrow outputs under the old 128-row tile failed to launch on an H100
# (CUDA_ERROR_INVALID_VALUE, 2026-11-23): 41 KB dynamic + 10 KB static shared memory, which
# ConvTile.launchable now refuses.
MICRO = 16
MIN_EXTENT = 16
# Narrow convs take the rule only where MULAYER_GPU_NARROW_CONV=1: their J tiles compile for
# sm_90 and their numerics tests exist, but neither has run on a GPU yet (the session that wrote
# them got no GPU time); until then they keep dlight's rules by default, as before.
MIN_OUT_CHANNELS = 64
NARROW_ENV = "MULAYER_GPU_NARROW_CONV"
WARP_SIZE = 32
VECTOR = 4  # halves per thread of a global -> shared copy (8 bytes)
NHWC_VECTOR = 8  # ... where the channels are contiguous and a multiple of 8 (16-byte loads)
NHWC_MIN_STEP = 32  # the smallest K step (two fragments: TVM's software pipeline needs two)
# Shared memory a kernel may use without opting in (static + dynamic).
SMEM_DEFAULT = 48 * 1024


def _sm_version(target: Target) -> int:
    arch = str(target.attrs.get("arch", ""))
    digits = arch.replace("sm_", "")
    return int(digits) if digits.isdigit() else -1


@dataclass(frozen=True)
class ConvTile:
    """Work split of one implicit GEMM (``I`` output pixels x ``J`` output channels x ``K``).

    Attributes
    ----------
    i_warps, i_frags : int
        Warps along I, and 16-row wmma fragments per warp: the block's I tile is
        ``16 * i_warps * i_frags`` rows.
    j_warps, j_frags : int
        The same along J (output channels).
    k_frags : int
        16-wide K steps per shared-memory stage (``K step = 16 * k_frags``).
    split_k : int
        Input-channel chunks computed by separate thread blocks (the chunk is the GEMM batch
        axis, on ``blockIdx.z``) into fp32/out_dtype partial sums that a second kernel adds up
        with the epilogue fused. 1: no split.
    a_by_pixel : bool
        Load the im2col tile with consecutive threads on consecutive output pixels (I) at one
        K position: in NCHW those are neighbouring input columns, so a warp's loads coalesce
        (stride 1), where K-major loads gather one element per channel/tap. Scalar loads and
        strided shared-memory stores instead of 4-wide vectors.
    k_by_tap : bool
        Order K as (kernel row, kernel column, input channel) instead of (channel, row,
        column): a K step then stays inside one tap when the channels fill whole steps, and
        the load's index math (div/mod by the kernel size per element) simplifies away.
    """

    i_warps: int = 4
    i_frags: int = 2
    j_warps: int = 4
    j_frags: int = 2
    k_frags: int = 4
    split_k: int = 1
    a_by_pixel: bool = False
    k_by_tap: bool = False

    @property
    def tile_i(self) -> int:
        return MICRO * self.i_warps * self.i_frags

    @property
    def tile_j(self) -> int:
        return MICRO * self.j_warps * self.j_frags

    @property
    def tile_k(self) -> int:
        return MICRO * self.k_frags

    @property
    def threads(self) -> int:
        return WARP_SIZE * self.i_warps * self.j_warps

    @property
    def shared_bytes(self) -> tuple[int, int]:
        """(dynamic, static) shared memory of a block: two stages of the A and B tiles (rows
        padded by 8 halves), and the accumulator tile (fp32, rows padded by 4)."""
        dynamic = 2 * (self.tile_i + self.tile_j) * (self.tile_k + 8) * 2
        acc = self.tile_i * (self.tile_j + 4) * 4
        return (dynamic + acc, 0) if self.acc_dynamic else (dynamic, acc)

    @property
    def acc_dynamic(self) -> bool:
        """Whether the accumulator tile goes to dynamic shared memory (see the schedule)."""
        return self.tile_i * self.tile_j >= 128 * 128

    @property
    def launchable(self) -> bool:
        """False where static + dynamic shared memory exceed 48 KB while the dynamic part alone
        does not: TVM then does not raise the kernel's dynamic limit and the launch fails
        (CUDA_ERROR_INVALID_VALUE on an H100, e.g. 64x64 tiles with K step 64)."""
        dynamic, static = self.shared_bytes
        return dynamic > SMEM_DEFAULT or dynamic + static <= SMEM_DEFAULT

    def blocks(self, gemm_i: int, gemm_j: int) -> int:
        """Thread blocks of the GEMM kernel for an ``I x J`` output."""
        return _ceil(gemm_i, self.tile_i) * _ceil(gemm_j, self.tile_j) * self.split_k

    def name(self) -> str:
        split = f"_s{self.split_k}" if self.split_k > 1 else ""
        by_pixel = "_p" if self.a_by_pixel else ""
        by_tap = "_t" if self.k_by_tap else ""
        return (
            f"i{self.i_warps}x{self.i_frags}_j{self.j_warps}x{self.j_frags}_k{self.k_frags}"
            f"{split}{by_pixel}{by_tap}"
        )


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _warp_tile_j(j_extent: int) -> tuple[int, int]:
    """(warps, fragments per warp) along J: 8 fragments (128 columns) unless J is smaller."""
    frags = -(-j_extent // MICRO)
    if frags >= 8:
        return 4, 2
    if frags >= 4:
        return 2, 2
    if frags >= 2:
        return 2, 1
    return 1, 1


def legacy_tile(info: Conv2dInfo) -> ConvTile:
    """The rule's tile before per-shape tiles (128 rows x up to 128 columns, no split)."""
    j_warps, j_frags = _warp_tile_j(info.f)
    return ConvTile(4, 2, j_warps, j_frags, 4, 1)


# Default tile and split-K policy, fitted to a sweep of up to 19 tiles and splits on 18 dense
# convs of ResNet-18/50, VGG-16 and the 7x7 stem (H100, docs/results.md "GPU dense conv rule"):
# what it picks was the sweep's fastest on 11 of 18 layers and within 20% of it on 17 (7x7
# 512->512: 18.3 us against 14.8 with 128x64 tiles and split 16). Every layer whose grid was
# under ~100 blocks gained from splitting K (that layer: 101.7 -> 18.3 us with split 8), and
# layers with long K chunks kept gaining up to ~4 blocks per SM (VGG-16 14x14 512: split 8).
DEFAULT_TILE = (1, 2, 2, 2, 4)  # i_warps, i_frags, j_warps, j_frags, k_frags: 32x64, K step 64
# Fewer than 64 output channels: (i_warps, i_frags) of the I tile; J is one warp of 1-3
# fragments (16, 32 or 48 channels, the output padded to it).
NARROW_TILE = (2, 2)
FILL_BLOCKS = 96  # split K while the grid has fewer blocks than this
MIN_CHUNK = 576  # ... or while each chunk keeps at least this much K
MAX_SPLIT_BLOCKS = 512  # never split a grid beyond this many blocks
# NHWC convs of at least this many FLOPs take 4 warps along I (128x64 blocks, same split-K):
# H100 sweep, 2026-12-07 (docs/results.md, "Channels-last GPU convs"): VGG-16's 3.7-GFLOP
# 3x3 layers 26.9 -> 19.5 us (224x224), 26.7 -> 22.6 (56x56), 33.6 -> 27.0 (28x28, split 2),
# 128 channels at 112x112 25.6 -> 23.0; 512 at 14x14 (0.9 GFLOP, split 8) 11.7 -> 10.3. At
# 0.23 GFLOP and below (ResNet's layers) the 32x64 default stays faster (4.9 against 7.4 us).
LARGE_NHWC_FLOPS = 5e8


def narrow_convs_enabled() -> bool:
    """Whether convs with fewer than :data:`MIN_OUT_CHANNELS` outputs take this rule's default
    tiles (``MULAYER_GPU_NARROW_CONV=1``; see :data:`NARROW_ENV`)."""
    return os.environ.get(NARROW_ENV, "") == "1"


def base_tile(info: Conv2dInfo) -> ConvTile:
    """The tile before split-K: :data:`DEFAULT_TILE`, or :data:`NARROW_TILE` with a J tile of
    1-3 fragments for convs with fewer than 64 output channels; K steps of 32 where K is that
    short (a 3-channel 3x3 stem: K = 27; one-fragment steps break TVM's software pipeline)."""
    gemm_k = info.cg * info.kh * info.kw
    k_frags = 2 if gemm_k <= 2 * MICRO else DEFAULT_TILE[4]
    j_frags = _ceil(info.f, MICRO)
    if j_frags >= 4:
        return ConvTile(*DEFAULT_TILE[:4], k_frags)
    i_warps, i_frags = NARROW_TILE
    return ConvTile(i_warps, i_frags, 1, j_frags, k_frags)


def choose_tile(info: Conv2dInfo) -> ConvTile:
    """The default tile of ``info``: :func:`base_tile` with split-K by the policy above.

    ``MULAYER_GPU_CONV_TILE=legacy`` selects :func:`legacy_tile` (to measure against it).
    """
    if os.environ.get("MULAYER_GPU_CONV_TILE", "") == "legacy":
        return legacy_tile(info)
    tile = base_tile(info)
    gemm_k = info.cg * info.kh * info.kw
    base = tile.blocks(info.n * info.oh * info.ow, info.f)
    split = 1
    for choice in split_k_choices(info, tile.tile_k):
        if base * choice > MAX_SPLIT_BLOCKS:
            break
        if info.layout == "NHWC" and (info.cg // choice) % _nhwc_chunk_multiple(info):
            continue  # its K steps would straddle taps or cut a vector: scalar loads
        if base * split < FILL_BLOCKS or gemm_k // choice >= MIN_CHUNK:
            split = choice
    tile = replace(tile, split_k=split)
    flops = 2 * info.n * info.oh * info.ow * info.f * gemm_k
    if info.layout == "NHWC" and tile.j_frags == DEFAULT_TILE[3] and flops >= LARGE_NHWC_FLOPS:
        tile = replace(tile, i_warps=4)
    return nhwc_k_step(info, tile) if _taps_in_k(info) else tile


def _nhwc_chunk_multiple(info: Conv2dInfo) -> int:
    """What an NHWC split-K chunk's channel count must be a multiple of for 16-byte loads."""
    return NHWC_MIN_STEP if _taps_in_k(info) else NHWC_VECTOR


def _taps_in_k(info: Conv2dInfo) -> bool:
    """An NHWC conv with several kernel taps: K is (row, column, channel)."""
    return info.layout == "NHWC" and info.kh * info.kw > 1


def nhwc_k_step(info: Conv2dInfo, tile: ConvTile) -> ConvTile:
    """An NHWC tile whose K steps stay inside one kernel tap (channels of a split-K chunk a
    multiple of the step): the padding predicate is then the same for a thread's 8 lanes and
    the im2col copy is one 16-byte load, where a step across taps makes TVM emit 8 scalar ones
    (seen in the CUDA source: 64 -> 128 channels at 14x14, split 2, K step 64)."""
    chunk = info.cg // tile.split_k
    for k_frags in (tile.k_frags, NHWC_MIN_STEP // MICRO):
        if chunk % (MICRO * k_frags) == 0:
            return replace(tile, k_frags=k_frags)
    return tile


def split_k_choices(info: Conv2dInfo, tile_k: int) -> list[int]:
    """Splits of the input channels whose chunks pad to whole K steps with <= 12.5% waste."""
    taps = info.kh * info.kw
    choices = []
    for split in (2, 3, 4, 6, 8, 12, 16, 32):
        chunk = info.cg // split * taps
        if (
            info.cg % split == 0
            and chunk >= MICRO
            and 8 * _ceil(chunk, tile_k) * tile_k <= 9 * chunk
        ):
            choices.append(split)
    return choices


class Conv2dTensorCore(GPUScheduleRule):
    """fp16 conv2d (groups=1, NCHW or NHWC) on CUDA tensor cores (see module doc).

    ``tile`` fixes the work split (tests, sweeps); by default :func:`choose_tile` picks it.
    """

    def __init__(self, tile: ConvTile | None = None):
        self.tile = tile

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        if str(target.kind.name) != "cuda" or _sm_version(target) < 70:
            return None
        if "dlight.do_not_tensorize" in func.attrs:
            return None
        sch = s_tir.Schedule(func)
        info = find_conv2d(sch, layouts=("NCHW", "NHWC"))
        if info is None or info.groups != 1 or info.in_dtype != "float16":
            return None
        if info.w_dtype != "float16" or info.out_dtype not in ("float16", "float32"):
            return None
        gemm_i = info.n * info.oh * info.ow
        gemm_k = info.cg * info.kh * info.kw
        if min(gemm_i, gemm_k) < MIN_EXTENT:
            return None
        if info.f < MIN_OUT_CHANNELS and self.tile is None and not narrow_convs_enabled():
            return None
        load_tvm_tensor_intrinsics()
        tile = self.tile or choose_tile(info)
        if not tile.launchable:
            logger.debug("conv2d: tile %s would not launch (shared memory)", tile.name())
            return None
        if tile.split_k > 1 and not sch.get_consumers(info.block):
            # The partial sums are added up in registers before an epilogue writes them out; a
            # conv that is the function's output has none: no split.
            tile = replace(tile, split_k=1)
        block = info.block
        if tile.split_k > 1:
            if info.cg % tile.split_k:
                return None
            block = _split_reduction(sch, info, tile.split_k)
        if info.layout == "NHWC":  # K is already (row, column, channel)
            tile = replace(tile, k_by_tap=False)
        vector = NHWC_VECTOR if info.layout == "NHWC" and info.cg % NHWC_VECTOR == 0 else VECTOR
        return schedule_implicit_gemm(sch, block, info.out_dtype, tile, vector)


def _split_reduction(sch: s_tir.Schedule, info: Conv2dInfo, split: int):
    """rfactor the input channels into ``split`` chunks: returns the partial-sum GEMM block.

    The original block becomes the sum over chunks; the epilogue is inlined into it and it runs
    as its own kernel, one thread per output element with the sum in a register.
    """
    rc_at = info.reduce_channel_loop
    rc = sch.get_loops(info.block)[rc_at]
    rc_outer, _ = sch.split(rc, factors=[split, None])
    partial = sch.rfactor(rc_outer, factor_axis=0)
    # Loops in the order of the block's iter vars (the chunk first), as the GEMM layout needs.
    p_loops = sch.get_loops(partial)
    rest = [loop for at, loop in enumerate(p_loops[4:], 4) if at != rc_at]
    sch.reorder(p_loops[rc_at], *p_loops[:4], *rest)
    total = info.block
    # Epilogue: fold the chain into its last block, which then reads the sum.
    chain = []
    consumers = list(sch.get_consumers(total))
    while consumers:
        chain.append(consumers[0])
        consumers = list(sch.get_consumers(consumers[0]))
    for block in chain[:-1]:
        sch.compute_inline(block)
    loops = sch.get_loops(total)
    spatial = sch.fuse(*loops[:4])
    bx, tx = sch.split(spatial, factors=[None, 128])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    if chain:
        sch.reverse_compute_at(chain[-1], tx)
    sch.set_scope(total, 0, "local")
    sch.decompose_reduction(total, loops[4])
    return partial


def _channels_last_in_k(sch: s_tir.Schedule, block) -> None:
    """Permute the block's reduction iterators (rc, ry, rx) to (ry, rx, rc)."""
    iter_vars = sch.get(block).iter_vars
    reduce = [i for i, iv in enumerate(iter_vars) if iv.iter_type == tirx.IterVar.CommReduce]
    order = list(range(len(iter_vars)))
    order[reduce[0] : reduce[-1] + 1] = [*reduce[1:], reduce[0]]
    src = [tirx.Var(iv.var.name, iv.var.ty) for iv in iter_vars]
    sch.transform_block_layout(block, tirx.IndexMap(src, [src[i] for i in order], None))


def schedule_implicit_gemm(  # noqa: PLR0915 - one linear recipe, split for no gain
    sch: s_tir.Schedule,
    main_block,
    out_dtype: str,
    tile: ConvTile,
    vector: int = VECTOR,
) -> s_tir.Schedule | None:
    """Tensor-core schedule of a GEMM-like block (returns None if tensorization fails).

    ``vector``: elements per thread of the K-contiguous global -> shared copies (8 = 16-byte
    loads where K is contiguous in memory: NHWC data, OHWI weights)."""
    from tvm.s_tir.dlight.gpu.matmul import (
        auto_inline_consumer_chain,
        auto_inline_consumers,
        auto_inline_producers,
        get_index_map,
    )
    from tvm.s_tir.tensor_intrin.cuda import get_wmma_intrin_group

    # Step 0. Tile: I tile x J tile per block, warps over both; K in steps of k_frags fragments.
    j_warps, j_frags = tile.j_warps, tile.j_frags
    i_factors = [None, 1, tile.i_warps, tile.i_frags]
    j_factors = [1, None, j_warps, j_frags]
    k_factors = [None, tile.k_frags]
    num_ty = i_factors[2] * j_factors[2]

    # Step 1. Normalize to C[S, I, J] += A[S, I, K] * B[S, J, K] (implicit im2col).
    if tile.k_by_tap:
        _channels_last_in_k(sch, main_block)
    reindex_a = sch.reindex(main_block, ("read", 0))
    reindex_b = sch.reindex(main_block, ("read", 1))
    reindex_c = sch.reindex(main_block, ("write", 0))
    index_maps = get_index_map(sch.get(main_block))
    if index_maps is None:
        return None
    matmul_map, a_map, b_map, c_map = index_maps
    sch.transform_layout(reindex_a, ("write", 0), a_map)
    sch.transform_layout(reindex_b, ("write", 0), b_map)
    sch.transform_layout(reindex_c, ("read", 0), c_map)
    sch.transform_block_layout(main_block, matmul_map)

    # Step 2. Pad the GEMM to whole tiles.
    sch.pad_einsum(
        main_block,
        [1, MICRO * i_factors[2] * i_factors[3], MICRO * j_warps * j_frags, MICRO * k_factors[1]],
    )

    # Step 3. Blockize the 16x16x16 product and tile around it.
    batch, i, j, k = sch.get_loops(main_block)
    i, i_inner = sch.split(i, factors=[None, MICRO])
    j, j_inner = sch.split(j, factors=[None, MICRO])
    k, k_inner = sch.split(k, factors=[None, MICRO])
    sch.reorder(i, j, k, i_inner, j_inner, k_inner)
    block_inner = main_block
    block_outer = sch.blockize(i_inner)
    i0, i1, i2, i3 = sch.split(i, factors=i_factors)
    j0, j1, j2, j3 = sch.split(j, factors=j_factors)
    k0, k1 = sch.split(k, k_factors)
    sch.annotate(k0, "software_pipeline_order", [0, 3, 1, 4, 5, 2, 6])
    sch.annotate(k0, "software_pipeline_stage", [0, 0, 0, 0, 0, 1, 1])
    sch.annotate(k1, "software_pipeline_order", [0, 1, 2])
    sch.annotate(k1, "software_pipeline_stage", [0, 0, 1])
    sch.reorder(i0, j0, i1, j1, j2, i2, k0, k1, i3, j3)
    sch.bind(batch, "blockIdx.z")
    sch.bind(sch.fuse(i0, j0), "blockIdx.x")
    sch.bind(sch.fuse(i1, j1), "blockIdx.y")
    thread_idy = sch.fuse(j2, i2)
    sch.bind(thread_idy, "threadIdx.y")

    # Step 4. Global -> shared (padding and im2col inlined into the copy).
    def fetch_to_shared(block, idx, by_row=False):
        block_read = sch.cache_read(block, idx, "shared.dyn")
        sch.compute_at(block_read, k0)
        rows, cols = sch.get_loops(block_read)[-2:]
        if by_row:  # threadIdx.x along the rows (I), one element each
            sch.reorder(cols, rows)
            fused = sch.fuse(cols, rows)
            _, f_1, f_2 = sch.split(fused, factors=[None, num_ty, WARP_SIZE])
        else:
            fused = sch.fuse(rows, cols)
            _, f_1, f_2, f_3 = sch.split(fused, factors=[None, num_ty, WARP_SIZE, vector])
            sch.vectorize(f_3)
        sch.bind(f_2, "threadIdx.x")
        sch.bind(f_1, "threadIdx.y")
        sch.storage_align(block_read, 0, axis=-2, factor=16, offset=8)
        sch.annotate(block_read, "tirx.manifest_shared_memory_local_stage", 1)
        sch.annotate(block_read, "double_buffer_scope", 0)
        return block_read

    a_g2s = fetch_to_shared(block_outer, 0, by_row=tile.a_by_pixel)
    b_g2s = fetch_to_shared(block_outer, 1)
    auto_inline_producers(sch, a_g2s)
    auto_inline_producers(sch, b_g2s)

    # Step 5. Shared -> wmma fragments; accumulators -> shared -> global.
    a_frag = sch.cache_read(block_outer, 0, "wmma.matrix_a")
    b_frag = sch.cache_read(block_outer, 1, "wmma.matrix_b")
    sch.compute_at(a_frag, k1)
    sch.compute_at(b_frag, k1)
    # TVM's merging of dynamic shared memory mis-types the fp32 accumulator stage when it is
    # smaller than the fp16 operand stages (J tile < 128: "tvm_access_ptr element type must
    # match"); such tiles (<= 32 KB) go to static shared memory instead.
    acc_scope = "shared.dyn" if tile.acc_dynamic else "shared"
    acc_shared = sch.cache_write(block_outer, 0, acc_scope)
    sch.storage_align(acc_shared, 0, -2, 16, 4)
    store = sch.cache_write(block_outer, 0, "wmma.accumulator")
    sch.reverse_compute_at(store, thread_idy)
    sch.reverse_compute_at(acc_shared, thread_idy)
    si, sj = sch.get_loops(store)[-2:]
    si0, si1 = sch.split(si, factors=[None, MICRO])
    sj0, sj1 = sch.split(sj, factors=[None, MICRO])
    sch.reorder(si0, sj0, si1, sj1)
    init = sch.decompose_reduction(block_outer, k0)
    init_inner = sch.get_child_blocks(init)[0]

    # Step 6. Tensorize: fragment loads, init, mma, store (accumulator type = out_dtype).
    intrins = get_wmma_intrin_group(
        load_scope="shared.dyn",
        store_scope=acc_scope,
        in_dtype="float16",
        out_dtype=out_dtype,
        trans_b=True,
    )
    for frag, name in ((a_frag, "load_a"), (b_frag, "load_b")):
        fi, fj = sch.get_loops(frag)[-2:]
        fi0, fi1 = sch.split(fi, factors=[None, MICRO])
        fj0, fj1 = sch.split(fj, factors=[None, MICRO])
        sch.reorder(fi0, fj0, fi1, fj1)
        sch.unroll(fi0)
        sch.unroll(fj0)
        sch.tensorize(fi1, intrins[name])
    sch.tensorize(sch.get_loops(init_inner)[-2], intrins["init"])
    sch.tensorize(sch.get_loops(store)[-2], intrins["store"])
    sch.tensorize(sch.get_loops(block_inner)[-3], intrins["compute"])

    # Step 7. Epilogue fused into the shared -> global write-back (with split-K, the partial
    # sums are written as they are: the epilogue runs after the sum over chunks).
    if tile.split_k > 1:
        auto_inline_consumers(sch, acc_shared)
    else:
        auto_inline_consumer_chain(sch, acc_shared)
    fused = sch.fuse(*sch.get_loops(acc_shared)[-2:])
    _, f1, f2 = sch.split(fused, factors=[None, WARP_SIZE, VECTOR])
    sch.bind(f1, "threadIdx.x")
    sch.vectorize(f2)
    logger.debug("conv2d: tensor-core implicit GEMM, tile %s", tile.name())
    return sch
