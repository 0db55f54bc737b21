"""Rule base classes and the clean-up step every CPU rule ends with."""

from __future__ import annotations

import math

from tvm import s_tir, tirx
from tvm.s_tir.dlight import ScheduleRule
from tvm.target import Target

from ._util import (
    SCHEDULE_ERRORS,
    const_int,
    is_cpu_target,
    is_gpu_target,
    iter_kinds,
    largest_divisor,
    leaf_blocks,
    vector_bits,
)

# Parallel tasks the outer loops must give before an elementwise block's innermost loop stays
# serial (see :func:`schedule_spatial_cpu`).
MIN_TASKS = 64


class CPUScheduleRule(ScheduleRule):
    """A rule for llvm targets.

    ``generic``: a catch-all rule (True) rather than a kernel specialised for its op; tuning
    (``mulayer tune``) picks the PrimFuncs such rules schedule. Rules without the attribute
    (dlight's) count as generic.
    """

    generic = False

    def is_target_available(self, target: Target) -> bool:
        return is_cpu_target(target)


class GPUScheduleRule(ScheduleRule):
    """A rule for GPU targets (the result must bind threads); ``generic`` as for CPU rules."""

    generic = False

    def is_target_available(self, target: Target) -> bool:
        return is_gpu_target(target)


def _has_parallel_loop(sch: s_tir.Schedule, block) -> bool:
    for loop in sch.get_loops(block):
        if sch.get(loop).kind in (tirx.ForKind.PARALLEL, tirx.ForKind.VECTORIZED):
            return True
    return False


def schedule_spatial_cpu(
    sch: s_tir.Schedule, block, target: Target, max_parallel: int = 4096
) -> None:
    """Parallelise the outer loops of an untransformed block; vectorise its innermost loop.

    Works for injective blocks (fuse all but the vector loop into one parallel loop) and for
    reductions (fuse the leading spatial loops only; the reduction stays serial). The block's
    loops must still be its iter vars in order (as legalization leaves them).
    """
    loops = sch.get_loops(block)
    block_stmt = sch.get(block)
    kinds = iter_kinds(block_stmt)
    if not loops or len(loops) != len(kinds):
        return
    extents = [const_int(sch.get(lp).extent) for lp in loops]
    if any(e is None for e in extents):
        if kinds[0] == "S":  # symbolic shapes: parallelise the outermost loop only
            sch.parallel(loops[0])
        return
    n_lead = len(kinds) - len(kinds.lstrip("S"))
    if n_lead == 0:
        return
    lanes = vector_bits(target) // 32
    vec_loop = None
    if n_lead == len(loops) and extents[-1] > 1:
        factor = largest_divisor(extents[-1], 4 * lanes)
        if factor >= max(2, lanes // 2):
            if factor == extents[-1]:
                vec_loop = loops[-1]
            else:
                _, vec_loop = sch.split(loops[-1], [None, factor])
            loops = sch.get_loops(block)[:-1]
            n_lead = len(loops)
    if vec_loop is None and n_lead == len(loops) > 1 and math.prod(extents[:-1]) >= MIN_TASKS:
        # No vector split (no divisor of the width fits, e.g. a stem's 226-wide quantize +
        # pad): keep the innermost loop serial, out of the parallel one, so that its index
        # arithmetic stays incremental and LLVM can vectorise it (that stem: 0.51 -> 0.04 ms).
        n_lead -= 1
    if n_lead > 0:
        n_fuse, work = 1, extents[0]
        while n_fuse < n_lead and work < max_parallel:
            work *= extents[n_fuse]
            n_fuse += 1
        outer = sch.fuse(*loops[:n_fuse]) if n_fuse > 1 else loops[0]
        if work > 1:
            sch.parallel(outer)
    if vec_loop is not None:
        sch.vectorize(vec_loop)


def finish_cpu_schedule(sch: s_tir.Schedule, target: Target, skip: set[str]) -> None:
    """Parallelise (and vectorise) every block a rule did not schedule itself."""
    for block in leaf_blocks(sch):
        name = sch.get(block).name_hint
        if name in skip or _has_parallel_loop(sch, block):
            continue
        try:
            schedule_spatial_cpu(sch, block, target)
        except SCHEDULE_ERRORS:
            continue
