#!/usr/bin/env python3
"""Kernel benchmark: mulayer's schedule rules against PyTorch, onnxruntime and cuDNN, per layer.

Representative CNN layers (ResNet 3x3 at 56/28/14/7, ResNet's stride-2 256 -> 512 3x3 and 1x1
at 14x14, VGG 3x3 at 224, 56 and 28 (256 -> 512), a pointwise 1x1, MobileNetV2 depthwise 3x3, a
4096x1000 dense), batch 1, each measured as:

- ours CPU int8: u8 x s8 -> s32 conv/dense with the requantize epilogue fused (u8 out; the dense
  returns s32 + bias), ``mulayer.schedules.apply_schedules`` on ``llvm -mcpu=<detected>``,
  ``TVM_NUM_THREADS`` = ``--threads``; weights packed at compile time;
- ours CPU int8, VNNI only: the same with AMX switched off (``-mattr=-amx-int8``), measured
  only where the int8 conv rule uses AMX tiles (stride-1 dense convs on Sapphire Rapids and
  later: the GPU machine's Xeon);
- ours CPU fp32: conv + bias + relu (dense + bias) the same way;
- ours GPU fp16: fp16 operands, fp32 accumulation, bias + relu, fp16 out (cuda, ``sm_XY`` of
  the GPU);
- PyTorch CPU fp32 (``torch.set_num_threads(--threads)``): ``F.conv2d`` / ``F.linear`` with bias;
- onnxruntime CPU int8 (``--threads`` intra-op threads): a ``QLinearConv`` model (u8 x s8,
  per-channel weight scales, bias, u8 out) or ``MatMulInteger`` + ``Add`` for the dense;
- cuDNN fp16 through PyTorch (``cudnn.benchmark``): ``F.conv2d`` / ``F.linear`` in fp16, timed
  with CUDA events around replays of a captured CUDA graph (eager launches when capture fails),
  so PyTorch's per-call overhead is not counted.

Our kernels are timed with TVM's ``time_evaluator`` on the compiled Relax VM function (about
1 µs of VM overhead on the CPU), the others with ``time.perf_counter`` around batches of calls
(onnxruntime through I/O binding). Each figure is the median of ``--repeat`` batches, each
batch at least ``--min-ms`` long, after a warm-up. Every output is checked against a float64
reference (int8: at most 1 unit of requantize rounding; fp32: 1e-4; fp16: 2e-2 relative to
the largest output) and marked ``!`` in the table when off.

A column that cannot be measured here (no CUDA, package missing) is "n/a" with the reason; a
failing cell is reported with its error. The work runs in a child process: a crash (signal) in
one cell is reported as that cell's error and the child is restarted for the rest.

On the GPU machine (TVM installed there, see ../shared/device/README.md; mulayer is imported
from this checkout when it is not installed)::

    PYTHONUNBUFFERED=1 python3 scripts/bench_kernels.py --threads 16 --out $OUT

Here, quickly (2 cores, no GPU: GPU columns n/a)::

    python scripts/bench_kernels.py --quick --threads 2 --out /tmp/bench
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
from benchlib.machine import cpu_model
from benchlib.timing import error_text

SCHEMA = 1
RESULT_NAME = "bench_kernels"


# ---------------------------------------------------------------------------------------------
# Layers and columns (defined once; everything else derives from these)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layer:
    """One benchmark layer: a conv (``conv`` set) or a dense ``[1, k] x [k, n]``."""

    name: str
    conv: tuple | None = None  # ConvCase fields: (c, h, w, f, k, stride, pad, groups)
    dense: tuple[int, int] | None = None  # (k, n)

    def case(self):
        from mulayer.schedules.testing import ConvCase

        c, h, w, f, k, stride, pad, groups = self.conv
        return ConvCase(c, h, w, f, k=k, stride=stride, pad=pad, groups=groups)

    @property
    def flops(self) -> int:
        """2 x multiply-adds."""
        if self.dense is not None:
            return 2 * self.dense[0] * self.dense[1]
        c, h, w, f, k, stride, pad, groups = self.conv
        oh = (h + 2 * pad - k) // stride + 1
        ow = (w + 2 * pad - k) // stride + 1
        return 2 * f * oh * ow * (c // groups) * k * k

    @property
    def shape(self) -> str:
        if self.dense is not None:
            return f"dense 1x{self.dense[0]} -> {self.dense[1]}"
        c, h, w, f, k, stride, _, groups = self.conv
        kind = "dw " if groups > 1 and groups == c else ""
        return f"{kind}{k}x{k}/{stride} {c}x{h}x{w} -> {f}"


LAYERS = (
    Layer("resnet_3x3_56", conv=(64, 56, 56, 64, 3, 1, 1, 1)),
    Layer("resnet_3x3_28", conv=(128, 28, 28, 128, 3, 1, 1, 1)),
    Layer("resnet_3x3_14", conv=(256, 14, 14, 256, 3, 1, 1, 1)),
    Layer("resnet_3x3_7", conv=(512, 7, 7, 512, 3, 1, 1, 1)),
    Layer("resnet_3x3s2_14", conv=(256, 14, 14, 512, 3, 2, 1, 1)),
    Layer("resnet_1x1s2_14", conv=(256, 14, 14, 512, 1, 2, 0, 1)),
    Layer("vgg_3x3_28", conv=(256, 28, 28, 512, 3, 1, 1, 1)),
    Layer("vgg_3x3_224", conv=(64, 224, 224, 64, 3, 1, 1, 1)),
    Layer("vgg_3x3_56", conv=(256, 56, 56, 256, 3, 1, 1, 1)),
    Layer("pointwise_1x1_56", conv=(64, 56, 56, 256, 1, 1, 0, 1)),
    Layer("mbv2_dw_3x3s2_112", conv=(96, 112, 112, 96, 3, 2, 1, 96)),
    Layer("mbv2_dw_3x3_56", conv=(144, 56, 56, 144, 3, 1, 1, 144)),
    Layer("dense_4096_1000", dense=(4096, 1000)),
)
QUICK_LAYERS = ("resnet_3x3_28", "pointwise_1x1_56", "mbv2_dw_3x3_56", "dense_4096_1000")


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    precision: str  # int8 | fp32 | fp16: which inputs and reference the cell uses
    device: str  # cpu | gpu


COLUMNS = (
    Column("ours_int8_cpu", "ours CPU int8", "int8", "cpu"),
    Column("ours_int8_vnni_cpu", "ours CPU int8, VNNI only", "int8", "cpu"),
    Column("ours_fp32_cpu", "ours CPU fp32", "fp32", "cpu"),
    Column("torch_fp32_cpu", "PyTorch CPU fp32", "fp32", "cpu"),
    Column("ort_int8_cpu", "onnxruntime CPU int8", "int8", "cpu"),
    Column("ours_fp16_gpu", "ours GPU fp16", "fp16", "gpu"),
    Column("cudnn_fp16", "cuDNN fp16 (PyTorch)", "fp16", "gpu"),
)
COLUMN_BY_KEY = {c.key: c for c in COLUMNS}
LAYER_BY_NAME = {layer.name: layer for layer in LAYERS}
# Error bound per precision (int8: absolute, in output units; else relative to max |ref|).
TOLERANCE = {"int8": 1.0, "fp32": 1e-4, "fp16": 2e-2}


@dataclass
class Cell:
    """One measurement (or why there is none)."""

    layer: str
    column: str
    us: float | None = None
    gops: float | None = None
    error: str | None = None  # "n/a: <reason>", "skipped: ...", or the failure
    check: float | None = None  # error against the reference (see TOLERANCE)
    check_ok: bool | None = None
    build_s: float | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Options:
    threads: int
    repeat: int
    min_ms: float
    deadline: float  # time.time() after which no new cell starts


# ---------------------------------------------------------------------------------------------
# Inputs and references (float64, exact for int8)
# ---------------------------------------------------------------------------------------------
class LayerData:
    """Random inputs of one layer in every precision, and their float64 references."""

    def __init__(self, layer: Layer) -> None:
        rng = np.random.default_rng(zlib.crc32(layer.name.encode()))
        self.layer = layer
        if layer.dense is not None:
            k, n = layer.dense
            xshape, wshape, bshape = (1, k), (n, k), (n,)
        else:
            case = layer.case()
            xshape = (case.n, case.c, case.h, case.w)
            wshape = (case.f, case.c // case.groups, case.k, case.k)
            bshape = (1, case.f, 1, 1)
        fan_in = int(np.prod(wshape[1:]))
        self.x = rng.standard_normal(xshape).astype("float32")
        self.w = (rng.standard_normal(wshape) / np.sqrt(fan_in)).astype("float32")
        self.b = rng.standard_normal(bshape).astype("float32")
        self.x8 = rng.integers(0, 256, xshape).astype("uint8")
        self.w8 = rng.integers(-128, 128, wshape).astype("int8")
        self.b32 = rng.integers(-1000, 1000, bshape).astype("int32")
        self._refs: dict[str, np.ndarray] = {}

    @property
    def out_channels(self) -> int:
        return self.w.shape[0]

    def requant_scale(self) -> np.ndarray:
        """Per-channel requantize scale of the int8 conv (as in ``testing.conv2d_module``)."""
        return np.linspace(1e-4, 2e-3, self.out_channels, dtype="float32")

    def _linear(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """x (*) w in float64 (conv or dense), no bias."""
        x, w = x.astype("float64"), w.astype("float64")
        if self.layer.dense is not None:
            return x @ w.T
        case = self.layer.case()
        try:
            import torch
            import torch.nn.functional as F

            out = F.conv2d(
                torch.from_numpy(x),
                torch.from_numpy(w),
                stride=case.stride,
                padding=case.pad,
                groups=case.groups,
            )
            return out.numpy()
        except ImportError:
            from mulayer.schedules.testing import conv2d_reference

            return conv2d_reference(x, w, case)

    def reference(self, precision: str) -> np.ndarray:
        """The exact output for ``precision`` (int8: requantized u8, or s32 for the dense)."""
        if precision not in self._refs:
            if precision == "int8":
                acc = self._linear(self.x8, self.w8) + self.b32
                if self.layer.dense is None:
                    scale = self.requant_scale().reshape(1, -1, 1, 1)
                    ref = np.clip(np.round(acc.astype("float32") * scale), 0, 255)
                else:
                    ref = acc
            else:
                x, w = (self.x, self.w) if precision == "fp32" else self.fp16_inputs()[:2]
                ref = self._linear(x, w) + self.b
                if self.layer.dense is None:
                    ref = np.maximum(ref, 0)  # our conv epilogue: bias + relu
            self._refs[precision] = ref
        return self._refs[precision]

    def fp16_inputs(self) -> tuple[np.ndarray, np.ndarray]:
        return self.x.astype("float16"), self.w.astype("float16")


def check_error(precision: str, out: np.ndarray, ref: np.ndarray, relu: bool) -> float:
    """Error of ``out`` against ``ref`` in TOLERANCE's units."""
    out = np.asarray(out, dtype="float64").reshape(ref.shape)
    if relu:  # peers without a fused relu
        out = np.maximum(out, 0)
    diff = float(np.max(np.abs(out - ref)))
    if precision == "int8":
        return diff
    return diff / max(float(np.max(np.abs(ref))), 1e-30)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def time_callable(fn, opts: Options) -> float:
    """Median seconds per call over ``repeat`` batches of at least ``min_ms`` each."""
    fn()
    start = time.perf_counter()
    fn()
    one = max(time.perf_counter() - start, 1e-7)
    number = max(1, int(opts.min_ms / 1e3 / one))
    for _ in range(min(number, 20)):  # warm-up (caches, thread pools, clocks)
        fn()
    samples = []
    for _ in range(opts.repeat if one < 0.5 else 2):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - start) / number)
    return statistics.median(samples)


