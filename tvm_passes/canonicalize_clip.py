"""CanonicalizeClip: turn the ONNX importer's clip kernels back into Relax ops.

TVM's ONNX frontend lowers ``Clip`` (opset >= 11) to ``call_tir`` of TOPI ``maximum`` and
``minimum`` PrimFuncs, which hides a channel-wise epilogue (ReLU6) from the passes that follow.
This pass rewrites ``call_tir(maximum*, (x, c))`` with a scalar constant ``c`` to
``R.maximum(x, c)`` (likewise ``minimum``). It runs in the frontend's canonicalisation, after
FoldConstant (so the bounds are constants) and before DeadCodeElimination (which drops the then
unused PrimFuncs). Anything else is left unchanged.
"""

from __future__ import annotations

import logging

import tvm
from tvm import relax
from tvm.ir.expr import Constant

log = logging.getLogger(__name__)

_OPS = {"maximum": relax.op.maximum, "minimum": relax.op.minimum}


@relax.expr_functor.mutator
class _ClipRewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self._call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        if call.op != self._call_tir or not isinstance(call.args[1], relax.Tuple):
            return call
        name = call.args[0].name_hint
        kind = next((k for k in _OPS if name == k or name.startswith(k)), None)
        fields = call.args[1].fields
        if kind is None or len(fields) != 2:
            return call
        x, bound = fields
        if not isinstance(bound, Constant) or len(bound.value.shape) != 0:
            log.debug("CanonicalizeClip: %s with a non-scalar-constant bound kept", name)
            return call
        if str(bound.value.dtype) != str(x.ty.dtype):
            return call
        return _OPS[kind](x, bound)


@tvm.transform.module_pass(opt_level=0, name="CanonicalizeClip")
class CanonicalizeClip:
    """Rewrite call_tir of TOPI maximum/minimum with scalar constant bounds to Relax ops."""

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _ClipRewriter(mod)
        for gvar, func in mod.functions.items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
        return rewriter.builder_.finalize()
