"""PageAlignHostStorage: host storages of a two-device module start and end on page boundaries.

Pipeline position: right after ``relax.transform.LowerRuntimeBuiltin`` (see
:func:`mulayer.passes.pipeline.vm_lowering`), on the VM's ``R.vm.alloc_storage`` calls (that
lowering resets the storage dtype to ``uint8``, so an earlier rewrite would be lost).

A crossing copies a planned host buffer to or from the GPU (:mod:`mulayer.runtime.crossing`).
The CUDA driver DMAs straight from or to page-locked memory, but it may lock only pages the model
owns, and the memory planner's storages are ``R.vm.alloc_storage(R.shape([nbytes]), device, "uint8",
"global")``: 64-byte aligned, so their first and last pages are shared with other
memory and each crossing ends up as three copies (a pageable head, the locked middle, a pageable
tail). This pass asks for the same storage in whole pages instead: ``dtype`` ``uint8x4096``
(the VM's allocator aligns a storage to its dtype's size) and the size in pages. A planned host
tensor (always at offset 0 of its storage) then starts on a page and the page its last byte
lies in is its storage's own, so the runtime can lock all of it and copy it in one DMA. Storages
on the GPU are left as they are; so is a storage whose size is not a literal.

Best effort: TVM's pooled allocator hands back a freed buffer of the same size whatever alignment
it was first allocated with, so in a process that ran other models a storage may still start
inside a page. The runtime checks the address and then copies in pieces (partial pages through
its bounce pages), as for models built before this pass.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.op import vm as vm_op

PAGE = 4096
PAGE_DTYPE = f"uint8x{PAGE}"  # one element = one page: alignment and size in whole pages
# The VM's own storage op (after LowerRuntimeBuiltin, which resets relax.memory.alloc_storage's
# dtype to uint8): R.vm.alloc_storage(shape in bytes, device index, dtype, scope).
_VM_ALLOC_STORAGE = tvm.ir.Op.get("relax.vm.alloc_storage")
_HOST_KINDS = ("llvm", "c")


def _host_indices(mod: tvm.IRModule) -> set[int]:
    """Virtual device indices (the planner's ``alloc_storage`` argument) of host VDevices."""
    vdevices = list(mod.global_infos.get("vdevice", []))
    return {i for i, vd in enumerate(vdevices) if vd.target.kind.name in _HOST_KINDS}


def _literal_bytes(call: relax.Call) -> int | None:
    """The byte size of an ``alloc_storage`` with a literal shape, else ``None``."""
    values = getattr(call.args[0], "values", None)
    if values is None or len(values) != 1:
        return None
    value = getattr(values[0], "value", None)
    return value if isinstance(value, int) else None


@relax.expr_functor.mutator
class _PageAligner(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, hosts: set[int]) -> None:
        super().__init__(mod)
        self.hosts = hosts
        self.aligned = 0

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not call.op.same_as(_VM_ALLOC_STORAGE):
            return call
        device = getattr(call.args[1], "value", None)
        nbytes = _literal_bytes(call)
        if device not in self.hosts or nbytes is None or str(call.args[2].value) != "uint8":
            return call
        self.aligned += 1
        pages = relax.ShapeExpr([-(-nbytes // PAGE)])
        return vm_op.alloc_storage(pages, call.args[1], PAGE_DTYPE, call.args[3])


@tvm.transform.module_pass(opt_level=0, name="PageAlignHostStorage")
class PageAlignHostStorage:
    """Allocate host storages in whole, page-aligned pages; see the module docstring.

    ``cpu_only``: the module is a single-device CPU build (no VDevices; device index 0 is the
    host). Its storages are page-aligned too, so that the buffers it leaves in TVM's pooled
    allocator, which a cooperative model loaded in the same process may be handed back, start
    on pages (the pool rounds every size up to whole pages already: no memory is added)."""

    def __init__(self, cpu_only: bool = False) -> None:
        self.cpu_only = cpu_only

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        two_devices = len(mod.global_infos.get("vdevice", [])) >= 2
        hosts = _host_indices(mod) if two_devices else ({0} if self.cpu_only else set())
        if not hosts:
            return mod  # a GPU-only module: nothing of its own crosses
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                mutator = _PageAligner(mod, hosts)
                new_func = mutator.visit_expr(func)
                if mutator.aligned:
                    mod[gvar] = new_func
        return mod