def _finish(cell: Cell, layer: Layer, seconds: float) -> Cell:
    cell.us = round(seconds * 1e6, 2)
    cell.gops = round(layer.flops / seconds / 1e9, 1)
    return cell


def _checked(cell: Cell, precision: str, out, ref, relu: bool = False) -> None:
    cell.check = float(f"{check_error(precision, out, ref, relu):.3g}")
    cell.check_ok = cell.check <= TOLERANCE[precision]


# ---------------------------------------------------------------------------------------------
# Columns: ours (TVM)
# ---------------------------------------------------------------------------------------------
class TVMContext:
    """Targets, built once per process."""

    def __init__(self, threads: int) -> None:
        import tvm

        from mulayer.target import detect_cpu

        self.cpu_name = detect_cpu()
        cpu = {"kind": "llvm", "mcpu": self.cpu_name, "num-cores": threads}
        self.cpu = tvm.target.Target(cpu)
        # The same CPU with AMX switched off: the int8 rules fall back to VNNI.
        self.cpu_vnni = tvm.target.Target({**cpu, "mattr": ["-amx-int8", "-amx-tile"]})
        self.amx = _amx_usable(self.cpu)
        self.gpu = None
        self.gpu_reason = None
        dev = tvm.cuda(0)
        if not dev.exist:
            self.gpu_reason = "no CUDA device visible to TVM"
        else:
            arch = "sm_" + str(dev.compute_version).replace(".", "")
            self.gpu = tvm.target.Target(
                {"kind": "cuda", "arch": arch}, host={"kind": "llvm", "mcpu": self.cpu_name}
            )


