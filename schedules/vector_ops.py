"""TIR intrinsics the loop vectorizer may widen, which TVM 0.27 leaves scalar.

TVM's ``VectorizeLoop`` widens a call only where its op has the ``TVectorizable`` attribute;
``tirx.nearbyint`` (the rounding step of every int8 requantize epilogue) lacks it, so a
``T.vectorized`` epilogue loop became a scalar loop, which LLVM then unrolled and vectorized
over the wrong axis with gathers and byte-wise stores (docs/results.md, "CPU int8, session 6").
LLVM lowers the vector ``llvm.nearbyint`` to ``vrndscaleps`` (x86) / ``frintx`` (Arm), with the
same round-half-to-even result per lane as the scalar call, so integer outputs do not change.
"""

from __future__ import annotations

import tvm

VECTORIZABLE_OPS = ("tirx.nearbyint",)


def register_vectorizable_ops() -> None:
    """Mark :data:`VECTORIZABLE_OPS` vectorizable (idempotent; per process, before building)."""
    for name in VECTORIZABLE_OPS:
        op = tvm.ir.Op.get(name)
        if op.get_attr("TVectorizable") is None:
            tvm.ir.register_op_attr(name, "TVectorizable", True)
