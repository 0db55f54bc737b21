"""Helpers shared by mulayer's Relax passes: the part-naming contract and small IR utilities.

The contract
------------
:class:`~mulayer.passes.split_channels.SplitChannels` names every binding that belongs to one
side of a layer:

- ``<layer>_<side>``: the layer's op on that side (``conv2d_3_gpu``, ``dense_0_cpu``);
- ``<layer>_<side>_e<k>``: its k-th channel-wise epilogue (bias add, per-channel multiply,
  relu, clip), pulled into the part so it runs before the join;
- ``<layer>_<side>_in``: a channel slice of the layer's input (grouped conv, pooling); it is
  *not* a part binding (it runs where its input lives, see PlaceDevices);
- ``<layer>_<side>_<tag>`` (any other tag): a helper binding a later pass adds to the part
  (CastGPU's ``_cast_in``/``_cast_out``, the quantizer's ``_qin``/``_qacc``/``_qdeq``...); not
  a part binding for :func:`part_of`, but :func:`part_role` reports it (role ``"aux"``) and
  PlaceDevices runs it on the part's side;
- ``<layer>_join``: the ``concat`` of the two parts on axis 1.

``<layer>`` is the layer name of :func:`mulayer.frontend.layers.splittable_layers` with ``.``
replaced by ``_``; ``<side>`` is ``gpu`` or ``cpu``. Later passes (quantizer, CastGPU, PlaceDevices)
find the parts with :func:`part_of` / :func:`is_part_op`; Relax's CanonicalizeBindings and
DeadCodeElimination keep these names (tested).
"""

from __future__ import annotations

import re

import numpy as np
from tvm import relax
from tvm.ir.expr import Constant

from mulayer.frontend.epilogue import CHANNELWISE_BINARY
from mulayer.frontend.layers import SPLITTABLE_KINDS

SIDES = ("gpu", "cpu")

# Binary ops that are channel-wise when one operand is a per-channel or scalar constant
# (SplitChannels pulls them into each part; the profiler replays them as epilogues).
CHANNELWISE_BINARY_OPS = {
    name: getattr(relax.op, name.split(".")[1]) for name in CHANNELWISE_BINARY
}

# Layer prefixes are the splittable kinds of mulayer.frontend.layers, so no other name can parse
# as one.
_KINDS = "|".join(sorted(SPLITTABLE_KINDS, key=len, reverse=True))
_PART = re.compile(rf"^(?P<layer>(?:{_KINDS})_\d+)_(?P<side>gpu|cpu)(?:_(?P<tag>[a-z0-9_]+))?$")
_JOIN = re.compile(rf"^(?P<layer>(?:{_KINDS})_\d+)_join$")
_EPILOGUE = re.compile(r"^e\d+$")


def var_prefix(layer: str) -> str:
    """``conv2d.3`` -> ``conv2d_3``: the prefix of every binding of that layer."""
    return layer.replace(".", "_")


def layer_from_prefix(prefix: str) -> str:
    """``global_avg_pool2d_0`` -> ``global_avg_pool2d.0`` (inverse of :func:`var_prefix`)."""
    kind, _, index = prefix.rpartition("_")
    return f"{kind}.{index}"


def part_name(layer: str, side: str, epilogue: int | None = None) -> str:
    """Name of a part's op (``epilogue=None``) or of its ``epilogue``-th epilogue."""
    base = f"{var_prefix(layer)}_{side}"
    return base if epilogue is None else f"{base}_e{epilogue}"


def input_slice_name(layer: str, side: str) -> str:
    return f"{var_prefix(layer)}_{side}_in"


def join_name(layer: str) -> str:
    return f"{var_prefix(layer)}_join"


def _name(var: relax.Var | str) -> str:
    return var if isinstance(var, str) else var.name


def part_role(var: relax.Var | str) -> tuple[str, str, str] | None:
    """``(layer, side, role)`` of a binding named after a part, else ``None``.

    ``role`` is ``"op"`` (``<layer>_<side>``), ``"epilogue"`` (``..._e<k>``), ``"input"``
    (``..._in``, a channel slice of the layer's input) or ``"aux"`` (any other suffix: helper
    bindings later passes add to a part, e.g. ``_cast_in`` of CastGPU, ``_qin``/``_qacc`` of the
    quantizer). PlaceDevices runs op, epilogue and aux bindings on the part's side.
    """
    match = _PART.match(_name(var))
    if match is None:
        return None
    tag = match["tag"]
    if tag is None:
        role = "op"
    elif _EPILOGUE.match(tag):
        role = "epilogue"
    else:
        role = "input" if tag == "in" else "aux"
    return layer_from_prefix(match["layer"]), match["side"], role


