"""Build a chunk of parts into one library (one Relax function per part), in any process.

Building dominates profiling time, so the profiler batches many parts into one module and
builds chunks in parallel worker processes, then loads and times them in one process (the
builder/runner split of TVM's tuners). :func:`build_chunk` takes and returns plain JSON so it
can run in a worker.

Lowering mirrors :func:`mulayer.passes.pipeline.build_two_device` for one device:
:func:`mulayer.compiler.build.legalize_and_fuse` (legalized, constants folded, fused as
``FuseOpsPerDevice`` fuses a device's region), :func:`mulayer.schedules.apply_schedules` (no
folding of the CPU weight packing, as in a two-device module), then ``tvm.compile`` with the
``default_build`` pipeline. The rule that scheduled each part's main kernel is read from the
schedules' debug log.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from .layer_spec import LayerSpec
from .parts import PartInfo, param_specs, part_function

# Substrings naming a part's main kernel among its PrimFuncs.
_MAIN_KERNELS = ("conv2d", "matmul", "pool", "mean")


@dataclass
class BuildRequest:
    """A chunk to build: parts of one processor, for one target."""

    processor: str
    parts: list[dict]  # {"id", "spec", "channels"}
    host: dict
    device: dict | None
    library: str
    prepack: bool = False

    def to_json(self) -> dict:
        return self.__dict__.copy()


@dataclass
class BuildResult:
    library: str
    infos: dict[str, dict]  # part id -> PartInfo JSON + "schedule"
    seconds: float
    errors: dict[str, str] = field(default_factory=dict)


class _RuleLog(logging.Handler):
    """Collects ``scheduled <func> with <rule>`` debug records of mulayer.schedules."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.rules: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "scheduled %s with %s" and len(record.args) == 2:
            self.rules[str(record.args[0])] = str(record.args[1])


def _targets(request: BuildRequest):
    import tvm

    host = tvm.target.Target(request.host)
    if request.processor == "cpu":
        return host
    device = request.device
    if device is None:
        raise ValueError("a GPU part needs a device target")
    if device["kind"] == "llvm":
        return tvm.target.Target(device)
    return tvm.target.Target(device, host=host)


def _called_prim_funcs(func) -> list[str]:
    from tvm import relax

    names: list[str] = []

    def visit(expr):
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", None) == "relax.call_tir":
            gvar = expr.args[0]
            if isinstance(gvar, relax.GlobalVar):
                names.append(gvar.name_hint)

    relax.analysis.post_order_visit(func.body, visit)
    return names


def _main_rule(kernels: list[str], rules: dict[str, str]) -> tuple[str, str]:
    """(main kernel name, the rule that scheduled it)."""
    for key in _MAIN_KERNELS:
        for name in kernels:
            if key in name:
                return name, rules.get(name, "unscheduled")
    name = kernels[0] if kernels else ""
    return name, rules.get(name, "unscheduled")


def schedule_parts(functions: dict, target, prepack: bool = False):
    """Legalize and schedule Relax part functions (``{name: function}``) without compiling.

    Returns ``(module, {name: schedule info})``; the schedule info names the rule that
    scheduled the part's main kernel.
    """
    import tvm

    from mulayer.compiler.build import legalize_and_fuse
    from mulayer.schedules import apply_schedules

    mod = tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in functions.items()})
    # Fused as a build fuses each device's region (FuseOpsPerDevice): the epilogue runs inside
    # the layer's kernel and constant weight casts fold (parts timed before 2026-12-07 20:50
    # UTC ran every op as its own kernel, the GPU whole-layer part's weight cast included).
    mod = legalize_and_fuse(mod, target)
    log = logging.getLogger("mulayer.schedules")
    handler, level, propagate = _RuleLog(), log.level, log.propagate
    # The debug records are collected here; they reach the user only where debug logging is
    # on already (--verbose), not on stderr at every profile.
    log.propagate = propagate and log.isEnabledFor(logging.DEBUG)
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        mod = apply_schedules(mod, target, fold_packing=prepack)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate
    schedules = {}
    for name in functions:
        kernels = _called_prim_funcs(mod[name])
        kernel, rule = _main_rule(kernels, handler.rules)
        schedules[name] = {
            "rule": rule,
            "kernel": kernel.rstrip("0123456789_") or kernel,
            "kernels": len(kernels),
            "prepacked": prepack,
            "target": str(target.kind.name),
        }
    return mod, schedules


def compile_parts(functions: dict, target, prepack: bool = False):
    """Lower and compile Relax part functions (``{name: function}``) into one executable.

    Returns ``(executable, {name: schedule info})`` (see :func:`schedule_parts`).
    """
    import tvm

    from mulayer.compiler.build import check_device_module

    mod, schedules = schedule_parts(functions, target, prepack)
    ex = tvm.compile(mod, target=target, relax_pipeline="default_build")
    if target.kind.name in ("cuda", "opencl"):
        check_device_module(ex, target.kind.name)
    return ex, schedules


def build_chunk(raw: dict) -> dict:
    """Build the parts of a :class:`BuildRequest` (as JSON) into ``library``; JSON result.

    A part whose Relax function cannot be made is reported in ``errors`` and left out; a failing
    compile of the chunk raises.
    """
    request = BuildRequest(**raw)
    start = time.perf_counter()
    target = _targets(request)
    if target.kind.name == "cuda":
        # Registers the CUDA compile callback: where a CUDA runtime is present, kernels are then
        # compiled here, in the parallel builders, not when the timer loads the library.
        from tvm.support import nvcc  # noqa: F401
    functions, infos, errors = {}, {}, {}
    for i, part in enumerate(request.parts):
        try:
            func, precision = part_function(
                LayerSpec.from_json(part["spec"]),
                request.processor,
                part["channels"],
                lift_weights=not request.prepack,
            )
        except (ValueError, RuntimeError) as err:
            errors[part["id"]] = f"{type(err).__name__}: {err}"
            continue
        functions[f"p{i}"] = func
        infos[part["id"]] = PartInfo(f"p{i}", param_specs(func), precision).to_json()
    if not functions:
        return BuildResult("", {}, time.perf_counter() - start, errors).__dict__
    ex, schedules = compile_parts(functions, target, request.prepack)
    for info in infos.values():
        info["schedule"] = schedules[info["name"]]
    ex.export_library(request.library, **_export_options(request))
    return BuildResult(request.library, infos, time.perf_counter() - start, errors).__dict__


def build_chunk_safely(raw: dict) -> list[dict]:
    """:func:`build_chunk`, and when the chunk fails to build, each part alone (so one part
    TVM cannot compile costs only its own row, marked with the error)."""
    try:
        return [build_chunk(raw)]
    except Exception as err:  # noqa: BLE001 - any build failure: isolate the culprit
        if len(raw["parts"]) == 1:
            message = f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}"
            return [BuildResult("", {}, 0.0, {raw["parts"][0]["id"]: message}).__dict__]
    results = []
    for i, part in enumerate(raw["parts"]):
        single = {**raw, "parts": [part], "library": raw["library"].replace(".so", f"-{i}.so")}
        results += build_chunk_safely(single)
    return results


def _export_options(request: BuildRequest) -> dict:
    from mulayer.compiler.build import export_options
    from mulayer.target import TargetSpec

    return export_options(TargetSpec(host=request.host, device=request.device))


def library_path(folder: Path, index: int) -> str:
    return str(folder / f"chunk{index:05d}.so")
