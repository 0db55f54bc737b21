"""canonical_form: the canonical Relax every mulayer pass expects, from any ONNX import.

Runs first, on the importer's output (mulayer's own frontend, or TVM's
``relax.frontend.onnx.from_onnx``): batch norm folded into the preceding conv (otherwise
decomposed into a per-channel multiply and add), constants folded (a dense layer reads
``matmul(x, W)`` with a constant ``W``), Clip canonicalised (:class:`CanonicalizeClip`), bindings
canonical and dead code removed. Idempotent: a no-op on its own output.
"""

from __future__ import annotations

import tvm
from tvm import relax

from .canonicalize_clip import CanonicalizeClip


def canonical_form() -> tvm.transform.Sequential:
    """The passes that bring an imported model into mulayer's canonical form."""
    return tvm.transform.Sequential(
        [
            relax.transform.FoldBatchnormToConv2D(),
            relax.transform.DecomposeOpsForInference(),
            relax.transform.FoldConstant(),
            CanonicalizeClip(),
            relax.transform.CanonicalizeBindings(),
            relax.transform.DeadCodeElimination(),
        ],
        name="mulayer.CanonicalForm",
    )
