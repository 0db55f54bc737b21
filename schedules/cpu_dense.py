"""CPU (llvm) schedule for matmul / dense / batched matmul in floating point.

Matches the single reduction block ``C[..., i, j] += A[..., i, k] * B[..., k, j]`` that
``LegalizeOps`` makes of ``R.matmul`` (B may also be indexed ``[j, k]`` when a transpose was
fused in). The B operand is repacked to ``[..., N/vo, K, vo]`` (a layout-rewrite stage that
``SplitLayoutRewritePreproc`` + ``FoldConstant`` precompute for constant weights), and each
thread accumulates an ``mi x vo`` tile of C in registers: ``vo`` columns as vectors, one
broadcast of A per row and step of k.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.s_tir.schedule import SBlockRV
from tvm.target import Target

from ._util import (
    LAYOUT_REWRITE_PREPROC,
    VECTOR_DTYPES,
    const_int,
    is_cpu_target,
    is_simple_multiply_add,
    iter_extents,
    iter_kinds,
    largest_divisor,
    leaf_blocks,
    logger,
    new_schedule,
    num_vector_registers,
    vector_bits,
)
from .base import CPUScheduleRule, finish_cpu_schedule
from .cpu_tiling import tile_matmul


@dataclass
class MatmulInfo:
    """One matmul-like block: iter extents, operands and where j/k sit in B's indices."""

    block: SBlockRV
    name: str
    extents: list[int]  # spatial..., reduction (k last)
    a_read: int
    b_read: int
    b_j_dim: int
    b_k_dim: int
    a_uses_i: bool
    in_dtype: str
    b_dtype: str
    out_dtype: str

    @property
    def n(self) -> int:
        """Extent of j (columns of C)."""
        return self.extents[-2]

    @property
    def k(self) -> int:
        """Extent of the reduction."""
        return self.extents[-1]


def _var_positions(indices, ivars) -> list[int] | None:
    """For each index of a load: which iter var it is (None if the load is not a permutation)."""
    out = []
    for idx in indices:
        if not isinstance(idx, tirx.Var):
            if const_int(idx) == 0:
                out.append(-1)  # broadcast dimension of extent 1
                continue
            return None
        pos = next((i for i, v in enumerate(ivars) if v.same_as(idx)), None)
        if pos is None:
            return None
        out.append(pos)
    return out


def find_matmul(sch: s_tir.Schedule) -> MatmulInfo | None:
    """Return the single matmul-like block of the function, or None."""
    found = []
    for block_rv in leaf_blocks(sch):
        block = sch.get(block_rv)
        kinds = iter_kinds(block)
        if "R" not in kinds:
            continue
        if not (kinds.endswith("SR") and kinds.count("R") == 1 and kinds.count("S") >= 1):
            return None
        extents = iter_extents(block)
        if any(e is None for e in extents):
            return None
        loads = is_simple_multiply_add(block)
        if loads is None:
            return None
        ivars = [iv.var for iv in block.iter_vars]
        j_pos, k_pos = len(ivars) - 2, len(ivars) - 1
        pos = [_var_positions(ld.indices, ivars) for ld in loads]
        if pos[0] is None or pos[1] is None:
            return None
        # B is the operand indexed by j and k; A is indexed by k but not j.
        if j_pos in pos[0] and j_pos not in pos[1]:
            loads = (loads[1], loads[0])
            pos = [pos[1], pos[0]]
        a_pos, b_pos = pos
        if j_pos in a_pos or j_pos not in b_pos or k_pos not in b_pos or k_pos not in a_pos:
            return None
        # The output must be written at exactly the spatial iter vars.
        out_idx = _var_positions(block.body.indices, ivars)
        if out_idx != list(range(len(ivars) - 1)):
            return None
        reads = [r.source for r in block.reads]
        try:
            a_read = next(i for i, b in enumerate(reads) if b.same_as(loads[0].source))
            b_read = next(i for i, b in enumerate(reads) if b.same_as(loads[1].source))
        except StopIteration:
            return None
        found.append(
            MatmulInfo(
                block=block_rv,
                name=block.name_hint,
                extents=extents,
                a_read=a_read,
                b_read=b_read,
                b_j_dim=b_pos.index(j_pos),
                b_k_dim=b_pos.index(k_pos),
                a_uses_i=len(ivars) >= 3 and (len(ivars) - 3) in a_pos,
                in_dtype=str(loads[0].source.dtype),
                b_dtype=str(loads[1].source.dtype),
                out_dtype=str(block.writes[0].source.dtype),
            )
        )
    if len(found) != 1:
        return None
    return found[0]


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
