"""ChainInt8: consecutive CPU int8 layers pass uint8 activations, not fp32.

Runs after :class:`~mulayer.passes.quantize_cpu.QuantizeCPU` on a CPU-only module (every layer on
the CPU), before legalization and fusion. QuantizeCPU gives every int8 layer its own quantize of
an fp32 input (``q(x) = astype(clip(round(x / s) + zp, 0, 255), "uint8")``) and dequantizes its
int32 result back to fp32. Once fused (FuseOps), a layer's epilogue already ends with the next
layer's quantize, so the activation between two int8 layers is stored as uint8 (the producer
requantizes: int32 accumulator -> per-channel scale -> bias -> relu/clip -> round -> + zero point
-> clip -> uint8). What breaks such chains is a tensor that something else also reads in fp32.
This pass rewrites those places so that the fp32 tensor is no longer needed:

1. **One quantize per tensor.** Quantize chains of the same tensor with the same ``(s, zp)`` are
   merged (two convs reading one tensor), and each is moved right after its source, so later
   steps can read it anywhere.
2. **Residual adds read the uint8 tensor.** ``add(x, y)``, where ``y`` comes out of an int8
   layer (so the add is fused into that layer's epilogue) and ``x`` is quantized for another
   int8 layer, becomes ``add(dq(q(x)), y)`` with ``dq(q) = (f32(q) - zp) * s``: the skip input
   is dequantized in registers inside the producer's epilogue (the fp32 add is what
   onnxruntime's QDQ graphs compute too). The skip then carries the quantization error of ``x``.
   Where both addends are int8 results and nothing quantizes either (a projection skip: the
   shortcut conv of a ResNet stage), the later-bound one, which FuseOps leaves in a kernel of
   its own, is quantized with its layer's calibrated output range (``stats``) and dequantized
   in the other's epilogue: it is stored as uint8, not fp32.
3. **Max pooling and concatenation run on uint8.** ``q(max_pool2d(x)) = max_pool2d(q(x))`` and
   ``q(concat(x1, x2)) = concat(q(x1), q(x2))`` exactly (``q`` is monotone; uint8 max pooling
   pads with 0 = ``q(-inf)``), so when a pooled/concatenated tensor is only quantized, the
   quantize moves before it, into its producers' epilogues. Steps 1 and 3 repeat until nothing
   changes: on GoogLeNet a concat (or max pool) feeds a block's convs and its max-pool branch
   with one ``(s, zp)``; once the branch's quantize has moved before its pool it merges with
   the convs' one, and the concat/pool producing the tensor commutes in turn (every Inception
   concat and max pool but the last, read by the fp32 average pool, runs on uint8).
   Where the scales differ (percentile calibration gives the branch's conv its own), a max
   pool whose input already has a uint8 tensor pools that one and requantizes in its epilogue:
   ``q_p(dq_x(max_pool2d(q_x(x))))`` for ``q_p(max_pool2d(x))``, one more rounding.
4. **Zero padding inside the conv.** ``conv2d(pad(q, value=0), padding=0)`` (QuantizeCPU pads
   with the zero point) becomes ``conv2d(q, padding=p)`` when ``zp == 0`` (inputs after a relu):
   the schedule rules then pack the padded input in the conv's own prologue.

Chains end (a dequantize, or fp32 kept) where an fp32 op reads the tensor: average pooling, a
layer the accuracy guard kept in fp32, a model output. Nothing here changes a layer's
quantization parameters; only step 2 (skip inputs) and step 3's requantizing pools change
numbers.

When ``main`` is not one dataflow block the module is returned unchanged (debug log).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Constant

from mulayer.compiler.calibration import CalibrationStats, activation_qparams

from .common import conv2d_like, op_name, part_role, substitute, vars_in

log = logging.getLogger(__name__)

# Channel-wise epilogue ops between an int8 layer's dequantize and its result.
_EPILOGUE_OPS = {
    "relax.add",
    "relax.multiply",
    "relax.subtract",
    "relax.nn.relu",
    "relax.clip",
    "relax.maximum",
    "relax.minimum",
}


@dataclass(frozen=True)
class _Quant:
    """One quantize chain ``var = q_{scale, zp}(source)``: its bindings, source last-read."""

    var: relax.Var
    source: relax.Var
    scale: float
    zero_point: int
    chain: tuple[relax.Var, ...]  # every binding of the chain, ``var`` last

    @property
    def key(self) -> tuple:
        return (self.source, np.float32(self.scale).tobytes(), self.zero_point)


def _scalar(expr) -> float | None:
    if isinstance(expr, Constant) and expr.value.numpy().size == 1:
        return float(expr.value.numpy().reshape(()))
    return None


def _prim(expr) -> float | None:
    value = getattr(expr, "value", None)
    value = getattr(value, "value", value)
    return float(value) if isinstance(value, (int, float)) else None


class _Graph:
    """``main``'s dataflow bindings as an ordered, editable list."""

    def __init__(self, bindings: list[tuple[relax.Var, relax.Expr]], params, output) -> None:
        self.bindings = bindings
        self.params = list(params)
        self.output = output
        self.refresh()

    def refresh(self) -> None:
        self.value = {var: value for var, value in self.bindings}
        self.users: dict[relax.Var, list[relax.Var]] = {}
        for var, value in self.bindings:
            for used in vars_in(value):
                self.users.setdefault(used, []).append(var)
        for used in vars_in(self.output):
            self.users.setdefault(used, []).append(None)  # the function's result

    def quant(self, var: relax.Var) -> _Quant | None:
        """The quantize chain ending in ``var`` (QuantizeCPU's form), else None."""
        value = self.value.get(var)
        if op_name(value) != "relax.astype" or str(value.attrs.dtype) != "uint8":
            return None
        chain = [var]
        expr = value.args[0]

        def step(op: str):
            nonlocal expr
            if not isinstance(expr, relax.Var) or len(self.users.get(expr, ())) != 1:
                return None
            call = self.value.get(expr)
            if op_name(call) != op:
                return None
            chain.append(expr)
            return call

        clip = step("relax.clip")
        if clip is None or _prim(clip.args[1]) != 0.0 or _prim(clip.args[2]) != 255.0:
            return None
        expr = clip.args[0]
        zero_point = 0
        if isinstance(expr, relax.Var) and op_name(self.value.get(expr)) == "relax.add":
            add = step("relax.add")
            zp = _scalar(add.args[1]) if add is not None else None
            if zp is None or zp != int(zp):
                return None
            zero_point, expr = int(zp), add.args[0]
        rnd = step("relax.round")
        if rnd is None:
            return None
        expr = rnd.args[0]
        div = step("relax.divide")
        scale = _scalar(div.args[1]) if div is not None else None
        if scale is None or not isinstance(div.args[0], relax.Var):
            return None
        return _Quant(var, div.args[0], scale, zero_point, tuple(reversed(chain)))

    def quants(self) -> list[_Quant]:
        found = [self.quant(var) for var, _ in self.bindings]
        return [q for q in found if q is not None]

    def int8_result(self, var) -> bool:
        """True when ``var`` is an int8 layer's dequantized result (after its epilogue)."""
        return self.dequantize_of(var) is not None

    def dequantize_of(self, var) -> relax.Var | None:
        """The ``astype(int32 accumulator, "float32")`` binding under ``var`` when ``var`` is an
        int8 layer's dequantized result (after its epilogue), else None."""
        seen = 0
        while isinstance(var, relax.Var) and seen < 16:
            value = self.value.get(var)
            name = op_name(value)
            if name == "relax.astype" and str(value.args[0].ty.dtype) == "int32":
                return var if str(value.attrs.dtype) == "float32" else None
            if name not in _EPILOGUE_OPS:
                return None
            tensors = [a for a in value.args if isinstance(a, relax.Var)]
            if len(tensors) != 1:
                return None
            var = tensors[0]
            seen += 1
        return None

    def int8_layer(self, var) -> str | None:
        """The layer (``conv2d.7``) whose int8 result ``var`` is, else None."""
        deq = self.dequantize_of(var)
        role = part_role(deq) if deq is not None else None
        return role[0] if role is not None else None


