"""mulayer's pass pipeline, as one place that the compile driver and TVM users share.

Three stages, each usable on its own:

- :func:`cooperative_passes`: the mulayer Relax passes (split → int8 CPU parts → fp16 GPU parts
  → VDevices and copies → CPU weights lifted), a ``tvm.transform.Sequential``;
- :func:`lower_two_device`: legalize keeping each call's VDevice and schedule every PrimFunc for
  its own side;
- :func:`vm_lowering`: TVM's ``default_build`` VM lowering with
  :class:`~mulayer.passes.separate_device_storage.SeparateDeviceStorage` and
  :class:`~mulayer.passes.page_align_host_storage.PageAlignHostStorage` after the memory planner.

:func:`build_two_device` runs the last two on a placed module (:func:`compile_lowered` the last).

``import mulayer.passes`` registers the whole chain as ``relax.get_pipeline("mulayer", ...)``, so
a TVM flow builds a cooperative module with::

    import mulayer.passes  # registers "mulayer"
    ex = tvm.compile(mod, target=None, relax_pipeline=relax.get_pipeline(
        "mulayer", plan=mulayer.Plan.uniform(0.5), gpu_target=gpu, cpu_target=cpu,
        calibration=stats))
"""

from __future__ import annotations

import tvm
from tvm import relax

from mulayer.runtime import crossing  # noqa: F401  (the copy StageCrossings' calls run)

from .build_helpers import legalize_keeping_vdevices
from .canonicalize import canonical_form
from .cast_gpu import CastGPU
from .chain_int8 import ChainInt8
from .fuse_per_device import FusePerDevice
from .lift_cpu_weights import LiftCPUWeights
from .page_align_host_storage import PageAlignHostStorage
from .place_devices import PlaceDevices, make_vdevices
from .quantize_cpu import QuantizeCPU
from .rewrite_cuda_graph_per_device import RewriteCUDAGraphPerDevice
from .separate_device_storage import SeparateDeviceStorage
from .split_channels import SplitChannels
from .stage_crossings import StageCrossings


def cooperative_passes(
    plan, gpu_target, cpu_target, calibration=None, guard_db: float = 30.0
) -> tvm.transform.Sequential:
    """The mulayer Relax passes for ``plan`` (CPU parts stay fp32 when ``calibration`` is None)."""
    passes = [SplitChannels(plan)]
    if calibration is not None:
        passes.append(QuantizeCPU(calibration, guard_db=guard_db))
    passes += [CastGPU(), PlaceDevices(gpu_target, cpu_target), LiftCPUWeights()]
    return tvm.transform.Sequential(passes, name="mulayer.CooperativePasses")


def cpu_only_passes(plan, calibration=None, guard_db: float = 30.0) -> tvm.transform.Sequential:
    """The Relax passes of a plan that keeps every layer on the CPU (a single-device module).

    Split (names the CPU parts) → int8 CPU parts (calibrated, guarded) → uint8 chains between
    int8 layers → stem convs padded to 4 input channels (dot-product rule). The result is built
    like any llvm module (legalize, fuse, schedule).
    """
    from mulayer.schedules import PadConvInputChannels

    passes = [SplitChannels(plan)]
    if calibration is not None:
        passes += [
            QuantizeCPU(calibration, guard_db=guard_db),
            ChainInt8(stats=calibration),
            PadConvInputChannels(),
        ]
    return tvm.transform.Sequential(passes, name="mulayer.CPUOnlyPasses")


def lower_two_device(mod: tvm.IRModule, gpu_target) -> tvm.IRModule:
    """Realize VDevices, legalize keeping them, fuse per device, schedule each PrimFunc for its
    side."""
    from mulayer.schedules import apply_schedules

    mod = relax.transform.RealizeVDevice()(mod)
    mod = legalize_keeping_vdevices(mod)
    mod = FusePerDevice()(mod)  # fused kernels keep their device's target
    mod = StageCrossings()(mod)  # copies into planned buffers, device-to-host ones early
    return apply_schedules(mod, gpu_target)


