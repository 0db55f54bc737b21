"""Builders and numpy references shared by the schedule tests and ``scripts/bench_kernels.py``.

Everything here is compile-side only (it imports Relax); a deployment never needs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, tirx


@dataclass(frozen=True)
class ConvCase:
    """One NCHW conv2d problem (weights OIHW)."""

    c: int
    h: int
    w: int
    f: int
    k: int = 3
    stride: int = 1
    pad: int = 1
    groups: int = 1
    dilation: int = 1
    n: int = 1

    @property
    def out_hw(self) -> tuple[int, int]:
        """Output height and width."""
        span = (self.k - 1) * self.dilation + 1
        return (
            (self.h + 2 * self.pad - span) // self.stride + 1,
            (self.w + 2 * self.pad - span) // self.stride + 1,
        )

    @property
    def flops(self) -> int:
        """2 x multiply-adds."""
        oh, ow = self.out_hw
        return 2 * self.n * self.f * oh * ow * (self.c // self.groups) * self.k * self.k

    def __str__(self) -> str:
        return (
            f"{self.c}x{self.h}x{self.w}->{self.f} k{self.k} s{self.stride} p{self.pad}"
            f" g{self.groups} d{self.dilation} n{self.n}"
        )


def standard_pipeline(mod: tvm.IRModule, fuse: bool = True) -> tvm.IRModule:
    """Legalize (and fuse) the way the mulayer build does before ``apply_schedules``."""
    passes = [relax.transform.LegalizeOps()]
    if fuse:
        passes += [
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ]
    return tvm.transform.Sequential(passes)(mod)


def conv2d_module(
    case: ConvCase,
    dtype: str = "float32",
    w_dtype: str | None = None,
    out_dtype: str | None = None,
    epilogue: str = "bias_relu",
    params: dict[str, np.ndarray] | None = None,
    cast_to: str | None = None,
    layout: str = "NCHW",
) -> tvm.IRModule:
    """A Relax module ``main(x, w, b)`` computing conv2d (+ bias + relu), not yet legalized.

    ``layout="NHWC"``: data, bias and output channels-last, weights OHWI (what
    :class:`~mulayer.passes.channels_last.ChannelsLastGPU` makes of a GPU conv).

    ``epilogue`` is ``"none"``, ``"bias"``, ``"bias_relu"`` or ``"requant"`` (int32 ->
    ``clip(round((acc + b) * scale), 0, 255)`` as uint8, the quantizer's requantize; the scale
    is a per-channel constant). ``params`` binds ``w``/``b`` as constants (as the mulayer
    frontend does). ``cast_to`` casts the result last (e.g. fp32 accumulators to float16).
    """
    oh, ow = case.out_hw
    acc = out_dtype or dtype
    bb = relax.BlockBuilder()
    nhwc = layout == "NHWC"
    x_shape = (case.n, case.h, case.w, case.c) if nhwc else (case.n, case.c, case.h, case.w)
    cg = case.c // case.groups
    w_shape = (case.f, case.k, case.k, cg) if nhwc else (case.f, cg, case.k, case.k)
    x = relax.Var("x", relax.TensorType(x_shape, dtype))
    w = relax.Var("w", relax.TensorType(w_shape, w_dtype or dtype))
    b = relax.Var("b", relax.TensorType((1, 1, 1, case.f) if nhwc else (1, case.f, 1, 1), acc))
    del oh, ow
    with bb.function("main", [x, w, b]):
        with bb.dataflow():
            kwargs = {"out_dtype": out_dtype} if out_dtype else {}
            if nhwc:
                kwargs.update(data_layout="NHWC", kernel_layout="OHWI")
            y = bb.emit(
                relax.op.nn.conv2d(
                    x,
                    w,
                    strides=case.stride,
                    padding=case.pad,
                    dilation=case.dilation,
                    groups=case.groups,
                    **kwargs,
                )
            )
            if epilogue in ("bias", "bias_relu"):
                y = bb.emit(relax.op.add(y, b))
            if epilogue == "bias_relu":
                y = bb.emit(relax.op.nn.relu(y))
            if epilogue == "requant":
                y = bb.emit(relax.op.add(y, b))
                y = bb.emit(relax.op.astype(y, "float32"))
                scale = np.linspace(1e-4, 2e-3, case.f, dtype="float32").reshape(1, case.f, 1, 1)
                y = bb.emit(relax.op.multiply(y, relax.const(scale)))
                y = bb.emit(relax.op.round(y))
                y = bb.emit(relax.op.clip(y, 0, 255))
                y = bb.emit(relax.op.astype(y, "uint8"))
            if cast_to:
                y = bb.emit(relax.op.astype(y, cast_to))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = bb.get()
    if params:
        mod = relax.transform.BindParams("main", params)(mod)
    return mod


def matmul_module(
    m: int,
    k: int,
    n: int,
    dtype: str = "float32",
    w_dtype: str | None = None,
    out_dtype: str | None = None,
    transpose_w: bool = False,
    bias: bool = True,
    params: dict[str, np.ndarray] | None = None,
    cast_to: str | None = None,
) -> tvm.IRModule:
    """A Relax module ``main(x, w, b)``: ``x @ w (+ b)``; ``w`` is ``[N, K]`` if transposed.

    ``cast_to`` casts the result last (e.g. fp32 accumulators to float16).
    """
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((m, k), dtype))
    w = relax.Var("w", relax.TensorType((n, k) if transpose_w else (k, n), w_dtype or dtype))
    b = relax.Var("b", relax.TensorType((n,), out_dtype or dtype))
    with bb.function("main", [x, w, b]):
        with bb.dataflow():
            rhs = relax.op.permute_dims(w) if transpose_w else w
            kwargs = {"out_dtype": out_dtype} if out_dtype else {}
            y = bb.emit(relax.op.matmul(x, rhs, **kwargs))
            if bias:
                y = bb.emit(relax.op.add(y, b))
            if cast_to:
                y = bb.emit(relax.op.astype(y, cast_to))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = bb.get()
    if params:
        mod = relax.transform.BindParams("main", params)(mod)
    return mod


def requant_reference(acc: np.ndarray, b: np.ndarray) -> np.ndarray:
    """numpy twin of the ``"requant"`` epilogue of :func:`conv2d_module`."""
    f = acc.shape[1]
    scale = np.linspace(1e-4, 2e-3, f, dtype="float32").reshape(1, f, 1, 1)
    y = (acc + b).astype("float32") * scale
    return np.clip(np.round(y), 0, 255).astype("uint8")


def conv2d_reference(
    x: np.ndarray, w: np.ndarray, case: ConvCase, acc_dtype: str = "float64"
) -> np.ndarray:
    """NCHW/OIHW conv2d in numpy, accumulated in ``acc_dtype`` (int64 for exact int8)."""
    x = x.astype(acc_dtype)
    w = w.astype(acc_dtype)
    p, s, d, g = case.pad, case.stride, case.dilation, case.groups
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    oh, ow = case.out_hw
    cg, fg = case.c // g, case.f // g
    out = np.zeros((case.n, case.f, oh, ow), acc_dtype)
    for ry in range(case.k):
        for rx in range(case.k):
            win = xp[
                :,
                :,
                ry * d : ry * d + (oh - 1) * s + 1 : s,
                rx * d : rx * d + (ow - 1) * s + 1 : s,
            ]  # n, c, oh, ow
            for gi in range(g):
                out[:, gi * fg : (gi + 1) * fg] += np.einsum(
                    "nchw,fc->nfhw",
                    win[:, gi * cg : (gi + 1) * cg],
                    w[gi * fg : (gi + 1) * fg, :, ry, rx],
                )
    return out


def prim_funcs(mod: tvm.IRModule) -> dict[str, tirx.PrimFunc]:
    """The module's PrimFuncs by name."""
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}


