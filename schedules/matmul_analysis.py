"""Recognise a legalized matmul / dense / batched matmul inside a (possibly fused) PrimFunc.

``LegalizeOps`` makes of ``R.matmul`` a single reduction block
``C[..., i, j] += A[..., i, k] * B[..., k, j]`` (B may also be indexed ``[j, k]`` when a transpose
was fused in). :func:`find_matmul` finds it and says where ``j`` and ``k`` sit in B's indices;
the CPU rules (:mod:`.cpu_dense`, :mod:`.cpu_int8`) and :mod:`.cpu_tiling` work from its
:class:`MatmulInfo`, as the conv rules do from :mod:`.conv2d_analysis`.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.s_tir.schedule import SBlockRV

from ._util import const_int, is_simple_multiply_add, iter_extents, iter_kinds, leaf_blocks


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
