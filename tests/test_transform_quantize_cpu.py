"""QuantizeCPU: structure of the rewrite, exact int32 arithmetic, SQNR and the accuracy guard.

The split modules are written by hand following SplitChannels' naming contract
(``<layer>_<side>``, ``<layer>_<side>_e<k>``, ``<layer>_join``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I  # noqa: N812
from tvm.script import relax as R

from mulayer.compiler.calibration import CalibrationStats, LayerStats, calibrate, conv2d_nchw
from mulayer.passes.quantize_cpu import QuantizeCPU, precision_report

C, K, HW, GPU = 8, 16, 10, 8  # conv: channels in / out, spatial size, channels on the GPU
CLASSES = 12


def _run(mod: tvm.IRModule, *args: np.ndarray) -> np.ndarray:
    exe = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(exe, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()


def _stats(name: str, kind: str, scale: float, zp: int, channels: int, sqnr_db: float = 60.0):
    noise = 10.0 ** (-sqnr_db / 10.0)
    return LayerStats(name, kind, -zp * scale, (255 - zp) * scale, scale, zp, 0.0, 1.0,
                      [1.0] * channels, [noise] * channels)  # fmt: skip


def _quant_w(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent reference of the weight quantization: int8 symmetric per channel."""
    red = tuple(a for a in range(w.ndim) if a != axis)
    s = np.abs(w.astype(np.float64)).max(axis=red, keepdims=True) / 127.0
    return np.clip(np.rint(w / s), -127, 127).astype(np.int8), s.reshape(-1)


# ----------------------------------------------------------------------------- structure
def test_conv_part_rewrite_structure():
    @I.ir_module
    class Before:
        @R.function
        def main(
            x: R.Tensor((1, 4, 6, 6), "float32"),
            w: R.Tensor((8, 4, 3, 3), "float32"),
            b: R.Tensor((1, 8, 1, 1), "float32"),
        ):
            with R.dataflow():
                conv2d_0_cpu = R.nn.conv2d(x, w, padding=1)
                conv2d_0_cpu_e0 = R.add(conv2d_0_cpu, b)
                conv2d_0_cpu_e1 = R.nn.relu(conv2d_0_cpu_e0)
                R.output(conv2d_0_cpu_e1)
            return conv2d_0_cpu_e1

    @I.ir_module
    class Expected:
        @R.function
        def main(
            x: R.Tensor((1, 4, 6, 6), "float32"),
            wq: R.Tensor((8, 4, 3, 3), "int8"),
            corr: R.Tensor((1, 8, 1, 1), "int32"),
            deq: R.Tensor((1, 8, 1, 1), "float32"),
            b: R.Tensor((1, 8, 1, 1), "float32"),
        ):
            with R.dataflow():
                q0 = R.divide(x, R.const(0.0625, "float32"))
                q1 = R.round(q0)
                q2 = R.add(q1, R.const(16.0, "float32"))
                q3 = R.clip(q2, 0, 255)
                q4 = R.astype(q3, "uint8")
                q5 = R.nn.pad(q4, [0, 0, 0, 0, 1, 1, 1, 1], pad_value=16.0)
                acc = R.nn.conv2d(q5, wq, padding=0, out_dtype="int32")
                acc1 = R.subtract(acc, corr)
                acc2 = R.astype(acc1, "float32")
                conv2d_0_cpu = R.multiply(acc2, deq)
                conv2d_0_cpu_e0 = R.add(conv2d_0_cpu, b)
                conv2d_0_cpu_e1 = R.nn.relu(conv2d_0_cpu_e0)
                R.output(conv2d_0_cpu_e1)
            return conv2d_0_cpu_e1

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4, 3, 3)).astype("float32")
    b = rng.standard_normal((1, 8, 1, 1)).astype("float32")
    before = relax.transform.BindParams("main", {"w": w, "b": b})(Before)
    stats = CalibrationStats({"conv2d.0": _stats("conv2d.0", "conv2d", 0.0625, 16, 8)})
    quantize = QuantizeCPU(stats)
    after = quantize(before)

    wq, ws = _quant_w(w, 0)
    corr = (16 * wq.astype(np.int64).sum(axis=(1, 2, 3))).astype("int32").reshape(1, 8, 1, 1)
    deq = (0.0625 * ws).astype("float32").reshape(1, 8, 1, 1)
    expected = relax.transform.BindParams("main", {"wq": wq, "corr": corr, "deq": deq, "b": b})(
        Expected
    )
    tvm.ir.assert_structural_equal(after["main"], expected["main"])
    assert quantize.report["conv2d.0"]["precision"] == "int8"
    assert precision_report(after)["conv2d.0"]["precision"] == "int8"


