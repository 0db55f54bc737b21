"""TIR schedule rules of mulayer (imported as ``mulayer.schedules``).

The build calls :func:`apply_schedules` on a module after ``relax.transform.LegalizeOps()``
(and, when it fuses, after AnnotateTIROpPattern / FuseOps / FuseTIR). Every PrimFunc is offered
to the rules of its target in order; the first rule that returns a schedule wins (dlight
convention: ``None`` means "not mine"); a fallback comes last.

Contract of ``apply_schedules(mod, target) -> IRModule``
--------------------------------------------------------
- ``mod`` is not modified; a new module is returned. ``target`` may be a ``Target``, a dict or
  a string. A PrimFunc's own ``target`` attribute (two-device modules) wins over it.
- Signature: ``apply_schedules(mod, target, fold_packing=True)``; also available as the module
  pass ``ApplySchedules(target, fold_packing=True)``.
- PrimFuncs with ``tirx.is_scheduled`` (or ``tirx.is_host_func``) are left alone; every
  function a rule schedules gets ``tirx.is_scheduled = True``; other attributes are kept.
- Never raises for a rule failure: the failing rule is logged at DEBUG on the
  ``mulayer.schedules`` logger and the next rule is tried. A CPU function whose rules all fail
  stays unscheduled (correct, slow); GPU lists end with ``dlight.gpu.Fallback`` (thread
  bindings are mandatory there).
- No search: ResNet-50 schedules (and packs its weights) in ~3 s for llvm (plus ~4 s once per
  process for cuda, to load TVM's tensor intrinsics). MetaSchedule tuning is a separate,
  optional step (``mulayer tune``, :mod:`mulayer.compiler.tune`).

Weight packing (CPU). The conv/matmul rules repack the weight inside the PrimFunc (a block
annotated ``meta_schedule.layout_rewrite_preproc``). With ``fold_packing=True`` (default),
``apply_schedules`` then precomputes it for kernels whose weight is a constant at every call
site (:func:`~.prepack.fold_weight_packing`: the kernel becomes ``<name>_prepacked`` and takes
the packed constant). Weights that are parameters, and all kernels of two-device modules
(``vdevice`` global info: TVM's SplitLayoutRewritePreproc breaks those), keep packing on every
call: correct, slower for large weights (a 3x3 512->512 conv: 1.9 ms folded, 5.4 ms not).

int8 stem. ``PadConvInputChannels`` (Relax pass, before LegalizeOps, after quantization)
pads u8 x s8 convs with ``C % 4 != 0`` input channels (RGB stems) so that the VNNI rule applies.

Shared tiling steps of the CPU conv/matmul rules live in :mod:`.cpu_tiling`. Rules carry
``generic`` (catch-alls: ``Conv2dWidthVector``, ``CPUFallback``, dlight's): ``mulayer tune``
(:mod:`mulayer.compiler.tune`) tunes the kernels those schedule, and a tuned kernel (marked
``tirx.is_scheduled`` by ``MetaScheduleApplyDatabase``) is skipped here.

Rules, in order
---------------
llvm: :class:`~.cpu_amx.Conv2dInt8AMX` (AMX tiles, where :func:`~.cpu_amx.amx_usable`; the
process must call :func:`~.cpu_amx.request_amx_permission` before running its kernels),
:class:`~.cpu_int8.Conv2dInt8DotProduct`, :class:`~.cpu_int8.MatmulInt8DotProduct`
(VNNI / Arm dot product; pointwise convs with pixels in the VNNI lanes,
:mod:`~.cpu_int8_pointwise`), :class:`~.cpu_int8.Conv2dInt8Depthwise` (u8 x s8 depthwise, int32
vectors), :class:`~.cpu_conv2d.Conv2dChannelVector`,
:class:`~.cpu_conv2d.Conv2dWidthVector`, :class:`~.cpu_dense.MatmulCPU`,
:class:`~.cpu_pool.PoolPlanes` (NCHW window pools, one channel plane per task),
:class:`~.cpu_generic.CPUFallback` (global pools, elementwise, reductions).
cuda/opencl: :class:`~.gpu_conv2d.Conv2dTensorCore` (cuda sm_70+),
:class:`~.gpu_depthwise.DepthwiseConv2d` (NCHW depthwise, fp16/fp32, any GPU kind), then
dlight's Matmul, GEMV, Reduction, GeneralReduction, Fallback.
"""

from .apply import ApplySchedules, apply_schedules, cpu_rules, gpu_rules
from .pad_channels import PadConvInputChannels
from .vector_ops import register_vectorizable_ops

register_vectorizable_ops()  # before any build in this process (requantize rounding)

__all__ = ["ApplySchedules", "PadConvInputChannels", "apply_schedules", "cpu_rules", "gpu_rules"]
