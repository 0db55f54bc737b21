"""PoolPlanes (schedules/cpu_pool.py): pools one channel plane per task, bit-exact."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from mulayer.schedules import apply_schedules, cpu_rules
from mulayer.schedules.cpu_pool import PoolPlanes
from mulayer.schedules.testing import prim_funcs, standard_pipeline

TARGET = tvm.target.Target(
    {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": 2}
)

# (dtype, NCHW shape, pool op, kernel, stride, padding, ceil_mode)
POOLS = [
    ("uint8", (1, 8, 30, 30), "max", 3, 2, 1, False),  # ResNet's stem pool, smaller
    ("uint8", (2, 6, 14, 14), "max", 3, 1, 1, False),  # GoogLeNet's branch pool, batch 2
    ("uint8", (1, 5, 15, 15), "max", 3, 2, 0, True),  # ceil mode, odd width (phase padding)
    ("uint8", (1, 4, 7, 7), "max", 2, 2, 0, True),  # 7 -> 4 with ceil mode
    ("uint8", (1, 3, 16, 16), "max", 2, 2, 0, False),  # VGG's 2x2
    ("float32", (1, 8, 17, 17), "max", 3, 2, 1, False),  # fp32: the padding is -inf
    ("float32", (1, 8, 12, 12), "avg", 3, 1, 1, False),  # average (divide in the epilogue)
]


def _pool_module(dtype, shape, op, k, s, p, ceil):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, dtype))
    pool = relax.op.nn.max_pool2d if op == "max" else relax.op.nn.avg_pool2d
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(pool(x, k, s, p, ceil_mode=ceil))
        bb.emit_func_output(out)
    return standard_pipeline(bb.get())


def _numpy_max_pool(x, k, s, p, oh, ow):
    lo = np.iinfo(x.dtype).min if x.dtype.kind in "ui" else -np.inf
    n, c, h, w = x.shape
    padded = np.full((n, c, max(h + 2 * p, (oh - 1) * s + k), max(w + 2 * p, (ow - 1) * s + k)), lo)
    padded = padded.astype(x.dtype)
    padded[:, :, p : p + h, p : p + w] = x
    out = np.full((n, c, oh, ow), lo).astype(x.dtype)
    for ry in range(k):
        for rx in range(k):
            out = np.maximum(out, padded[:, :, ry : ry + s * oh : s, rx : rx + s * ow : s])
    return out


@pytest.mark.parametrize("pool", POOLS, ids=str)
def test_pool_planes_bit_exact(pool):
    dtype, shape, op, k, s, p, ceil = pool
    mod = _pool_module(*pool)
    (func,) = prim_funcs(mod).values()
    claimed = next(r for r in cpu_rules(TARGET) if r.apply(func, TARGET, False) is not None)
    assert isinstance(claimed, PoolPlanes)
    sched = apply_schedules(mod, TARGET)
    (sfunc,) = prim_funcs(sched).values()
    assert f"T.parallel(T.int64({shape[0] * shape[1]}))" in sfunc.script()  # (n, c) planes
    rng = np.random.default_rng()
    data = rng.integers(0, 256, shape) if dtype == "uint8" else rng.standard_normal(shape) - 3
    data = data.astype(dtype)
    got = relax.VirtualMachine(tvm.compile(sched, target=TARGET), tvm.cpu())["main"](
        tvm.runtime.tensor(data)
    )
    got = got.numpy()
    if op == "max":
        np.testing.assert_array_equal(got, _numpy_max_pool(data, k, s, p, *got.shape[2:]))
    else:
        want = relax.VirtualMachine(tvm.compile(mod, target=TARGET), tvm.cpu())["main"](
            tvm.runtime.tensor(data)
        )
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-6)


def test_global_pool_is_not_claimed():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16, 7, 7), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.adaptive_avg_pool2d(x, (1, 1)))
        bb.emit_func_output(out)
    (func,) = prim_funcs(standard_pipeline(bb.get())).values()
    assert PoolPlanes().apply(func, TARGET, False) is None