def _amx_usable(target) -> bool:
    """Whether our int8 conv rule uses AMX on ``target``."""
    try:
        from mulayer.schedules.cpu_amx import amx_usable
    except ImportError:  # an older checkout without the AMX rule
        return False
    return amx_usable(target)


def _ours_module(layer: Layer, data: LayerData, precision: str):
    """The Relax module of our column, its inputs, and whether its output is NHWC (dense and
    depthwise fp16 convs run channels-last where GPU builds run them so:
    ``MULAYER_GPU_LAYOUT=NHWC``)."""
    from mulayer.passes.channels_last import gpu_layout
    from mulayer.schedules import PadConvInputChannels
    from mulayer.schedules.testing import conv2d_module, matmul_module

    if layer.dense is not None:
        k, n = layer.dense
        if precision == "int8":
            params = {"w": data.w8, "b": data.b32}
            return (
                matmul_module(1, k, n, "uint8", "int8", "int32", transpose_w=True, params=params),
                [data.x8],
                False,
            )
        if precision == "fp32":
            params = {"w": data.w, "b": data.b}
            return matmul_module(1, k, n, transpose_w=True, params=params), [data.x], False
        x16, w16 = data.fp16_inputs()
        mod = matmul_module(
            1,
            k,
            n,
            "float16",
            out_dtype="float32",
            transpose_w=True,
            params={"w": w16, "b": data.b},
            cast_to="float16",
        )
        return mod, [x16], False
    case = layer.case()
    if precision == "int8":
        mod = conv2d_module(
            case, "uint8", "int8", "int32", epilogue="requant", params={"w": data.w8, "b": data.b32}
        )
        return PadConvInputChannels()(mod), [data.x8], False
    if precision == "fp32":
        return conv2d_module(case, params={"w": data.w, "b": data.b}), [data.x], False
    x16, w16 = data.fp16_inputs()
    params = {"w": w16, "b": data.b}
    depthwise = case.groups == case.c == case.f
    nhwc = (case.groups == 1 or depthwise) and gpu_layout() == "NHWC"
    if nhwc:
        x16 = np.ascontiguousarray(x16.transpose(0, 2, 3, 1))
        params = {k: np.ascontiguousarray(v.transpose(0, 2, 3, 1)) for k, v in params.items()}
    mod = conv2d_module(
        case,
        "float16",
        out_dtype="float32",
        params=params,
        cast_to="float16",
        layout="NHWC" if nhwc else "NCHW",
    )
    return mod, [x16], nhwc


