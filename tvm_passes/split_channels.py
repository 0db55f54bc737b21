"""SplitChannels: split each splittable layer's output channels into a GPU part and a CPU part.

Pipeline position: first mulayer pass, on the canonical module of
:mod:`mulayer.frontend.onnx_import`; the quantizer (CPU parts),
:class:`~mulayer.passes.cast_gpu.CastGPU` (GPU parts) and
:class:`~mulayer.passes.place_devices.PlaceDevices` run after it.

For every layer of :func:`mulayer.frontend.layers.splittable_layers` the plan gives ``g`` output
channels to the GPU (``Plan.gpu_size``, already aligned):

- ``0 < g < C``: the layer becomes ``<layer>_gpu`` on channels ``[0, g)`` and ``<layer>_cpu``
  on ``[g, C)``, each with its own slice of the constant weights (sliced at compile time), joined
  by ``<layer>_join = concat([gpu, cpu], axis=1)``. Conv2d and dense need the whole input;
  grouped/depthwise convs and pools need only their channels' slice of the input
  (``<layer>_<side>_in``), and grouped convs move ``g`` to the nearest group boundary.
- ``g == 0`` or ``g == C``: nothing is sliced or joined; the layer is only renamed
  ``<layer>_cpu`` / ``<layer>_gpu``.
- Channel-wise epilogues that read the op's result and nothing else reads (add, subtract,
  multiply, divide, maximum, minimum with a per-channel or scalar constant; relu; clip; and the
  ``maximum``/``minimum`` PrimFuncs the ONNX frontend emits for Clip) are pulled into each part
  (``<layer>_<side>_e<k>``), constants sliced, so they run before the join. The Clip PrimFuncs
  become ``R.maximum`` / ``R.minimum``.
- The height axis is not supported here: such layers are left unchanged (debug log).

The GPU part is emitted first so the GPU launch precedes the CPU work of the same layer.
"""

from __future__ import annotations

import logging
import re

import tvm
from tvm import relax
from tvm.ir.expr import Constant
from tvm.relax.expr_functor import PyExprMutator, mutator

from mulayer.frontend.dataflow import consumers, count_uses
from mulayer.frontend.epilogue import const_operand
from mulayer.frontend.layers import Layer, classify, splittable_layers, static_shape
from mulayer.plan import Plan

from .common import (
    CHANNELWISE_BINARY_OPS,
    const_slice,
    conv2d_like,
    input_slice_name,
    join_name,
    op_name,
    part_name,
)

log = logging.getLogger(__name__)

_BINARY = CHANNELWISE_BINARY_OPS
_CLIP_PRIMFUNC = re.compile(r"^(maximum|minimum)(_?\d+)?$")


@tvm.transform.module_pass(opt_level=0, name="SplitChannels")
class SplitChannels:
    """Split every splittable layer of ``main`` between the GPU and the CPU as ``plan`` says.

    Parameters
    ----------
    plan : mulayer.Plan
        Per-layer GPU share; layers it does not list follow ``plan.default_ratio``.
    """

    def __init__(self, plan: Plan):
        self.plan = plan

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        func = mod["main"]
        splitter = _Splitter(mod, self.plan, func)
        new_func = splitter.visit_expr(func)
        mod = splitter.builder_.get().clone()  # never mutate the caller's module
        mod["main"] = new_func
        # Drops the absorbed Clip PrimFuncs and anything else left unused.
        return relax.transform.DeadCodeElimination(["main"])(mod)


