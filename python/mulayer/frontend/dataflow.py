"""Who reads what in a Relax function (use counts, consumers, producers) and static shapes."""

from __future__ import annotations

from tvm import relax


def count_uses(func: relax.Function) -> dict[relax.Var, int]:
    """How many times each variable is read in ``func`` (bindings and the returned value)."""
    uses: dict[relax.Var, int] = {}

    def visit(expr: relax.Expr) -> None:
        if isinstance(expr, relax.Var):
            uses[expr] = uses.get(expr, 0) + 1

    for block in func.body.blocks:
        for binding in block.bindings:
            relax.analysis.post_order_visit(binding.value, visit)
    relax.analysis.post_order_visit(func.body.body, visit)
    return uses


def consumers(func: relax.Function) -> dict[relax.Var, list[relax.VarBinding]]:
    """For each variable, the bindings that read it, in program order."""
    result: dict[relax.Var, list[relax.VarBinding]] = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            seen: set[relax.Var] = set()

            def visit(expr: relax.Expr, binding=binding, seen=seen) -> None:
                if isinstance(expr, relax.Var) and expr not in seen:
                    seen.add(expr)
                    result.setdefault(expr, []).append(binding)

            relax.analysis.post_order_visit(binding.value, visit)
    return result


def producers(func: relax.Function) -> dict[relax.Var, relax.Expr]:
    """The value bound to each variable of ``func``."""
    return {
        b.var: b.value
        for block in func.body.blocks
        for b in block.bindings
        if isinstance(b, relax.VarBinding)
    }


def static_shape(expr: relax.Expr) -> tuple[int, ...] | None:
    """The static shape of a tensor expression, or ``None`` when unknown or dynamic."""
    ty = expr.ty if hasattr(expr, "ty") else None
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return tuple(int(d) for d in ty.shape.values)
    except (TypeError, AttributeError):
        return None
