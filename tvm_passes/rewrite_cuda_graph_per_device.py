"""RewriteCUDAGraphPerDevice: TVM's CUDA-graph capture, around the GPU segments only.

Pipeline position: in :func:`mulayer.passes.pipeline.vm_lowering`, where TVM's
``RewriteCUDAGraph`` sits (after the memory planner and
:class:`~mulayer.passes.separate_device_storage.SeparateDeviceStorage`); like it, it acts only
when the pass-context option ``"relax.backend.use_cuda_graph"`` is on.

TVM's ``RewriteCUDAGraph`` lifts every maximal run of "static" bindings (kernel calls whose
arguments are planned buffers, constants or weights) into a function captured once as a CUDA
graph and replayed by ``vm.builtin.cuda_graph.run_or_capture``. It does not look at devices: a
CPU kernel, a ``to_vdevice`` or the crossing copy of
:class:`~mulayer.passes.stage_crossings.StageCrossings` would be captured with the GPU kernels
(and, on replay, never run again). TVM treats calls of ``vm.builtin.*`` functions as
non-capturable, so this pass

1. hides every CPU-side call (a PrimFunc whose target is a CPU kind, any ``ExternFunc`` that is
   not a ``vm.builtin``, ``to_vdevice``, and host storage allocations, first moved to the front:
   TVM caches only allocations of the first device) behind a placeholder
   ``vm.builtin.mulayer_hidden.<n>`` call with the same arguments, which ends the current GPU
   segment;
2. runs TVM's ``RewriteCUDAGraph`` (its static allocations, the CPU ones included, become
   cached allocations: allocated once per loaded model);
3. puts the hidden calls back.

So each maximal run of GPU kernels between CPU parts is one captured graph, and CPU kernels and
crossings run outside every graph.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

_HIDDEN = "vm.builtin.mulayer_hidden"
_TO_VDEVICE = tvm.ir.Op.get("relax.to_vdevice")
_ALLOC_STORAGE = tvm.ir.Op.get("relax.memory.alloc_storage")
_CPU_KINDS = ("llvm", "c")


def _runs_on_host(mod: tvm.IRModule, call: relax.Call) -> bool:
    op = call.op
    if isinstance(op, relax.GlobalVar):
        func = mod[op]
        if not isinstance(func, tirx.PrimFunc):
            return False
        target = func.attrs.get("target") if func.attrs is not None else None
        return target is not None and target.kind.name in _CPU_KINDS
    if isinstance(op, relax.ExternFunc):
        return not str(op.global_symbol).startswith("vm.builtin")
    return op.same_as(_TO_VDEVICE) or _host_storage(call)


def _host_storage(value) -> bool:
    """An ``alloc_storage`` on a device other than the first (the GPU): TVM's capture can only
    cache allocations of device 0."""
    if not (isinstance(value, relax.Call) and value.op.same_as(_ALLOC_STORAGE)):
        return False
    index = getattr(value.args[1], "value", 0)
    return isinstance(index, int) and index != 0


def _hoist_host_storage(func: relax.Function) -> relax.Function:
    """Move the host ``alloc_storage`` bindings (no dependencies) to the front of their block,
    so that hiding them does not cut a GPU segment in two."""
    body = func.body
    if not isinstance(body, relax.SeqExpr):
        return func
    blocks = []
    for block in body.blocks:
        front = [b for b in block.bindings if _host_storage(getattr(b, "value", None))]
        rest = [b for b in block.bindings if not _host_storage(getattr(b, "value", None))]
        kind = type(block)
        blocks.append(kind(front + rest))
    return relax.Function(
        func.params, relax.SeqExpr(blocks, body.body), func.ret_ty, func.is_pure, func.attrs
    )


@relax.expr_functor.mutator
class _Hider(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, hidden: list[relax.Call]) -> None:
        super().__init__(mod)
        self.mod_ = mod
        self.hidden = hidden

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not _runs_on_host(self.mod_, call):
            return call
        self.hidden.append(call)
        placeholder = relax.ExternFunc(f"{_HIDDEN}.{len(self.hidden) - 1}")
        return relax.Call(placeholder, list(call.args), None, [call.ty])


@relax.expr_functor.mutator
class _Restorer(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, hidden: list[relax.Call]) -> None:
        super().__init__(mod)
        self.hidden = hidden

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        op = call.op
        symbol = str(op.global_symbol) if isinstance(op, relax.ExternFunc) else ""
        if not symbol.startswith(_HIDDEN + "."):
            return call
        original = self.hidden[int(symbol.rsplit(".", 1)[1])]
        return relax.Call(original.op, list(call.args), original.attrs, original.ty_args)


def _map_functions(mod: tvm.IRModule, make) -> tvm.IRModule:
    mod = mod.clone()
    for gvar, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            mod[gvar] = make(mod).visit_expr(_hoist_host_storage(func))
    return mod


@tvm.transform.module_pass(opt_level=0, name="RewriteCUDAGraphPerDevice")
class RewriteCUDAGraphPerDevice:
    """Capture the GPU segments of a two-device module; see the module docstring."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        if not bool(ctx.config.get("relax.backend.use_cuda_graph", False)):
            return mod
        hidden: list[relax.Call] = []
        mod = _map_functions(mod, lambda m: _Hider(m, hidden))
        mod = relax.transform.RewriteCUDAGraph()(mod)
        return _map_functions(mod, lambda m: _Restorer(m, hidden))
