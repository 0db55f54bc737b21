"""What follows a splittable layer channel by channel, and whether its input can be negative.

SplitChannels pulls a layer's channel-wise epilogue (bias add, per-channel multiply, relu,
ReLU6's maximum and minimum, clip) into each part, so it is part of what a processor runs; an
int8 CPU part quantizes its input with a zero point of 0 only when that input is never negative
(after a ReLU). The layer table (:mod:`.layers`) records both for the cost model; the profiler
(:mod:`mulayer.profiler.layer_spec`) records the epilogue step by step to rebuild the layer.
"""

from __future__ import annotations

from tvm import relax
from tvm.ir.expr import Constant

from .dataflow import static_shape

# Binary ops that are channel-wise when one operand is a per-channel or scalar constant.
CHANNELWISE_BINARY = (
    "relax.add",
    "relax.subtract",
    "relax.multiply",
    "relax.divide",
    "relax.maximum",
    "relax.minimum",
)
UNARY = ("relax.nn.relu",)
# Epilogue ops that clamp from above (ReLU6 and friends): the extra comparison per element.
CLAMPS = ("relax.minimum", "relax.clip")
# Producers whose output is never negative, and ops that keep that property.
_NONNEG_OPS = ("relax.nn.relu",)
_NONNEG_PRESERVING = (
    "relax.nn.max_pool2d",
    "relax.nn.avg_pool2d",
    "relax.nn.adaptive_avg_pool2d",
    "relax.mean",
    "relax.concat",
    "relax.reshape",
    "relax.flatten",
    "relax.permute_dims",
    "relax.strided_slice",
)


def const_operand(call: relax.Call, src: relax.Var) -> tuple[Constant, bool] | None:
    """``(constant, whether it comes first)`` of a binary ``call`` of ``src`` and a constant."""
    lhs, rhs = call.args
    if lhs.same_as(src) and isinstance(rhs, Constant):
        return rhs, False
    if rhs.same_as(src) and isinstance(lhs, Constant):
        return lhs, True
    return None


def epilogue_step(call: relax.Expr, src: relax.Var, out_shape: tuple[int, ...]) -> dict | None:
    """The JSON form of ``call`` if it is a channel-wise epilogue op applied to ``src``."""
    if not isinstance(call, relax.Call):
        return None
    name = getattr(call.op, "name", None)
    if name in UNARY and call.args[0].same_as(src):
        return {"op": name}
    if name == "relax.clip" and call.args[0].same_as(src):
        return {"op": name, "min": float(call.args[1].value), "max": float(call.args[2].value)}
    if name not in CHANNELWISE_BINARY or static_shape(call) != out_shape:
        return None
    operand = const_operand(call, src)
    if operand is None:
        return None
    const, const_first = operand
    shape = list(const.value.shape)
    aligned = [1] * (len(out_shape) - len(shape)) + shape
    if len(aligned) != len(out_shape) or any(
        d != 1 and not (i == 1 and d == out_shape[1]) for i, d in enumerate(aligned)
    ):
        return None
    step = {
        "op": name,
        "const_shape": shape,
        "const_dtype": str(const.value.dtype),
        "const_first": const_first,
    }
    if const.value.numpy().size == 1:  # a scalar bound (ReLU6) is kept as it is
        step["const_value"] = float(const.value.numpy().reshape(-1)[0])
    return step


def epilogue_steps(
    var: relax.Var,
    out_shape: tuple[int, ...],
    uses: dict[relax.Var, int],
    readers: dict[relax.Var, list[relax.VarBinding]],
) -> list[dict]:
    """The epilogue after the layer bound to ``var``: each step read only by the next one."""
    steps, cur = [], var
    while uses.get(cur, 0) == 1 and len(readers.get(cur, [])) == 1:
        nxt = readers[cur][0]
        step = epilogue_step(nxt.value, cur, out_shape)
        if step is None:
            break
        steps.append(step)
        cur = nxt.var
    return steps


def is_nonneg(expr: relax.Expr, producers: dict, depth: int = 0) -> bool:
    """Whether ``expr`` is never negative (a ReLU output, seen through pools and concats)."""
    if depth > 8:
        return False
    value = producers.get(expr) if isinstance(expr, relax.Var) else expr
    if isinstance(value, relax.Tuple):
        return all(is_nonneg(f, producers, depth + 1) for f in value.fields)
    if not isinstance(value, relax.Call):
        return False
    name = getattr(value.op, "name", None)
    if name in _NONNEG_OPS:
        return True
    if name == "relax.clip":
        return float(value.args[1].value) >= 0.0
    if name == "relax.minimum":  # ReLU6 = minimum(maximum(x, 0), 6)
        return is_nonneg(value.args[0], producers, depth + 1)
    if name == "relax.maximum":
        other = value.args[1]
        return isinstance(other, Constant) and float(other.value.numpy().min()) >= 0.0
    if name in _NONNEG_PRESERVING:
        return is_nonneg(value.args[0], producers, depth + 1)
    return False
