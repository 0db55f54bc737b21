"""LiftCPUWeights: make the constants the CPU side reads CPU-resident, copied once, not per call.

Pipeline position: right after :class:`~mulayer.passes.place_devices.PlaceDevices`, only when
the two sides are different kinds of device (PlaceDevices emits no constant copies otherwise).

The Relax VM loads every constant onto its first device (the GPU), so PlaceDevices copies each
constant a CPU part reads (``const<n>_to_cpu = R.to_vdevice(const, cpu)``) on every call. This
pass turns those copies into parameters of ``main`` after its inputs (``main`` gets the attribute
``num_input`` = number of real inputs, TVM's convention for "inputs, then weights") and adds a
function :data:`WEIGHTS_FUNC` that makes the copies and returns them as a tuple. A runtime calls
it once after loading::

    weights = vm["mulayer_cpu_weights"]()
    out = vm["main"](x, *weights)

The GPU-side constants stay constants, resident on the GPU.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.ir.expr import Constant

WEIGHTS_FUNC = "mulayer_cpu_weights"
_TO_VDEVICE = tvm.ir.Op.get("relax.to_vdevice")


def cpu_weight_bindings(func: relax.Function) -> list[relax.VarBinding]:
    """``main``'s bindings that copy a constant to the CPU (PlaceDevices' ``const<n>_to_cpu``)."""
    found = []
    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if (
                isinstance(value, relax.Call)
                and value.op.same_as(_TO_VDEVICE)
                and isinstance(value.args[0], Constant)
                and binding.var.name.endswith("_to_cpu")
            ):
                found.append(binding)
    return found


@relax.expr_functor.mutator
class _DropBindings(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, replace: dict[relax.Var, relax.Var]) -> None:
        super().__init__(mod)
        self.replace = replace

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var in self.replace:
            self.set_var_remap(binding.var, self.replace[binding.var])
            return
        super().visit_var_binding_(binding)


@tvm.transform.module_pass(opt_level=0, name="LiftCPUWeights")
class LiftCPUWeights:
    """Lift ``main``'s constant-to-CPU copies into parameters; see the module docstring."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        main = mod["main"]
        bindings = cpu_weight_bindings(main)
        if not bindings:
            return mod
        weights = {b.var: relax.Var(b.var.name, b.var.ty) for b in bindings}
        body = _DropBindings(mod, weights).visit_expr(main.body)
        new_main = relax.Function(
            [*main.params, *weights.values()], body, main.ret_ty, main.is_pure, main.attrs
        ).with_attr("num_input", len(main.params))
        mod = mod.clone()
        mod["main"] = new_main
        mod[WEIGHTS_FUNC] = _weights_function(bindings)
        return mod


def _weights_function(bindings: list[relax.VarBinding]) -> relax.Function:
    bb = relax.BlockBuilder()
    with bb.function(WEIGHTS_FUNC, [], pure=True):
        with bb.dataflow():
            copies = [bb.emit(b.value, b.var.name) for b in bindings]
            out = bb.emit_output(relax.Tuple(copies))
        bb.emit_func_output(out)
    return bb.get()[WEIGHTS_FUNC]