# ------------------------------------------------------------------------------- epilogues
def _epilogue_builder(mod: tvm.IRModule, call: relax.Expr, src: relax.Var, rank: int):
    """If ``call`` is a channel-wise epilogue of ``src``, a function ``(x, lo, hi) -> Expr``.

    The function rebuilds the epilogue on ``x`` (channels ``[lo, hi)`` of ``src``).
    """
    name = op_name(call)
    shape = static_shape(src)
    if name is None or shape is None:
        return None
    if name in ("relax.nn.relu", "relax.clip") and call.args[0].same_as(src):
        return lambda x, lo, hi: relax.Call(call.op, [x, *call.args[1:]], call.attrs)
    if name in _BINARY:
        operand = const_operand(call, src)
        if operand is None:
            return None
        const, const_first = operand
        axis = _channel_axis_of_const(const, shape, rank)
        if axis is False or static_shape(call) != shape:
            return None
        op = _BINARY[name]

        def build(x, lo, hi):
            c = const if axis is None else const_slice(const, axis, lo, hi)
            return op(c, x) if const_first else op(x, c)

        return build
    if name == "relax.call_tir":
        gvar, args = call.args[0], call.args[1]
        if not isinstance(gvar, relax.GlobalVar) or not _CLIP_PRIMFUNC.match(gvar.name_hint):
            return None
        if not isinstance(args, relax.Tuple) or len(args) != 2 or not args[0].same_as(src):
            return None
        bound = args[1]
        if not isinstance(bound, Constant) or bound.value.numpy().size != 1:
            return None
        if static_shape(call) != shape or not _is_elementwise_minmax(mod[gvar]):
            return None
        op = relax.op.maximum if gvar.name_hint.startswith("maximum") else relax.op.minimum
        return lambda x, lo, hi: op(x, bound)
    return None


def _channel_axis_of_const(const: Constant, out_shape, rank: int):
    """Axis of ``const`` to slice for a per-channel operand; ``None``: no slicing; ``False``: no.

    The channel axis of the layer's output is 1 (NCHW and [N, C] alike).
    """
    cshape = static_shape(const)
    if cshape is None or len(cshape) > rank:
        return False
    padded = (1,) * (rank - len(cshape)) + tuple(cshape)
    for i, d in enumerate(padded):
        if i != 1 and d != 1:
            return False
    if padded[1] == 1:
        return None
    if padded[1] != out_shape[1]:
        return False
    return 1 - (rank - len(cshape))


def _is_elementwise_minmax(func) -> bool:
    """The ONNX frontend's Clip PrimFuncs: one block, ``T.max``/``T.min`` of input and a scalar."""
    if not isinstance(func, tvm.tirx.PrimFunc):
        return False
    text = func.script()
    blocks = [line for line in text.splitlines() if line.strip().startswith("with T.sblock(")]
    return ("T.max(" in text or "T.min(" in text) and len(blocks) == 1