def _tensor_var(name: str, like: relax.Expr, dtype: str) -> relax.Var:
    return relax.DataflowVar(name, relax.TensorType(like.ty.shape, dtype))


def _quantize_bindings(source: relax.Var, q: _Quant, name: str) -> list[tuple]:
    """Bindings of ``q``'s quantize (same constants) applied to ``source``."""
    out = []
    x = source
    steps = [relax.op.divide(x, relax.const(np.float32(q.scale), "float32"))]
    out.append((_tensor_var(name, source, "float32"), steps[0]))
    out.append((_tensor_var(name, source, "float32"), relax.op.round(out[-1][0])))
    if q.zero_point:
        zp = relax.const(np.float32(q.zero_point), "float32")
        out.append((_tensor_var(name, source, "float32"), relax.op.add(out[-1][0], zp)))
    out.append((_tensor_var(name, source, "float32"), relax.op.clip(out[-1][0], 0, 255)))
    out.append((_tensor_var(name, source, "uint8"), relax.op.astype(out[-1][0], "uint8")))
    return out


def _dequantize_bindings(q: _Quant, name: str, var: relax.Var | None = None) -> list[tuple]:
    """Bindings of ``(f32(v) - zp) * s`` (``q``'s constants), the fp32 value the uint8 ``v``
    (default ``q.var``) stands for."""
    var = q.var if var is None else var
    out = [(_tensor_var(name, var, "float32"), relax.op.astype(var, "float32"))]
    if q.zero_point:
        zp = relax.const(np.float32(q.zero_point), "float32")
        out.append((_tensor_var(name, var, "float32"), relax.op.subtract(out[-1][0], zp)))
    scale = relax.const(np.float32(q.scale), "float32")
    out.append((_tensor_var(name, var, "float32"), relax.op.multiply(out[-1][0], scale)))
    return out


