"""GPU rules (cuda, opencl, and other kinds with the ``gpu`` key).

First :class:`~.gpu_conv2d.Conv2dTensorCore` (fp16 conv as an implicit GEMM on tensor cores,
cuda sm_70+) and :class:`~.gpu_depthwise.DepthwiseConv2d` (NCHW and NHWC depthwise convs,
which dlight's ``GeneralReduction`` would otherwise claim at 0.03x cuDNN), then dlight's
generic GPU rules in the order TVM's own ``default`` pipeline uses, so anything mulayer does not
specialise is scheduled exactly as stock TVM would:

``dlight.gpu.Matmul``
    matmul *and* legalized NCHW conv2d (it treats the conv as an implicit GEMM). With
    apache-tvm-ffi 0.1.14.post1 it compiles every conv we tried for ``cuda -arch=sm_90``
    (regular, strided, grouped, depthwise, fused bias+relu, fp16/fp32): some with
    tensor cores (``mma``/``wmma`` in the source, e.g. 128ch at 28x28), others SIMT.
    It imports ``tvm.s_tir.tensor_intrin`` on first use (30-60 s); we pre-import it through
    :func:`~._intrin.load_tvm_tensor_intrinsics` (about 4 s).
``GEMV``, ``Reduction``, ``GeneralReduction``
    matrix-vector products, softmax/mean/pooling-style reductions.
``Fallback``
    binds any remaining loop nest to blocks/threads (GPU kernels must be bound).
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight import ScheduleRule
from tvm.target import Target

from ._intrin import load_tvm_tensor_intrinsics
from .base import GPUScheduleRule
from .gpu_conv2d import Conv2dTensorCore
from .gpu_depthwise import DepthwiseConv2d


class WithTensorIntrinsics(GPUScheduleRule):
    """Wrap a rule that may tensorize: load TVM's intrinsics fast before it runs."""

    generic = True  # dlight's rules are the stock, untuned schedules

    def __init__(self, rule: ScheduleRule):
        self.rule = rule

    def apply(
        self, func: tirx.PrimFunc, target: Target, tunable: bool
    ) -> s_tir.Schedule | list[s_tir.Schedule] | None:
        load_tvm_tensor_intrinsics()
        return self.rule.apply(func, target, tunable)

    def __repr__(self) -> str:
        return f"WithTensorIntrinsics({type(self.rule).__name__})"


def dlight_default_rules() -> list[ScheduleRule]:
    """dlight's default GPU rules (fallback last)."""
    return [
        WithTensorIntrinsics(dl.gpu.Matmul()),
        dl.gpu.GEMV(),
        dl.gpu.Reduction(),
        dl.gpu.GeneralReduction(),
        dl.gpu.Fallback(),
    ]


def default_gpu_rules(target: Target) -> list[ScheduleRule]:
    """Rules for ``target``: mulayer's GPU conv rules first, then dlight's defaults."""
    del target  # each rule gates itself (the tensor-core conv needs cuda sm_70+)
    return [Conv2dTensorCore(), DepthwiseConv2d(), *dlight_default_rules()]
