"""CPU-only int8 builds: fused single-device module, uint8 chains between int8 layers.

- the integer arithmetic of a chain (conv -> add -> relu -> max pool -> conv), bit-exact against
  a numpy model of the same requantization, on fresh random data;
- fp32 <-> uint8 conversions only at chain boundaries (structural, on the fused module);
- end to end on zoo nets: output SQNR against fp32 not below the unchained two-device build.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

import mulayer
from mulayer.compiler.build import build_single, legalize_and_fuse
from mulayer.compiler.calibration import calibrate, quantize_weight
from mulayer.passes import sink_dequantize as sink_module
from mulayer.passes.chain_int8 import ChainInt8
from mulayer.passes.pipeline import cpu_only_passes
from mulayer.passes.quantize_cpu import QuantizeCPU
from mulayer.passes.sink_dequantize import SinkDequantize
from mulayer.passes.split_channels import SplitChannels
from mulayer.plan import Plan
from mulayer.schedules import apply_schedules
from mulayer.schedules._util import leaf_blocks
from mulayer.schedules.apply import claiming_rule
from mulayer.schedules.cpu_amx import Conv2dInt8AMX
from mulayer.schedules.cpu_int8 import Conv2dInt8DotProduct
from mulayer.schedules.testing import build_prim_func, run_poisoned
from mulayer.target import parse_target

HOST = parse_target("llvm").host_target()
C, H = 16, 12  # channels, height/width of the chain's input


def _conv3x3_bias(bb: relax.BlockBuilder, data, w: np.ndarray, b: np.ndarray):
    """Emit a padded 3x3 conv of ``data`` with weight ``w``, plus bias ``b``."""
    y = bb.emit(relax.op.nn.conv2d(data, relax.const(w), padding=[1, 1, 1, 1]))
    return bb.emit(relax.op.add(y, relax.const(b)))


def _square_net(rng, names):
    """Random ``C -> C`` 3x3 conv weights and biases by name, a block builder, the model input
    and ``conv(data, name)`` emitting that conv plus bias."""
    weights = {
        name: (
            (rng.standard_normal((C, C, 3, 3)) * 0.12).astype("float32"),
            (rng.standard_normal((1, C, 1, 1)) * 0.1).astype("float32"),
        )
        for name in names
    }
    bb = relax.BlockBuilder()
    x = relax.Var("input", relax.TensorType((1, C, H, H), "float32"))

    def conv(data, name):
        return _conv3x3_bias(bb, data, *weights[name])

    return weights, bb, x, conv


def _chain_module(rng) -> tuple[tvm.IRModule, dict]:
    """fp32 ``conv -> relu -> conv -> add(skip) -> relu -> max pool -> conv`` (canonical form)."""
    weights, bb, x, conv = _square_net(rng, ("w0", "w1", "w2"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y0 = bb.emit(relax.op.nn.relu(conv(x, "w0")))
            y1 = conv(y0, "w1")
            y = bb.emit(relax.op.nn.relu(bb.emit(relax.op.add(y1, y0))))
            p = bb.emit(relax.op.nn.max_pool2d(y, pool_size=[2, 2], strides=[2, 2]))
            out = bb.emit_output(conv(p, "w2"))
        bb.emit_func_output(out)
    return bb.get(), weights


def _conv_int(q: np.ndarray, wq: np.ndarray, zp: int) -> np.ndarray:
    """int64 3x3 conv of uint8 ``q`` padded with ``zp``, minus ``zp * sum(w)`` (QuantizeCPU)."""
    qp = np.pad(q.astype(np.int64), ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=zp)
    n, _, h, w = q.shape
    acc = np.zeros((n, wq.shape[0], h, w), np.int64)
    for ry in range(3):
        for rx in range(3):
            acc += np.einsum("nchw,fc->nfhw", qp[:, :, ry : ry + h, rx : rx + w], wq[:, :, ry, rx])
    return acc - zp * wq.astype(np.int64).sum(axis=(1, 2, 3)).reshape(1, -1, 1, 1)


def _quantize(x: np.ndarray, s: float, zp: int) -> np.ndarray:
    q = np.rint(x / np.float32(s)) + np.float32(zp)
    return np.clip(q, 0, 255).astype(np.uint8)


def _fma(a, b, c) -> np.ndarray:
    """float32 ``a * b + c`` rounded once (LLVM contracts the epilogue's multiply-add)."""
    exact = a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)
    return exact.astype(np.float32)


