"""Lower a Relax module to a VM executable for one target (CPU fp32 or GPU fp16).

Cooperative (two-device) modules are built by ``mulayer.passes``' build helper; this module
covers the single-processor baselines.
"""

from __future__ import annotations

import logging
from pathlib import Path

import tvm
from tvm import relax

from ..errors import MuLayerError
from ..passes.sink_dequantize import SinkDequantize
from ..target import TargetSpec

log = logging.getLogger(__name__)


def legalize_and_fuse(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Legalize and fuse ``mod`` into the PrimFuncs the schedules (and tuning) work on."""
    seq = tvm.transform.Sequential(
        [
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            SinkDequantize(),  # int8 kernels hand uint8 to their readers, not fp32
            relax.transform.FuseTIR(),
            relax.transform.DeadCodeElimination(),
        ]
    )
    with target:
        return seq(mod)


def lower_for_target(
    mod: tvm.IRModule, target: tvm.target.Target, tuning_db: str | Path | None = None
) -> tvm.IRModule:
    """Legalize, fuse and schedule every PrimFunc of ``mod`` for ``target``.

    With ``tuning_db`` (a folder written by ``mulayer tune``), PrimFuncs that have a tuning
    record take MetaSchedule's best schedule; the rules schedule the rest.
    """
    from mulayer.schedules import apply_schedules
    from mulayer.schedules.apply import packing_host
    from mulayer.schedules.prepack import fold_weight_packing

    mod = legalize_and_fuse(mod, target)
    if tuning_db is None:
        return apply_schedules(mod, target)
    from .tuning_db import apply_tuning_db

    mod = apply_tuning_db(mod, target, tuning_db)
    mod = apply_schedules(mod, target, fold_packing=False)  # skips the tuned PrimFuncs
    # Precompute the constant-weight packing of rule and tuned kernels alike.
    return fold_weight_packing(mod, packing_host(target))


def to_fp16(mod: tvm.IRModule) -> tvm.IRModule:
    """The GPU-only form: convs and matmuls in fp16 with fp32 accumulation (inputs and outputs
    stay fp32); with ``MULAYER_GPU_LAYOUT=NHWC``, dense and depthwise convs channels-last
    (:class:`~mulayer.passes.channels_last.ChannelsLastGPU`)."""
    from mulayer.passes.channels_last import ChannelsLastGPU

    mod = relax.transform.ToMixedPrecision(out_dtype="float32")(mod)
    return ChannelsLastGPU()(mod)


def build_single(mod: tvm.IRModule, target: tvm.target.Target, tuning_db: str | Path | None = None):
    """Build ``mod`` for one processor and return the ``tvm.runtime.Executable``.

    ``tuning_db``: a ``mulayer tune`` database folder to take tuned schedules from.
    """
    mod = lower_for_target(mod, target, tuning_db)
    cpu = target.kind.name in ("llvm", "c")
    pipeline = cpu_build_pipeline() if cpu else relax.get_pipeline("default_build")
    try:
        ex = tvm.compile(mod, target=target, relax_pipeline=pipeline)
    except RuntimeError as err:  # TVM errors derive from RuntimeError
        raise RuntimeError(f"TVM failed to build for {target.kind.name}: {err}") from err
    if target.kind.name in ("cuda", "opencl"):
        check_device_module(ex, target.kind.name)
    return ex


def cpu_build_pipeline() -> tvm.transform.Pass:
    """TVM's ``default_build`` lowering, then whole-page host storages
    (:class:`~mulayer.passes.page_align_host_storage.PageAlignHostStorage`)."""
    from mulayer.passes.page_align_host_storage import PageAlignHostStorage

    return tvm.transform.Sequential(
        [relax.get_pipeline("default_build"), PageAlignHostStorage(cpu_only=True)]
    )


def build_for_this_cpu(mod: tvm.IRModule):
    """``mod`` built for this machine's CPU as a CPU fp32 model is (fused, scheduled by the
    rules, parallel over all cores); e.g. the instrumented module calibration runs."""
    from ..target import parse_target

    return build_single(mod, parse_target("llvm").host_target())


def export_options(spec: TargetSpec) -> dict:
    """Cross-compile the library when the host target is not this machine (e.g. aarch64)."""
    compiler = check_cross_compiler(spec)
    if compiler is None:
        return {}
    from tvm.support import cc  # tvm.contrib.cc before TVM 0.27

    return {"fcompile": cc.cross_compiler(compiler)}


def check_cross_compiler(spec: TargetSpec) -> str | None:
    """The cross compiler exporting for ``spec``'s host needs (``None``: the native one), or a
    ``MuLayerError`` saying how to install it when it is not on PATH."""
    import shutil

    triple = spec.host.get("mtriple")
    if not triple or triple.startswith("x86_64"):
        return None
    compiler = f"{triple}-g++"
    if shutil.which(compiler) is None:
        raise MuLayerError(
            f"exporting for {triple} needs the cross compiler {compiler!r} on PATH "
            f"(Debian: apt-get install g++-{triple.split('-')[0].replace('_', '-')}-linux-gnu)"
        )
    return compiler


def check_device_module(ex, kind: str) -> None:
    """A GPU build must contain a device module (``default_build`` can silently emit host code)."""
    kinds = {m.kind for m in all_modules(ex.mod)}
    if kind not in kinds:
        raise MuLayerError(
            f"the {kind} build produced no {kind} module (found: {', '.join(sorted(kinds))}); "
            "the kernels were not scheduled for the GPU"
        )


def all_modules(mod):
    yield mod
    for sub in mod.imports if hasattr(mod, "imports") else mod.imported_modules:
        yield from all_modules(sub)
