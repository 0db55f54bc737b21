"""CPU fallback: parallelise and vectorise any function no specific rule claimed.

Injective stages are inlined into their consumers where possible (one pass over memory instead
of several), then each remaining stage gets one parallel outer loop and, where the innermost
spatial loop is long enough, a vector loop. For reductions over a window (pooling), the
reduction loops move outside the innermost spatial loop so that loop can be vectorised.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.target import Target

from ._util import (
    SCHEDULE_ERRORS,
    const_int,
    is_cpu_target,
    iter_kinds,
    largest_divisor,
    leaf_blocks,
    vector_bits,
)
from .base import CPUScheduleRule, schedule_spatial_cpu


def _inline_injective(sch: s_tir.Schedule) -> None:
    """Compute-inline spatial blocks that feed other blocks (never the function outputs)."""
    changed = True
    while changed:
        changed = False
        blocks = leaf_blocks(sch)
        for block in blocks[:-1]:
            if "R" in iter_kinds(sch.get(block)) or not sch.get_consumers(block):
                continue
            try:
                sch.compute_inline(block)
            except SCHEDULE_ERRORS:
                continue
            changed = True
            break


def _schedule_window_reduction(sch: s_tir.Schedule, block, target: Target) -> bool:
    """Pooling-like ``S..S R..R`` block: vectorise the innermost spatial loop.

    Returns False (and changes nothing) when the shape does not fit.
    """
    kinds = iter_kinds(sch.get(block))
    loops = sch.get_loops(block)
    n_s = len(kinds) - len(kinds.lstrip("S"))
    if n_s < 2 or kinds[n_s:].strip("R") or len(loops) != len(kinds):
        return False
    extents = [const_int(sch.get(lp).extent) for lp in loops]
    if any(e is None for e in extents):
        return False
    lanes = vector_bits(target) // 32
    inner = extents[n_s - 1]
    factor = largest_divisor(inner, 4 * lanes)
    if factor < max(2, lanes // 2):
        return False
    spatial, reduce = loops[:n_s], loops[n_s:]
    xo, xi = sch.split(spatial[-1], [None, factor])
    sch.reorder(*spatial[:-1], xo, *reduce, xi)
    outer = sch.fuse(*spatial[:-1], xo)
    # Parallel before decomposing: ``parallel`` rejects a reduction block without its init.
    sch.parallel(outer)
    sch.vectorize(xi)
    init = sch.decompose_reduction(block, reduce[0])
    sch.vectorize(sch.get_loops(init)[-1])
    return True


class CPUFallback(CPUScheduleRule):
    """Parallel + vectorised loops for any static-shape function (see module doc)."""

    generic = True

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        if not is_cpu_target(target):
            return None
        sch = s_tir.Schedule(func)
        _inline_injective(sch)
        for block in leaf_blocks(sch):
            if "R" in iter_kinds(sch.get(block)):
                try:
                    if _schedule_window_reduction(sch, block, target):
                        continue
                except SCHEDULE_ERRORS:
                    pass
            try:
                schedule_spatial_cpu(sch, block, target)
            except SCHEDULE_ERRORS:
                continue
        return sch
