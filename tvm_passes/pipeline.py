"""mulayer's pass pipeline, as one place that the compile driver and TVM users share.

Three stages, each usable on its own:

- :func:`cooperative_passes`: the mulayer Relax passes (split → int8 CPU parts → fp16 GPU parts
  → VDevices and copies → CPU weights lifted), a ``tvm.transform.Sequential``;
- :func:`lower_two_device`: legalize keeping each call's VDevice and schedule every PrimFunc for
  its own side;
- :func:`vm_lowering`: TVM's ``default_build`` VM lowering with
  :class:`~mulayer.passes.separate_device_storage.SeparateDeviceStorage` after the memory planner.

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

from .cast_gpu import CastGPU
from .lift_cpu_weights import LiftCPUWeights
from .place_devices import PlaceDevices
from .quantize_cpu import QuantizeCPU
from .separate_device_storage import SeparateDeviceStorage
from .split_channels import SplitChannels


def cooperative_passes(
    plan, gpu_target, cpu_target, calibration=None, guard_db: float = 30.0
) -> tvm.transform.Sequential:
    """The mulayer Relax passes for ``plan`` (CPU parts stay fp32 when ``calibration`` is None)."""
    passes = [SplitChannels(plan)]
    if calibration is not None:
        passes.append(QuantizeCPU(calibration, guard_db=guard_db))
    passes += [CastGPU(), PlaceDevices(gpu_target, cpu_target), LiftCPUWeights()]
    return tvm.transform.Sequential(passes, name="mulayer.CooperativePasses")


def lower_two_device(mod: tvm.IRModule, gpu_target) -> tvm.IRModule:
    """Realize VDevices, legalize keeping them, and schedule each PrimFunc for its side."""
    from mulayer.schedules import apply_schedules

    from .build_helpers import legalize_keeping_vdevices

    mod = relax.transform.RealizeVDevice()(mod)
    mod = legalize_keeping_vdevices(mod)
    return apply_schedules(mod, gpu_target)


def vm_lowering() -> tvm.transform.Pass:
    """TVM's ``default_build`` lowering plus :class:`SeparateDeviceStorage` (two-device safe).

    CUDA graphs follow TVM's own switch, the pass-context option
    ``"relax.backend.use_cuda_graph"``.
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
            t.RewriteCUDAGraph(),
            t.LowerAllocTensor(),
            t.KillAfterLastUse(),
            t.LowerRuntimeBuiltin(),
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
        from mulayer.frontend import canonicalize  # a no-op on import_onnx's output

        return vm_lowering()(lower_two_device(cooperative(canonicalize(mod)), gpu))

    return _pipeline


def register() -> None:
    """Make ``relax.get_pipeline("mulayer", ...)`` return :func:`mulayer_pipeline` (idempotent)."""
    from tvm.relax import pipeline as relax_pipeline

    if "mulayer" not in relax_pipeline.PIPELINE_MAP:
        relax_pipeline.register_pipeline("mulayer")(mulayer_pipeline)