def measure_ours(layer: Layer, column: Column, data: LayerData, ctx: TVMContext, opts: Options):
    import tvm
    from tvm import relax

    from mulayer.schedules import apply_schedules
    from mulayer.schedules.testing import standard_pipeline

    cell = Cell(layer.name, column.key)
    if column.device == "gpu":
        if ctx.gpu is None:
            cell.error = f"n/a: {ctx.gpu_reason}"
            return cell
        target, dev = ctx.gpu, tvm.cuda(0)
    elif column.key == "ours_int8_vnni_cpu":
        if not ctx.amx:
            cell.error = "n/a: no AMX here (the int8 column is VNNI already)"
            return cell
        target, dev = ctx.cpu_vnni, tvm.cpu(0)
    else:
        target, dev = ctx.cpu, tvm.cpu(0)
    mod, inputs, nhwc = _ours_module(layer, data, column.precision)
    start = time.perf_counter()
    mod = apply_schedules(standard_pipeline(mod), target)
    unscheduled = [
        gv.name_hint
        for gv, f in mod.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc) and not (f.attrs and f.attrs.get("tirx.is_scheduled"))
    ]
    ex = tvm.compile(mod, target=target)
    vm = relax.VirtualMachine(ex, dev)
    cell.build_s = round(time.perf_counter() - start, 2)
    if unscheduled:
        cell.extra["unscheduled"] = unscheduled
    args = [tvm.runtime.tensor(a, dev) for a in inputs]
    out = vm["main"](*args).numpy()
    if nhwc:
        out = out.transpose(0, 3, 1, 2)
        cell.extra["layout"] = "NHWC"
    _checked(cell, column.precision, out, data.reference(column.precision))
    first = time.perf_counter()
    vm["main"](*args)
    dev.sync()
    repeat = opts.repeat if time.perf_counter() - first < 0.5 else 2
    ev = vm.time_evaluator("main", dev, number=1, repeat=repeat, min_repeat_ms=int(opts.min_ms))
    return _finish(cell, layer, statistics.median(ev(*args).results))


