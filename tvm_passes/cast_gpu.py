"""CastGPU: run every GPU-side part (``<layer>_gpu`` and its epilogues) in float16.

Pipeline position: after :class:`~mulayer.passes.split_channels.SplitChannels` (which names the
parts), before :class:`~mulayer.passes.place_devices.PlaceDevices`.

For each GPU part:

- the part's input is cast to float16 (``<layer>_gpu_cast_in``); when that input is itself the
  float32 cast-back of an earlier float16 result, the float16 value is used directly (the
  round trip fp16 -> fp32 -> fp16 is exact, so nothing changes numerically);
- conv2d / dense weights become float16 constants (converted at compile time);
- ``accumulate="float32"`` (default, safest): conv2d and dense take float16 operands and
  accumulate in float32 (``out_dtype="float32"``); their epilogues then stay float32 and no
  cast back is needed. ``accumulate="float16"``: they compute and return float16, epilogue
  constants become float16 and the part's last value is cast back to float32
  (``<layer>_gpu_cast_out``) before the join. Pooling always runs in float16 and is cast back.

A module with no CPU part at all (every layer on the GPU) is converted by TVM's
``ToMixedPrecision(out_dtype="float32")`` and :class:`~.channels_last.ChannelsLastGPU` instead,
as the GPU-only build is: its fused kernels are then the GPU-only module's.

The casts are helper bindings of the part (role ``"aux"`` of
:func:`mulayer.passes.common.part_role`): PlaceDevices runs them on the GPU with the part.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Constant
from tvm.relax.expr_functor import PyExprMutator, mutator

from .channels_last import ChannelsLastGPU
from .common import conv2d_like, has_cpu_part, op_name, part_role, var_prefix

ACCUMULATE = ("float32", "float16")
_WEIGHTED = ("relax.nn.conv2d", "relax.matmul")


@tvm.transform.module_pass(opt_level=0, name="CastGPU")
class CastGPU:
    """Convert the GPU parts of ``main`` to float16.

    Parameters
    ----------
    accumulate : str
        ``"float32"`` (default) or ``"float16"``: the output dtype of GPU conv2d/dense.
    layout : str | None
        Conv layout of a module with no CPU part (:class:`~.channels_last.ChannelsLastGPU`);
        None: ``MULAYER_GPU_LAYOUT``. The profiler's single-layer parts pass ``"NCHW"``.
    """

    def __init__(self, accumulate: str = "float32", layout: str | None = None):
        if accumulate not in ACCUMULATE:
            raise ValueError(f"accumulate={accumulate!r}: use one of {', '.join(ACCUMULATE)}")
        self.accumulate = accumulate
        self.layout = layout

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if not has_cpu_part(mod["main"]):
            # Every layer on the GPU: convert exactly as the GPU-only build does (fp16
            # activations between layers, no per-part casts, the same conv layouts), so its
            # kernels are the same.
            mod = relax.transform.ToMixedPrecision(out_dtype="float32")(mod)
            return ChannelsLastGPU(self.layout)(mod)
        caster = _Caster(mod, self.accumulate, mod["main"])
        new_func = caster.visit_expr(mod["main"])
        mod = mod.clone()
        mod["main"] = relax.analysis.remove_all_unused(new_func)
        return mod


def _to_fp16(expr: relax.Expr) -> relax.Expr:
    if isinstance(expr, Constant) and str(expr.value.dtype) == "float32":
        return relax.const(expr.value.numpy().astype(np.float16), "float16")
    return expr


def _dtype(expr: relax.Expr) -> str | None:
    ty = getattr(expr, "ty", None)
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


@mutator
class _Caster(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, accumulate: str, func: relax.Function):
        super().__init__(mod)
        self.accumulate = accumulate
        # The last binding of every GPU part (the op or its last epilogue).
        self.last: dict[str, relax.Var] = {}
        # Float32 casts of float16 values, to short-circuit fp16 -> fp32 -> fp16.
        self.widened: dict[relax.Var, relax.Var] = {}
        for block in func.body.blocks:
            for binding in block.bindings:
                role = part_role(binding.var)
                if role is not None and role[1] == "gpu" and role[2] in ("op", "epilogue"):
                    self.last[role[0]] = binding.var

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        role = part_role(binding.var)
        if role is None or role[1] != "gpu" or role[2] not in ("op", "epilogue"):
            super().visit_var_binding_(binding)
            return
        layer, _, kind = role
        value = binding.value
        if kind == "op":
            new_value = self._cast_op(layer, value)
        else:
            args = [self.visit_expr(a) for a in value.args]
            if _dtype(args[0]) == "float16":
                args = [_to_fp16(a) for a in args]
            new_value = relax.Call(value.op, args, value.attrs, value.ty_args)
        is_last = self.last.get(layer) is not None and self.last[layer].same_as(binding.var)
        is_output = not isinstance(binding.var, relax.DataflowVar)
        new_var = self.builder_.emit(new_value, binding.var.name)
        if _dtype(new_var) == "float16" and is_last:
            back = relax.op.astype(new_var, "float32")
            name = f"{var_prefix(layer)}_gpu_cast_out"
            out = (
                self.builder_.emit_output(back, name)
                if is_output
                else self.builder_.emit(back, name)
            )
            self.widened[out] = new_var
            self.set_var_remap(binding.var, out)
            return
        if is_output:
            new_var = self.builder_.emit_output(new_var, binding.var.name)
        self.set_var_remap(binding.var, new_var)

    def _cast_op(self, layer: str, call: relax.Call) -> relax.Expr:
        data = self.visit_expr(call.args[0])
        if _dtype(data) != "float16":
            narrowed = self.widened.get(data) if isinstance(data, relax.Var) else None
            data = (
                narrowed
                if narrowed is not None
                else self.builder_.emit(
                    relax.op.astype(data, "float16"), f"{var_prefix(layer)}_gpu_cast_in"
                )
            )
        name = op_name(call)
        if name not in _WEIGHTED:
            return relax.Call(call.op, [data, *call.args[1:]], call.attrs, call.ty_args)
        weight = _to_fp16(call.args[1])
        out_dtype = self.accumulate
        if name == "relax.matmul":
            return relax.op.matmul(data, weight, out_dtype=out_dtype)
        return conv2d_like(call, data, weight, out_dtype=out_dtype)
