"""PlaceDevices: put every binding of ``main`` on the GPU or the CPU VDevice, with copies.

Pipeline position: last mulayer pass, after SplitChannels, the CPU quantizer and CastGPU; the
result goes to :func:`mulayer.passes.pipeline.build_two_device`.

The module gets ``global_infos["vdevice"] = [gpu, cpu]`` (both with ``vdevice_id`` 0; the VM
is then created with ``[gpu_device, cpu_device]``, e.g. ``[tvm.cuda(0), tvm.cpu(0)]``, or
``[tvm.cpu(0), tvm.cpu(0)]`` when the "GPU" side is compiled for llvm). Placement rules:

1. Part bindings (:func:`mulayer.passes.common.part_of`) and the helper bindings later passes
   added to a part (role ``"aux"`` of :func:`~mulayer.passes.common.part_role`: CastGPU's
   casts, the quantizer's int8 op / dequantize) run on the part's side. The quantization of
   an int8 CPU part's input (``<layer>_cpu_qin*``) runs where that input is: when it comes
   from the GPU, the GPU quantizes and the tensor crosses as uint8, a quarter of the fp32
   bytes.
2. Joins (``<layer>_join``) run on the processor that consumes the result next: the side of the
   first part (in program order) reached through the join's consumers, unmarked ones looked
   through; the CPU when none is reached (the result is returned to the host).
3. Any other binding (residual add, concat of branches, reshape, input slices...) runs
   where its tensor inputs mostly are (by element count; ties: the first input's side), so an
   input slice happens before the tensor crosses and fewer bytes cross.
4. ``main``'s parameters live on the CPU (the host, where inputs arrive) and its result is
   copied back to the CPU if it was computed on the GPU.
5. A ``main`` with no CPU part (every layer on the GPU) is placed wholly on the GPU, parameters
   and result included: the GPU-only module plus nothing (the runtime uploads the inputs).

Wherever a tensor is read on the other side, an explicit ``R.to_vdevice`` copy
(``to_<side>_<var>``) is emitted right before its first reader on that side, once. SplitChannels
emits each layer's GPU part before its CPU part, so the GPU launch comes first, the CPU work
overlaps it, and the device-to-host copy of the GPU part is emitted at the join, after the CPU
work. The VM keeps every constant on its first device (the GPU): when the two sides are
different kinds of device, constants read on the CPU get a copy ``const<n>_to_cpu``, which
:class:`~mulayer.passes.lift_cpu_weights.LiftCPUWeights` then turns into a once-per-load copy.
PrimFuncs called with ``call_tir`` are cloned per side with that side's ``target`` attribute.
"""

from __future__ import annotations

import logging
import re

import tvm
from tvm import relax
from tvm.ir.expr import Constant
from tvm.target import Target

from mulayer.frontend.dataflow import consumers

from .common import SIDES, has_cpu_part, join_of, part_role

log = logging.getLogger(__name__)
# QuantizeCPU's input quantization of a CPU part (``<layer>_cpu_qin``, ``..._qin1``, ...).
_QUANTIZE_INPUT = re.compile(r"_cpu_qin\d*$")


def make_vdevices(gpu_target: Target, cpu_target: Target) -> dict[str, relax.VDevice]:
    """The two VDevices, GPU first (the order of the module's ``vdevice`` list)."""
    gpu_target = _as_target(gpu_target)
    cpu_target = _as_target(cpu_target)
    if gpu_target.kind.name not in ("llvm", "c") and gpu_target.host is None:
        gpu_target = Target(gpu_target, host=cpu_target)
    return {
        "gpu": relax.VDevice(gpu_target, 0, "global"),
        "cpu": relax.VDevice(cpu_target, 0, "global"),
    }


def _as_target(target) -> Target:
    return target if isinstance(target, Target) else Target(target)