def _numpy_chain(x: np.ndarray, weights: dict, stats) -> np.ndarray:
    """The chain's int8 arithmetic in numpy: each layer's epilogue requantizes for the next."""
    layer = {name: stats.layers[name] for name in ("conv2d.0", "conv2d.1", "conv2d.2")}

    def dequant(acc, w, entry, b):
        _, w_scale = quantize_weight(w, 0)
        deq = (np.float64(entry.input_scale) * w_scale).astype(np.float32).reshape(1, -1, 1, 1)
        return _fma(acc.astype(np.float32), deq, b)

    def wq(name):
        return quantize_weight(weights[name][0], 0)[0]

    e0, e1, e2 = layer["conv2d.0"], layer["conv2d.1"], layer["conv2d.2"]
    q0 = _quantize(x, e0.input_scale, e0.input_zero_point)
    acc0 = _conv_int(q0, wq("w0"), e0.input_zero_point)
    y0 = np.maximum(dequant(acc0, weights["w0"][0], e0, weights["w0"][1]), np.float32(0))
    q1 = _quantize(y0, e1.input_scale, e1.input_zero_point)  # conv2d.0's epilogue
    acc1 = _conv_int(q1, wq("w1"), e1.input_zero_point)
    z = dequant(acc1, weights["w1"][0], e1, weights["w1"][1])
    # The skip is the uint8 tensor, dequantized in conv2d.1's epilogue.
    skip = (q1.astype(np.float32) - np.float32(e1.input_zero_point)).astype(np.float32)
    y = np.maximum(_fma(skip, np.full_like(skip, e1.input_scale), z), np.float32(0))
    qy = _quantize(y, e2.input_scale, e2.input_zero_point)  # conv2d.1's epilogue
    qp = qy.reshape(1, C, H // 2, 2, H // 2, 2).max(axis=(3, 5))  # max pool on uint8
    acc2 = _conv_int(qp, wq("w2"), e2.input_zero_point)
    return dequant(acc2, weights["w2"][0], e2, weights["w2"][1])


def _projection_module(rng) -> tuple[tvm.IRModule, dict]:
    """fp32 ResNet projection block: ``y0 = relu(conv(x))``; ``main = conv(relu(conv(y0)))``,
    ``skip = conv(y0)`` (bound after ``main``, as torchvision's ResNets are exported);
    ``relu(main + skip) -> conv``. Neither addend is quantized by another layer."""
    weights, bb, x, conv = _square_net(rng, ("w0", "w1", "w2", "ws", "w3"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y0 = bb.emit(relax.op.nn.relu(conv(x, "w0")))
            main = conv(bb.emit(relax.op.nn.relu(conv(y0, "w1"))), "w2")
            skip = conv(y0, "ws")
            y = bb.emit(relax.op.nn.relu(bb.emit(relax.op.add(main, skip))))
            out = bb.emit_output(conv(y, "w3"))
        bb.emit_func_output(out)
    return bb.get(), weights


def _inception_module(rng) -> tuple[tvm.IRModule, dict]:
    """fp32 stem and Inception-like block: ``y = max_pool(relu(conv(x)))``; branches
    ``relu(conv(y))``, ``relu(conv(y))``, ``relu(conv(max_pool_3x3_s1(y)))``; ``concat ->
    max pool -> conv``. ``y`` is read by two convs and a max pool (GoogLeNet's pattern)."""
    shapes = {"w0": (C, C), "w1": (C, C), "w2": (C, C), "w3": (C, C), "w4": (C, 3 * C)}
    weights = {
        name: (
            (rng.standard_normal((f, c, 3, 3)) * 0.12).astype("float32"),
            (rng.standard_normal((1, f, 1, 1)) * 0.1).astype("float32"),
        )
        for name, (f, c) in shapes.items()
    }
    bb = relax.BlockBuilder()
    x = relax.Var("input", relax.TensorType((1, C, H, H), "float32"))

    def conv(data, name):
        return _conv3x3_bias(bb, data, *weights[name])

    with bb.function("main", [x]):
        with bb.dataflow():
            y0 = bb.emit(relax.op.nn.relu(conv(x, "w0")))
            y = bb.emit(relax.op.nn.max_pool2d(y0, pool_size=[2, 2], strides=[2, 2]))
            b1 = bb.emit(relax.op.nn.relu(conv(y, "w1")))
            b2 = bb.emit(relax.op.nn.relu(conv(y, "w2")))
            pool = relax.op.nn.max_pool2d(y, pool_size=[3, 3], strides=[1, 1], padding=[1, 1])
            b3 = bb.emit(relax.op.nn.relu(conv(bb.emit(pool), "w3")))
            cat = bb.emit(relax.op.concat([b1, b2, b3], axis=1))
            p = bb.emit(relax.op.nn.max_pool2d(cat, pool_size=[2, 2], strides=[2, 2]))
            out = bb.emit_output(conv(p, "w4"))
        bb.emit_func_output(out)
    return bb.get(), weights


def _numpy_inception(x: np.ndarray, weights: dict, stats) -> np.ndarray:
    """The block's int8 arithmetic in numpy: max pools and the concat on uint8, each branch's
    epilogue quantizing for the layer after the concat (its calibrated scale). The branch's
    pool reads ``y``'s uint8 tensor and, where conv2d.3's scale differs, requantizes to it."""
    e = [stats.layers[f"conv2d.{i}"] for i in range(5)]

    def layer(q, i, relu=True):
        w, b = weights[f"w{i}"]
        wq, w_scale = quantize_weight(w, 0)
        acc = _conv_int(q, wq, e[i].input_zero_point)
        deq = (np.float64(e[i].input_scale) * w_scale).astype(np.float32).reshape(1, -1, 1, 1)
        y = _fma(acc.astype(np.float32), deq, b)
        return np.maximum(y, np.float32(0)) if relu else y

    def q(v, i):
        return _quantize(v, e[i].input_scale, e[i].input_zero_point)

    h = H // 2
    # max(q(.)) = q(max(.)): conv2d.0's epilogue quantizes for the block (one scale for its
    # three readers), the pools run on uint8 (padding 0 = q(-inf)).
    qy = q(layer(q(x, 0), 0), 1).reshape(1, C, h, 2, h, 2).max(axis=(3, 5))
    padded = np.pad(qy, ((0, 0), (0, 0), (1, 1), (1, 1)))
    pooled = np.stack(
        [padded[:, :, ry : ry + h, rx : rx + h] for ry in range(3) for rx in range(3)]
    ).max(axis=0)
    if (e[3].input_scale, e[3].input_zero_point) != (e[1].input_scale, e[1].input_zero_point):
        zp = np.float32(e[1].input_zero_point)
        pooled = q((pooled.astype(np.float32) - zp) * np.float32(e[1].input_scale), 3)
    branches = [layer(qy, 1), layer(qy, 2), layer(pooled, 3)]
    cat = np.concatenate([q(b, 4) for b in branches], axis=1)  # each branch's epilogue
    qp = cat.reshape(1, 3 * C, h // 2, 2, h // 2, 2).max(axis=(3, 5))
    return layer(qp, 4, relu=False)


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_inception_block_pools_and_concatenates_uint8_bit_exact(method):
    rng = np.random.default_rng()
    mod, weights = _inception_module(rng)
    samples = rng.standard_normal((4, 1, C, H, H)).astype("float32")
    # minmax: a 3x3 stride-1 max pool keeps its input's range, so conv2d.3 (after the pool)
    # gets the scale of conv2d.1/2 (reading y) and y has one quantize; percentile (what
    # mulayer.compile uses): conv2d.3's scale differs and the pool requantizes its uint8 max.
    stats = calibrate(mod, [{"input": s} for s in samples], method=method)
    e = [stats.layers[f"conv2d.{i}"] for i in range(4)]
    assert e[1].input_scale == e[2].input_scale
    assert (e[3].input_scale == e[1].input_scale) == (method == "minmax")
    chained = _cpu_only(mod, stats)
    calls = {}
    for binding in chained["main"].body.blocks[0].bindings:
        name = getattr(binding.value, "op", None)
        if name is not None and str(name.name) in ("relax.nn.max_pool2d", "relax.concat"):
            calls.setdefault(str(name.name), []).append(_dtype(binding.var))
    assert calls == {"relax.nn.max_pool2d": ["uint8"] * 3, "relax.concat": ["uint8"]}
    vm = relax.VirtualMachine(build_single(chained, HOST), tvm.cpu())
    for _ in range(3):
        x = rng.standard_normal((1, C, H, H)).astype("float32")
        out = vm["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_array_equal(out, _numpy_inception(x, weights, stats))


def _cpu_only(mod: tvm.IRModule, stats) -> tvm.IRModule:
    return cpu_only_passes(Plan.uniform(0.0), stats, guard_db=-100.0)(mod)


def test_chain_is_bit_exact_against_numpy_requantization():
    rng = np.random.default_rng()
    mod, weights = _chain_module(rng)
    samples = rng.standard_normal((4, 1, C, H, H)).astype("float32")
    stats = calibrate(mod, [{"input": s} for s in samples], method="percentile")
    chained = _cpu_only(mod, stats)
    # One quantize of the input, then only uint8 between the layers: no fp32 -> uint8 cast
    # outside a conv kernel but the input's.
    vm = relax.VirtualMachine(build_single(chained, HOST), tvm.cpu())
    for _ in range(3):
        x = rng.standard_normal((1, C, H, H)).astype("float32")
        out = vm["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_array_equal(out, _numpy_chain(x, weights, stats))


def test_chain_without_int8_skips_is_exact():
    """Merging quantizes, quantizing before max pooling and padding inside the conv change no
    number: with the skip kept in fp32 the chained build equals the unchained one bit for bit."""
    rng = np.random.default_rng()
    mod, _ = _chain_module(rng)
    samples = rng.standard_normal((2, 1, C, H, H)).astype("float32")
    stats = calibrate(mod, [{"input": s} for s in samples], method="percentile")
    split = SplitChannels(Plan.uniform(0.0))(mod)
    quantized = QuantizeCPU(stats, guard_db=-100.0)(split)
    chained = ChainInt8(int8_skips=False)(quantized)
    assert sum(1 for _ in _kernels(legalize_and_fuse(chained, HOST))) < sum(
        1 for _ in _kernels(legalize_and_fuse(quantized, HOST))
    )
    x = tvm.runtime.tensor(rng.standard_normal((1, C, H, H)).astype("float32"))
    outs = [
        relax.VirtualMachine(build_single(m, HOST), tvm.cpu())["main"](x).numpy()
        for m in (quantized, chained)
    ]
    np.testing.assert_array_equal(outs[1], outs[0])


def _fused(mod: tvm.IRModule, stats) -> tvm.IRModule:
    return legalize_and_fuse(_cpu_only(mod, stats), HOST)


def _kernels(fused: tvm.IRModule) -> list[tuple[str, tvm.tirx.PrimFunc, relax.Var, list]]:
    """``(name, PrimFunc, output var, args)`` of every ``call_tir`` of ``main``."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    found = []
    for block in fused["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and value.op.same_as(call_tir):
                gv = value.args[0]
                found.append((gv.name_hint, fused[gv], binding.var, list(value.args[1].fields)))
    return found


def _is_int8_kernel(func: tvm.tirx.PrimFunc) -> bool:
    """A u8 x s8 conv or matmul kernel (it reads a uint8 buffer and has a reduction)."""
    text = func.script()
    return ("conv2d_nchw" in text or "matmul" in text) and '"uint8"' in text


def _dtype(expr) -> str:
    return str(expr.ty.dtype)


@pytest.mark.parametrize(
    "builder, method",
    [
        (_chain_module, "percentile"),
        (_projection_module, "minmax"),
        (_inception_module, "minmax"),
        (_inception_module, "percentile"),
    ],
)
def test_fp32_uint8_conversions_only_at_chain_boundaries(builder, method):
    rng = np.random.default_rng()
    mod, _ = builder(rng)
    samples = rng.standard_normal((2, 1, C, H, H)).astype("float32")
    stats = calibrate(mod, [{"input": s} for s in samples], method=method)
    kernels = _kernels(_fused(mod, stats))
    producer = {var: (name, func) for name, func, var, _ in kernels}
    standalone_quantizes = []
    for name, func, var, args in kernels:
        inputs = [a for a in args if isinstance(a, relax.Var)]
        if _is_int8_kernel(func):
            # Every int8 kernel is claimed by the int8 rule (epilogue in the conv's tiles).
            assert isinstance(claiming_rule(func, HOST), (Conv2dInt8DotProduct, Conv2dInt8AMX)), (
                name
            )
            # ... and reads only uint8 activations (the skip too), never an fp32 tensor.
            assert all(_dtype(a) == "uint8" for a in inputs if a in producer), name
        elif _dtype(var) == "uint8" and any(_dtype(a) == "float32" for a in inputs):
            standalone_quantizes.append(name)
            # A quantize outside a conv kernel reads a chain start, never an int8 result.
            assert all(a not in producer for a in inputs), name
        # No standalone dequantize: uint8 -> fp32 happens inside the consumer's kernel.
        assert not (_dtype(var) == "float32" and not _is_int8_kernel(func) and inputs)
        assert (
            not any(_dtype(a) == "uint8" for a in inputs)
            or _dtype(var) == "uint8"
            or (_is_int8_kernel(func))
        ), name
    assert len(standalone_quantizes) == 1  # the model input's
    # The only fp32 tensor is the model output.
    fp32 = [var for _, func, var, _ in kernels if _dtype(var) == "float32"]
    assert len(fp32) == 1


def _random_args(func: tvm.tirx.PrimFunc, rng) -> tuple[list[np.ndarray], tuple, str]:
    """Random inputs for every parameter buffer but the last (the output): its shape, dtype."""
    buffers = [p.ty for p in func.params]
    args = []
    for buf in buffers[:-1]:
        shape = tuple(int(d) for d in buf.shape)
        dtype = str(buf.dtype)
        if dtype == "float32":
            args.append(rng.uniform(0.01, 0.1, shape).astype(dtype))
        else:
            info = np.iinfo(dtype)
            args.append(rng.integers(max(info.min, -1000), min(info.max, 1000) + 1, shape, dtype))
    out = buffers[-1]
    return args, tuple(int(d) for d in out.shape), str(out.dtype)


@pytest.mark.parametrize("builder, kernels", [(_chain_module, 3), (_projection_module, 5)])
def test_fused_int8_kernels_match_unscheduled_and_write_every_element(builder, kernels):
    rng = np.random.default_rng()
    mod, _ = builder(rng)
    samples = rng.standard_normal((2, 1, C, H, H)).astype("float32")
    stats = calibrate(mod, [{"input": s} for s in samples], method="percentile")
    fused = _fused(mod, stats)
    scheduled = apply_schedules(fused, HOST, fold_packing=False)
    checked = 0
    for gv, func in fused.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc) or not _is_int8_kernel(func):
            continue
        args, out_shape, out_dtype = _random_args(func, rng)
        ref = run_poisoned(build_prim_func(func, HOST), args, out_shape, out_dtype)
        lib = build_prim_func(scheduled[gv.name_hint], HOST)
        out = run_poisoned(lib, args, out_shape, out_dtype)
        if out_dtype == "uint8":
            np.testing.assert_array_equal(out, ref)
        else:  # an fp32 chain end: multiply-adds may be contracted differently (1 ulp)
            assert np.isfinite(out).all()
            np.testing.assert_allclose(out, ref, rtol=1e-6)
        checked += 1
    assert checked == kernels


def test_projection_skip_is_requantized_and_stays_accurate():
    """With the calibration, ChainInt8 requantizes the projection conv's result with its
    calibrated output range (one rewrite more, one rounding more than an fp32 skip); the fused
    module then stores it as uint8 (SinkDequantize moves its dequantize into the add's kernel),
    and the output stays close to the fp32 model's."""
    rng = np.random.default_rng()
    mod, _ = _projection_module(rng)
    samples = rng.standard_normal((4, 1, C, H, H)).astype("float32")
    stats = calibrate(mod, [{"input": s} for s in samples], method="minmax")
    split = QuantizeCPU(stats, guard_db=-100.0)(SplitChannels(Plan.uniform(0.0))(mod))
    with_stats, without = ChainInt8(stats=stats), ChainInt8()
    chained, unchained = with_stats(split), without(split)
    assert with_stats.rewrites == without.rewrites + 1
    sink = SinkDequantize()
    fused = tvm.transform.Sequential(
        [
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            sink,
        ]
    )
    with HOST:
        fused(chained)
    assert sink.moves == 1
    ref = relax.VirtualMachine(tvm.compile(mod, target=HOST), tvm.cpu())["main"]
    for built in (chained, unchained):
        vm = relax.VirtualMachine(build_single(built, HOST), tvm.cpu())
        x = tvm.runtime.tensor(rng.standard_normal((1, C, H, H)).astype("float32"))
        out, expected = vm["main"](x).numpy(), ref(x).numpy()
        assert 10 * np.log10((expected**2).sum() / ((out - expected) ** 2).sum()) > 25


def test_sinking_the_dequantize_changes_no_output(monkeypatch):
    """SinkDequantize moves PrimFunc calls between kernels, nothing else: bit-equal outputs."""
    rng = np.random.default_rng()
    mod, _ = _projection_module(rng)
    samples = rng.standard_normal((2, 1, C, H, H)).astype("float32")
    chained = _cpu_only(mod, calibrate(mod, [{"input": s} for s in samples], method="minmax"))
    x = tvm.runtime.tensor(rng.standard_normal((1, C, H, H)).astype("float32"))
    sunk = relax.VirtualMachine(build_single(chained, HOST), tvm.cpu())["main"](x).numpy()
    monkeypatch.setattr(sink_module, "sink_dequantize", lambda m: (m, 0))
    kept = relax.VirtualMachine(build_single(chained, HOST), tvm.cpu())["main"](x).numpy()
    np.testing.assert_array_equal(sunk, kept)


def test_guard_kept_layer_ends_the_chain():
    """A layer the guard keeps in fp32 reads fp32: the producer dequantizes for it."""
    rng = np.random.default_rng()
    mod, _ = _chain_module(rng)
    samples = rng.standard_normal((2, 1, C, H, H)).astype("float32")
    stats = calibrate(mod, [{"input": s} for s in samples], method="percentile")
    stats.layers["conv2d.1"].noise = [1e9] * C  # SQNR far below the guard
    chained = cpu_only_passes(Plan.uniform(0.0), stats, guard_db=30.0)(mod)
    x = rng.standard_normal((1, C, H, H)).astype("float32")
    vm = relax.VirtualMachine(build_single(chained, HOST), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x)).numpy()
    ref = relax.VirtualMachine(tvm.compile(mod, target=HOST), tvm.cpu())["main"]
    expected = ref(tvm.runtime.tensor(x)).numpy()
    assert 10 * np.log10((expected**2).sum() / ((out - expected) ** 2).sum()) > 25


def _sqnr(model, reference, xs) -> float:
    signal = noise = 0.0
    for x in xs:
        ref = reference(x).astype(np.float64)
        out = next(iter(model({"input": x}).values())).astype(np.float64)
        signal += float((ref**2).sum())
        noise += float(((out - ref) ** 2).sum())
    return 10 * np.log10(signal / noise)


@pytest.mark.parametrize("name", ["tiny"])
def test_zoo_cpu_only_int8_is_fused_and_accurate(name, tmp_path):
    from mulayer.models import zoo
    from mulayer.models.reference import onnxruntime_session

    path = zoo.save_model(name, tmp_path / f"{name}.onnx")
    shape = zoo.get_model_info(name).input_shape
    # Fixed calibration samples (the SQNR gap below moves by up to ~1 dB between calibration
    # seeds on `tiny`, which made a fresh seed fail now and then); fresh inputs to score.
    samples = {"input": np.random.default_rng(0).standard_normal((4, *shape[1:]))}
    samples["input"] = samples["input"].astype("float32")
    rng = np.random.default_rng()
    stats = mulayer.calibrate(str(path), samples, method="percentile")
    compiled = mulayer.compile(str(path), target="mulayer -ratio=0, llvm, llvm", calibration=stats)
    meta = compiled.metadata()
    assert meta["built_as"] == "cpu" and meta["vm_devices"] == ["cpu"]
    assert "cpu_weights" not in meta and all(
        d["placement"] == "cpu" for d in meta["precision"].values()
    )
    model = mulayer.load(compiled.export(tmp_path / f"{name}.mulayer"))
    # The unchained two-device build of the same plan (today's cooperative path).
    from mulayer.compiler.driver import build_cooperative
    from mulayer.frontend.onnx_import import import_onnx

    mod, inputs, _ = import_onnx(str(path))
    spec = compiled.spec
    old, _ = build_cooperative(mod, spec, compiled.plan, compiled.layers, stats, inputs)
    from mulayer.passes.build_helpers import devices

    old_vm = relax.VirtualMachine(old, devices(spec.device_target()))
    session = onnxruntime_session(path)
    xs = [rng.standard_normal(shape).astype("float32") for _ in range(6)]

    def old_model(inputs):
        return {"out": old_vm["main"](tvm.runtime.tensor(inputs["input"])).numpy()}

    reference = lambda x: session.run(None, {"input": x})[0]  # noqa: E731
    new_db, old_db = _sqnr(model, reference, xs), _sqnr(old_model, reference, xs)
    # uint8 residual skips requantize once more than the fp32 skips of the unchained build: on
    # the zoo nets that cost 0.1-0.7 dB (docs/results.md); over 8 calibration seeds on `tiny`
    # the gap was -0.3..+0.76 dB, and above 1 dB at times. 1 dB still catches a broken
    # requantization (tens of dB).
    assert new_db >= old_db - 1.0, (new_db, old_db)
    # Every output element written (NaN-poisoned outputs would show).
    assert np.isfinite(next(iter(model({"input": xs[0]}).values()))).all()


AMX = tvm.target.Target(
    {"kind": "llvm", "mcpu": "sapphirerapids", "mattr": ["+amx-int8", "+amx-tile"], "num-cores": 2}
)


@pytest.mark.parametrize(
    ("rule", "target"),
    [(Conv2dInt8DotProduct(), HOST), (Conv2dInt8AMX(), AMX)],
    ids=["vnni", "amx"],  # stable ids: pytest-xdist workers must collect the same names
)
def test_int8_rules_claim_fused_kernels_with_the_epilogue_in_the_tile(rule, target):
    """Requantize, residual add (dequantized skip) and relu run in the conv's output tiles: no
    epilogue block is left as a separate pass over memory."""
    rng = np.random.default_rng()
    mod, _ = _chain_module(rng)
    samples = rng.standard_normal((2, 1, C, H, H)).astype("float32")
    stats = calibrate(mod, [{"input": s} for s in samples], method="percentile")
    kernels = [f for _, f, _, _ in _kernels(_fused(mod, stats)) if _is_int8_kernel(f)]
    assert len(kernels) == 3
    for func in kernels:
        with target:
            sch = rule.apply(func, target, False)
        assert sch is not None
        conv_blocks = ("conv2d_nchw", "pad_temp", "param_0_global", "amx_request_permission")
        conv_blocks += ("amx_configure_tiles",)  # the per-task ldtilecfg
        names = [sch.get(block).name_hint for block in leaf_blocks(sch)]
        assert all(name.startswith(conv_blocks) for name in names), names