# ---------------------------------------------------------------------------------------------
# Columns: peers
# ---------------------------------------------------------------------------------------------
def _torch_call(layer: Layer, x, w, b):
    import torch.nn.functional as F

    if layer.dense is not None:
        return lambda: F.linear(x, w, b.reshape(-1))
    case = layer.case()
    b = b.reshape(-1)
    return lambda: F.conv2d(x, w, b, stride=case.stride, padding=case.pad, groups=case.groups)


def measure_torch_cpu(layer: Layer, column: Column, data: LayerData, opts: Options) -> Cell:
    import torch

    cell = Cell(layer.name, column.key)
    torch.set_num_threads(opts.threads)
    x, w, b = (torch.from_numpy(a) for a in (data.x, data.w, data.b))
    fn = _torch_call(layer, x, w, b)
    with torch.inference_mode():
        out = fn().numpy()
        _checked(cell, "fp32", out, data.reference("fp32"), relu=layer.dense is None)
        return _finish(cell, layer, time_callable(fn, opts))


def measure_cudnn(layer: Layer, column: Column, data: LayerData, opts: Options) -> Cell:
    import torch

    cell = Cell(layer.name, column.key)
    torch.backends.cudnn.benchmark = True
    x16, w16 = data.fp16_inputs()
    x, w = (torch.from_numpy(a).cuda() for a in (x16, w16))
    b = torch.from_numpy(data.b).half().cuda()
    fn = _torch_call(layer, x, w, b)
    with torch.inference_mode():
        out = fn().float().cpu().numpy()  # also runs cudnn.benchmark's algorithm search
        _checked(cell, "fp16", out, data.reference("fp16"), relu=layer.dense is None)
        eager = _cuda_event_seconds(lambda: fn(), calls=200, opts=opts)
        cell.extra["eager_us"] = round(eager * 1e6, 2)
        try:
            seconds = _cuda_graph_seconds(fn, opts)
            cell.extra["timing"] = "cuda graph replay"
        except RuntimeError as err:  # capture unsupported: eager launches
            seconds = eager
            cell.extra["timing"] = f"eager (graph capture failed: {str(err).splitlines()[0]})"
    return _finish(cell, layer, seconds)


