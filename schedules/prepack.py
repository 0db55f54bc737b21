"""Precompute the weight packing the CPU rules put inside their PrimFuncs.

The conv/matmul rules repack the constant weight in a stage annotated
``meta_schedule.layout_rewrite_preproc``. :func:`fold_weight_packing` moves every such stage
into its own PrimFunc (Relax's ``SplitLayoutRewritePreproc``: ``<f>_weight_prepack`` produces
the packed weight, ``<f>_prepacked`` consumes it) and evaluates the ``_weight_prepack`` calls
whose inputs are constants, once, at compile time. Unlike a module-wide ``FoldConstant`` it
touches nothing else (GPU kernels, other constant subexpressions) and it keeps the ``vdevice``
of the weight it replaces. Kernels whose weight is not a constant keep packing per call.

:func:`~mulayer.schedules.apply_schedules` calls it by default (``fold_packing=True``); the
packing of a weight that is a parameter (not a constant) stays a per-call kernel.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.ir.expr import Constant, GenericConst

from ._util import LAYOUT_REWRITE_PREPROC, leaf_blocks, logger

PREPACK_SUFFIX = "_weight_prepack"


def has_layout_rewrite(sch: tvm.s_tir.Schedule) -> bool:
    """Whether a schedule has a block annotated as a layout-rewrite preprocessing stage."""
    return any(LAYOUT_REWRITE_PREPROC in sch.get(b).annotations for b in leaf_blocks(sch))


@relax.expr_functor.mutator
class _FoldPrepack(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, host: tvm.target.Target) -> None:
        super().__init__(mod)
        self._mod = mod
        self._host = host
        self._call_tir = tvm.ir.Op.get("relax.call_tir")
        self._built: dict[str, tvm.runtime.Module] = {}
        self.folded = 0

    def _build(self, gvar: tvm.ir.GlobalVar) -> tvm.runtime.Module:
        """The library holding ``gvar``'s packing kernel.

        All packing kernels of one target build together, once: one LLVM code generation
        instead of one per kernel (ResNet-50: 54 kernels, 4 s -> under 1 s).
        """
        name = gvar.name_hint
        if name not in self._built:
            by_target: dict[str, tuple[tvm.target.Target, dict]] = {}
            for other, func in self._mod.functions_items():
                if not other.name_hint.endswith(PREPACK_SUFFIX) or other.name_hint in self._built:
                    continue
                target = func.attrs.get("target") or self._host
                funcs = by_target.setdefault(str(target), (target, {}))[1]
                funcs[other.name_hint] = func.with_attr("global_symbol", other.name_hint)
            for target, funcs in by_target.values():
                module = {n: f.without_attr("target") for n, f in funcs.items()}
                lib = tvm.tirx.build(tvm.IRModule(module), target=target)
                self._built.update(dict.fromkeys(funcs, lib))
        return self._built[name]

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        if call.op != self._call_tir:
            return call
        gvar, args = call.args[0], call.args[1]
        if not isinstance(gvar, tvm.ir.GlobalVar) or not gvar.name_hint.endswith(PREPACK_SUFFIX):
            return call
        fields = args.fields if isinstance(args, relax.Tuple) else [args]
        if not fields or not all(isinstance(f, Constant) for f in fields):
            return call
        out_ty = call.ty
        if not isinstance(out_ty, relax.TensorType) or out_ty.shape is None:
            return call
        shape = [int(s) for s in out_ty.shape.values]
        out = tvm.runtime.tensor(np.zeros(shape, str(out_ty.dtype)))
        self._build(gvar)[gvar.name_hint](*[f.value for f in fields], out)
        vdevice = getattr(fields[0].ty, "vdevice", None)
        self.folded += 1
        return GenericConst(out, relax.TensorType(shape, str(out_ty.dtype), vdevice=vdevice))


def _preproc_param_index(func: tirx.PrimFunc) -> tuple[int, list[str]] | None:
    """(index of the packed parameter, names of the pack blocks) of a scheduled PrimFunc."""
    sch = tvm.s_tir.Schedule(func)
    names, index = [], None
    for block_rv in leaf_blocks(sch):
        block = sch.get(block_rv)
        if LAYOUT_REWRITE_PREPROC not in block.annotations:
            continue
        names.append(block.name_hint)
        src = block.reads[0].source
        index = next((i for i, p in enumerate(func.params) if p.same_as(src)), None)
    return None if index is None else (index, names)


def _call_sites(mod: tvm.IRModule) -> dict[str, list[list[relax.Expr]]]:
    """Arguments of every ``call_tir`` per callee name, over all Relax functions."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    sites: dict[str, list[list[relax.Expr]]] = {}

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op == call_tir:
            args = expr.args[1]
            fields = list(args.fields) if isinstance(args, relax.Tuple) else [args]
            sites.setdefault(expr.args[0].name_hint, []).append(fields)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return sites


def _keep_only_foldable_packs(mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
    """Un-annotate pack stages whose weight is not a constant at every call site.

    Those stay inside their kernel (SplitLayoutRewritePreproc would only move them to a kernel
    of their own). Returns the module and the number of foldable functions.
    """
    sites = _call_sites(mod)
    foldable = 0
    mod = mod.clone()
    for gvar, func in list(mod.functions_items()):
        if not isinstance(func, tirx.PrimFunc):
            continue
        found = _preproc_param_index(func)
        if found is None:
            continue
        index, blocks = found
        calls = sites.get(gvar.name_hint, [])
        if calls and all(index < len(a) and isinstance(a[index], Constant) for a in calls):
            foldable += 1
            continue
        sch = tvm.s_tir.Schedule(func)
        for name in blocks:
            sch.unannotate(sch.get_sblock(name), LAYOUT_REWRITE_PREPROC)
        mod[gvar] = sch.mod["main"]
    return mod, foldable


def fold_weight_packing(mod: tvm.IRModule, host: tvm.target.Target | None = None) -> tvm.IRModule:
    """Split off and precompute the weight packing of scheduled CPU kernels (see module doc).

    Only kernels whose packed weight is a constant at every call site are split; two-device
    modules (``vdevice`` global info) are returned unchanged, as TVM 0.27's
    ``SplitLayoutRewritePreproc`` drops bindings there ("Var ... is not defined" at build).

    Parameters
    ----------
    mod : tvm.IRModule
        A module after :func:`~mulayer.schedules.apply_schedules`.
    host : tvm.target.Target, optional
        Target to run the packing kernels on at compile time (default: plain ``llvm``); a
        PrimFunc's own ``target`` attribute wins.

    Returns
    -------
    tvm.IRModule
        The module with packed constant weights; unchanged if nothing is packed.
    """
    if "vdevice" in mod.global_infos:
        logger.debug("fold_weight_packing: two-device module, packing stays in the kernels")
        return mod
    mod, foldable = _keep_only_foldable_packs(mod)
    if foldable == 0:
        return mod
    mod = relax.transform.SplitLayoutRewritePreproc()(mod)
    folder = _FoldPrepack(mod, host or tvm.target.Target("llvm"))
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            folder.builder_.update_func(gvar, folder.visit_expr(func))
    mod = folder.builder_.finalize()
    # Drop the _weight_prepack PrimFuncs nobody calls any more.
    mod = relax.transform.DeadCodeElimination()(mod)
    logger.debug("fold_weight_packing: %d weights packed at compile time", folder.folded)
    return mod
