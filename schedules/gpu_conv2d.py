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

Grouped convs are left to dlight's SIMT rules (their GEMM is block-diagonal), depthwise ones to
:class:`~.gpu_depthwise.DepthwiseConv2d`.
Numerics need a GPU: see ``tests/test_schedules_gpu.py`` (``-m gpu``).
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.target import Target

from ._intrin import load_tvm_tensor_intrinsics
from ._util import logger
from .base import GPUScheduleRule
from .conv2d_analysis import find_conv2d

# wmma fragment shape and the smallest GEMM extents worth a tensor-core tile.
MICRO = 16
MIN_EXTENT = 16
# Narrower outputs (warp tiles of 1 or 2 fragments along J) failed to launch on an H100
# (CUDA_ERROR_INVALID_VALUE, 2026-11-23): they go to dlight's rules until that is fixed.
MIN_OUT_CHANNELS = 64
WARP_SIZE = 32
VECTOR = 4


def _sm_version(target: Target) -> int:
    arch = str(target.attrs.get("arch", ""))
    digits = arch.replace("sm_", "")
    return int(digits) if digits.isdigit() else -1


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


class Conv2dTensorCore(GPUScheduleRule):
    """fp16 NCHW conv2d (groups=1) on CUDA tensor cores (see module doc)."""

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        if str(target.kind.name) != "cuda" or _sm_version(target) < 70:
            return None
        if "dlight.do_not_tensorize" in func.attrs:
            return None
        sch = s_tir.Schedule(func)
        info = find_conv2d(sch)
        if info is None or info.groups != 1 or info.in_dtype != "float16":
            return None
        if info.w_dtype != "float16" or info.out_dtype not in ("float16", "float32"):
            return None
        gemm_i = info.n * info.oh * info.ow
        gemm_k = info.cg * info.kh * info.kw
        if min(gemm_i, gemm_k) < MIN_EXTENT or info.f < MIN_OUT_CHANNELS:
            return None
        load_tvm_tensor_intrinsics()
        j_warps, j_frags = _warp_tile_j(info.f)
        return schedule_implicit_gemm(sch, info.block, info.out_dtype, j_warps, j_frags)


def schedule_implicit_gemm(  # noqa: PLR0915 - one linear recipe, split for no gain
    sch: s_tir.Schedule,
    main_block,
    out_dtype: str,
    j_warps: int,
    j_frags: int,
) -> s_tir.Schedule | None:
    """Tensor-core schedule of a GEMM-like block (returns None if tensorization fails)."""
    from tvm.s_tir.dlight.gpu.matmul import (
        auto_inline_consumer_chain,
        auto_inline_producers,
        get_index_map,
    )
    from tvm.s_tir.tensor_intrin.cuda import get_wmma_intrin_group

    # Step 0. Tile: 128 rows (4 warps x 2 fragments) x J tile; K in steps of 4 fragments.
    i_factors = [None, 1, 4, 2]
    j_factors = [1, None, j_warps, j_frags]
    k_factors = [None, 4]
    num_ty = i_factors[2] * j_factors[2]

    # Step 1. Normalize to C[S, I, J] += A[S, I, K] * B[S, J, K] (implicit im2col).
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
    def fetch_to_shared(block, idx):
        block_read = sch.cache_read(block, idx, "shared.dyn")
        sch.compute_at(block_read, k0)
        fused = sch.fuse(*sch.get_loops(block_read)[-2:])
        _, f_1, f_2, f_3 = sch.split(fused, factors=[None, num_ty, WARP_SIZE, VECTOR])
        sch.bind(f_2, "threadIdx.x")
        sch.bind(f_1, "threadIdx.y")
        sch.vectorize(f_3)
        sch.storage_align(block_read, 0, axis=-2, factor=16, offset=8)
        sch.annotate(block_read, "tirx.manifest_shared_memory_local_stage", 1)
        sch.annotate(block_read, "double_buffer_scope", 0)
        return block_read

    a_g2s = fetch_to_shared(block_outer, 0)
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
    acc_scope = "shared.dyn" if j_warps * j_frags >= 8 else "shared"
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

    # Step 7. Epilogue fused into the shared -> global write-back.
    auto_inline_consumer_chain(sch, acc_shared)
    fused = sch.fuse(*sch.get_loops(acc_shared)[-2:])
    _, f1, f2 = sch.split(fused, factors=[None, WARP_SIZE, VECTOR])
    sch.bind(f1, "threadIdx.x")
    sch.vectorize(f2)
    logger.debug("conv2d: tensor-core implicit GEMM, J tile %dx%d", j_warps, j_frags)
    return sch
