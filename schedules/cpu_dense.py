"""CPU (llvm) schedule for matmul / dense / batched matmul in floating point.

Matches the single reduction block ``C[..., i, j] += A[..., i, k] * B[..., k, j]`` that
``LegalizeOps`` makes of ``R.matmul`` (B may also be indexed ``[j, k]`` when a transpose was
fused in). The B operand is repacked to ``[..., N/vo, K, vo]`` (a layout-rewrite stage that
``SplitLayoutRewritePreproc`` + ``FoldConstant`` precompute for constant weights), and each
thread accumulates an ``mi x vo`` tile of C in registers: ``vo`` columns as vectors, one
broadcast of A per row and step of k.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.schedule import SBlockRV
from tvm.target import Target

from ._util import (
    LAYOUT_REWRITE_PREPROC,
    VECTOR_DTYPES,
    is_cpu_target,
    largest_divisor,
    logger,
    new_schedule,
    num_vector_registers,
    vector_bits,
)
from .base import CPUScheduleRule, finish_cpu_schedule
from .cpu_tiling import tile_matmul
from .matmul_analysis import MatmulInfo, find_matmul


def pack_b(sch: s_tir.Schedule, info: MatmulInfo, vo: int, inner_k: int = 1) -> SBlockRV:
    """Repack B to ``[other dims..., N/vo, K/inner_k, vo, inner_k]`` through a cached copy.

    ``inner_k > 1`` gives the int8 dot-product layout (VNNI: vo=16, inner_k=4). The copy is
    annotated as a layout-rewrite preprocessing stage.
    """
    block = info.block
    packed = sch.cache_read(block, info.b_read, "global")
    jd, kd = info.b_j_dim, info.b_k_dim

    def index_map(*idx):
        others = [v for d, v in enumerate(idx) if d not in (jd, kd)]
        j, k = idx[jd], idx[kd]
        if inner_k > 1:
            return (*others, j // vo, k // inner_k, j % vo, k % inner_k)
        return (*others, j // vo, k, j % vo)

    sch.transform_layout(block, ("read", info.b_read), index_map)
    sch.annotate(packed, LAYOUT_REWRITE_PREPROC, 1)
    return packed


class MatmulCPU(CPUScheduleRule):
    """Floating-point matmul/dense with a packed B operand (see module doc)."""

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        if not is_cpu_target(target):
            return None
        sch = new_schedule(func)
        info = find_matmul(sch)
        if info is None or info.out_dtype not in VECTOR_DTYPES:
            return None
        bits = int("".join(ch for ch in info.out_dtype if ch.isdigit()) or 32)
        lanes = max(1, vector_bits(target) // bits)
        budget = num_vector_registers(target) - 8
        # Step 1. Column tile: up to 3 vectors (measured best with 4-8 rows), whole vectors first.
        vo = (
            largest_divisor(info.n, 3 * lanes, lanes)
            or largest_divisor(info.n, 3 * lanes, max(1, lanes // 2))
            or largest_divisor(info.n, 3 * lanes)
        )
        vectors = -(-vo // lanes)
        m = info.extents[-3] if len(info.extents) >= 3 else 1
        mi = largest_divisor(m, max(1, budget // vectors)) if info.a_uses_i else 1
        schedule_matmul(sch, info, target, vo=vo, mi=mi)
        return sch


def schedule_matmul(
    sch: s_tir.Schedule, info: MatmulInfo, target: Target, vo: int, mi: int
) -> None:
    """Apply the packed-B register-tile matmul schedule."""
    # Step 1. Pack B; tile: parallel (batch, jo, io) | k | ii (unrolled), ji (vector).
    pack = pack_b(sch, info, vo)
    acc_out, ii, (ji,), k = tile_matmul(sch, info, mi, [vo])
    if ii is not None:
        sch.unroll(ii)
    sch.vectorize(ji)
    init = sch.decompose_reduction(info.block, k)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(acc_out)[-1])

    # Step 2. The pack walks B in destination order; the rest is parallel + vectorised.
    pack_loops = sch.get_loops(pack)
    if len(pack_loops) >= 2:
        sch.parallel(pack_loops[0])
    finish_cpu_schedule(
        sch, target, skip={info.name, info.name + "_init", sch.get(acc_out).name_hint}
    )
    logger.debug("matmul %s: vo=%d mi=%d", info.name, vo, mi)
