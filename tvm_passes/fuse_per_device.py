"""FusePerDevice: fuse operators inside each device's region of a two-device module.

Pipeline position: in :func:`mulayer.passes.pipeline.lower_two_device`, after
:func:`~mulayer.passes.build_helpers.legalize_keeping_vdevices` and before the schedules.

TVM's ``FuseOps`` / ``FuseTIR`` fuse a two-device module as they fuse a single-device one, with
two problems (DESIGN.md §2):

- the fused PrimFuncs lose the ``target`` attribute that legalization gave each PrimFunc, so
  the schedules (and codegen) would not know which side a kernel belongs to;
- nothing stops a group from spanning both devices.

The second cannot happen on a module that :class:`~mulayer.passes.place_devices.PlaceDevices`
placed: every tensor read on the other side goes through ``R.to_vdevice``, an opaque op that
``FuseOps`` never fuses, so every group's calls produce tensors of one VDevice. This pass checks
that (a group of two devices is refused with a ``ValueError``, never built half-wrong) and gives
each fused PrimFunc the target of its call's output VDevice. A PrimFunc called from both sides
is cloned per side (``<name>_cpu``), like PlaceDevices does before fusion.

On the llvm + llvm stand-in with two identical targets nothing is fused (FuseOps cannot tell
the sides apart there); the stand-in checks numerics, not speed.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


def _group() -> tvm.transform.Pass:
    t = relax.transform
    return tvm.transform.Sequential(
        [
            t.AnnotateTIROpPattern(),
            t.FoldConstant(),  # e.g. the weight casts of ToMixedPrecision, as in a GPU-only build
            t.FuseOps(),
        ],
        name="mulayer.Group",
    )


def _fuse(mod: tvm.IRModule) -> tvm.IRModule:
    mod = _group()(mod)
    t = relax.transform
    return tvm.transform.Sequential([t.FuseTIR(), t.DeadCodeElimination()])(mod)


def _output_vdevice(call: relax.Call) -> relax.VDevice | None:
    types = list(call.ty_args)
    if len(types) == 1 and isinstance(types[0], relax.TupleType):
        types = list(types[0].fields)
    found = {str(t.vdevice): t.vdevice for t in types if getattr(t, "vdevice", None) is not None}
    if len(found) > 1:
        raise ValueError(f"a kernel writes tensors on two devices: {sorted(found)}")
    return next(iter(found.values()), None)


def _prim_targets(mod: tvm.IRModule) -> dict[str, str]:
    """Kind name of the target of every PrimFunc that has one."""
    targets = {}
    for gvar, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and func.attrs is not None and "target" in func.attrs:
            targets[gvar.name_hint] = str(func.attrs["target"])
    return targets


@relax.expr_functor.mutator
class _TargetRestorer(relax.PyExprMutator):
    """Give every called PrimFunc its call site's target; clone per side when needed."""

    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.mod_ = mod
        self.assigned: dict[str, str] = {}  # PrimFunc name -> target string given
        self.clones: dict[tuple[str, str], relax.GlobalVar] = {}

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not call.op.same_as(_CALL_TIR):
            return call
        vdevice = _output_vdevice(call)
        gvar = call.args[0]
        if vdevice is None:
            return call
        target = vdevice.target
        func = self.mod_[gvar]
        have = func.attrs.get("target") if func.attrs is not None else None
        if have is not None and str(have) == str(target):
            return call
        key = (gvar.name_hint, str(target))
        if key not in self.clones:
            owner = self.assigned.setdefault(gvar.name_hint, str(target))
            if have is None and owner == str(target):
                self.builder_.update_func(gvar, func.with_attr("target", target))
                self.clones[key] = gvar
            else:
                side = "cpu" if target.kind.name in ("llvm", "c") else target.kind.name
                clone = func.with_attr("target", target)
                self.clones[key] = self.builder_.add_func(clone, f"{gvar.name_hint}_{side}")
        new_gvar = self.clones[key]
        if new_gvar.same_as(gvar):
            return call
        return relax.Call(call.op, [new_gvar, *call.args[1:]], call.attrs, call.ty_args)


@tvm.transform.module_pass(opt_level=0, name="FusePerDevice")
class FusePerDevice:
    """Fuse ``mod`` (two VDevices, placed and legalized) per device; see the module docstring."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        vdevices = list(mod.global_infos.get("vdevice", []))
        if len(vdevices) == 2 and str(vdevices[0].target) == str(vdevices[1].target):
            # The llvm + llvm stand-in with identical targets: FuseOps would share one fused
            # function between the sides and then reject the other side's call.
            return mod
        mod = _fuse(mod)
        for gvar, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                restorer = _TargetRestorer(mod)
                new_func = restorer.visit_expr(func)
                mod = restorer.builder_.get()
                mod[gvar] = new_func
        return mod