def build_prim_func(func: tirx.PrimFunc, target: tvm.target.Target) -> tvm.runtime.Module:
    """Compile one PrimFunc as ``main``."""
    func = func.with_attr("global_symbol", "main")
    return tvm.tirx.build(tvm.IRModule({"main": func}), target=target)


def run_poisoned(
    lib: tvm.runtime.Module,
    inputs: list[np.ndarray],
    out_shape: tuple[int, ...],
    out_dtype: str,
) -> np.ndarray:
    """Call ``lib["main"](*inputs, out)`` with ``out`` pre-filled with NaN (or a sentinel)."""
    if np.dtype(out_dtype).kind == "f":
        poison = np.full(out_shape, np.nan, out_dtype)
    else:
        poison = np.full(out_shape, np.iinfo(out_dtype).min + 7, out_dtype)
    args = [tvm.runtime.tensor(a) for a in inputs]
    out = tvm.runtime.tensor(poison)
    lib["main"](*args, out)
    return out.numpy()


def time_prim_func(
    lib: tvm.runtime.Module, args: list[np.ndarray], number: int = 10, repeat: int = 5
) -> float:
    """Seconds per call: the best of ``repeat`` means of ``number`` calls (the best resists
    noise from other processes on a shared machine). ``args`` include the output buffer."""
    dev = tvm.cpu()
    targs = [tvm.runtime.tensor(a) for a in args]
    ev = lib.time_evaluator("main", dev, number=number, repeat=repeat)
    return float(min(ev(*targs).results))
