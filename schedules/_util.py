"""Helpers shared by the schedule rules: target queries, block lookup, epilogue fusion.

Nothing here schedules a whole function; the rules in the sibling modules do.
"""

from __future__ import annotations

import logging

import tvm
from tvm import ir, s_tir, tirx
from tvm.s_tir.schedule import SBlockRV
from tvm.target import Target

logger = logging.getLogger("mulayer.schedules")

# Attribute that a layout-transform stage on a constant weight carries, so that Relax's
# SplitLayoutRewritePreproc can move it into its own function (then FoldConstant precomputes it).
LAYOUT_REWRITE_PREPROC = "meta_schedule.layout_rewrite_preproc"

# Accumulator types the generic vector rules handle (int32: the int8 fallback without VNNI).
VECTOR_DTYPES = ("float32", "float16", "float64", "int32")

# What a failing schedule primitive raises (ScheduleError derives from RuntimeError; tvm-ffi maps
# other C++ checks to ValueError/TypeError/IndexError).
SCHEDULE_ERRORS = (RuntimeError, ValueError, TypeError, IndexError)


# ---------------------------------------------------------------------------------------------
# Target queries
# ---------------------------------------------------------------------------------------------
def target_kind(target: Target) -> str:
    """The kind name of ``target`` (``"llvm"``, ``"cuda"``, ...)."""
    return str(target.kind.name)


def is_cpu_target(target: Target) -> bool:
    """True for llvm (CPU) targets."""
    return target_kind(target) in ("llvm", "c")


def is_gpu_target(target: Target) -> bool:
    """True for the GPU kinds the dlight rules schedule (thread bindings required)."""
    return "gpu" in target.keys or target_kind(target) in (
        "cuda",
        "opencl",
        "rocm",
        "vulkan",
        "metal",
        "webgpu",
    )


def has_cpu_feature(target: Target, feature: str) -> bool:
    """Whether the LLVM target (mcpu/mattr/mtriple) has ``feature`` (e.g. ``"avx512vnni"``)."""
    if target_kind(target) != "llvm":
        return False
    try:
        return bool(tvm.target.codegen.target_has_features(feature, target))
    except SCHEDULE_ERRORS:  # unknown feature name for this architecture
        return False


def is_aarch64(target: Target) -> bool:
    """True when the LLVM target triple is 64-bit Arm."""
    triple = str(target.attrs.get("mtriple", "") or "")
    return triple.startswith(("aarch64", "arm64"))


def vector_bits(target: Target) -> int:
    """Width in bits of the widest SIMD register usable for fp32/int32 arithmetic."""
    if is_aarch64(target):
        return 128
    if has_cpu_feature(target, "avx512f"):
        return 512
    if has_cpu_feature(target, "avx2") or has_cpu_feature(target, "avx"):
        return 256
    return 128


def num_vector_registers(target: Target) -> int:
    """Architectural SIMD registers (32 for AVX-512 and AArch64, 16 otherwise)."""
    if is_aarch64(target) or vector_bits(target) == 512:
        return 32
    return 16


# ---------------------------------------------------------------------------------------------
# Integer helpers
# ---------------------------------------------------------------------------------------------
def largest_divisor(n: int, limit: int, multiple_of: int = 1) -> int:
    """Largest divisor of ``n`` that is ``<= limit`` and a multiple of ``multiple_of``.

    Returns 0 if there is none (only possible when ``multiple_of > 1``).
    """
    for d in range(min(n, limit), 0, -1):
        if n % d == 0 and d % multiple_of == 0:
            return d
    return 0


def const_int(expr) -> int | None:
    """The value of a constant integer expression, else None."""
    if isinstance(expr, int):
        return expr
    if isinstance(expr, tirx.IntImm):
        return int(expr.value)
    return None


# ---------------------------------------------------------------------------------------------
# Block queries
# ---------------------------------------------------------------------------------------------
def iter_kinds(block: s_tir.SBlock) -> str:
    """``"S"``/``"R"``/``"O"`` per block iter var, e.g. ``"SSSSRRR"`` for conv2d."""
    kinds = []
    for iv in block.iter_vars:
        if iv.iter_type == tirx.IterVar.DataPar:
            kinds.append("S")
        elif iv.iter_type == tirx.IterVar.CommReduce:
            kinds.append("R")
        else:
            kinds.append("O")
    return "".join(kinds)


def iter_extents(block: s_tir.SBlock) -> list[int | None]:
    """Constant extents of the block iter vars (None where symbolic)."""
    return [const_int(iv.dom.extent) for iv in block.iter_vars]


def leaf_blocks(sch: s_tir.Schedule) -> list[SBlockRV]:
    """All blocks directly under the root block, in program order."""
    root = sch.get_sblock("root") if _has_root(sch) else None
    if root is None:
        return []
    return list(sch.get_child_blocks(root))