class _Chainer:
    def __init__(self, graph: _Graph, output_ranges: dict | None = None) -> None:
        self.g = graph
        self.output_ranges = output_ranges
        self.changes = 0

    # Step 1 -----------------------------------------------------------------------------
    def merge_quantizes(self) -> None:
        """Hoist every quantize chain right after its source; merge duplicates."""
        g = self.g
        quants = g.quants()
        by_source: dict[relax.Var, list[_Quant]] = {}
        first: dict[tuple, _Quant] = {}
        remap: dict[relax.Var, relax.Var] = {}
        in_chain: set[relax.Var] = set()
        for q in quants:
            in_chain.update(q.chain)
            if q.key in first:
                remap[q.var] = first[q.key].var
                self.changes += 1
                continue
            first[q.key] = q
            by_source.setdefault(q.source, []).append(q)
        bindings = []
        for param in g.params:
            for q in by_source.get(param, ()):
                bindings += [(v, g.value[v]) for v in q.chain]
        for var, value in g.bindings:
            if var in in_chain:
                continue
            bindings.append((var, substitute(value, remap)))
            for q in by_source.get(var, ()):
                bindings += [(v, g.value[v]) for v in q.chain]
        g.bindings = bindings
        g.output = substitute(g.output, remap)
        g.refresh()

    # Step 2 -----------------------------------------------------------------------------
    def residual_adds(self) -> None:
        g = self.g
        by_source = {q.source: q for q in g.quants()}
        bindings = []
        for var, value in g.bindings:
            if op_name(value) == "relax.add" and all(isinstance(a, relax.Var) for a in value.args):
                a, b = value.args
                same = tuple(a.ty.shape) == tuple(b.ty.shape) == tuple(var.ty.shape)
                for skip, other in ((a, b), (b, a)):
                    q = by_source.get(skip)
                    if not same or q is None or not g.int8_result(other):
                        continue
                    bindings += _dequantize_bindings(q, f"{var.name}_dq")
                    value = substitute(value, {skip: bindings[-1][0]})
                    self.changes += 1
                    break
                else:
                    if same:
                        value = self._projection_skip(var, value, bindings)
            bindings.append((var, value))
        g.bindings = bindings
        g.refresh()

    def _projection_skip(self, var: relax.Var, add: relax.Call, bindings: list) -> relax.Call:
        """``add(a, b)`` of two int8 results that nothing quantizes (a residual block whose skip
        is a projection conv): requantize the later-bound one with its layer's calibrated output
        range and add ``dq(q(.))``. FuseOps puts the add into the earlier producer's kernel, so
        the later one wrote fp32 for the add alone; it now writes uint8, as onnxruntime's QDQ
        graphs do (one more rounding, on the skip)."""
        if self.output_ranges is None:
            return add
        g = self.g
        order = {v: i for i, (v, _) in enumerate(g.bindings)}
        a, b = add.args
        layers = [g.int8_layer(a), g.int8_layer(b)]
        if None in layers or len(g.users.get(a, ())) != 1 or len(g.users.get(b, ())) != 1:
            return add
        skip, layer = (a, layers[0]) if order.get(a, -1) > order.get(b, -1) else (b, layers[1])
        bounds = self.output_ranges.get(layer)
        if bounds is None:
            return add
        scale, zero_point = activation_qparams(*bounds)
        q = _Quant(skip, skip, scale, zero_point, ())
        chain = _quantize_bindings(skip, q, f"{var.name}_qskip")
        deq = _dequantize_bindings(q, f"{var.name}_dq", chain[-1][0])
        # The quantize goes right after the skip's producer; the dequantize before the add.
        at = next(i for i, (v, _) in enumerate(bindings) if v == skip) + 1
        bindings[at:at] = chain
        bindings += deq
        self.changes += 1
        return substitute(add, {skip: deq[-1][0]})

    # Step 3 -----------------------------------------------------------------------------
    def commute(self) -> None:
        """Move a quantize before the max pool / concat whose only reader it is."""
        g = self.g
        for q in g.quants():
            source = g.value.get(q.source)
            kind = op_name(source)
            if kind not in ("relax.nn.max_pool2d", "relax.concat"):
                continue
            if g.users.get(q.source) != [q.chain[0]]:
                continue
            if kind == "relax.nn.max_pool2d":
                inputs = [source.args[0]]
            else:
                inputs = list(source.args[0].fields)
            if not all(isinstance(x, relax.Var) and x.ty.dtype == "float32" for x in inputs):
                continue
            new = []
            quantized = []
            other = self._other_quant(inputs[0], q) if kind == "relax.nn.max_pool2d" else None
            for x in inputs if other is None else ():
                chain = _quantize_bindings(x, q, f"{q.source.name}_q")
                new += chain
                quantized.append(chain[-1][0])
            if other is not None:  # pool the uint8 tensor that exists, then requantize
                quantized = [other.var]
            if kind == "relax.nn.max_pool2d":
                op = relax.Call(source.op, quantized, source.attrs, [])
            else:
                op = relax.Call(source.op, [relax.Tuple(quantized)], source.attrs, [])
            pooled = relax.DataflowVar(q.source.name, relax.TensorType(q.var.ty.shape, "uint8"))
            new.append((pooled, op))
            if other is not None:
                new += _dequantize_bindings(other, f"{q.source.name}_rq", pooled)
                new += _quantize_bindings(new[-1][0], q, f"{q.source.name}_rq")
                pooled = new[-1][0]
            bindings = []
            drop = set(q.chain) | {q.source}
            for var, value in g.bindings:
                if var in drop:
                    if var == q.source:
                        bindings += new
                    continue
                bindings.append((var, substitute(value, {q.var: pooled})))
            g.bindings = bindings
            g.output = substitute(g.output, {q.var: pooled})
            g.refresh()
            self.changes += 1
            return self.commute()  # the graph changed: look again
        return None

    def _other_quant(self, x: relax.Var, q: _Quant) -> _Quant | None:
        """A quantize of ``x`` with constants other than ``q``'s (``x`` is stored as uint8),
        bound before ``q``'s source (so the pool that replaces it can read it)."""
        order = {var: i for i, (var, _) in enumerate(self.g.bindings)}
        for other in self.g.quants():
            if (
                other.source == x
                and other.key != q.key
                and order[other.var] < order.get(q.source, -1)
            ):
                return other
        return None

    def commute_to_fixpoint(self) -> None:
        """Commute and merge until nothing changes.

        A commute can make a tensor's quantizes identical (an Inception block's max-pool branch,
        quantized before its pool, reads the concatenation with the same ``(s, zp)`` as the
        block's convs); once merged, that tensor has one reader and its own producer (a concat,
        a max pool between stages) commutes in turn.
        """
        while True:
            before = self.changes
            self.commute()
            self.merge_quantizes()
            if self.changes == before:
                return

    # Step 4 -----------------------------------------------------------------------------
    def fold_zero_padding(self) -> None:
        g = self.g
        bindings = []
        for var, value in g.bindings:
            if op_name(value) == "relax.nn.conv2d" and isinstance(value.args[0], relax.Var):
                pad = g.value.get(value.args[0])
                attrs = value.attrs
                if (
                    op_name(pad) == "relax.nn.pad"
                    and float(pad.attrs.pad_value) == 0.0
                    and str(pad.attrs.pad_mode) == "constant"
                    and not any(int(p) for p in attrs.padding)
                ):
                    widths = [int(w) for w in pad.attrs.pad_width]
                    if len(widths) == 8 and not any(widths[:4]):
                        top, bottom, left, right = widths[4:]
                        value = conv2d_like(
                            value, pad.args[0], value.args[1], padding=[top, left, bottom, right]
                        )
                        self.changes += 1
            bindings.append((var, value))
        g.bindings = bindings
        g.refresh()


