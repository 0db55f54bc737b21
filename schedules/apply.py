"""``apply_schedules``: offer every PrimFunc of a module to the rules of its target."""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight import ScheduleRule
from tvm.target import Target

from ._util import is_cpu_target, is_gpu_target, logger
from .cpu_amx import Conv2dInt8AMX
from .cpu_conv2d import Conv2dChannelVector, Conv2dWidthVector
from .cpu_dense import MatmulCPU
from .cpu_generic import CPUFallback
from .cpu_int8 import Conv2dInt8Depthwise, Conv2dInt8DotProduct, MatmulInt8DotProduct
from .cpu_pool import PoolPlanes
from .prepack import fold_weight_packing, has_layout_rewrite


def cpu_rules(target: Target) -> list[ScheduleRule]:
    """The rules tried for an llvm target, most specific first (fallback last)."""
    del target  # all CPU rules gate themselves on the target's features
    return [
        Conv2dInt8AMX(),
        Conv2dInt8DotProduct(),
        MatmulInt8DotProduct(),
        Conv2dInt8Depthwise(),
        Conv2dChannelVector(),
        Conv2dWidthVector(),
        MatmulCPU(),
        PoolPlanes(),
        CPUFallback(),
    ]


def gpu_rules(target: Target) -> list[ScheduleRule]:
    """The rules tried for a GPU target (cuda, opencl, ...), fallback last."""
    from .gpu import default_gpu_rules

    return default_gpu_rules(target)


def rules_for(target: Target) -> list[ScheduleRule]:
    """The rules for ``target`` in the order they are tried (empty for unknown kinds)."""
    if is_gpu_target(target):
        return gpu_rules(target)
    if is_cpu_target(target):
        return cpu_rules(target)
    return []


def _is_scheduled(func: tirx.PrimFunc) -> bool:
    return bool(func.attrs is not None and func.attrs.get("tirx.is_scheduled", False))


def _is_host_func(func: tirx.PrimFunc) -> bool:
    return bool(func.attrs is not None and func.attrs.get("tirx.is_host_func", False))


def claiming_rule(func: tirx.PrimFunc, target: Target) -> ScheduleRule | None:
    """The rule that :func:`apply_schedules` would schedule ``func`` with (None: none)."""
    for rule in rules_for(target):
        try:
            with target:
                if rule.apply(func, target, False) is not None:
                    return rule
        except Exception:  # noqa: BLE001 - as in _schedule_one: a failing rule is skipped
            continue
    return None


def is_generic_rule(rule: ScheduleRule | None) -> bool:
    """True for catch-all rules (ours and dlight's): their kernels are the ones worth tuning."""
    return rule is None or bool(getattr(rule, "generic", True))


def _schedule_one(
    name: str, func: tirx.PrimFunc, target: Target, rules: list[ScheduleRule]
) -> tuple[tirx.PrimFunc, bool] | None:
    """The first rule's result and whether it packs a weight; None if no rule applies."""
    for rule in rules:
        try:
            with target:
                sch = rule.apply(func, target, False)
        except Exception as err:  # noqa: BLE001 - a rule bug must not break the build
            logger.debug("rule %s failed on %s: %s", type(rule).__name__, name, err, exc_info=True)
            continue
        if sch is None:
            continue
        if isinstance(sch, list):
            sch = sch[0]
        assert isinstance(sch, s_tir.Schedule)
        logger.debug("scheduled %s with %s", name, type(rule).__name__)
        return sch.mod["main"].with_attr("tirx.is_scheduled", True), has_layout_rewrite(sch)
    return None


@tvm.transform.module_pass(opt_level=0, name="MulayerApplySchedules")
class ApplySchedules:
    """Module pass form of :func:`apply_schedules` (usable in a ``tvm.transform.Sequential``)."""

    def __init__(self, target: Target | dict | str, fold_packing: bool = True):
        self.target = target if isinstance(target, Target) else Target(target)
        self.fold_packing = fold_packing

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {}
        packs = False
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or _is_scheduled(func) or _is_host_func(func):
                continue
            func_target = func.attrs.get("target") if func.attrs is not None else None
            tgt = func_target if func_target is not None else self.target
            rules = rules_for(tgt)
            if not rules:
                continue
            result = _schedule_one(gvar.name_hint, func, tgt, rules)
            if result is not None:
                updates[gvar], packed = result
                packs = packs or packed
        if not updates:
            return mod
        mod = mod.clone()  # never mutate the caller's module
        for gvar, func in updates.items():
            mod[gvar] = func
        if packs and self.fold_packing:
            try:
                mod = fold_weight_packing(mod, packing_host(self.target))
            except Exception as err:  # noqa: BLE001 - packing then runs per call, still correct
                logger.debug("fold_weight_packing failed: %s", err, exc_info=True)
        return mod


def packing_host(target: Target) -> Target:
    """The CPU target that runs compile-time weight packing (for ``fold_weight_packing``)."""
    if is_cpu_target(target):
        return target
    return target.host if target.host is not None else Target("llvm")


def apply_schedules(
    mod: tvm.IRModule, target: Target | dict | str, fold_packing: bool = True
) -> tvm.IRModule:
    """Schedule every PrimFunc of ``mod`` that a rule applies to.

    Parameters
    ----------
    mod : tvm.IRModule
        A module after ``LegalizeOps`` (fused or not). It is not modified.
    target : tvm.target.Target | dict | str
        The default target; a PrimFunc's ``target`` attribute overrides it.
    fold_packing : bool
        Precompute the weight packing of CPU kernels whose weights are constants
        (:func:`~mulayer.schedules.prepack.fold_weight_packing`). With False, each kernel
        packs its weight on every call (correct, slower for large weights).

    Returns
    -------
    tvm.IRModule
        The module with scheduled PrimFuncs (marked ``tirx.is_scheduled``); others unchanged.
    """
    return ApplySchedules(target, fold_packing)(mod)
