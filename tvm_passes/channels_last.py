"""ChannelsLastGPU: run a GPU module's dense convs in NHWC with OHWI weights.

Pipeline position: on a module whose every layer runs on the GPU, after its fp16 conversion
(``ToMixedPrecision``) and before legalization: the GPU-only build
(:func:`mulayer.compiler.build.to_fp16`) and a cooperative plan with no CPU part
(:class:`~mulayer.passes.cast_gpu.CastGPU`), so that both get the same kernels.

Why: the tensor-core conv rule (:mod:`mulayer.schedules.gpu_conv2d`) reads its im2col tile
along K. In NCHW, K (channel, row, column) is a gather, one 2-byte element per channel and tap;
in NHWC, K (row, column, channel) is contiguous, so the copies into shared memory are 16-byte
vectors and the index math is a few adds. Depthwise convs go NHWC too: their rule
(:func:`~mulayer.schedules.gpu_depthwise.schedule_depthwise_nhwc`) then loads vectors of
channels.

TVM's ``ConvertLayout`` does the rewrite: weights are transposed once (constants, folded when
compiling), and the layout propagates through elementwise ops, pooling and concatenation, so a
chain of convs changes layout only at its ends (the graph input, a flatten, a conv that stays
NCHW). Grouped convs other than depthwise ones stay NCHW (dlight's rules take them).

On by default since measured on the H100 (2026-12-07, docs/results.md "Channels-last GPU
convs"): GPU-only VGG-16 0.800 -> 0.471 ms, ResNet-18 0.367 -> 0.193 ms, MobileNetV2 0.245 ->
0.221 ms against the NCHW build of the same rules. ``MULAYER_GPU_LAYOUT=NCHW`` at compile time
leaves the module as it is (the NCHW kernels).
"""

from __future__ import annotations

import logging
import os

import tvm
from tvm import relax

log = logging.getLogger(__name__)

LAYOUT_ENV = "MULAYER_GPU_LAYOUT"
LAYOUTS = ("NHWC", "NCHW")
DEFAULT_LAYOUT = "NHWC"  # measured faster on the H100 (see the module doc)
_CONV2D = "relax.nn.conv2d"
_NHWC = {_CONV2D: ["NHWC", "OHWI"]}


def gpu_layout() -> str:
    """The data layout of GPU dense and depthwise convs: ``MULAYER_GPU_LAYOUT`` (default
    :data:`DEFAULT_LAYOUT`)."""
    from mulayer.errors import MuLayerError

    layout = os.environ.get(LAYOUT_ENV, DEFAULT_LAYOUT).upper() or DEFAULT_LAYOUT
    if layout not in LAYOUTS:
        raise MuLayerError(f"{LAYOUT_ENV}={layout!r}: use one of {', '.join(LAYOUTS)}")
    return layout


def channels_last_kind(call: relax.Call) -> str | None:
    """``"dense"`` or ``"depthwise"`` for a 2-D NCHW/OIHW conv the GPU rules run in NHWC (one
    group: the tensor-core rule; one input and one output channel per group: the depthwise
    rule), else None."""
    if not _is_conv2d(call):
        return None
    attrs = call.attrs
    if (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout)) != (
        "NCHW",
        "OIHW",
        "NCHW",
    ):
        return None
    groups = int(attrs.groups)
    if groups == 1:
        return "dense"
    shape = getattr(call.args[1].ty, "shape", None)
    if shape is None:
        return None
    weight = [int(d) if isinstance(d, tvm.tirx.IntImm) else None for d in shape.values]
    return "depthwise" if weight[1] == 1 and weight[0] == groups else None


def _is_conv2d(call: relax.Call) -> bool:
    return isinstance(call.op, tvm.ir.Op) and call.op.name == _CONV2D


def _desired_layouts(call: relax.Call) -> dict:
    if not _is_conv2d(call):
        return {}
    if channels_last_kind(call):
        return _NHWC
    # An empty answer would let the conv take its input's layout (NHWC): name its own.
    return {_CONV2D: [str(call.attrs.data_layout), str(call.attrs.kernel_layout)]}


@tvm.transform.module_pass(opt_level=0, name="ChannelsLastGPU")
class ChannelsLastGPU:
    """Convert the module's dense and depthwise NCHW convs to NHWC/OHWI (see the module doc).

    Parameters
    ----------
    layout : str | None
        ``"NHWC"`` (convert) or ``"NCHW"`` (leave the module as it is); default
        :func:`gpu_layout`.
    """

    def __init__(self, layout: str | None = None):
        self.layout = layout or gpu_layout()
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout={self.layout!r}: use one of {', '.join(LAYOUTS)}")

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if self.layout == "NCHW":
            log.debug("ChannelsLastGPU: %s=NCHW, convs keep their layout", LAYOUT_ENV)
            return mod
        return relax.transform.ConvertLayout({}, layout_cb=_desired_layouts)(mod)
