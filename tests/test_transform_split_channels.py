"""SplitChannels: structure (TVMScript Before/Expected), part names, and numerics on llvm."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from mulayer.frontend.layers import layer_names
from mulayer.passes.common import is_part_op, join_of, part_of, part_role
from mulayer.passes.split_channels import SplitChannels
from mulayer.plan import LayerDecision, Plan

from .relax_nets import NETS, reference, rel_error, run_llvm

RNG = np.random.default_rng(0)


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def bind(mod: tvm.IRModule, **params: np.ndarray) -> tvm.IRModule:
    """Turn the named parameters of ``main`` into constants (weights are constants in the
    canonical form; TVMScript writes them more readably as parameters)."""
    return relax.transform.BindParams("main", params)(mod)


def split(mod: tvm.IRModule, plan: Plan) -> tvm.IRModule:
    return SplitChannels(plan)(mod)


def gpu_size(layer: str, size: int, align: int = 4) -> Plan:
    return Plan(align=align, layers={layer: LayerDecision("split", "channel", size)})


# ------------------------------------------------------------------------------ structure
def test_conv2d_with_epilogues():
    @I.ir_module
    class Before:
        @R.function
        def main(
            x: R.Tensor((1, 4, 8, 8), "float32"),
            w: R.Tensor((16, 4, 3, 3), "float32"),
            b: R.Tensor((1, 16, 1, 1), "float32"),
        ) -> R.Tensor((1, 16, 8, 8), "float32"):
            with R.dataflow():
                y = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
                z = R.add(y, b)
                gv = R.nn.relu(z)
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(
            x: R.Tensor((1, 4, 8, 8), "float32"),
            wg: R.Tensor((8, 4, 3, 3), "float32"),
            bg: R.Tensor((1, 8, 1, 1), "float32"),
            wc: R.Tensor((8, 4, 3, 3), "float32"),
            bc: R.Tensor((1, 8, 1, 1), "float32"),
        ) -> R.Tensor((1, 16, 8, 8), "float32"):
            with R.dataflow():
                g = R.nn.conv2d(x, wg, padding=[1, 1, 1, 1])
                g0 = R.add(g, bg)
                g1 = R.nn.relu(g0)
                c = R.nn.conv2d(x, wc, padding=[1, 1, 1, 1])
                c0 = R.add(c, bc)
                c1 = R.nn.relu(c0)
                gv = R.concat((g1, c1), axis=1)
                R.output(gv)
            return gv

    w, b = rand(16, 4, 3, 3), rand(1, 16, 1, 1)
    after = split(bind(Before, w=w, b=b), Plan.uniform(0.5, align=4))
    expected = bind(Expected, wg=w[:8], bg=b[:, :8], wc=w[8:], bc=b[:, 8:])
    tvm.ir.assert_structural_equal(after, expected)
    names = [b.var.name for b in after["main"].body.blocks[0].bindings]
    assert names == [
        "conv2d_0_gpu",
        "conv2d_0_gpu_e0",
        "conv2d_0_gpu_e1",
        "conv2d_0_cpu",
        "conv2d_0_cpu_e0",
        "conv2d_0_cpu_e1",
        "conv2d_0_join",
    ]


def test_grouped_conv_slices_input_on_group_boundary():
    @I.ir_module
    class Before:
        @R.function
        def main(
            x: R.Tensor((1, 8, 8, 8), "float32"), w: R.Tensor((16, 2, 3, 3), "float32")
        ) -> R.Tensor((1, 16, 8, 8), "float32"):
            with R.dataflow():
                gv = R.nn.conv2d(x, w, padding=[1, 1, 1, 1], groups=4)
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(
            x: R.Tensor((1, 8, 8, 8), "float32"),
            wg: R.Tensor((8, 2, 3, 3), "float32"),
            wc: R.Tensor((8, 2, 3, 3), "float32"),
        ) -> R.Tensor((1, 16, 8, 8), "float32"):
            with R.dataflow():
                xg = R.strided_slice(x, axes=[1], begin=[0], end=[4])
                g = R.nn.conv2d(xg, wg, padding=[1, 1, 1, 1], groups=2)
                xc = R.strided_slice(x, axes=[1], begin=[4], end=[8])
                c = R.nn.conv2d(xc, wc, padding=[1, 1, 1, 1], groups=2)
                gv = R.concat((g, c), axis=1)
                R.output(gv)
            return gv

    w = rand(16, 2, 3, 3)
    # 6 output channels asked; groups hold 4 each, so the split moves to 8.
    after = split(bind(Before, w=w), gpu_size("conv2d.0", 6, align=2))
    tvm.ir.assert_structural_equal(after, bind(Expected, wg=w[:8], wc=w[8:]))


def test_depthwise_conv():
    @I.ir_module
    class Before:
        @R.function
        def main(
            x: R.Tensor((1, 8, 6, 6), "float32"), w: R.Tensor((8, 1, 3, 3), "float32")
        ) -> R.Tensor((1, 8, 6, 6), "float32"):
            with R.dataflow():
                gv = R.nn.conv2d(x, w, padding=[1, 1, 1, 1], groups=8)
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(
            x: R.Tensor((1, 8, 6, 6), "float32"),
            wg: R.Tensor((4, 1, 3, 3), "float32"),
            wc: R.Tensor((4, 1, 3, 3), "float32"),
        ) -> R.Tensor((1, 8, 6, 6), "float32"):
            with R.dataflow():
                xg = R.strided_slice(x, axes=[1], begin=[0], end=[4])
                g = R.nn.conv2d(xg, wg, padding=[1, 1, 1, 1], groups=4)
                xc = R.strided_slice(x, axes=[1], begin=[4], end=[8])
                c = R.nn.conv2d(xc, wc, padding=[1, 1, 1, 1], groups=4)
                gv = R.concat((g, c), axis=1)
                R.output(gv)
            return gv

    w = rand(8, 1, 3, 3)
    after = split(bind(Before, w=w), gpu_size("conv2d.0", 4))
    tvm.ir.assert_structural_equal(after, bind(Expected, wg=w[:4], wc=w[4:]))


def test_dense_with_bias_and_relu():
    @I.ir_module
    class Before:
        @R.function
        def main(
            x: R.Tensor((1, 16), "float32"),
            w: R.Tensor((16, 12), "float32"),
            b: R.Tensor((12,), "float32"),
        ) -> R.Tensor((1, 12), "float32"):
            with R.dataflow():
                y = R.matmul(x, w)
                z = R.add(y, b)
                gv = R.nn.relu(z)
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(
            x: R.Tensor((1, 16), "float32"),
            wg: R.Tensor((16, 4), "float32"),
            bg: R.Tensor((4,), "float32"),
            wc: R.Tensor((16, 8), "float32"),
            bc: R.Tensor((8,), "float32"),
        ) -> R.Tensor((1, 12), "float32"):
            with R.dataflow():
                g = R.matmul(x, wg)
                g0 = R.add(g, bg)
                g1 = R.nn.relu(g0)
                c = R.matmul(x, wc)
                c0 = R.add(c, bc)
                c1 = R.nn.relu(c0)
                gv = R.concat((g1, c1), axis=1)
                R.output(gv)
            return gv

    w, b = rand(16, 12), rand(12)
    after = split(bind(Before, w=w, b=b), gpu_size("dense.0", 4))
    expected = bind(Expected, wg=w[:, :4], bg=b[:4], wc=w[:, 4:], bc=b[4:])
    tvm.ir.assert_structural_equal(after, expected)
    assert [is_part_op(b.var) for b in after["main"].body.blocks[0].bindings] == [
        True, False, False, True, False, False, False,
    ]  # fmt: skip


def test_pools():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 16, 8, 8), "float32")) -> R.Tensor((1, 16, 1, 1), "float32"):
            with R.dataflow():
                a = R.nn.max_pool2d(x, pool_size=[3, 3], strides=[1, 1], padding=[1, 1, 1, 1])
                b = R.nn.avg_pool2d(a, pool_size=[2, 2], strides=[2, 2])
                gv = R.mean(b, axis=[2, 3], keepdims=True)
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 16, 8, 8), "float32")) -> R.Tensor((1, 16, 1, 1), "float32"):
            with R.dataflow():
                x0 = R.strided_slice(x, axes=[1], begin=[0], end=[8])
                a0 = R.nn.max_pool2d(x0, pool_size=[3, 3], strides=[1, 1], padding=[1, 1, 1, 1])
                x1 = R.strided_slice(x, axes=[1], begin=[8], end=[16])
                a1 = R.nn.max_pool2d(x1, pool_size=[3, 3], strides=[1, 1], padding=[1, 1, 1, 1])
                a = R.concat((a0, a1), axis=1)
                a2 = R.strided_slice(a, axes=[1], begin=[0], end=[8])
                b0 = R.nn.avg_pool2d(a2, pool_size=[2, 2], strides=[2, 2])
                a3 = R.strided_slice(a, axes=[1], begin=[8], end=[16])
                b1 = R.nn.avg_pool2d(a3, pool_size=[2, 2], strides=[2, 2])
                b = R.concat((b0, b1), axis=1)
                b2 = R.strided_slice(b, axes=[1], begin=[0], end=[8])
                m0 = R.mean(b2, axis=[2, 3], keepdims=True)
                b3 = R.strided_slice(b, axes=[1], begin=[8], end=[16])
                m1 = R.mean(b3, axis=[2, 3], keepdims=True)
                gv = R.concat((m0, m1), axis=1)
                R.output(gv)
            return gv

    after = split(Before, Plan.uniform(0.5, align=4))
    tvm.ir.assert_structural_equal(after, Expected)
    roles = [part_role(b.var) for b in after["main"].body.blocks[0].bindings]
    assert roles[:2] == [("max_pool2d.0", "gpu", "input"), ("max_pool2d.0", "gpu", "op")]


def test_epilogue_with_another_reader_stays_after_the_join():
    @I.ir_module
    class Before:
        @R.function
        def main(
            x: R.Tensor((1, 4, 8, 8), "float32"), w: R.Tensor((8, 4, 1, 1), "float32")
        ) -> R.Tensor((1, 8, 8, 8), "float32"):
            with R.dataflow():
                y = R.nn.conv2d(x, w)
                z = R.nn.relu(y)
                gv = R.add(z, y)
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(
            x: R.Tensor((1, 4, 8, 8), "float32"),
            wg: R.Tensor((4, 4, 1, 1), "float32"),
            wc: R.Tensor((4, 4, 1, 1), "float32"),
        ) -> R.Tensor((1, 8, 8, 8), "float32"):
            with R.dataflow():
                g = R.nn.conv2d(x, wg)
                c = R.nn.conv2d(x, wc)
                y = R.concat((g, c), axis=1)
                z = R.nn.relu(y)
                gv = R.add(z, y)
                R.output(gv)
            return gv

    w = rand(8, 4, 1, 1)
    after = split(bind(Before, w=w), Plan.uniform(0.5, align=4))
    tvm.ir.assert_structural_equal(after, bind(Expected, wg=w[:4], wc=w[4:]))


@pytest.mark.parametrize(("ratio", "side"), [(0.0, "cpu"), (1.0, "gpu")])
def test_whole_layer_is_only_renamed(ratio, side):
    @I.ir_module
    class Before:
        @R.function
        def main(
            x: R.Tensor((1, 16), "float32"),
            w: R.Tensor((16, 12), "float32"),
            b: R.Tensor((12,), "float32"),
        ) -> R.Tensor((1, 12), "float32"):
            with R.dataflow():
                y = R.matmul(x, w)
                gv = R.add(y, b)
                R.output(gv)
            return gv

    before = bind(Before, w=rand(16, 12), b=rand(12))
    after = split(before, Plan.uniform(ratio))
    tvm.ir.assert_structural_equal(after, before)
    names = [b.var.name for b in after["main"].body.blocks[0].bindings]
    assert names == [f"dense_0_{side}", f"dense_0_{side}_e0"]
    assert [part_of(n) for n in names] == [("dense.0", side)] * 2


def test_height_axis_is_left_unchanged():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 16, 8, 8), "float32")) -> R.Tensor((1, 16, 4, 4), "float32"):
            with R.dataflow():
                gv = R.nn.max_pool2d(x, pool_size=[2, 2], strides=[2, 2])
                R.output(gv)
            return gv

    plan = Plan(layers={"max_pool2d.0": LayerDecision("split", "height", 2)})
    tvm.ir.assert_structural_equal(split(Before, plan), Before)


def test_input_module_is_not_mutated():
    mod = NETS["tiny"]()
    text = mod.script()
    split(mod, Plan.uniform(0.5, align=4))
    assert mod.script() == text


# ------------------------------------------------------------------------- names, contract
def test_names_survive_canonicalize_and_dce():
    mod = NETS["tiny"]()
    layers = layer_names(mod["main"])
    after = split(mod, Plan.uniform(0.5, align=4))
    after = relax.transform.CanonicalizeBindings()(after)
    after = relax.transform.DeadCodeElimination()(after)
    bindings = after["main"].body.blocks[0].bindings
    ops = {part_of(b.var) for b in bindings if is_part_op(b.var)}
    assert ops == {(layer, side) for layer in layers for side in ("gpu", "cpu")}
    joins = {join_of(b.var) for b in bindings} - {None}
    assert joins == set(layers)
    # The frontend's Clip PrimFuncs were pulled into the parts as R.maximum / R.minimum.
    assert not any(str(b.value.op) == "Op(relax.call_tir)" for b in bindings)
    assert not [gv for gv, f in after.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]


def test_part_name_helpers():
    assert part_of("conv2d_3_cpu_e0") == ("conv2d.3", "cpu")
    assert part_of("global_avg_pool2d_12_gpu") == ("global_avg_pool2d.12", "gpu")
    assert part_of("max_pool2d_0_gpu_in") is None
    assert part_of("conv2d_3_join") is None and join_of("conv2d_3_join") == "conv2d.3"
    assert is_part_op("dense_0_gpu") and not is_part_op("dense_0_gpu_e1")
    assert part_of("lv5") is None and not is_part_op("conv2d_0_gpu_cast_in")
    assert part_role("conv2d_0_cpu_qacc") == ("conv2d.0", "cpu", "aux")
    assert part_role("max_pool2d_1_gpu_in") == ("max_pool2d.1", "gpu", "input")
    # Copies PlaceDevices emits never parse as parts.
    assert part_role("to_cpu_conv2d_0_gpu_e1") is None and part_role("const3_to_cpu") is None


# ------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("net", sorted(NETS))
def test_split_matches_unsplit(net):
    mod = NETS[net]()
    x, expected = reference(net)
    for ratio in (0.0, 0.25, 0.5, 1.0):
        after = split(mod, Plan.uniform(ratio, align=4))
        assert rel_error(run_llvm(after, x), expected) <= 1e-5, ratio