# ----------------------------------------------------------------------------------- mutator
@mutator
class _Splitter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, plan: Plan, func: relax.Function):
        super().__init__(mod)
        self.mod_ = mod
        self.plan = plan
        self.heads: dict[relax.Var, tuple[Layer, list[relax.VarBinding], list]] = {}
        self.absorbed: set[relax.Var] = set()
        self._analyse(func)

    # Step 1. Find the layers (same order and filter as splittable_layers) and their epilogues.
    def _analyse(self, func: relax.Function) -> None:
        layers = iter(splittable_layers(func))
        uses = count_uses(func)
        readers = consumers(func)
        for block in func.body.blocks:
            for binding in block.bindings:
                if not isinstance(binding, relax.VarBinding) or classify(binding.value) is None:
                    continue
                if static_shape(binding.value.args[0]) is None or static_shape(binding.var) is None:
                    continue
                layer = next(layers)
                assert layer.var == binding.var.name, (layer, binding.var)
                if not isinstance(block, relax.DataflowBlock):
                    log.debug("%s is outside a dataflow block; left unchanged", layer.name)
                    continue
                rank = len(layer.output_shape)
                chain, builders, cur = [], [], binding.var
                while uses.get(cur, 0) == 1 and len(readers.get(cur, [])) == 1:
                    nxt = readers[cur][0]
                    build = _epilogue_builder(self.mod_, nxt.value, cur, rank)
                    if build is None:
                        break
                    chain.append(nxt)
                    builders.append(build)
                    cur = nxt.var
                self.heads[binding.var] = (layer, chain, builders)
                self.absorbed.update(b.var for b in chain)

    # Step 2. Rewrite each head; drop its absorbed epilogues (already emitted with the parts).
    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var in self.absorbed:
            return
        entry = self.heads.get(binding.var)
        if entry is None:
            super().visit_var_binding_(binding)
            return
        layer, chain, builders = entry
        if self.plan.axis(layer.name) != "channel":
            log.debug(
                "%s: axis %r is not supported; left unchanged",
                layer.name,
                self.plan.axis(layer.name),
            )
            self._re_emit([binding, *chain])
            return
        channels = layer.out_channels
        gpu = self.plan.gpu_size(layer.name, channels)
        gpu = _snap_to_groups(layer, gpu)
        final = chain[-1].var if chain else binding.var
        call = binding.value
        if gpu in (0, channels):
            side = "gpu" if gpu == channels else "cpu"
            result = self._emit_part(layer, call, builders, side, 0, channels, final)
        else:
            parts = [
                self._emit_part(layer, call, builders, "gpu", 0, gpu, None),
                self._emit_part(layer, call, builders, "cpu", gpu, channels, None),
            ]
            result = self._emit(relax.op.concat(parts, axis=1), join_name(layer.name), final)
        self.set_var_remap(final, result)

    def _re_emit(self, bindings: list[relax.VarBinding]) -> None:
        for b in bindings:
            super().visit_var_binding_(b)

    def _emit(self, expr: relax.Expr, name: str, like: relax.Var | None) -> relax.Var:
        """Emit ``expr`` as ``name``; as a function output if it replaces an output var."""
        if like is not None and not isinstance(like, relax.DataflowVar):
            return self.builder_.emit_output(expr, name)
        return self.builder_.emit(expr, name)

    def _emit_part(self, layer, call, builders, side, lo, hi, final) -> relax.Var:
        whole = lo == 0 and hi == layer.out_channels
        expr = self._part_op(layer, call, side, lo, hi, whole)
        last = len(builders) - 1
        var = self._emit(expr, part_name(layer.name, side), final if last < 0 else None)
        for k, build in enumerate(builders):
            var = self._emit(
                build(var, lo, hi), part_name(layer.name, side, k), final if k == last else None
            )
        return var

    def _part_op(self, layer: Layer, call: relax.Call, side, lo, hi, whole) -> relax.Expr:
        data = self.visit_expr(call.args[0])
        if whole:
            return relax.Call(call.op, [data, *call.args[1:]], call.attrs, call.ty_args)
        if layer.kind == "dense":
            return relax.Call(call.op, [data, const_slice(call.args[1], 1, lo, hi)], call.attrs)
        if layer.kind == "conv2d":
            weight = const_slice(call.args[1], 0, lo, hi)
            if layer.groups == 1:
                return relax.Call(call.op, [data, weight], call.attrs)
            per_out = layer.out_channels // layer.groups
            per_in = layer.input_shape[1] // layer.groups
            g_lo, g_hi = lo // per_out, hi // per_out
            data = self._slice_input(data, layer, side, g_lo * per_in, g_hi * per_in)
            return conv2d_like(call, data, weight, groups=g_hi - g_lo)
        # Pooling: each output channel reads only its own input channel.
        data = self._slice_input(data, layer, side, lo, hi)
        return relax.Call(call.op, [data, *call.args[1:]], call.attrs, call.ty_args)

    def _slice_input(self, data, layer: Layer, side: str, lo: int, hi: int) -> relax.Var:
        sliced = relax.op.strided_slice(data, axes=[1], begin=[lo], end=[hi])
        return self.builder_.emit(sliced, input_slice_name(layer.name, side))


def _snap_to_groups(layer: Layer, gpu: int) -> int:
    """Move a split point of a grouped conv to the nearest group boundary."""
    if layer.kind != "conv2d" or layer.groups == 1:
        return gpu
    per_out = layer.out_channels // layer.groups
    snapped = int(round(gpu / per_out)) * per_out
    if snapped != gpu:
        log.debug("%s: split point %d moved to group boundary %d", layer.name, gpu, snapped)
    return max(0, min(layer.out_channels, snapped))