@tvm.transform.module_pass(opt_level=0, name="PlaceDevices")
class PlaceDevices:
    """Annotate ``main`` for a GPU VDevice and a CPU VDevice; see the module docstring.

    Parameters
    ----------
    gpu_target, cpu_target : tvm.target.Target | dict | str
        E.g. ``{"kind": "cuda", "arch": "sm_90"}`` and ``{"kind": "llvm"}``; the GPU side may
        itself be an llvm target (the cooperative path then runs on a CPU-only machine).
    copy_constants : bool, optional
        Emit ``const<n>_to_cpu`` copies for constants read on the CPU; default: when the two
        sides are different kinds of device (``True`` exercises that path on llvm + llvm).
    """

    def __init__(self, gpu_target, cpu_target, copy_constants: bool | None = None):
        self.vdevices = make_vdevices(gpu_target, cpu_target)
        self.copy_constants = copy_constants

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        func = mod["main"]
        if not all(isinstance(b, relax.DataflowBlock) for b in func.body.blocks):
            log.debug("PlaceDevices: main has a non-dataflow block; left unplaced")
            return mod
        return _Placer(mod, self.vdevices, self.copy_constants).run()


class _Placer:
    """Rebuilds ``main`` binding by binding (placement needs a whole-function view first)."""

    def __init__(self, mod: tvm.IRModule, vdevices: dict, copy_constants: bool | None):
        self.mod = mod
        self.func = mod["main"]
        self.vdevices = vdevices
        gpu_kind = vdevices["gpu"].target.kind.name
        self.copy_consts = (
            gpu_kind != vdevices["cpu"].target.kind.name
            if copy_constants is None
            else copy_constants
        )
        self.bindings = [b for block in self.func.body.blocks for b in block.bindings]
        self.side: dict[relax.Var, str] = {p: "cpu" for p in self.func.params}

    # Step 1. Decide each binding's side.
    def _decide(self) -> None:
        self.all_gpu = not has_cpu_part(self.func)
        if self.all_gpu:
            # Nothing runs on the CPU: the whole function, inputs included, is the GPU's.
            self.side = {p: "gpu" for p in self.func.params}
            self.side.update({b.var: "gpu" for b in self.bindings})
            return
        readers = consumers(self.func)
        order = {b.var: i for i, b in enumerate(self.bindings)}
        for binding in self.bindings:
            part = part_role(binding.var)
            if _QUANTIZE_INPUT.search(binding.var.name):
                # Quantize where the input is: from the GPU, uint8 crosses instead of fp32.
                self.side[binding.var] = self._majority_side(binding.value)
            elif part is not None and part[2] != "input":
                self.side[binding.var] = part[1]
            elif join_of(binding.var) is not None:
                self.side[binding.var] = self._next_consumer_side(binding.var, readers, order)
            else:
                self.side[binding.var] = self._majority_side(binding.value)

    def _next_consumer_side(self, var, readers, order) -> str:
        frontier, seen = list(readers.get(var, [])), set()
        while frontier:
            frontier.sort(key=lambda b: order[b.var])
            binding = frontier.pop(0)
            if binding.var in seen:
                continue
            seen.add(binding.var)
            part = part_role(binding.var)
            if part is not None and part[2] != "input":
                return part[1]
            frontier.extend(readers.get(binding.var, []))
        return "cpu"

    def _majority_side(self, value: relax.Expr) -> str:
        weight = dict.fromkeys(SIDES, 0)
        first = None
        for var in _tensor_vars(value):
            side = self.side.get(var, "cpu")
            first = first or side
            weight[side] += _elements(var)
        if weight["gpu"] == weight["cpu"]:
            return first or "cpu"
        return max(weight, key=weight.get)

    # Step 2. Rebuild main with copies where a tensor crosses.
    def run(self) -> tvm.IRModule:
        self._decide()
        others = {gv: f for gv, f in self.mod.functions_items() if gv.name_hint != "main"}
        bb = relax.BlockBuilder(tvm.IRModule(others, attrs=self.mod.attrs))
        cpu = self.vdevices["cpu"]
        params = [
            relax.Var(p.name, _with_vdevice(p.ty, self.vdevices[self.side[p]]))
            for p in self.func.params
        ]
        self.new: dict[relax.Var, relax.Var] = dict(zip(self.func.params, params, strict=True))
        self.copies: dict[tuple, relax.Var] = {}
        self.bb = bb
        self.funcs: dict[tuple[str, str], relax.GlobalVar] = {}
        result = self.func.body.body
        attrs = dict(self.func.attrs) if self.func.attrs is not None else {}
        with bb.function("main", params, attrs=attrs, pure=self.func.is_pure):
            with bb.dataflow():
                for binding in self.bindings:
                    side = self.side[binding.var]
                    value = self._rewrite(binding.value, side)
                    is_output = not isinstance(binding.var, relax.DataflowVar)
                    returns_from_gpu = (
                        binding.var.same_as(result) and side == "gpu" and not self.all_gpu
                    )
                    if is_output and not returns_from_gpu:
                        var = bb.emit_output(value, binding.var.name)
                    else:
                        var = bb.emit(value, binding.var.name)
                    if returns_from_gpu:
                        self.side[var] = "gpu"
                        var = bb.emit_output(
                            relax.op.to_vdevice(var, cpu), f"to_cpu_{binding.var.name}"
                        )
                    self.new[binding.var] = var
                output = self.new[result] if isinstance(result, relax.Var) else result
                if not isinstance(result, relax.Var):
                    out_side = "gpu" if self.all_gpu else "cpu"
                    output = bb.emit_output(self._rewrite(result, out_side))
            bb.emit_func_output(output)
        mod = bb.get()
        mod.update_global_info("vdevice", [self.vdevices["gpu"], self.vdevices["cpu"]])
        return relax.transform.DeadCodeElimination(["main"])(mod)

    def _rewrite(self, expr: relax.Expr, side: str) -> relax.Expr:
        """``expr`` with every tensor it reads made available on ``side``."""
        if isinstance(expr, relax.Var):
            return self._on(expr, side)
        if isinstance(expr, Constant):
            if side == "cpu" and self.copy_consts and isinstance(expr.ty, relax.TensorType):
                return self._copy(expr, "cpu")
            return expr
        if isinstance(expr, relax.Tuple):
            return relax.Tuple([self._rewrite(f, side) for f in expr.fields])
        if isinstance(expr, relax.Call):
            if getattr(expr.op, "name", None) == "relax.call_tir":
                return self._rewrite_call_tir(expr, side)
            args = [self._rewrite(a, side) for a in expr.args]
            return relax.Call(expr.op, args, expr.attrs, expr.ty_args)
        return expr

    def _rewrite_call_tir(self, call: relax.Call, side: str) -> relax.Expr:
        gvar, args = call.args[0], call.args[1]
        new_args = self._rewrite(args, side)
        key = (gvar.name_hint, side)
        if key not in self.funcs:
            prim = self.mod[gvar].with_attr("target", self.vdevices[side].target)
            self.funcs[key] = self.bb.add_func(prim, f"{gvar.name_hint}_{side}")
        vdev = self.vdevices[side]
        out = [_with_vdevice(t, vdev) for t in call.ty_args]
        return relax.Call(call.op, [self.funcs[key], new_args, *call.args[2:]], call.attrs, out)

    def _on(self, var: relax.Var, side: str) -> relax.Var:
        new = self.new[var]
        if self.side.get(var, "cpu") == side or not isinstance(var.ty, relax.TensorType):
            return new
        return self._copy(new, side)

    def _copy(self, expr: relax.Expr, side: str) -> relax.Var:
        """One ``to_vdevice`` of ``expr`` to ``side``: ``to_<side>_<var>`` / ``const<n>_to_<side>``.

        The names start with ``to_`` / ``const`` so they never parse as part bindings.
        """
        key = (expr, side)
        if key not in self.copies:
            if isinstance(expr, relax.Var):
                name = f"to_{side}_{expr.name}"
            else:
                name = f"const{len(self.copies)}_to_{side}"
            self.copies[key] = self.bb.emit(relax.op.to_vdevice(expr, self.vdevices[side]), name)
        return self.copies[key]


def _with_vdevice(ty, vdevice: relax.VDevice):
    if isinstance(ty, relax.TensorType):
        return relax.TensorType(ty.shape, ty.dtype, vdevice=vdevice)
    return ty


def _tensor_vars(expr: relax.Expr) -> list[relax.Var]:
    found: list[relax.Var] = []

    def visit(e: relax.Expr) -> None:
        if isinstance(e, relax.Var) and isinstance(e.ty, relax.TensorType) and e not in found:
            found.append(e)

    relax.analysis.post_order_visit(expr, visit)
    return found


def _elements(var: relax.Var) -> int:
    try:
        count = 1
        for d in var.ty.shape.values:
            count *= int(d)
        return count
    except (TypeError, AttributeError):
        return 1
