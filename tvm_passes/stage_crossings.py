"""StageCrossings: copy tensors between the devices into planned buffers, host copies early.

Pipeline position: in :func:`mulayer.passes.pipeline.lower_two_device`, after
:class:`~mulayer.passes.fuse_per_device.FusePerDevice` (the VM lowering follows).

PlaceDevices expresses a crossing as ``R.to_vdevice``, which the VM runs as
``vm.builtin.to_device``: a fresh allocation on every call, a copy through pageable memory, and
a result that TVM's CUDA-graph planner cannot treat as static (so no GPU kernel after the first
crossing could be captured). This pass rewrites each crossing of ``main`` into a
destination-passing call ``R.call_dps_packed("mulayer.crossing.copy", (x, pin), out)``:

- the destination is an ordinary planned tensor on the destination device (the static memory
  planner allocates it once; with CUDA graphs it is a cached allocation), so the runtime can pin
  the host side once per loaded model and the GPU kernels that read an uploaded tensor stay
  capturable;
- ``mulayer.crossing.copy`` (registered by :mod:`mulayer.runtime.crossing`) copies and returns
  when the destination can be read. Its second argument says whether the host side may be
  page-locked: only planned buffers, which live as long as the loaded model, may. A parameter of
  ``main`` (the caller's input, a weight) or a tensor ``main`` returns is freed by its owner, and
  memory freed while page-locked leaves a registration behind that makes later copies through
  that address fail (``cudaErrorInvalidValue``). The flag is 2 (``PIN_WHOLE_PAGES``): the VM
  lowering that follows allocates host storages in whole pages
  (:class:`~mulayer.passes.page_align_host_storage.PageAlignHostStorage`), so the runtime may lock
  a page-aligned buffer through the end of its last page (artifacts built before say 1).

It also moves every device-to-host copy right after the binding that produces its source: the
CPU part of a split layer then reads its input as soon as the GPU has produced it, and the GPU
part of the layer, launched after the copy, runs while the CPU part computes (left where
PlaceDevices put them, next to their CPU reader, these copies waited for that GPU part).
"""

from __future__ import annotations

import tvm
from tvm import relax

COPY_FUNC = "mulayer.crossing.copy"  # registered by mulayer.runtime.crossing
# The pin flag of a planned host buffer: its storage is whole pages (PageAlignHostStorage), so
# where it starts on a page the page of its last byte is the model's too (1: older artifacts).
PIN_WHOLE_PAGES = 2
_TO_VDEVICE = tvm.ir.Op.get("relax.to_vdevice")


def _host_test(mod: tvm.IRModule):
    """``is_host(vdevice)``: the CPU VDevice is PlaceDevices' second one (on the llvm + llvm
    stand-in both are llvm, so they are told apart by identity, not by kind)."""
    vdevices = list(mod.global_infos.get("vdevice", []))
    if len(vdevices) == 2:
        return lambda vdevice: vdevice.__chandle__() == vdevices[1].__chandle__()
    return lambda vdevice: vdevice.target.kind.name in ("llvm", "c")


def _crossing(binding: relax.Binding) -> relax.Call | None:
    value = getattr(binding, "value", None)
    is_copy = isinstance(value, relax.Call) and value.op.same_as(_TO_VDEVICE)
    return value if is_copy and isinstance(value.args[0], relax.Var) else None


def _staged(call: relax.Call, ty: relax.TensorType, pin: bool) -> relax.Call:
    out = relax.TensorType(ty.shape, ty.dtype, vdevice=call.attrs.dst_vdevice)
    args = relax.Tuple([call.args[0], relax.prim_value(PIN_WHOLE_PAGES if pin else 0)])
    staged = relax.call_dps_packed(COPY_FUNC, args, out_ty=out)
    return relax.BlockBuilder().normalize(staged)


def _escaping(main: relax.Function) -> set[relax.Var]:
    """Variables whose tensors ``main`` returns (through aliases and tuples)."""
    escaping: set[relax.Var] = set()

    def add(expr: relax.Expr) -> None:
        if isinstance(expr, relax.Var):
            escaping.add(expr)
        elif isinstance(expr, relax.Tuple):
            for field in expr.fields:
                add(field)

    add(main.body.body)
    for block in reversed(list(main.body.blocks)):
        for binding in reversed(list(block.bindings)):
            value = getattr(binding, "value", None)
            if binding.var in escaping and isinstance(value, relax.Tuple | relax.Var):
                add(value)
            elif binding.var in escaping and isinstance(value, relax.TupleGetItem):
                add(value.tuple_value)
    return escaping


