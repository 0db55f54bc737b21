"""SeparateDeviceStorage: never let a tensor of one device live in another device's storage.

Pipeline position: right after ``relax.transform.StaticPlanBlockMemory`` (see
:func:`mulayer.passes.pipeline.vm_lowering`).

TVM 0.27's static memory planner pools storage tokens by size and dtype only: in a module with
two VDevices it can hand a storage allocated on the GPU (``alloc_storage(..., 0, ...)``) to a
tensor placed on the CPU (``alloc_tensor(storage, ..., runtime_device_index=1)``), and the CPU
kernel then fails with "Mismatched ... device_type" (or, with two CPU devices, silently works).
This pass gives every (storage, device) pair its own ``alloc_storage`` of the same size on the
tensor's device, emitted right before the first tensor that needs it. Within one device the
planner's reuse stays valid (its lifetimes did not overlap across all devices, so they do not
overlap within one).
"""

from __future__ import annotations

import tvm
from tvm import relax

_ALLOC_STORAGE = tvm.ir.Op.get("relax.memory.alloc_storage")
_ALLOC_TENSOR = tvm.ir.Op.get("relax.memory.alloc_tensor")


def _device_index(expr: relax.Expr) -> int | None:
    """The integer of a literal device-index argument (an ``IntImm`` in 0.27), else ``None``."""
    value = getattr(expr, "value", None)
    return value if isinstance(value, int) else None


@relax.expr_functor.mutator
class _StorageSeparator(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.storages: dict[relax.Var, relax.Call] = {}
        self.clones: dict[tuple[relax.Var, int], relax.Var] = {}
        self.separated = 0

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = binding.value
        if isinstance(value, relax.Call) and value.op.same_as(_ALLOC_STORAGE):
            self.storages[binding.var] = value
        elif isinstance(value, relax.Call) and value.op.same_as(_ALLOC_TENSOR):
            storage = value.args[0]
            alloc = self.storages.get(storage)
            device = _device_index(value.args[4])
            if alloc is not None and device is not None and device != _device_index(alloc.args[1]):
                clone = self._clone(storage, alloc, device)
                value = relax.Call(value.op, [clone, *value.args[1:]], value.attrs, value.ty_args)
                binding = relax.VarBinding(binding.var, value)
        super().visit_var_binding_(binding)

    def _clone(self, storage: relax.Var, alloc: relax.Call, device: int) -> relax.Var:
        key = (storage, device)
        if key not in self.clones:
            size, _, scope, dtype = alloc.args
            call = relax.op.memory.alloc_storage(size, device, scope, dtype)
            self.clones[key] = self.builder_.emit(call, f"{storage.name}_dev{device}")
            self.separated += 1
        return self.clones[key]


@tvm.transform.module_pass(opt_level=0, name="SeparateDeviceStorage")
class SeparateDeviceStorage:
    """Split storages shared by tensors of different devices; see the module docstring."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                mutator = _StorageSeparator(mod)
                new_func = mutator.visit_expr(func)
                if mutator.separated:
                    mod[gvar] = new_func
        return mod
