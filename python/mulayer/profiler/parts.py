"""Parts: one side of a split layer as a stand-alone Relax function, built by the real passes.

A *part* is what one processor computes of a split layer: ``channels`` of the layer's output
channels, in that processor's precision, with the layer's epilogue. :func:`part_function` makes
it the way a cooperative build does (:func:`mulayer.compiler.driver.build_cooperative`): the layer
of a :class:`~mulayer.profiler.layer_spec.LayerSpec` is split by
:class:`~mulayer.passes.split_channels.SplitChannels` (the other side gets the remaining channels),
the CPU side is quantized by :class:`~mulayer.passes.quantize_cpu.QuantizeCPU` (uint8 x int8,
calibration stats synthesized from the spec; pooling stays float32, as in a real build) or the GPU
side cast by :class:`~mulayer.passes.cast_gpu.CastGPU`, and the other side is cut away. The part's
input is float32 on its own processor (the cross-device copy is a separate transfer cost).
Constant casts fold first (a build folds a whole-layer fp16 part's weight cast too); then the
weights become parameters in the part's precision (``lift_weights``) so a library of many parts
stays small; cooperative builds pack CPU weights on every call anyway (``schedules`` module doc).
The builder fuses each part as a build does (:mod:`.builder`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Constant

from mulayer.compiler.calibration import CalibrationStats, LayerStats, activation_qparams
from mulayer.passes.cast_gpu import CastGPU
from mulayer.passes.common import join_name
from mulayer.passes.quantize_cpu import QuantizeCPU
from mulayer.passes.split_channels import SplitChannels
from mulayer.plan import LayerDecision, Plan

from .layer_spec import LayerSpec, layer_module

PROCESSORS = ("cpu", "gpu")
# The input ranges assumed for the CPU part's uint8 quantization (only the zero point matters
# for speed: 0 after a ReLU, mid-range otherwise).
_NONNEG_RANGE = (0.0, 6.0)
_SIGNED_RANGE = (-3.0, 3.0)
# Constants with more elements than this become parameters.
_LIFT_MIN_ELEMENTS = 256


@dataclass
class PartInfo:
    """What the timer needs to call a built part: its parameters' shapes and dtypes."""

    name: str
    params: list[tuple[list[int], str]]
    precision: str

    def to_json(self) -> dict:
        return {"name": self.name, "params": self.params, "precision": self.precision}

    @classmethod
    def from_json(cls, raw: dict) -> PartInfo:
        return cls(raw["name"], [(list(s), d) for s, d in raw["params"]], raw["precision"])


def snap_channels(spec: LayerSpec, channels: int) -> int:
    """``channels`` moved to a group boundary of a grouped conv (as SplitChannels does)."""
    groups = int(spec.attrs.get("groups", 1)) if spec.kind == "conv2d" else 1
    total = spec.output_shape[1]
    if groups == 1:
        return channels
    per_out = total // groups
    return max(0, min(total, int(round(channels / per_out)) * per_out))


def synthetic_stats(spec: LayerSpec, layer: str | None = None) -> CalibrationStats:
    """Calibration stats that quantize every CPU channel (no accuracy guard applies)."""
    lo, hi = _NONNEG_RANGE if spec.input_nonneg else _SIGNED_RANGE
    scale, zero_point = activation_qparams(lo, hi)
    total = spec.output_shape[1]
    stats = LayerStats(
        name=layer or f"{spec.kind}.0",
        kind=spec.kind,
        input_min=lo,
        input_max=hi,
        input_scale=scale,
        input_zero_point=zero_point,
        output_min=-1.0,
        output_max=1.0,
        signal=[1.0] * total if spec.kind in ("conv2d", "dense") else None,
        noise=[0.0] * total if spec.kind in ("conv2d", "dense") else None,
    )
    return CalibrationStats(layers={stats.name: stats})


def _plan(layer: str, processor: str, channels: int, total: int) -> Plan:
    if channels >= total:
        decision = LayerDecision(placement=processor)
    else:
        gpu = channels if processor == "gpu" else total - channels
        decision = LayerDecision(placement="split", gpu_size=gpu)
    return Plan(default_ratio=1.0, align=1, layers={layer: decision})


def _part_result(func: relax.Function, layer: str, processor: str) -> relax.Var:
    """The variable holding the part's final value (the join's operand for this side)."""
    join = join_name(layer)
    for block in func.body.blocks:
        for binding in block.bindings:
            if binding.var.name == join:
                fields = binding.value.args[0].fields
                return fields[PROCESSORS.index(processor) ^ 1]  # join = concat([gpu, cpu])
    raise ValueError(f"no {join} in the split function")