_CALL_TIR = tvm.ir.Op.get("relax.call_tir")
_VIEW_OPS = tuple(tvm.ir.Op.get(name) for name in ("relax.reshape", "relax.memory.view"))


def _with_views(mod: tvm.IRModule, main: relax.Function, roots: set[relax.Var]) -> set[relax.Var]:
    """``roots`` and every variable that may share their memory: aliases, reshapes (a
    reshape-pattern PrimFunc becomes a view in the VM lowering: RewriteDataflowReshape)."""
    shared = set(roots)
    for block in main.body.blocks:
        for binding in block.bindings:
            value = getattr(binding, "value", None)
            if isinstance(value, relax.Var) and value in shared:
                shared.add(binding.var)
            elif isinstance(value, relax.Call) and value.args:
                source = value.args[0]
                if value.op.same_as(_CALL_TIR):
                    callee = value.args[0]
                    func = mod[callee] if isinstance(callee, tvm.ir.GlobalVar) else None
                    inputs = value.args[1].fields if len(value.args) > 1 else []
                    is_view = isinstance(func, tvm.tirx.PrimFunc) and (
                        relax.analysis.has_reshape_pattern(func)
                    )
                    source = inputs[0] if is_view and inputs else None
                elif not any(value.op.same_as(op) for op in _VIEW_OPS):
                    source = None
                if source is not None and source in shared:
                    shared.add(binding.var)
    return shared


def _pinnable(binding: relax.VarBinding, call: relax.Call, is_host, owned) -> bool:
    """Whether the host side of a crossing is a planned buffer (see the module docstring)."""
    host_side = binding.var if is_host(call.attrs.dst_vdevice) else call.args[0]
    return host_side not in owned


def _reorder(bindings: list[relax.Binding], is_host) -> list[relax.Binding]:
    """Bindings with each device-to-host crossing moved right after its source's binding."""
    hoisted: dict[relax.Var, list[relax.Binding]] = {}
    moved = set()
    for binding in bindings:
        call = _crossing(binding)
        if call is not None and is_host(call.attrs.dst_vdevice):
            hoisted.setdefault(call.args[0], []).append(binding)
            moved.add(binding.var)
    order: list[relax.Binding] = []
    for binding in bindings:
        if binding.var in moved:
            continue
        order.append(binding)
        order.extend(hoisted.pop(binding.var, []))
    # Copies of a parameter (no binding produces it) stay where they were, in front.
    return [b for src in hoisted.values() for b in src] + order


@tvm.transform.module_pass(opt_level=0, name="StageCrossings")
class StageCrossings:
    """Rewrite ``main``'s ``to_vdevice`` crossings; see the module docstring."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        main = mod["main"]
        is_host = _host_test(mod)
        # Freed by their owners, not planned: the caller's tensors (and views of them) and
        # what main returns.
        owned = _with_views(mod, main, set(main.params)) | _escaping(main)
        blocks = []
        changed = False
        for block in main.body.blocks:
            bindings = list(block.bindings)
            if not any(_crossing(b) is not None for b in bindings):
                blocks.append(block)
                continue
            changed = True
            new = []
            for binding in _reorder(bindings, is_host):
                call = _crossing(binding)
                if call is not None and isinstance(binding.var.ty, relax.TensorType):
                    pin = _pinnable(binding, call, is_host, owned)
                    binding = relax.VarBinding(binding.var, _staged(call, binding.var.ty, pin))
                new.append(binding)
            kind = relax.DataflowBlock if isinstance(block, relax.DataflowBlock) else None
            blocks.append(kind(new) if kind else relax.BindingBlock(new))
        if not changed:
            return mod
        body = relax.SeqExpr(blocks, main.body.body)
        mod = mod.clone()
        mod["main"] = relax.Function(main.params, body, main.ret_ty, main.is_pure, main.attrs)
        return mod
