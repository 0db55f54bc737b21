"""PadConvInputChannels: give u8 x s8 convs a multiple of 4 input channels (dot-product rule).

The int8 dot-product instructions (``vpdpbusd``, ``sdot``/``usdot``) reduce 4 input channels at
once, so :class:`~mulayer.schedules.cpu_int8.Conv2dInt8DotProduct` needs ``C % 4 == 0``. A stem
conv has 3 (RGB): without this pass it runs on the int32 fallback at ~1/8 of the speed (measured
here: 46 GOP/s against ~400). The pass rewrites::

    conv2d(x: u8[N, C, H, W], W: const s8[F, C, KH, KW], groups=1, out_dtype="int32")
    -> conv2d(pad(x, channels C -> C'), W zero-padded to C', ...)

with ``C'`` the next multiple of 4. The extra weight channels are zero, so the result is
bit-identical whatever the padded input channel holds. The weight padding is a constant (no
runtime cost); the input padding is one extra pass over the (small) stem input.

Where it runs: on the Relax module after quantization (QuantizeCPU) and before LegalizeOps.
Only NCHW/OIHW, ``groups == 1``, uint8 data, constant int8 weight, int32 output are touched;
everything else is returned unchanged.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Constant

from mulayer.frontend.layers import static_shape

from ._util import logger

CHANNEL_MULTIPLE = 4


@relax.expr_functor.mutator
class _PadChannels(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, multiple: int) -> None:
        super().__init__(mod)
        self._conv = tvm.ir.Op.get("relax.nn.conv2d")
        self._multiple = multiple
        self.rewritten = 0

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        if call.op != self._conv:
            return call
        data, weight = call.args
        attrs = call.attrs
        if not isinstance(weight, Constant):
            return call
        if (
            attrs.data_layout != "NCHW"
            or attrs.kernel_layout != "OIHW"
            or int(attrs.groups) != 1
            or str(attrs.out_dtype) != "int32"
            or str(data.ty.dtype) != "uint8"
            or str(weight.value.dtype) != "int8"
        ):
            return call
        shape = static_shape(data)
        if shape is None or shape[1] % self._multiple == 0:
            return call
        extra = -shape[1] % self._multiple
        w = weight.value.numpy()
        w_pad = np.concatenate([w, np.zeros((w.shape[0], extra, *w.shape[2:]), w.dtype)], axis=1)
        x_pad = relax.op.nn.pad(data, [0, 0, 0, extra, 0, 0, 0, 0], pad_value=0.0)
        self.rewritten += 1
        logger.debug("PadConvInputChannels: %d -> %d input channels", shape[1], shape[1] + extra)
        return relax.op.nn.conv2d(
            x_pad,
            relax.const(w_pad),
            strides=attrs.strides,
            padding=attrs.padding,
            dilation=attrs.dilation,
            groups=1,
            data_layout="NCHW",
            kernel_layout="OIHW",
            out_dtype="int32",
        )


@tvm.transform.module_pass(opt_level=0, name="PadConvInputChannels")
class PadConvInputChannels:
    """Pad the input channels of u8 x s8 convs to a multiple of 4 (see module doc)."""

    def __init__(self, multiple: int = CHANNEL_MULTIPLE) -> None:
        self.multiple = multiple

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _PadChannels(mod, self.multiple)
        for gvar, func in mod.functions.items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
        return rewriter.builder_.finalize()