def _has_root(sch: s_tir.Schedule) -> bool:
    try:
        sch.get_sblock("root")
    except SCHEDULE_ERRORS:
        return False
    return True


def is_simple_multiply_add(block: s_tir.SBlock) -> tuple[ir.TensorLoad, ir.TensorLoad] | None:
    """Match ``C[...] = C[...] + cast?(A[...]) * cast?(B[...])`` and return (A-load, B-load)."""
    body = block.body
    if not isinstance(body, tirx.BufferStore):
        return None
    value = body.value
    if not isinstance(value, tirx.Add):
        return None
    lhs, rhs = value.a, value.b
    if not (isinstance(lhs, ir.TensorLoad) and lhs.source.same_as(body.buffer)):
        return None
    if not isinstance(rhs, tirx.Mul):
        return None

    def strip(e):
        while isinstance(e, tirx.Cast):
            e = e.value
        return e

    a, b = strip(rhs.a), strip(rhs.b)
    if not (isinstance(a, ir.TensorLoad) and isinstance(b, ir.TensorLoad)):
        return None
    return a, b


# ---------------------------------------------------------------------------------------------
# Epilogue / prologue handling
# ---------------------------------------------------------------------------------------------
def inline_epilogue_into(sch: s_tir.Schedule, writer: SBlockRV) -> SBlockRV:
    """Reverse-inline the elementwise consumer chain of ``writer`` into it.

    ``writer`` must be a spatial block (e.g. the write-back stage of ``cache_write``). Consumers
    are inlined one at a time while that succeeds; what cannot be inlined stays a separate stage
    (the caller's fallback parallelises it). Returns ``writer``.
    """
    changed = True
    while changed:
        changed = False
        for consumer in sch.get_consumers(writer):
            try:
                sch.reverse_compute_inline(consumer)
            except SCHEDULE_ERRORS:
                # A side input computed in the function (the dequantized skip of a residual
                # add) blocks the inlining: inline it into the consumer, then try again.
                if not _inline_side_inputs(sch, consumer, writer):
                    continue
                try:
                    sch.reverse_compute_inline(consumer)
                except SCHEDULE_ERRORS:
                    continue
            changed = True
            break
    return writer


def _inline_side_inputs(sch: s_tir.Schedule, consumer: SBlockRV, writer: SBlockRV) -> bool:
    """Compute-inline the producers of ``consumer`` other than ``writer``; True if any was."""
    inlined = False
    progress = True
    while progress:
        progress = False
        for producer in sch.get_producers(consumer):
            if sch.get(producer).same_as(sch.get(writer)):
                continue
            try:
                sch.compute_inline(producer)
            except SCHEDULE_ERRORS:
                continue
            progress = inlined = True
            break
    return inlined


def new_schedule(func: tirx.PrimFunc) -> s_tir.Schedule:
    """A fresh schedule over ``func`` (error messages unrendered: failures are expected)."""
    level = "detail" if logger.isEnabledFor(logging.DEBUG) else "none"
    return s_tir.Schedule(func, error_render_level=level)


def copy_plane(sch: s_tir.Schedule, pad: SBlockRV, stride: int) -> None:
    """Schedule a task's padded copy of one channel plane (``pad``, computed at the task loop;
    columns split by phase for ``stride > 1``, ``N, C, H, W % s, W // s``).

    The zero border is written by its own block (``decompose_padding``), so the copy of the
    interior has no bounds check per element. Stride 1: the interior copy is a vector loop.
    Strides > 1: its columns walk ``W // s`` outer of the phases (unrolled), contiguous stores
    per phase that LLVM vectorises with de-interleaving loads (a vector loop over the phase
    split would gather). Falls back to a plain vector loop where the padding cannot be split.
    """
    loops = sch.get_loops(pad)
    first = len(loops) - 4  # the block's own n, c, h, w loops
    try:
        fill = sch.decompose_padding(pad, loops[first])
    except SCHEDULE_ERRORS:
        fill = None
    if fill is not None:
        fill_inner = sch.get_loops(fill)[-1]
        if stride > 1:  # in destination order
            fo, fp = sch.split(fill_inner, [None, stride])
            sch.reorder(fp, fo)
            fill_inner = fo
        sch.vectorize(fill_inner)
    inner = sch.get_loops(pad)[-1]
    if stride > 1:
        wo, wp = sch.split(inner, [None, stride])
        if fill is None:  # walk the copy in its destination order
            sch.reorder(wp, wo)
            sch.vectorize(wo)
        else:
            sch.unroll(wp)
    else:
        sch.vectorize(inner)
