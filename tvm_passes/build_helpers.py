"""Build a two-VDevice module (GPU part + CPU part) into one Relax VM executable.

Used by the compile driver after :class:`~mulayer.passes.place_devices.PlaceDevices`.
TVM 0.27 work-arounds (DESIGN §2, §6):

- LegalizeOps drops the vdevice of some calls (conv2d): every op's legalization is wrapped so
  the ``call_tir`` it returns keeps the call's vdevice, and the PrimFunc gets that target.
- FuseOps/FuseTIR drop PrimFunc targets, so nothing is fused here.
- PrimFuncs are scheduled by ``mulayer.schedules.apply_schedules`` (each PrimFunc's own
  ``target`` attribute picks its rules).

Known cost: the Relax VM puts every constant on its first device (the GPU, first in the
``vdevice`` list), so GPU weights are resident but, on a real GPU, constants read by CPU parts are
copied device-to-host on every call (PlaceDevices' ``const<n>_to_cpu``). The fix is to make the
CPU weights parameters the executor keeps in host memory (or a VM that places constants by
vdevice); with llvm as the "GPU" both sides share one device and nothing is copied.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.target import Target

from mulayer.schedules import apply_schedules

from .place_devices import PlaceDevices, make_vdevices


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


def build_two_device(mod: tvm.IRModule, gpu_target, cpu_target) -> tvm.runtime.Executable:
    """Compile a module for a GPU VDevice and a CPU VDevice into one VM executable.

    Parameters
    ----------
    mod : tvm.IRModule
        The module after PlaceDevices (if it has no ``vdevice`` global info, PlaceDevices is
        applied here with the given targets).
    gpu_target, cpu_target : tvm.target.Target | dict | str
        The targets PlaceDevices used; the GPU one may be llvm.

    Returns
    -------
    tvm.runtime.Executable
        Run it with ``relax.VirtualMachine(ex, devices(gpu_target))``.
    """
    vdevices = make_vdevices(gpu_target, cpu_target)
    if "vdevice" not in mod.global_infos:
        mod = PlaceDevices(gpu_target, cpu_target)(mod)
    mod = relax.transform.RealizeVDevice()(mod)
    mod = legalize_keeping_vdevices(mod)
    mod = apply_schedules(mod, vdevices["gpu"].target)
    return tvm.compile(mod, target=None)


def devices(gpu_target) -> list[tvm.runtime.Device]:
    """The VM device list matching PlaceDevices' ``[gpu, cpu]`` VDevices."""
    target = gpu_target if isinstance(gpu_target, Target) else Target(gpu_target)
    if target.kind.name in ("llvm", "c"):
        return [tvm.cpu(0), tvm.cpu(0)]
    return [tvm.device(target.kind.name, 0), tvm.cpu(0)]
