"""Small random canonical Relax nets for the pass tests, built with ``onnx`` + the frontend.

Every net is batch 1, float32, one input named ``input``; together they hold every layer kind
SplitChannels handles and every epilogue it pulls into a part.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import tvm
from tvm import relax

from mulayer.frontend.onnx_import import import_onnx
from mulayer.models.zoo import INPUT_NAME, GraphBuilder, build_model


def canonical(model: onnx.ModelProto) -> tvm.IRModule:
    mod, _, _ = import_onnx(model)
    return mod


@functools.cache
def tiny(seed: int = 0) -> tvm.IRModule:
    """The zoo's ``tiny`` net: conv+BN+relu, grouped conv+ReLU6, max pool, depthwise conv,
    residual add, concat of two branches, avg pool, global avg pool, two dense layers."""
    return canonical(build_model("tiny", seed))


@functools.cache
def odd(seed: int = 0) -> tvm.IRModule:
    """Odd channel counts, padded pools, a decomposed BN (multiply + add) after a pool, a
    grouped conv with 3 groups, a depthwise conv with channel multiplier 2, and a dense head."""
    b = GraphBuilder((1, 6, 12, 12), seed)
    x = b.relu(b.conv_bn(INPUT_NAME, "c0", "c0.bn", 24, 3), "c0.relu")
    p = b.maxpool(x, "mp", 3, 1, padding=1)
    p = b.bn(p, "mp.bn")  # not foldable into a conv: multiply + add after the pool
    y = b.relu6(b.conv(p, "g3", 18, 3, groups=3), "g3.relu6")
    z = b.conv(y, "dw2", 36, 3, groups=18)  # depthwise, channel multiplier 2
    z = b.conv(z, "pw", 24, 1)
    s = b.relu(b.add(x, z, "res"), "res.relu")
    a = b.avgpool(s, "ap", 3, 2, padding=1)
    c = b.conv(s, "c1", 12, 3, stride=2)
    x = b.concat([a, c], "cat")
    x = b.flatten(b.global_avgpool(x, "gap"), "flatten")
    x = b.relu(b.gemm(x, "fc1", 20), "fc1.relu")
    return canonical(b.finish(b.gemm(x, "fc2", 7), "odd"))


# Nets are cached: passes never mutate their input module (tested), so sharing is safe.
NETS = {"tiny": tiny, "odd": odd}


def input_for(mod: tvm.IRModule, seed: int = 1) -> np.ndarray:
    shape = [int(d) for d in mod["main"].params[0].ty.shape.values]
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def run_llvm(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    """Build ``mod`` for llvm and run ``main`` once."""
    ex = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


@functools.cache
def _reference(net: str) -> tuple[np.ndarray, np.ndarray]:
    mod = NETS[net]()
    x = input_for(mod)
    return x, run_llvm(mod, x)


def reference(net: str) -> tuple[np.ndarray, np.ndarray]:
    """A fresh random input of net ``net`` and the unsplit fp32 output for it (cached)."""
    x, y = _reference(net)
    assert np.isfinite(y).all()
    return x.copy(), y.copy()


def rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """Max error relative to the largest reference magnitude; NaN/inf anywhere gives inf."""
    if actual.shape != expected.shape or not np.isfinite(actual).all():
        return float("inf")
    scale = float(np.abs(expected).max()) or 1.0
    return float(np.abs(actual - expected).max()) / scale
