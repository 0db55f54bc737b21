"""CastGPU: GPU parts in float16 (structure, dtypes in the IR, fp16-level numerics)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from mulayer.passes.cast_gpu import CastGPU
from mulayer.passes.common import is_part_op, part_of
from mulayer.passes.split_channels import SplitChannels
from mulayer.plan import Plan

from .relax_nets import NETS, reference, rel_error, run_llvm

RNG = np.random.default_rng(0)


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def bind(mod: tvm.IRModule, **params: np.ndarray) -> tvm.IRModule:
    return relax.transform.BindParams("main", params)(mod)


@I.ir_module
class Split:
    """SplitChannels' output for a conv + bias + relu layer split 4 / 4."""

    @R.function
    def main(
        x: R.Tensor((1, 4, 8, 8), "float32"),
        wg: R.Tensor((4, 4, 3, 3), "float32"),
        bg: R.Tensor((1, 4, 1, 1), "float32"),
        wc: R.Tensor((4, 4, 3, 3), "float32"),
        bc: R.Tensor((1, 4, 1, 1), "float32"),
    ) -> R.Tensor((1, 8, 8, 8), "float32"):
        with R.dataflow():
            conv2d_0_gpu = R.nn.conv2d(x, wg, padding=[1, 1, 1, 1])
            conv2d_0_gpu_e0 = R.add(conv2d_0_gpu, bg)
            conv2d_0_gpu_e1 = R.nn.relu(conv2d_0_gpu_e0)
            conv2d_0_cpu = R.nn.conv2d(x, wc, padding=[1, 1, 1, 1])
            conv2d_0_cpu_e0 = R.add(conv2d_0_cpu, bc)
            conv2d_0_cpu_e1 = R.nn.relu(conv2d_0_cpu_e0)
            conv2d_0_join = R.concat((conv2d_0_gpu_e1, conv2d_0_cpu_e1), axis=1)
            R.output(conv2d_0_join)
        return conv2d_0_join


def test_fp32_accumulation():
    @I.ir_module
    class Expected:
        @R.function
        def main(
            x: R.Tensor((1, 4, 8, 8), "float32"),
            wg: R.Tensor((4, 4, 3, 3), "float16"),
            bg: R.Tensor((1, 4, 1, 1), "float32"),
            wc: R.Tensor((4, 4, 3, 3), "float32"),
            bc: R.Tensor((1, 4, 1, 1), "float32"),
        ) -> R.Tensor((1, 8, 8, 8), "float32"):
            with R.dataflow():
                xh = R.astype(x, "float16")
                g = R.nn.conv2d(xh, wg, padding=[1, 1, 1, 1], out_dtype="float32")
                g0 = R.add(g, bg)
                g1 = R.nn.relu(g0)
                c = R.nn.conv2d(x, wc, padding=[1, 1, 1, 1])
                c0 = R.add(c, bc)
                c1 = R.nn.relu(c0)
                gv = R.concat((g1, c1), axis=1)
                R.output(gv)
            return gv

    w, b = rand(8, 4, 3, 3), rand(1, 8, 1, 1)
    before = bind(Split, wg=w[:4], bg=b[:, :4], wc=w[4:], bc=b[:, 4:])
    after = CastGPU()(before)
    expected = bind(Expected, wg=w[:4].astype(np.float16), bg=b[:, :4], wc=w[4:], bc=b[:, 4:])
    tvm.ir.assert_structural_equal(after, expected)


def test_fp16_accumulation_casts_back_before_the_join():
    @I.ir_module
    class Expected:
        @R.function
        def main(
            x: R.Tensor((1, 4, 8, 8), "float32"),
            wg: R.Tensor((4, 4, 3, 3), "float16"),
            bg: R.Tensor((1, 4, 1, 1), "float16"),
            wc: R.Tensor((4, 4, 3, 3), "float32"),
            bc: R.Tensor((1, 4, 1, 1), "float32"),
        ) -> R.Tensor((1, 8, 8, 8), "float32"):
            with R.dataflow():
                xh = R.astype(x, "float16")
                g = R.nn.conv2d(xh, wg, padding=[1, 1, 1, 1], out_dtype="float16")
                g0 = R.add(g, bg)
                g1 = R.nn.relu(g0)
                g2 = R.astype(g1, "float32")
                c = R.nn.conv2d(x, wc, padding=[1, 1, 1, 1])
                c0 = R.add(c, bc)
                c1 = R.nn.relu(c0)
                gv = R.concat((g2, c1), axis=1)
                R.output(gv)
            return gv

    w, b = rand(8, 4, 3, 3), rand(1, 8, 1, 1)
    before = bind(Split, wg=w[:4], bg=b[:, :4], wc=w[4:], bc=b[:, 4:])
    after = CastGPU("float16")(before)
    expected = bind(
        Expected,
        wg=w[:4].astype(np.float16),
        bg=b[:, :4].astype(np.float16),
        wc=w[4:],
        bc=b[:, 4:],
    )
    tvm.ir.assert_structural_equal(after, expected)


def test_consecutive_gpu_layers_do_not_round_trip():
    mod = SplitChannels(Plan.uniform(1.0))(NETS["tiny"]())
    after = CastGPU("float16")(mod)
    bindings = after["main"].body.blocks[0].bindings
    casts = [b for b in bindings if b.var.name.endswith("_gpu_cast_in")]
    # conv2d.0 -> conv2d.1 -> max_pool2d.0 -> conv2d.2 ... chain in fp16 without a cast in:
    assert "conv2d_1_gpu_cast_in" not in {b.var.name for b in casts}
    assert "conv2d_2_gpu_cast_in" not in {b.var.name for b in casts}


@pytest.mark.parametrize("accumulate", ["float32", "float16"])
def test_gpu_ops_are_float16_in_the_ir(accumulate):
    after = CastGPU(accumulate)(SplitChannels(Plan.uniform(0.5, align=4))(NETS["tiny"]()))
    ops = [b for b in after["main"].body.blocks[0].bindings if is_part_op(b.var)]
    for binding in ops:
        side = part_of(binding.var)[1]
        data_dtype = str(binding.value.args[0].ty.dtype)
        assert data_dtype == ("float16" if side == "gpu" else "float32"), binding.var.name


@pytest.mark.parametrize("accumulate", ["float32", "float16"])
def test_numerics_within_fp16_tolerance(accumulate):
    mod = NETS["tiny"]()
    x, expected = reference("tiny")
    for ratio in (0.5, 1.0):
        after = CastGPU(accumulate)(SplitChannels(Plan.uniform(ratio, align=4))(mod))
        error = rel_error(run_llvm(after, x), expected)
        assert error < 2e-2, (ratio, error)
        if ratio == 1.0:
            assert error > 0.0  # it really ran in fp16
