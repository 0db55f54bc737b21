"""SinkDequantize: a fused kernel that ends in a dequantize hands its uint8 tensor on instead.

Runs between FuseOps and FuseTIR (fused functions still hold ``call_tir`` bindings). FuseOps
grows each kernel forward from its anchor op (a conv) through the elementwise ops after it.
When two int8 convs feed one residual add, the add joins the kernel bound first, and the other
kernel grows up to the add: with a projection skip requantized by
:class:`~mulayer.passes.chain_int8.ChainInt8`, that kernel computes ``q`` (uint8) and then
``dq(q) = (f32(q) - zp) * s`` and stores the fp32 result, four bytes an element where one
would do.

This pass moves such a trailing dequantize into the kernel that reads it: the producer returns
the uint8 tensor, the consumer takes it and dequantizes in its prologue (inlined into its
epilogue by the schedule rules, as for an identity skip). The same PrimFuncs run in the same
order on the same values, so outputs do not change.

A tail is moved when it is a run of one-input ``call_tir`` bindings that starts from a uint8
tensor of the kernel, yields a float32 result, and ends the kernel; and that result has exactly
one reader in ``main``, another fused kernel. Anything else is left as it is.
"""

from __future__ import annotations

import tvm
from tvm import relax

from .common import substitute, vars_in

_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


def _one_input_call_tir(value) -> relax.Var | None:
    """The single tensor argument of ``call_tir(f, (x,))``, else None."""
    if not isinstance(value, relax.Call) or not value.op.same_as(_CALL_TIR):
        return None
    args = value.args[1]
    fields = list(args.fields) if isinstance(args, relax.Tuple) else []
    if len(fields) != 1 or not isinstance(fields[0], relax.Var):
        return None
    return fields[0]


def _dtype(expr) -> str | None:
    return str(getattr(expr.ty, "dtype", None))


def _dequantize_tail(func: relax.Function) -> tuple[relax.Var, list] | None:
    """``(uint8 var, tail bindings)`` when ``func`` ends in a dequantize tail (module doc)."""
    body = func.body
    if len(body.blocks) != 1 or not isinstance(body.blocks[0], relax.DataflowBlock):
        return None
    bindings = list(body.blocks[0].bindings)
    if not bindings or not body.body.same_as(bindings[-1].var):
        return None
    if _dtype(bindings[-1].var) != "float32":
        return None
    tail: list = []
    expected = bindings[-1].var
    for binding in reversed(bindings):
        if not binding.var.same_as(expected):
            return None
        source = _one_input_call_tir(binding.value)
        if source is None:
            return None
        tail.insert(0, binding)
        if _dtype(source) == "uint8":
            return (source, tail) if len(tail) < len(bindings) else None
        expected = source
    return None


def _emit_function(
    name: str, func: relax.Function, params: list, bindings: list, output, remap: dict
) -> relax.Function:
    """``func`` rebuilt with ``params`` and ``(var, value)`` ``bindings`` (substituted through
    ``remap``), returning the value bound to ``output``."""
    bb = relax.BlockBuilder()
    with bb.function(name, params, attrs=dict(func.attrs), private=True):
        with bb.dataflow():
            for var, value in bindings:
                value = substitute(value, remap)
                if var.same_as(output):
                    out = bb.emit_output(value, var.name)
                else:
                    remap[var] = bb.emit(value, var.name)
        bb.emit_func_output(out)
    return bb.get()[name]


def _producer_without_tail(name: str, func: relax.Function, source: relax.Var, tail: list):
    """``func`` returning the uint8 ``source`` (the tail dropped)."""
    kept = [
        (b.var, b.value)
        for b in func.body.blocks[0].bindings
        if not any(b.same_as(t) for t in tail)
    ]
    return _emit_function(name, func, list(func.params), kept, source, {})


def _consumer_with_tail(name: str, func: relax.Function, index: int, source, tail: list):
    """``func`` taking a uint8 tensor at param ``index`` and running ``tail`` on it first."""
    old = func.params[index]
    new_param = relax.Var(old.name, relax.TensorType(source.ty.shape, "uint8"))
    params = list(func.params)
    params[index] = new_param
    dequantized = {old: tail[-1].var}
    bindings = [(b.var, b.value) for b in tail] + [
        (b.var, substitute(b.value, dequantized)) for b in func.body.blocks[0].bindings
    ]
    return _emit_function(name, func, params, bindings, func.body.body, {source: new_param})


def sink_dequantize(mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
    """``mod`` with dequantize tails moved to their readers, and how many were moved."""
    main = mod["main"] if "main" in [gv.name_hint for gv in mod.get_global_vars()] else None
    if not isinstance(main, relax.Function):
        return mod, 0
    body = main.body
    if len(body.blocks) != 1 or not isinstance(body.blocks[0], relax.DataflowBlock):
        return mod, 0
    bindings = list(body.blocks[0].bindings)
    readers: dict = {}
    for binding in bindings:
        for var in vars_in(binding.value):
            readers.setdefault(var, []).append(binding)
    for var in vars_in(body.body):
        readers.setdefault(var, []).append(None)

    def callee(value) -> relax.Function | None:
        if isinstance(value, relax.Call) and isinstance(value.op, relax.GlobalVar):
            func = mod[value.op]
            if isinstance(func, relax.Function) and func.attrs and "Primitive" in func.attrs:
                return func
        return None

    new_funcs: dict = {}  # main's var -> (name, function) of its call's new callee
    moves = 0
    for binding in bindings:
        func = callee(binding.value)
        found = _dequantize_tail(func) if func is not None else None
        users = readers.get(binding.var, [])
        if found is None or len(users) != 1 or users[0] is None:
            continue
        reader = users[0]
        reader_func = callee(reader.value)
        args = list(reader.value.args) if reader_func is not None else []
        slots = [i for i, a in enumerate(args) if a.same_as(binding.var)]
        if reader_func is None or len(slots) != 1:
            continue
        if binding.var in new_funcs or reader.var in new_funcs:
            continue  # one rewrite per kernel
        source, tail = found
        name = binding.value.op.name_hint
        reader_name = reader.value.op.name_hint
        new_funcs[binding.var] = (name + "_u8", _producer_without_tail(name, func, source, tail))
        new_funcs[reader.var] = (
            reader_name + "_dq",
            _consumer_with_tail(reader_name, reader_func, slots[0], source, tail),
        )
        moves += 1
    if not moves:
        return mod, 0

    bb = relax.BlockBuilder(mod)
    gvars = {var: bb.add_func(func, name) for var, (name, func) in new_funcs.items()}
    main_bb = relax.BlockBuilder()
    remap: dict = {}
    with main_bb.function("main", list(main.params), attrs=dict(main.attrs or {})):
        with main_bb.dataflow():
            for binding in bindings:
                value = binding.value
                if binding.var in gvars:
                    value = relax.Call(gvars[binding.var], list(value.args))
                value = substitute(value, remap)
                if isinstance(binding.var, relax.DataflowVar):
                    remap[binding.var] = main_bb.emit(value, binding.var.name)
                else:
                    remap[binding.var] = main_bb.emit_output(value, binding.var.name)
        main_bb.emit_func_output(substitute(body.body, remap))
    bb.update_func(mod.get_global_var("main"), main_bb.get()["main"])
    return relax.transform.DeadCodeElimination()(bb.get()), moves


@tvm.transform.module_pass(opt_level=0, name="SinkDequantize")
class SinkDequantize:
    """Move fused kernels' trailing dequantizes into their readers (see the module doc)."""

    def __init__(self) -> None:
        self.moves = 0

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mod, self.moves = sink_dequantize(mod)
        return mod
