"""Helpers of the two-VDevice build (GPU part + CPU part in one Relax VM executable).

:func:`mulayer.passes.pipeline.lower_two_device` and
:func:`~mulayer.passes.pipeline.build_two_device` use them after
:class:`~mulayer.passes.place_devices.PlaceDevices`. TVM 0.27 work-arounds (DESIGN §2, §6):

- LegalizeOps drops the vdevice of some calls (conv2d): every op's legalization is wrapped so
  the ``call_tir`` it returns keeps the call's vdevice, and the PrimFunc gets that target.
- FuseOps/FuseTIR drop PrimFunc targets, so nothing is fused here.
- PrimFuncs are scheduled by ``mulayer.schedules.apply_schedules`` (each PrimFunc's own
  ``target`` attribute picks its rules).
- The static memory planner shares storage across devices: the VM lowering adds
  :class:`~mulayer.passes.separate_device_storage.SeparateDeviceStorage` after it.

Constants: the Relax VM puts every constant on its first device (the GPU). GPU weights are
therefore resident; the constants CPU parts read are lifted by
:class:`~mulayer.passes.lift_cpu_weights.LiftCPUWeights` into ``main`` parameters that the
runtime copies to the host once (``vm["mulayer_cpu_weights"]()``).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.target import Target

from .common import part_role

_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


def keep_vdevice(legalize):
    """Wrap an ``FLegalize`` function so the ``call_tir`` it returns keeps the vdevice."""

    def wrapped(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        result = legalize(bb, call)
        vdev = call.ty.vdevice if isinstance(call.ty, relax.TensorType) else None
        if vdev is not None and isinstance(result, relax.Call) and len(result.ty_args) == 1:
            out = result.ty_args[0]
            if isinstance(out, relax.TensorType) and out.vdevice is None:
                result = relax.Call(
                    result.op,
                    result.args,
                    result.attrs,
                    [relax.TensorType(out.shape, out.dtype, vdevice=vdev)],
                )
        return result

    return wrapped


def legalize_keeping_vdevices(mod: tvm.IRModule) -> tvm.IRModule:
    """``LegalizeOps`` with :func:`keep_vdevice` around every op used in ``mod``."""
    ops: dict[str, tvm.ir.Op] = {}

    def visit(expr: relax.Expr) -> None:
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            ops[expr.op.name] = expr.op

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    custom = {}
    for name, op in ops.items():
        legalize = op.get_attr("FLegalize")
        if legalize is not None:
            custom[name] = keep_vdevice(legalize)
    return relax.transform.LegalizeOps(custom)(mod)


def kernel_sites(mod: tvm.IRModule) -> list[list[str]]:
    """``[symbol, binding, side]`` of every kernel ``main`` calls, in program order.

    ``mod`` is a lowered two-device module; the executor's tracer matches the VM's kernel calls
    to these sites so that intervals carry part names (``conv2d_3_cpu``).
    """
    sites = []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if not (isinstance(value, relax.Call) and value.op.same_as(_CALL_TIR)):
                continue
            sites.append([value.args[0].name_hint, binding.var.name, _side(binding)])
    return sites


def _side(binding: relax.VarBinding) -> str:
    """The part's side by name; else by the output's device kind (a CPU kind reads "cpu", so
    on the llvm + llvm stand-in, joins and other unnamed bindings read "cpu")."""
    part = part_role(binding.var)
    if part is not None:
        return part[1]
    vdevice = getattr(binding.var.ty, "vdevice", None)
    kind = vdevice.target.kind.name if vdevice is not None else "llvm"
    return "cpu" if kind in ("llvm", "c") else "gpu"


def devices(gpu_target) -> list[tvm.runtime.Device]:
    """The VM device list matching PlaceDevices' ``[gpu, cpu]`` VDevices."""
    target = gpu_target if isinstance(gpu_target, Target) else Target(gpu_target)
    if target.kind.name in ("llvm", "c"):
        return [tvm.cpu(0), tvm.cpu(0)]
    return [tvm.device(target.kind.name, 0), tvm.cpu(0)]