def vm_lowering() -> tvm.transform.Pass:
    """TVM's ``default_build`` lowering plus :class:`SeparateDeviceStorage` (two-device safe).

    CUDA graphs follow TVM's own switch, the pass-context option
    ``"relax.backend.use_cuda_graph"``; :class:`RewriteCUDAGraphPerDevice` captures only the
    GPU segments.
    """
    t = relax.transform
    return tvm.transform.Sequential(
        [
            relax.backend.DispatchSampling(),
            relax.backend.DispatchSortScan(),
            t.LegalizeOps(),
            t.RewriteDataflowReshape(),
            t.ToNonDataflow(),
            t.RemovePurityChecking(),
            t.CallTIRRewrite(),
            t.StaticPlanBlockMemory(),
            SeparateDeviceStorage(),
            RewriteCUDAGraphPerDevice(),  # graphs around GPU segments, CPU calls outside
            t.LowerAllocTensor(),
            t.KillAfterLastUse(),
            t.LowerRuntimeBuiltin(),
            PageAlignHostStorage(),  # crossings' host buffers in whole pages: one DMA each
            t.ComputePrimValue(),
            t.VMShapeLower(),
            t.AttachGlobalSymbol(),
        ],
        name="mulayer.VMLowering",
    )


def mulayer_pipeline(
    plan, gpu_target, cpu_target, calibration=None, guard_db: float = 30.0
) -> tvm.transform.Pass:
    """The whole chain for ``tvm.compile(mod, target=None, relax_pipeline=...)``.

    ``mod`` is a Relax module with its weights bound as constants: what
    ``mulayer.frontend.import_onnx`` returns, or TVM's own
    ``tvm.relax.frontend.onnx.from_onnx(proto)`` (``keep_params_in_input=False``, its
    default). The chain first canonicalises it as mulayer's frontend does (batch norm folded into
    convs, constants folded, bindings canonical): TVM's importer output fails to build without
    that (``Var lv1 is not defined``).
    """
    cooperative = cooperative_passes(plan, gpu_target, cpu_target, calibration, guard_db)
    gpu = PlaceDevices(gpu_target, cpu_target).vdevices["gpu"].target

    @tvm.transform.module_pass(opt_level=0, name="mulayer.Pipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mod = canonical_form()(mod)  # a no-op on import_onnx's output
        return vm_lowering()(lower_two_device(cooperative(mod), gpu))

    return _pipeline


def build_two_device(mod: tvm.IRModule, gpu_target, cpu_target) -> tvm.runtime.Executable:
    """Compile a module for a GPU VDevice and a CPU VDevice into one VM executable.

    Parameters
    ----------
    mod : tvm.IRModule
        The module after PlaceDevices (if it has no ``vdevice`` global info, PlaceDevices is
        applied here with the given targets).
    gpu_target, cpu_target : tvm.target.Target | dict | str
        The targets PlaceDevices used; the GPU one may be llvm.

    Returns
    -------
    tvm.runtime.Executable
        Run it with ``relax.VirtualMachine(ex, devices(gpu_target))``.
    """
    vdevices = make_vdevices(gpu_target, cpu_target)
    if "vdevice" not in mod.global_infos:
        mod = PlaceDevices(gpu_target, cpu_target)(mod)
    return compile_lowered(lower_two_device(mod, vdevices["gpu"].target))


def compile_lowered(mod: tvm.IRModule) -> tvm.runtime.Executable:
    """VM executable of a module :func:`lower_two_device` returned."""
    return tvm.compile(mod, target=None, relax_pipeline=vm_lowering())


def register() -> None:
    """Make ``relax.get_pipeline("mulayer", ...)`` return :func:`mulayer_pipeline` (idempotent)."""
    from tvm.relax import pipeline as relax_pipeline

    if "mulayer" not in relax_pipeline.PIPELINE_MAP:
        relax_pipeline.register_pipeline("mulayer")(mulayer_pipeline)
