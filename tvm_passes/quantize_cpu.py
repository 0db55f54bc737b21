"""QuantizeCPU: run the CPU parts of split conv2d / dense layers in int8 (µLayer's CPU precision).

Runs after SplitChannels (and before the GPU parts are cast to fp16 and placed on devices). A CPU
part is the op bound to ``<layer>_cpu`` (``conv2d_3_cpu``); its input activation, read in fp32,
is quantized to uint8 with the layer's calibrated per-tensor scale / zero point, its constant
weight to int8 symmetric per output channel, and the op runs with int32 accumulation::

    q    = astype(clip(round(x / s) + zp, 0, 255), "uint8")           # <layer>_cpu_qin
    q    = pad(q, value=zp)                         (conv with padding) # <layer>_cpu_qpad
    acc  = conv2d(q, W_i8, padding=0, out_dtype="int32")                # <layer>_cpu_qacc
           | matmul(q, W_i8, out_dtype="int32")
    acc  = acc - zp * sum(W_i8[c])                  (when zp != 0)      # <layer>_cpu_qzp
    y    = astype(acc, "float32") * (s * s_w[c])                        # <layer>_cpu

The uint8 × int8 product is kept as is (no widening of the data) so that a schedule can map it
to VNNI ``vpdpbusd`` / Arm ``udot``-style instructions. The zero point is handled exactly: the
padding is filled with ``zp`` (the quantized 0.0) before the conv, and the per-channel correction
``zp * sum(W_i8[c])`` is subtracted from the int32 accumulator. The result is dequantized right
away, so the part's epilogue (``<layer>_cpu_e<k>``: bias, per-channel scale, relu, clip) and the
join see fp32 ("dequantize at the join"). The names of the inserted bindings start with
``<layer>_cpu`` so later passes place them with the CPU part.

Accuracy guard: :class:`mulayer.compiler.calibration.CalibrationStats` holds, per output channel,
the energy of the fp32 result and of the int8 error measured on the calibration data; a CPU slice
whose SQNR is below ``guard_db`` stays fp32.

Not rewritten (left fp32, with the reason in the report): pooling parts (max/avg pooling is
memory-bound and cheap; keeping it fp32 avoids a quantize/dequantize pair around it), parts whose
weight is not a constant, layers without calibration stats, and inputs that are not fp32.
In cooperative plans consecutive int8 layers are not chained: every CPU part dequantizes to
fp32 and the next one quantizes again (the join is fp32). A plan with every layer on the CPU is
built as one fused module where :class:`~mulayer.passes.chain_int8.ChainInt8` chains them in
uint8.

The decision for every CPU part is stored as the module attribute ``mulayer.precision`` (JSON
``{layer: {"precision", "sqnr_db", "reason"}}``) and as ``pass.report``.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Constant

from mulayer.compiler.calibration import CalibrationStats, quantize_weight
from mulayer.frontend.layers import static_shape
from mulayer.passes.common import part_role

log = logging.getLogger(__name__)

PRECISION_ATTR = "mulayer.precision"
_QUANTIZABLE = {"relax.nn.conv2d": "conv2d", "relax.matmul": "dense"}


@relax.expr_functor.mutator
class _Quantizer(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, stats: CalibrationStats, guard_db: float):
        super().__init__(mod)
        self.stats = stats
        self.guard_db = guard_db
        self.report: dict[str, dict] = {}

    # ------------------------------------------------------------------ decisions
    def _keep(self, layer: str, reason: str, sqnr: float | None = None) -> None:
        log.debug("QuantizeCPU: %s stays float32: %s", layer, reason)
        self.report[layer] = {"precision": "float32", "sqnr_db": sqnr, "reason": reason}

    def _plan(self, layer: str, call: relax.Expr):
        """``(kind, stats)`` when the CPU part ``call`` of ``layer`` is to be quantized."""
        op = getattr(call.op, "name", None) if isinstance(call, relax.Call) else None
        kind = _QUANTIZABLE.get(op)
        if kind is None:
            self._keep(layer, f"{op or 'this op'} parts stay fp32 (pooling is memory-bound)")
            return None
        data, weight = call.args[0], call.args[1]
        if not isinstance(weight, Constant):
            self._keep(layer, "the weight is not a constant")
            return None
        data_shape, w_shape = static_shape(data), static_shape(weight)
        if data_shape is None or w_shape is None or str(data.ty.dtype) != "float32":
            self._keep(layer, "the input is not a static-shape float32 tensor")
            return None
        if kind == "conv2d" and (
            call.attrs.data_layout != "NCHW" or call.attrs.kernel_layout != "OIHW"
        ):
            self._keep(layer, f"layout {call.attrs.data_layout}/{call.attrs.kernel_layout}")
            return None
        if kind == "dense" and (len(w_shape) != 2 or len(data_shape) != 2):
            self._keep(layer, "matmul is not a 2-D dense layer")
            return None
        entry = self.stats.layers.get(layer)
        if entry is None:
            self._keep(layer, "no calibration stats for this layer")
            return None
        # The CPU part holds the last `cpu_channels` output channels of the layer.
        cpu_channels = w_shape[0] if kind == "conv2d" else w_shape[1]
        total = len(entry.signal) if entry.signal is not None else None
        if total is None or cpu_channels > total:
            self._keep(layer, "calibration stats do not match the layer's channels")
            return None
        sqnr = entry.sqnr_db(total - cpu_channels, total)
        sqnr_json = None if sqnr is None or math.isinf(sqnr) else round(sqnr, 2)
        if sqnr is None or sqnr < self.guard_db:
            self._keep(layer, f"SQNR {sqnr:.1f} dB < guard {self.guard_db:g} dB", sqnr_json)
            return None
        reason = "calibrated"
        if math.isinf(sqnr):  # no SQNR to show: say why
            signal = sum(entry.signal[total - cpu_channels :])
            reason = (
                "calibrated; no SQNR: int8 is exact on the calibration samples"
                if signal > 0
                else "calibrated; no SQNR: the calibration samples give this slice an all-zero "
                "result (give more, varied samples)"
            )
        self.report[layer] = {"precision": "int8", "sqnr_db": sqnr_json, "reason": reason}
        return kind, entry

    # ------------------------------------------------------------------- rewrite
    def _emit(self, value: relax.Expr, name: str) -> relax.Var:
        return self.builder_.emit(value, name)

    def _quantized(self, name: str, kind: str, call: relax.Call, entry) -> relax.Expr:
        data = call.args[0]
        weight = call.args[1].value.numpy().astype(np.float32)
        scale, zp = np.float32(entry.input_scale), int(entry.input_zero_point)
        axis = 0 if kind == "conv2d" else 1
        w_q, w_scale = quantize_weight(weight, axis)

        # Step 1. Quantize the input activation to uint8.
        qin = f"{name}_qin"
        q = self._emit(relax.op.divide(data, relax.const(scale, "float32")), qin)
        q = self._emit(relax.op.round(q), qin)
        if zp:
            q = self._emit(relax.op.add(q, relax.const(float(zp), "float32")), qin)
        q = self._emit(relax.op.clip(q, 0, 255), qin)
        q = self._emit(relax.op.astype(q, "uint8"), qin)

        # Step 2. The op on uint8 x int8 with int32 accumulation.
        out_shape = [1] * len(static_shape(call))
        out_shape[1] = -1
        if kind == "conv2d":
            attrs = call.attrs
            padding = [int(p) for p in attrs.padding]
            if any(padding):
                top, left, bottom, right = padding
                q = self._emit(
                    relax.op.nn.pad(q, [0, 0, 0, 0, top, bottom, left, right], pad_value=float(zp)),
                    f"{name}_qpad",
                )
            acc = relax.op.nn.conv2d(
                q,
                relax.const(w_q),
                strides=[int(s) for s in attrs.strides],
                padding=[0, 0, 0, 0],
                dilation=[int(d) for d in attrs.dilation],
                groups=int(attrs.groups),
                out_dtype="int32",
            )
            w_sum = w_q.astype(np.int64).sum(axis=(1, 2, 3))
        else:
            acc = relax.op.matmul(q, relax.const(w_q), out_dtype="int32")
            w_sum = w_q.astype(np.int64).sum(axis=0)
        acc = self._emit(acc, f"{name}_qacc")

        # Step 3. Exact zero-point correction: the uint8 data carry +zp in every element.
        if zp:
            correction = (zp * w_sum).astype(np.int32).reshape(out_shape)
            acc = self._emit(relax.op.subtract(acc, relax.const(correction)), f"{name}_qzp")

        # Step 4. Dequantize to fp32: the epilogue and the join stay in fp32.
        deq = (np.float64(scale) * w_scale).astype(np.float32).reshape(out_shape)
        acc = self._emit(relax.op.astype(acc, "float32"), f"{name}_qdeq")
        return relax.op.multiply(acc, relax.const(deq))

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        part = part_role(binding.var)
        if part is None or part[1:] != ("cpu", "op"):
            super().visit_var_binding_(binding)
            return
        layer = part[0]
        value = self.visit_expr(binding.value)
        plan = self._plan(layer, value)
        if plan is None:
            super().visit_var_binding_(binding)
            return
        kind, entry = plan
        new_value = self._quantized(binding.var.name, kind, value, entry)
        if (
            isinstance(binding.var, relax.DataflowVar)
            or not self.builder_.current_block_is_dataflow()
        ):
            new_var = self.builder_.emit(new_value, binding.var.name)
        else:
            new_var = self.builder_.emit_output(new_value, binding.var.name)
        self.set_var_remap(binding.var, new_var)


@tvm.transform.module_pass(opt_level=0, name="QuantizeCPU")
class QuantizeCPU:
    """Quantize the CPU parts of split conv2d / dense layers to uint8 x int8 -> int32.

    Parameters
    ----------
    stats : CalibrationStats
        From :func:`mulayer.compiler.calibration.calibrate` on the canonical module.
    guard_db : float
        A CPU slice whose SQNR on the calibration data is below this stays fp32.

    After the pass, ``report`` (also the module attribute ``mulayer.precision``, JSON) maps each
    CPU part's layer to ``{"precision": "int8" | "float32", "sqnr_db", "reason"}``.
    """

    def __init__(self, stats: CalibrationStats, guard_db: float = 30.0):
        self.stats = stats
        self.guard_db = float(guard_db)
        self.report: dict[str, dict] = {}

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        mutator = _Quantizer(mod, self.stats, self.guard_db)
        for gvar, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mutator.builder_.update_func(gvar, mutator.visit_expr(func))
        self.report = mutator.report
        if not self.report:
            return mod
        mod = mutator.builder_.get()
        return mod.with_attr(PRECISION_ATTR, json.dumps(self.report, sort_keys=True))


def precision_report(mod: tvm.IRModule) -> dict[str, dict]:
    """The ``mulayer.precision`` attribute of ``mod`` (empty when QuantizeCPU did not run)."""
    attrs = mod.attrs
    if attrs is None or PRECISION_ATTR not in attrs:
        return {}
    return json.loads(str(attrs[PRECISION_ATTR]))
