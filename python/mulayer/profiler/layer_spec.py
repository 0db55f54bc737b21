"""Layer specs: one splittable layer (op, attributes, epilogue) as JSON, and back to Relax.

A :class:`LayerSpec` is everything needed to rebuild a layer on its own: the op and its
attributes, the input shape, the weight shape and the channel-wise epilogue that SplitChannels
pulls into each part (bias add, relu, ReLU6's maximum/minimum...). Weights are not kept: the
profiler times kernels, and their speed does not depend on the weights' values, so the rebuilt
layer gets seeded random weights. Specs are plain JSON, so they travel to build workers and into
the profile rows.

Identical layers (same op, attributes and shapes) in one or many models have the same
:attr:`LayerSpec.key` and are profiled once. The epilogue is not part of the key: the first
occurrence's epilogue is timed (it is the same in nearly every occurrence, and the cost model
sees only :class:`mulayer.frontend.layers.Layer`, which does not describe it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import numpy as np
import tvm
from tvm import relax

from mulayer.frontend.dataflow import consumers, count_uses
from mulayer.frontend.epilogue import epilogue_steps
from mulayer.frontend.layers import Layer, splittable_bindings
from mulayer.passes.common import CHANNELWISE_BINARY_OPS

# How the profiler rebuilds a unary epilogue op.
_UNARY = {"relax.nn.relu": relax.op.nn.relu}


@dataclass
class LayerSpec:
    """A splittable layer, standing alone (see the module docstring)."""

    kind: str
    input_shape: list[int]
    output_shape: list[int]
    weight_shape: list[int] | None = None
    attrs: dict = field(default_factory=dict)
    epilogue: list[dict] = field(default_factory=list)
    # Whether the layer's input is never negative (after a ReLU): its uint8 zero point is 0.
    input_nonneg: bool = False

    @property
    def key(self) -> str:
        """Identity of the layer's op, attributes and shapes (not its epilogue)."""
        core = {
            "kind": self.kind,
            "input_shape": self.input_shape,
            "weight_shape": self.weight_shape,
            "attrs": self.attrs,
        }
        text = json.dumps(core, sort_keys=True, separators=(",", ":"))
        return f"{self.kind}-" + hashlib.sha1(text.encode()).hexdigest()[:12]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> LayerSpec:
        return cls(**raw)


# ------------------------------------------------------------------------------ describe
def _ints(values) -> list[int]:
    return [int(v) for v in values] if values is not None else []


def _op_attrs(kind: str, call: relax.Call) -> dict:
    attrs = call.attrs
    if kind == "conv2d":
        return {
            "strides": _ints(attrs.strides),
            "padding": _ints(attrs.padding),
            "dilation": _ints(attrs.dilation),
            "groups": int(attrs.groups),
        }
    if kind in ("max_pool2d", "avg_pool2d"):
        return {
            "pool_size": _ints(attrs.pool_size),
            "strides": _ints(attrs.strides),
            "padding": _ints(attrs.padding),
            "dilation": _ints(attrs.dilation),
            "ceil_mode": bool(attrs.ceil_mode),
            "count_include_pad": bool(attrs.count_include_pad),
        }
    if kind == "global_avg_pool2d":
        return {"form": "mean" if call.op.name == "relax.mean" else "adaptive"}
    return {}


def describe_layers(func: relax.Function) -> list[tuple[Layer, LayerSpec]]:
    """Every splittable layer of ``func`` (as :func:`mulayer.frontend.layers.splittable_layers`
    names them) with its stand-alone :class:`LayerSpec`."""
    uses, readers = count_uses(func), consumers(func)
    result = []
    for layer, binding in splittable_bindings(func):
        call = binding.value
        epilogue = epilogue_steps(binding.var, tuple(layer.output_shape), uses, readers)
        spec = LayerSpec(
            kind=layer.kind,
            input_shape=list(layer.input_shape),
            output_shape=list(layer.output_shape),
            weight_shape=list(layer.weight_shape) if layer.weight_shape else None,
            attrs=_op_attrs(layer.kind, call),
            epilogue=epilogue,
            input_nonneg=layer.input_nonneg,
        )
        result.append((layer, spec))
    return result


# ------------------------------------------------------------------------------- rebuild
def _random(shape, dtype: str, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)


def _op_call(spec: LayerSpec, x: relax.Expr, rng: np.random.Generator) -> relax.Expr:
    a = spec.attrs
    if spec.kind == "conv2d":
        weight = relax.const(_random(spec.weight_shape, "float32", rng) * 0.1)
        return relax.op.nn.conv2d(
            x,
            weight,
            strides=a["strides"],
            padding=a["padding"],
            dilation=a["dilation"],
            groups=a["groups"],
        )
    if spec.kind == "dense":
        weight = relax.const(_random(spec.weight_shape, "float32", rng) * 0.1)
        return relax.op.matmul(x, weight)
    if spec.kind in ("max_pool2d", "avg_pool2d"):
        pool = relax.op.nn.max_pool2d if spec.kind == "max_pool2d" else relax.op.nn.avg_pool2d
        return pool(
            x,
            pool_size=a["pool_size"],
            strides=a["strides"],
            padding=a["padding"],
            dilation=a["dilation"],
            ceil_mode=a["ceil_mode"],
            count_include_pad=a["count_include_pad"],
        )
    if spec.kind == "global_avg_pool2d":
        if a.get("form") == "mean":
            return relax.op.mean(x, axis=[2, 3], keepdims=True)
        return relax.op.nn.adaptive_avg_pool2d(x, output_size=[1, 1])
    raise ValueError(f"unknown layer kind {spec.kind!r}")


def _epilogue_call(step: dict, y: relax.Expr, rng: np.random.Generator) -> relax.Expr:
    name = step["op"]
    if name in _UNARY:
        return _UNARY[name](y)
    if name == "relax.clip":
        return relax.op.clip(y, step["min"], step["max"])
    if "const_value" in step:
        value = np.full(step["const_shape"], step["const_value"], step["const_dtype"])
    else:
        value = _random(step["const_shape"], step["const_dtype"], rng)
    const = relax.const(value)
    op = CHANNELWISE_BINARY_OPS[name]
    return op(const, y) if step["const_first"] else op(y, const)


def layer_module(spec: LayerSpec, seed: int = 0) -> tvm.IRModule:
    """A canonical module whose ``main`` is the layer and its epilogue, on a float32 input.

    The weights are seeded random values; the layer is named ``<kind>.0`` by
    :func:`mulayer.frontend.layers.splittable_layers`.
    """
    rng = np.random.default_rng(seed)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(spec.input_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(_op_call(spec, x, rng))
            for step in spec.epilogue:
                y = bb.emit(_epilogue_call(step, y, rng))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()