def _cut(func: relax.Function, result: relax.Expr) -> relax.Function:
    """``func`` returning ``result`` instead, everything else it no longer needs removed."""
    blocks = []
    for block in func.body.blocks:
        bindings = []
        for binding in block.bindings:
            var = binding.var
            if binding.var.same_as(result) and isinstance(var, relax.DataflowVar):
                var = relax.Var(var.name, var.ty)
                binding = relax.VarBinding(var, binding.value)
                result = var
            bindings.append(binding)
        blocks.append(
            relax.DataflowBlock(bindings)
            if isinstance(block, relax.DataflowBlock)
            else relax.BindingBlock(bindings)
        )
    body = relax.SeqExpr(blocks, result)
    new = relax.Function(func.params, body, result.ty, func.is_pure, func.attrs)
    return relax.analysis.remove_all_unused(new)


def _lift_weights(func: relax.Function) -> relax.Function:
    """Turn every large constant of ``func`` into a trailing parameter."""
    consts: list[Constant] = []

    def visit(expr):
        if not isinstance(expr, Constant) or not isinstance(expr.value, tvm.runtime.Tensor):
            return
        large = int(np.prod(expr.value.shape)) > _LIFT_MIN_ELEMENTS
        if large and not any(c.same_as(expr) for c in consts):
            consts.append(expr)

    relax.analysis.post_order_visit(func.body, visit)
    if not consts:
        return func
    params = [relax.Var(f"w{i}", c.ty) for i, c in enumerate(consts)]
    binds = dict(zip(consts, params, strict=True))

    @relax.expr_functor.mutator
    class _Lift(relax.PyExprMutator):
        def visit_generic_const_(self, const):  # TVM 0.27's name for constants
            for c, p in binds.items():
                if c.same_as(const):
                    return p
            return const

    body = _Lift().visit_expr(func.body)
    return relax.Function([*func.params, *params], body, func.ret_ty, func.is_pure, func.attrs)


def part_function(
    spec: LayerSpec, processor: str, channels: int, seed: int = 0, lift_weights: bool = True
) -> tuple[relax.Function, str]:
    """The Relax function of one part and the precision it computes in.

    Parameters
    ----------
    spec : LayerSpec
        The layer.
    processor : "cpu" or "gpu"
        The side: the CPU part is quantized to int8 (conv2d, dense), the GPU part cast to fp16.
    channels : int
        Output channels of the part, ``1 .. C`` (moved to a group boundary for grouped convs).
    """
    if processor not in PROCESSORS:
        raise ValueError(f"processor {processor!r}: use one of {', '.join(PROCESSORS)}")
    total = spec.output_shape[1]
    channels = snap_channels(spec, channels)
    if not 0 < channels <= total:
        raise ValueError(f"channels {channels} out of range 1..{total}")
    layer = f"{spec.kind}.0"
    mod = layer_module(spec, seed)
    # Step 1. Split the layer as a cooperative build would.
    mod = SplitChannels(_plan(layer, processor, channels, total))(mod)
    # Step 2. The side's precision.
    precision = "float32"
    if processor == "cpu":
        quantize = QuantizeCPU(synthetic_stats(spec, layer), guard_db=float("-inf"))
        mod = quantize(mod)
        if quantize.report.get(layer, {}).get("precision") == "int8":
            precision = "int8"
    else:
        # NCHW whatever MULAYER_GPU_LAYOUT says: a part alone would carry the layout
        # changes of a whole channels-last chain (input, output and weight transposes).
        mod = CastGPU(layout="NCHW")(mod)
        precision = "float16"
    # Step 3. Constant casts fold (a whole-layer GPU part casts its weights to fp16 at build
    # time, not on every call), as a build folds them before fusing.
    mod = relax.transform.FoldConstant()(mod)
    # Step 4. Keep only this side.
    func = mod["main"]
    if channels < total:
        func = _cut(func, _part_result(func, layer, processor))
    if lift_weights:
        func = _lift_weights(func)
    return func.without_attr("global_symbol"), precision


def param_specs(func: relax.Function) -> list[tuple[list[int], str]]:
    return [([int(d) for d in p.ty.shape.values], str(p.ty.dtype)) for p in func.params]


def random_args(params, device, rng: np.random.Generator | None = None):
    """Random tensors on ``device`` for a part's parameters."""
    rng = rng or np.random.default_rng(0)
    out = []
    for shape, dtype in params:
        if dtype.startswith(("int", "uint")):
            array = rng.integers(-8 if dtype.startswith("int") else 0, 8, size=shape).astype(dtype)
        else:
            array = rng.uniform(-1.0, 1.0, size=shape).astype(dtype)
        out.append(tvm.runtime.tensor(array, device))
    return out
