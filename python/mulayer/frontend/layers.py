"""The layer table: every layer of a canonical Relax module with its shapes and cost.

Splittable layers (conv2d, dense, pooling) get stable names ``<kind>.<index>`` (``conv2d.0``,
``dense.1``, ...), numbered per kind in the order they appear in ``main``. Plans, the cost model
and ``mulayer inspect`` all use these names; :func:`classify` is the one place that decides what
a layer is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tvm import relax
from tvm.ir.expr import Constant

from .dataflow import consumers, count_uses, producers, static_shape
from .epilogue import epilogue_steps, is_nonneg

# Kinds of layers SplitChannels can split on the output-channel axis.
SPLITTABLE_KINDS = ("conv2d", "dense", "max_pool2d", "avg_pool2d", "global_avg_pool2d")


@dataclass
class Layer:
    """One splittable layer of ``main``."""

    name: str
    kind: str
    var: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    weight_shape: tuple[int, ...] | None
    groups: int
    strides: tuple[int, ...]
    flops: int
    bytes_in: int
    bytes_out: int
    # The channel-wise ops after the layer that run in its parts (:mod:`.epilogue`), and
    # whether its input is never negative (the int8 CPU part's zero point is then 0).
    epilogue: tuple[str, ...] = ()
    input_nonneg: bool = False

    @property
    def out_channels(self) -> int:
        return self.output_shape[1]

    def to_json(self) -> dict:
        return asdict(self)


def _dtype_bytes(expr: relax.Expr) -> int:
    dtype = str(expr.ty.dtype)
    return max(1, int("".join(c for c in dtype if c.isdigit()) or 32) // 8)


def classify(call: relax.Expr) -> str | None:
    """The splittable kind of ``call`` or ``None``.

    A dense layer is ``matmul(x, W)`` with a rank-2 constant ``W`` (the frontend folds
    ``permute_dims`` of the ONNX weight); a global average pool is ``mean`` over H and W with
    ``keepdims`` on a rank-4 input.
    """
    if not isinstance(call, relax.Call):
        return None
    op_name = getattr(call.op, "name", None)
    if op_name == "relax.nn.conv2d":
        attrs = call.attrs
        if (
            attrs.data_layout == "NCHW"
            and attrs.kernel_layout == "OIHW"
            and isinstance(call.args[1], Constant)
            and static_shape(call.args[0]) is not None
        ):
            return "conv2d"
        return None
    if op_name == "relax.matmul":
        weight = call.args[1]
        x_shape = static_shape(call.args[0])
        if isinstance(weight, Constant) and len(static_shape(weight) or ()) == 2 and x_shape:
            return "dense" if len(x_shape) == 2 else None
        return None
    if op_name in ("relax.nn.max_pool2d", "relax.nn.avg_pool2d"):
        if call.attrs.layout == "NCHW" and static_shape(call.args[0]) is not None:
            return op_name.split(".")[-1]
        return None
    if op_name == "relax.nn.adaptive_avg_pool2d":
        out = call.attrs.output_size
        if call.attrs.layout == "NCHW" and (out is None or [int(v) for v in out] in ([1], [1, 1])):
            return "global_avg_pool2d"
        return None
    if op_name == "relax.mean":
        shape = static_shape(call.args[0])
        axes = [int(a) for a in call.attrs.axis] if call.attrs.axis is not None else None
        if shape and len(shape) == 4 and axes in ([2, 3], [-2, -1]) and call.attrs.keepdims:
            return "global_avg_pool2d"
    return None


def _flops(kind: str, call: relax.Call, in_shape, out_shape, w_shape) -> int:
    out_elems = 1
    for d in out_shape:
        out_elems *= d
    if kind == "conv2d":
        _, cin_per_group, kh, kw = w_shape
        return 2 * out_elems * cin_per_group * kh * kw
    if kind == "dense":
        return 2 * out_elems * w_shape[0]
    if kind in ("max_pool2d", "avg_pool2d"):
        kh, kw = (int(v) for v in call.attrs.pool_size)
        return out_elems * kh * kw
    in_elems = 1
    for d in in_shape:
        in_elems *= d
    return in_elems  # global pooling: one add per input element


def splittable_layers(func: relax.Function) -> list[Layer]:
    """All splittable layers of ``func`` in program order, named ``<kind>.<index>``."""
    return [layer for layer, _ in splittable_bindings(func)]


def splittable_bindings(func: relax.Function) -> list[tuple[Layer, relax.VarBinding]]:
    """Each splittable layer of ``func`` with its binding (var names need not be unique)."""
    layers: list[tuple[Layer, relax.VarBinding]] = []
    counters: dict[str, int] = {}
    uses, readers, values = count_uses(func), consumers(func), producers(func)
    for block in func.body.blocks:
        for binding in block.bindings:
            if not isinstance(binding, relax.VarBinding):
                continue
            kind = classify(binding.value)
            if kind is None:
                continue
            call = binding.value
            in_shape = static_shape(call.args[0])
            out_shape = static_shape(binding.var)
            if in_shape is None or out_shape is None:
                continue
            w_shape = static_shape(call.args[1]) if kind in ("conv2d", "dense") else None
            index = counters.get(kind, 0)
            counters[kind] = index + 1
            attrs = call.attrs
            strides = tuple(int(s) for s in getattr(attrs, "strides", None) or ())
            in_elems = out_elems = 1
            for d in in_shape:
                in_elems *= d
            for d in out_shape:
                out_elems *= d
            layer = Layer(
                name=f"{kind}.{index}",
                kind=kind,
                var=binding.var.name,
                input_shape=in_shape,
                output_shape=out_shape,
                weight_shape=w_shape,
                groups=int(getattr(attrs, "groups", 1) or 1) if kind == "conv2d" else 1,
                strides=strides,
                flops=_flops(kind, call, in_shape, out_shape, w_shape),
                bytes_in=in_elems * _dtype_bytes(call.args[0]),
                bytes_out=out_elems * _dtype_bytes(binding.var),
                epilogue=tuple(
                    step["op"] for step in epilogue_steps(binding.var, out_shape, uses, readers)
                ),
                input_nonneg=is_nonneg(call.args[0], values),
            )
            layers.append((layer, binding))
    return layers


def layer_names(func: relax.Function) -> list[str]:
    return [layer.name for layer in splittable_layers(func)]