def test_dense_part_rewrite_structure():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 16), "float32"), w: R.Tensor((16, 4), "float32")):
            with R.dataflow():
                dense_0_gpu = R.matmul(x, R.const(np.ones((16, 4), "float32")))
                dense_0_cpu = R.matmul(x, w)
                dense_0_join = R.concat([dense_0_gpu, dense_0_cpu], axis=1)
                R.output(dense_0_join)
            return dense_0_join

    @I.ir_module
    class Expected:
        @R.function
        def main(
            x: R.Tensor((1, 16), "float32"),
            wq: R.Tensor((16, 4), "int8"),
            deq: R.Tensor((1, 4), "float32"),
        ):
            with R.dataflow():
                dense_0_gpu = R.matmul(x, R.const(np.ones((16, 4), "float32")))
                q0 = R.divide(x, R.const(0.125, "float32"))
                q1 = R.round(q0)
                q3 = R.clip(q1, 0, 255)
                q4 = R.astype(q3, "uint8")
                acc = R.matmul(q4, wq, out_dtype="int32")
                acc2 = R.astype(acc, "float32")
                dense_0_cpu = R.multiply(acc2, deq)
                dense_0_join = R.concat([dense_0_gpu, dense_0_cpu], axis=1)
                R.output(dense_0_join)
            return dense_0_join

    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 4)).astype("float32")
    before = relax.transform.BindParams("main", {"w": w})(Before)
    stats = CalibrationStats({"dense.0": _stats("dense.0", "dense", 0.125, 0, 8)})
    after = QuantizeCPU(stats)(before)
    wq, ws = _quant_w(w, 1)
    deq = (0.125 * ws).astype("float32").reshape(1, 4)
    expected = relax.transform.BindParams("main", {"wq": wq, "deq": deq})(Expected)
    tvm.ir.assert_structural_equal(after["main"], expected["main"])


def test_unmarked_layers_are_left_alone():
    mod, _ = _canonical(np.random.default_rng(2))
    stats = CalibrationStats({"conv2d.0": _stats("conv2d.0", "conv2d", 0.1, 0, K)})
    quantize = QuantizeCPU(stats)
    tvm.ir.assert_structural_equal(quantize(mod), mod)
    assert quantize.report == {}


# ------------------------------------------------------------------------------ numerics
def _weights(rng: np.random.Generator, outlier: bool = False) -> dict[str, np.ndarray]:
    w = {
        "w": (rng.standard_normal((K, C, 3, 3)) * np.sqrt(2.0 / (C * 9))).astype("float32"),
        "b": (rng.standard_normal((1, K, 1, 1)) * 0.1).astype("float32"),
        "wd": (rng.standard_normal((K, CLASSES)) * np.sqrt(1.0 / K)).astype("float32"),
        "bd": (rng.standard_normal((1, CLASSES)) * 0.1).astype("float32"),
    }
    return w