def _rebuild(func: relax.Function, graph: _Graph) -> relax.Function:
    bb = relax.BlockBuilder()
    remap: dict[relax.Var, relax.Var] = {}
    params = list(func.params)
    with bb.function("main", params, pure=func.is_pure, private=True):
        with bb.dataflow():
            live = _live(graph)
            for var, value in graph.bindings:
                if var not in live:
                    continue
                new = substitute(value, remap)
                if isinstance(var, relax.DataflowVar):
                    remap[var] = bb.emit(new, var.name)
                else:
                    remap[var] = bb.emit_output(new, var.name)
            out = substitute(graph.output, remap)
            if not isinstance(out, relax.Var) or isinstance(out, relax.DataflowVar):
                out = bb.emit_output(out)
        bb.emit_func_output(out)
    body = bb.get()["main"].body
    return relax.Function(func.params, body, body.ty, func.is_pure, func.attrs)


def _live(graph: _Graph) -> set[relax.Var]:
    live: set[relax.Var] = set(vars_in(graph.output))
    for var, value in reversed(graph.bindings):
        if var in live:
            live.update(vars_in(value))
    return live


def chain_function(
    func: relax.Function, int8_skips: bool = True, stats: CalibrationStats | None = None
) -> tuple[relax.Function, int]:
    """``func`` with int8 chains (see the module doc) and the number of rewrites; ``stats``
    (the calibration) lets projection skips requantize (step 2)."""
    body = func.body
    if (
        not isinstance(body, relax.SeqExpr)
        or len(body.blocks) != 1
        or not isinstance(body.blocks[0], relax.DataflowBlock)
    ):
        log.debug("ChainInt8: main is not one dataflow block; unchanged")
        return func, 0
    bindings = []
    for binding in body.blocks[0].bindings:
        if not isinstance(binding, relax.VarBinding):
            log.debug("ChainInt8: a match-cast binding; unchanged")
            return func, 0
        bindings.append((binding.var, binding.value))
    graph = _Graph(bindings, func.params, body.body)
    ranges = None
    if stats is not None:
        ranges = {name: (e.output_min, e.output_max) for name, e in stats.layers.items()}
    chainer = _Chainer(graph, ranges)
    chainer.merge_quantizes()
    if int8_skips:
        chainer.residual_adds()
        chainer.merge_quantizes()
    chainer.commute_to_fixpoint()
    chainer.fold_zero_padding()
    if not chainer.changes:
        return func, 0
    return _rebuild(func, graph), chainer.changes


@tvm.transform.module_pass(opt_level=0, name="ChainInt8")
class ChainInt8:
    """Chain consecutive CPU int8 layers in uint8 (see the module doc); ``rewrites`` counts the
    rewrites of the last run. ``stats`` (the calibration QuantizeCPU used) gives projection
    skips their output range; without it they stay fp32."""

    def __init__(self, int8_skips: bool = True, stats: CalibrationStats | None = None) -> None:
        self.int8_skips = int8_skips
        self.stats = stats
        self.rewrites = 0

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
            return mod
        func, self.rewrites = chain_function(mod["main"], self.int8_skips, self.stats)
        if not self.rewrites:
            return mod
        mod = mod.clone()
        mod["main"] = func
        return mod