def _cuda_event_seconds(run, calls: int, opts: Options) -> float:
    """Median over ``repeat`` of (CUDA-event time of ``calls`` runs) / calls."""
    import torch

    for _ in range(10):
        run()
    samples = []
    for _ in range(opts.repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(samples)


def _cuda_graph_seconds(fn, opts: Options, per_graph: int = 20) -> float:
    """Per-call GPU time from replays of a CUDA graph holding ``per_graph`` calls."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn()
    return _cuda_event_seconds(graph.replay, calls=10, opts=opts) / per_graph


def _ort_model(layer: Layer, data: LayerData):
    """A one-op onnx model computing what our int8 kernel computes (see module doc)."""
    from onnx import TensorProto, helper, numpy_helper

    def init(name, array):
        return numpy_helper.from_array(np.asarray(array), name)

    if layer.dense is not None:
        k, n = layer.dense
        inits = [
            init("w", data.w8.T.copy()),
            init("a_zp", np.array(0, "uint8")),
            init("w_zp", np.array(0, "int8")),
            init("b", data.b32),
        ]
        nodes = [
            helper.make_node("MatMulInteger", ["x", "w", "a_zp", "w_zp"], ["acc"]),
            helper.make_node("Add", ["acc", "b"], ["y"]),
        ]
        x_info = helper.make_tensor_value_info("x", TensorProto.UINT8, [1, k])
        y_info = helper.make_tensor_value_info("y", TensorProto.INT32, [1, n])
    else:
        case = layer.case()
        f = data.out_channels
        inits = [
            init("x_scale", np.array(1.0, "float32")),
            init("x_zp", np.array(0, "uint8")),
            init("w", data.w8),
            init("w_scale", data.requant_scale()),
            init("w_zp", np.zeros(f, "int8")),
            init("y_scale", np.array(1.0, "float32")),
            init("y_zp", np.array(0, "uint8")),
            init("b", data.b32.reshape(-1)),
        ]
        node = helper.make_node(
            "QLinearConv",
            ["x", "x_scale", "x_zp", "w", "w_scale", "w_zp", "y_scale", "y_zp", "b"],
            ["y"],
            kernel_shape=[case.k, case.k],
            strides=[case.stride, case.stride],
            pads=[case.pad] * 4,
            group=case.groups,
        )
        nodes = [node]
        oh, ow = case.out_hw
        x_info = helper.make_tensor_value_info("x", TensorProto.UINT8, list(data.x8.shape))
        y_info = helper.make_tensor_value_info("y", TensorProto.UINT8, [1, f, oh, ow])
    graph = helper.make_graph(nodes, layer.name, [x_info], [y_info], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def measure_ort(layer: Layer, column: Column, data: LayerData, opts: Options) -> Cell:
    import onnxruntime as ort

    cell = Cell(layer.name, column.key)
    so = ort.SessionOptions()
    so.intra_op_num_threads = opts.threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(
        _ort_model(layer, data).SerializeToString(), so, providers=["CPUExecutionProvider"]
    )
    out = sess.run(None, {"x": data.x8})[0]
    _checked(cell, "int8", out, data.reference("int8"))
    binding = sess.io_binding()
    binding.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(data.x8))
    binding.bind_ortvalue_output("y", ort.OrtValue.ortvalue_from_numpy(np.empty_like(out)))
    return _finish(cell, layer, time_callable(lambda: sess.run_with_iobinding(binding), opts))


# ---------------------------------------------------------------------------------------------
# Worker: measures cells, one JSON line each, into the results file
# ---------------------------------------------------------------------------------------------
def _column_availability() -> dict[str, str | None]:
    """Per column: None if it can be measured here, else the reason."""
    reasons: dict[str, str | None] = {}
    try:
        import torch

        torch_ok, cuda_ok = None, torch.cuda.is_available()
    except ImportError as err:
        torch_ok, cuda_ok = f"PyTorch not installed ({err})", False
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401

        ort_ok = None
    except ImportError as err:
        ort_ok = f"onnxruntime/onnx not installed ({err})"
    try:
        import tvm  # noqa: F401

        import mulayer.schedules  # noqa: F401

        tvm_ok = None
    except ImportError as err:
        tvm_ok = f"TVM/mulayer not importable ({err})"
    for col in COLUMNS:
        if col.key.startswith("ours"):
            reasons[col.key] = tvm_ok
        elif col.key == "ort_int8_cpu":
            reasons[col.key] = ort_ok
        elif col.key == "torch_fp32_cpu":
            reasons[col.key] = torch_ok
        else:
            reasons[col.key] = torch_ok or (None if cuda_ok else "PyTorch sees no CUDA GPU")
    return reasons


def _environment(threads: int) -> dict:
    env = {
        "date": date.today().isoformat(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "python": platform.python_version(),
        "threads": threads,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
    }
    for name in ("tvm", "torch", "onnxruntime", "numpy"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    try:
        import torch

        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["cudnn"] = torch.backends.cudnn.version()
    except ImportError:
        pass
    try:
        from mulayer.target import detect_cpu

        env["llvm_mcpu"] = detect_cpu()
    except ImportError:
        pass
    return env


def use_checkout() -> None:
    """Import mulayer from this checkout when it is not installed (e.g. on the GPU machine).

    Mirrors pyproject's package-dir mapping: ``mulayer`` = python/mulayer, ``mulayer.schedules``
    = schedules/, ``mulayer.passes`` = tvm_passes/.
    """
    import importlib.util

    try:
        import mulayer.schedules  # noqa: F401

        return
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("mulayer"):
            raise  # TVM itself is missing: reported as the columns' reason
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "python"))
    import mulayer

    for name, folder in (("mulayer.passes", "tvm_passes"), ("mulayer.schedules", "schedules")):
        if name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(
            name, root / folder / "__init__.py", submodule_search_locations=[str(root / folder)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        setattr(mulayer, name.split(".")[1], module)


def run_worker(spec: dict) -> int:
    opts = Options(**spec["options"])
    with contextlib.suppress(ImportError):  # _column_availability says what is missing
        use_checkout()
    out = open(spec["results"], "a", buffering=1)  # noqa: SIM115 - one line per event

    def emit(event: dict) -> None:
        out.write(json.dumps(event) + "\n")
        out.flush()

    reasons = _column_availability()
    emit({"event": "env", "env": _environment(opts.threads), "columns": reasons})
    ctx = None
    data: dict[str, LayerData] = {}
    for layer_name, column_key in spec["tasks"]:
        layer, column = LAYER_BY_NAME[layer_name], COLUMN_BY_KEY[column_key]
        emit({"event": "start", "task": [layer_name, column_key]})
        cell = Cell(layer_name, column_key)
        if reasons[column_key]:
            cell.error = f"n/a: {reasons[column_key]}"
        elif time.time() > opts.deadline:
            cell.error = "skipped: time budget (--budget-s) used up"
        else:
            time.sleep(0.1)  # let the previous backend's spinning worker threads park
            try:
                if layer_name not in data:
                    data = {layer_name: LayerData(layer)}  # one layer's arrays at a time
                if column_key.startswith("ours"):
                    ctx = ctx or TVMContext(opts.threads)
                    cell = measure_ours(layer, column, data[layer_name], ctx, opts)
                else:
                    measure = {
                        "torch_fp32_cpu": measure_torch_cpu,
                        "ort_int8_cpu": measure_ort,
                        "cudnn_fp16": measure_cudnn,
                    }[column_key]
                    cell = measure(layer, column, data[layer_name], opts)
            except Exception as err:  # noqa: BLE001 - a failing cell is a result, not a crash
                cell = Cell(layer_name, column_key, error=error_text(err))
                cell.extra["traceback"] = traceback.format_exc(limit=4)[-2000:]
        emit({"event": "cell", "cell": asdict(cell)})
        print(_cell_line(cell), file=sys.stderr, flush=True)
    return 0


def _cell_line(cell: Cell) -> str:
    if cell.us is None:
        return f"{cell.layer:20} {cell.column:15} {cell.error}"
    check = "ok" if cell.check_ok else f"CHECK FAILED ({cell.check})"
    build = f" build {cell.build_s}s" if cell.build_s is not None else ""
    timing = f"{cell.us:10.1f} us {cell.gops:8.1f} GOP/s"
    return f"{cell.layer:20} {cell.column:15} {timing} {check}{build}"


# ---------------------------------------------------------------------------------------------
# Supervisor: runs workers until every task has a result (restarting after a crash)
# ---------------------------------------------------------------------------------------------
def supervise(tasks: list[tuple[str, str]], opts: Options, workdir: Path) -> tuple[dict, list]:
    results = workdir / "cells.jsonl"
    env: dict = {}
    cells: dict[tuple[str, str], dict] = {}
    env_vars = dict(os.environ, TVM_NUM_THREADS=str(opts.threads))
    for attempt in range(8):
        todo = [t for t in tasks if tuple(t) not in cells]
        if not todo:
            break
        spec_path = workdir / f"spec{attempt}.json"
        spec = {"tasks": todo, "options": asdict(opts), "results": str(results)}
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", str(spec_path)], env=env_vars, check=False
        )
        started = None
        for line in results.read_text().splitlines():
            event = json.loads(line)
            if event["event"] == "env":
                env = {**event["env"], "columns": event["columns"]}
            elif event["event"] == "start":
                started = tuple(event["task"])
            elif event["event"] == "cell":
                cell = event["cell"]
                cells[(cell["layer"], cell["column"])] = cell
                started = None
        if proc.returncode != 0 and started is not None and started not in cells:
            how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
            crashed = Cell(*started, error=f"crashed: the process died ({how})")
            cells[started] = asdict(crashed)
            print(_cell_line(crashed), file=sys.stderr, flush=True)
        elif proc.returncode != 0:
            print(f"worker exited with {proc.returncode}", file=sys.stderr)
    ordered = []
    for t in tasks:
        missing = asdict(Cell(*t, error="skipped: the worker kept failing"))
        ordered.append(cells.get(tuple(t), missing))
    return env, ordered


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _fmt_cell(cell: dict, notes: list[str]) -> str:
    if cell["us"] is None:
        text = cell["error"] or "?"
        if text.startswith("n/a"):
            return "n/a"
        if text.startswith("skipped"):
            return "skipped"
        notes.append(f"{cell['layer']} / {COLUMN_BY_KEY[cell['column']].title}: {text}")
        return f"error [{len(notes)}]"
    text = f"{cell['us']:.1f} ({cell['gops']:.0f})"
    if cell["check_ok"] is False:
        notes.append(
            f"{cell['layer']} / {COLUMN_BY_KEY[cell['column']].title}: output off by "
            f"{cell['check']} (tolerance {TOLERANCE[COLUMN_BY_KEY[cell['column']].precision]})"
        )
        text += f" ! [{len(notes)}]"
    return text


RATIOS = (
    ("int8 vs PyTorch fp32", "torch_fp32_cpu", "ours_int8_cpu"),
    ("int8 vs ORT int8", "ort_int8_cpu", "ours_int8_cpu"),
    ("cuDNN / ours fp16", "cudnn_fp16", "ours_fp16_gpu"),
)


def markdown(env: dict, cells: list[dict], layers: list[Layer], columns: list[Column]) -> str:
    by_key = {(c["layer"], c["column"]): c for c in cells}
    notes: list[str] = []
    keys = {c.key for c in columns}
    ratios = [r for r in RATIOS if r[1] in keys and r[2] in keys]
    head = ["layer", "shape", "MOP", *(c.title for c in columns), *(r[0] for r in ratios)]
    lines = [
        "| " + " | ".join(head) + " |",
        "| " + " | ".join(["---", "---"] + ["---:"] * (len(head) - 2)) + " |",
    ]
    for layer in layers:
        row = [layer.name, layer.shape, f"{layer.flops / 1e6:.0f}"]
        for col in columns:
            row.append(_fmt_cell(by_key[(layer.name, col.key)], notes))
        for _, peer, ours in ratios:
            a, b = by_key.get((layer.name, peer)), by_key.get((layer.name, ours))
            ok = a and b and a["us"] and b["us"]
            row.append(f"{a['us'] / b['us']:.2f}x" if ok else "")
        lines.append("| " + " | ".join(row) + " |")
    unavailable: dict[str, str] = {}  # column title -> reason, from the cells themselves
    for cell in cells:
        if (cell["error"] or "").startswith("n/a: "):
            unavailable.setdefault(COLUMN_BY_KEY[cell["column"]].title, cell["error"][5:])
    out = [
        f"Machine: {env.get('cpu')} ({env.get('cores')} cores), GPU: {env.get('gpu', 'none')};"
        f" TVM {env.get('tvm')}, PyTorch {env.get('torch')}, onnxruntime"
        f" {env.get('onnxruntime')}, llvm mcpu {env.get('llvm_mcpu')}, {env.get('threads')}"
        f" CPU threads. Date: {env.get('date')}.",
        f"Command: `{env.get('command')}`",
        "",
        "Batch 1; µs per layer (GOP/s = 2 x MACs / time), median of batches after warm-up.",
        "Ratios: peer time / our time (above 1: ours is faster).",
        "",
        *lines,
    ]
    if unavailable:
        out += ["", "n/a columns: " + "; ".join(f"{k}: {v}" for k, v in unavailable.items())]
    if notes:
        out += ["", *(f"[{i}] {note}" for i, note in enumerate(notes, 1))]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return run_worker(json.loads(Path(argv[1]).read_text()))
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="example: python3 scripts/bench_kernels.py --threads 16 --out $OUT",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads")
    parser.add_argument("--layers", default=None, help="comma list (default: all); see --list")
    parser.add_argument("--columns", default=None, help="comma list of column keys (default all)")
    parser.add_argument("--quick", action="store_true", help="4 layers, fewer repeats")
    parser.add_argument("--repeat", type=int, default=None, help="batches per figure (7)")
    parser.add_argument("--min-ms", type=float, default=None, help="ms per batch (20)")
    parser.add_argument(
        "--budget-s", type=float, default=420, help="start no cell after this many seconds"
    )
    parser.add_argument("--out", default=None, help="directory for bench_kernels.{json,md}")
    parser.add_argument("--list", action="store_true", help="list layers and columns")
    args = parser.parse_args(argv)
    if args.list:
        for layer in LAYERS:
            print(f"{layer.name:20} {layer.shape}")
        print("columns:", ", ".join(c.key for c in COLUMNS))
        return 0
    names = args.layers.split(",") if args.layers else (QUICK_LAYERS if args.quick else None)
    layers = [LAYER_BY_NAME[n] for n in names] if names else list(LAYERS)
    keys = args.columns.split(",") if args.columns else [c.key for c in COLUMNS]
    unknown = [k for k in keys if k not in COLUMN_BY_KEY]
    if unknown:
        parser.error(f"unknown columns {unknown}; valid: {', '.join(COLUMN_BY_KEY)}")
    columns = [COLUMN_BY_KEY[k] for k in keys]
    opts = Options(
        threads=args.threads,
        repeat=args.repeat or (3 if args.quick else 7),
        min_ms=args.min_ms or (5.0 if args.quick else 20.0),
        deadline=time.time() + args.budget_s,
    )
    tasks = [(layer.name, col.key) for layer in layers for col in columns]
    with tempfile.TemporaryDirectory(prefix="bench_kernels_") as tmp:
        env, cells = supervise(tasks, opts, Path(tmp))
    env["command"] = " ".join(["python3 scripts/bench_kernels.py", *argv])
    table = markdown(env, cells, layers, columns)
    if args.out:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        payload = {"schema": SCHEMA, "env": env, "cells": cells}
        (out_dir / f"{RESULT_NAME}.json").write_text(json.dumps(payload, indent=1))
        (out_dir / f"{RESULT_NAME}.md").write_text(table)
    print()
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