def _build(weights: dict[str, np.ndarray], split: bool) -> tvm.IRModule:
    """conv2d.0 (+bias, relu) -> global mean -> dense.0 (+bias); split: conv 8 GPU / 8 CPU
    channels, dense all on the CPU (ratio 0)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, C, HW, HW), "float32"))
    w, b = weights["w"], weights["b"]
    with bb.function("main", [x]):
        with bb.dataflow():
            if split:
                parts = []
                for side, sl in (("gpu", slice(0, GPU)), ("cpu", slice(GPU, K))):
                    y = bb.emit(R.nn.conv2d(x, R.const(w[sl]), padding=1), f"conv2d_0_{side}")
                    y = bb.emit(R.add(y, R.const(b[:, sl])), f"conv2d_0_{side}_e0")
                    parts.append(bb.emit(R.nn.relu(y), f"conv2d_0_{side}_e1"))
                y = bb.emit(R.concat(parts, axis=1), "conv2d_0_join")
            else:
                y = bb.emit(R.nn.conv2d(x, R.const(w), padding=1), "conv")
                y = bb.emit(R.nn.relu(bb.emit(R.add(y, R.const(b)))))
            y = bb.emit(R.reshape(R.mean(y, axis=[2, 3], keepdims=True), (1, K)))
            name = "dense_0_cpu" if split else "dense"
            y = bb.emit(R.matmul(y, R.const(weights["wd"])), name)
            out = bb.emit_output(R.add(y, R.const(weights["bd"])), name + "_e0" if split else "out")
        bb.emit_func_output(out)
    return relax.transform.FoldConstant()(bb.get())


def _canonical(rng):
    weights = _weights(rng)
    return _build(weights, split=False), weights


def _inputs(rng: np.random.Generator, n: int) -> np.ndarray:
    # Realistic activations: a ReLU'd signal with a positive mean.
    return np.maximum(rng.standard_normal((n, 1, C, HW, HW)) + 0.3, 0).astype("float32")


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    return 10 * np.log10((ref.astype(np.float64) ** 2).sum() / ((got - ref) ** 2).sum())


def test_quantized_module_matches_fp32():
    rng = np.random.default_rng(3)
    canonical, weights = _canonical(rng)
    stats = calibrate(canonical, _inputs(rng, 8))
    split = _build(weights, split=True)
    quantize = QuantizeCPU(stats)
    quantized = quantize(split)
    assert {k: v["precision"] for k, v in quantize.report.items()} == {
        "conv2d.0": "int8",
        "dense.0": "int8",
    }
    text = quantized.script()
    assert text.count('out_dtype="int32"') == 2
    x = _inputs(rng, 1)[0]  # fresh data, not seen by the calibration
    ref = _run(split, x)
    np.testing.assert_allclose(_run(canonical, x), ref, rtol=1e-4, atol=1e-5)
    assert _sqnr(ref, _run(quantized, x)) >= 30.0


def test_int32_accumulation_is_exact():
    """Same quantized arithmetic in numpy (int64) gives the module's result bit for bit."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((K, C, 3, 3)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, C, HW, HW), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(R.nn.conv2d(x, R.const(w), strides=2, padding=1), "conv2d_0_cpu")
        bb.emit_func_output(y)
    scale, zp = 0.03125, 37
    stats = CalibrationStats({"conv2d.0": _stats("conv2d.0", "conv2d", scale, zp, K)})
    quantized = QuantizeCPU(stats)(bb.get())

    # Inputs away from rounding ties, so the quantized data are known exactly.
    k = rng.integers(0, 256, (1, C, HW, HW))
    xs = ((k - zp + rng.uniform(-0.3, 0.3, k.shape)) * scale).astype("float32")
    q = np.clip(np.rint(xs / np.float32(scale)) + zp, 0, 255).astype(np.int64)
    assert (q == k).all()
    wq, ws = _quant_w(w, 0)
    acc = conv2d_nchw(
        (q - zp).astype(np.float64), wq.astype(np.float64), (2, 2), (1, 1, 1, 1), (1, 1), 1
    )
    acc = np.rint(acc).astype(np.int32)  # exact: every partial sum is an integer < 2**31
    deq = (scale * ws).astype("float32").reshape(1, K, 1, 1)
    expected = acc.astype(np.float32) * deq
    np.testing.assert_array_equal(_run(quantized, xs), expected)


def test_guard_keeps_long_tail_layer_in_float():
    rng = np.random.default_rng(5)
    canonical, weights = _canonical(rng)
    calib = _inputs(rng, 4)
    calib[0, 0, 0, 0, 0] = 2000.0  # one huge outlier: the uint8 step swamps normal values
    stats = calibrate(canonical, calib)
    assert stats["conv2d.0"].sqnr_db() < 30.0
    quantize = QuantizeCPU(stats, guard_db=30.0)
    quantized = quantize(_build(weights, split=True))
    report = precision_report(quantized)
    assert report["conv2d.0"]["precision"] == "float32"
    assert "guard" in report["conv2d.0"]["reason"]
    assert report["dense.0"]["precision"] == "int8"
    assert json.loads(quantized.attrs["mulayer.precision"]) == quantize.report
    assert quantized.script().count('out_dtype="int32"') == 1  # only the dense part


@pytest.mark.parametrize("groups", [K])
def test_depthwise_part(groups):
    rng = np.random.default_rng(6)
    w = (rng.standard_normal((K, K // groups, 3, 3))).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, K, HW, HW), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(R.nn.conv2d(x, R.const(w), padding=1, groups=groups), "conv2d_0_cpu")
            y = bb.emit_output(R.nn.relu(y), "conv2d_0_cpu_e0")
        bb.emit_func_output(y)
    mod = bb.get()
    xs = rng.standard_normal((1, K, HW, HW)).astype("float32")
    stats = calibrate(relax.transform.FoldConstant()(_depthwise_canonical(w, groups)), xs[None])
    quantized = QuantizeCPU(stats)(mod)
    assert "groups=16" in quantized.script() and 'out_dtype="int32"' in quantized.script()
    assert _sqnr(_run(mod, xs), _run(quantized, xs)) >= 30.0


def _depthwise_canonical(w: np.ndarray, groups: int) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, K, HW, HW), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(R.nn.conv2d(x, R.const(w), padding=1, groups=groups))
            y = bb.emit_output(R.nn.relu(y))
        bb.emit_func_output(y)
    return bb.get()