def part_of(var: relax.Var | str) -> tuple[str, str] | None:
    """``(layer, side)`` for a part binding (the op or one of its epilogues), else ``None``.

    >>> part_of("conv2d_3_cpu_e0")
    ('conv2d.3', 'cpu')
    """
    role = part_role(var)
    if role is None or role[2] not in ("op", "epilogue"):
        return None
    return role[0], role[1]


def is_part_op(var: relax.Var | str) -> bool:
    """True for the binding of a part's main op (``conv2d_3_cpu``), not its epilogues."""
    role = part_role(var)
    return role is not None and role[2] == "op"


def join_of(var: relax.Var | str) -> str | None:
    """The layer name of a join binding (``conv2d_3_join`` -> ``conv2d.3``), else ``None``."""
    match = _JOIN.match(_name(var))
    return layer_from_prefix(match["layer"]) if match else None


# ----------------------------------------------------------------------------- IR utilities
def op_name(expr: relax.Expr) -> str | None:
    """``"relax.nn.conv2d"`` for a call of a Relax op, else ``None``."""
    if isinstance(expr, relax.Call):
        return getattr(expr.op, "name", None)
    return None


def const_slice(const: Constant, axis: int, lo: int, hi: int) -> Constant:
    """``const[..., lo:hi, ...]`` along ``axis`` as a new constant (sliced at compile time)."""
    array = const.value.numpy()
    index = [slice(None)] * array.ndim
    index[axis] = slice(lo, hi)
    return relax.const(np.ascontiguousarray(array[tuple(index)]), str(const.value.dtype))


def conv2d_like(call: relax.Call, data: relax.Expr, weight: relax.Expr, **overrides) -> relax.Expr:
    """A ``relax.nn.conv2d`` on ``data`` and ``weight`` with ``call``'s attributes, except those
    given in ``overrides`` (``padding=...``, ``groups=...``, ``out_dtype=...``)."""
    attrs = call.attrs
    out_dtype = str(attrs.out_dtype)
    kwargs = {
        "strides": attrs.strides,
        "padding": attrs.padding,
        "dilation": attrs.dilation,
        "groups": attrs.groups,
        "data_layout": attrs.data_layout,
        "kernel_layout": attrs.kernel_layout,
        "out_layout": attrs.out_layout,
        "out_dtype": out_dtype if out_dtype not in ("", "void", "None") else None,
    }
    kwargs.update(overrides)
    return relax.op.nn.conv2d(data, weight, **kwargs)


def has_cpu_part(func: relax.Function) -> bool:
    """Whether any binding of ``func`` is (part of) a CPU part.

    A module without one (every layer on the GPU, e.g. ``-ratio=1``) is built as the GPU-only
    module: CastGPU converts it as the GPU-only build does and PlaceDevices puts all of it,
    parameters and result included, on the GPU.
    """
    for block in func.body.blocks:
        for binding in block.bindings:
            role = part_role(binding.var)
            if role is not None and role[1] == "cpu":
                return True
    return False


def vars_in(expr) -> list[relax.Var]:
    """The variables ``expr`` reads (through calls, tuples and tuple items)."""
    if isinstance(expr, relax.Var):
        return [expr]
    if isinstance(expr, relax.Call):
        return [v for arg in expr.args for v in vars_in(arg)]
    if isinstance(expr, relax.Tuple):
        return [v for item in expr.fields for v in vars_in(item)]
    if isinstance(expr, relax.TupleGetItem):
        return vars_in(expr.tuple_value)
    return []


def substitute(expr, remap: dict):
    """``expr`` with the variables in ``remap`` replaced (calls, tuples, tuple items)."""
    if isinstance(expr, relax.Var):
        return remap.get(expr, expr)
    if isinstance(expr, relax.Call):
        args = [substitute(arg, remap) for arg in expr.args]
        return relax.Call(expr.op, args, expr.attrs, expr.ty_args)
    if isinstance(expr, relax.Tuple):
        return relax.Tuple([substitute(item, remap) for item in expr.fields])
    if isinstance(expr, relax.TupleGetItem):
        return relax.TupleGetItem(substitute(expr.tuple_value, remap), expr.index)
    return expr
