"""ChannelsLastGPU: dense convs in NHWC/OHWI, layout changes only at chain ends, same numbers."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from mulayer.compiler.build import to_fp16
from mulayer.errors import MuLayerError
from mulayer.frontend.onnx_import import import_onnx
from mulayer.models import zoo
from mulayer.passes.cast_gpu import CastGPU
from mulayer.passes.channels_last import LAYOUT_ENV, ChannelsLastGPU, gpu_layout

from .relax_nets import NETS, input_for, rel_error, run_llvm


@I.ir_module
class Before:
    @R.function
    def main(
        x: R.Tensor((1, 8, 6, 6), "float32"),
        w1: R.Tensor((8, 8, 3, 3), "float32"),
        w2: R.Tensor((8, 1, 3, 3), "float32"),
        w3: R.Tensor((8, 4, 1, 1), "float32"),
    ) -> R.Tensor((1, 8, 6, 6), "float32"):
        with R.dataflow():
            y = R.nn.conv2d(x, w1, padding=[1, 1, 1, 1])
            y = R.nn.relu(y)
            z = R.nn.conv2d(y, w2, padding=[1, 1, 1, 1], groups=8)
            z = R.nn.conv2d(z, w3, groups=2)
            R.output(z)
        return z


@I.ir_module
class Expected:
    @R.function
    def main(
        x: R.Tensor((1, 8, 6, 6), "float32"),
        w1: R.Tensor((8, 8, 3, 3), "float32"),
        w2: R.Tensor((8, 1, 3, 3), "float32"),
        w3: R.Tensor((8, 4, 1, 1), "float32"),
    ) -> R.Tensor((1, 8, 6, 6), "float32"):
        nhwc = {"data_layout": "NHWC", "kernel_layout": "OHWI", "out_layout": "NHWC"}
        with R.dataflow():
            lv = R.permute_dims(x, axes=[0, 2, 3, 1])
            lv1 = R.permute_dims(w1, axes=[0, 2, 3, 1])
            y = R.nn.conv2d(lv, lv1, padding=[1, 1, 1, 1], **nhwc)
            y1 = R.nn.relu(y)
            lv2 = R.permute_dims(w2, axes=[0, 2, 3, 1])
            z = R.nn.conv2d(y1, lv2, padding=[1, 1, 1, 1], groups=8, **nhwc)
            lv3 = R.permute_dims(z, axes=[0, 3, 1, 2])
            z1 = R.nn.conv2d(lv3, w3, groups=2)
            R.output(z1)
        return z1


def test_dense_and_depthwise_convs_go_channels_last_other_grouped_convs_stay():
    after = ChannelsLastGPU("NHWC")(Before)
    tvm.ir.assert_structural_equal(after, Expected)


def test_nchw_leaves_the_module_unchanged():
    tvm.ir.assert_structural_equal(ChannelsLastGPU("NCHW")(Before), Before)


def test_gpu_only_form_keeps_nchw_when_asked(tmp_path, monkeypatch):
    monkeypatch.setenv(LAYOUT_ENV, "NCHW")
    zoo.save_model("resnet18", tmp_path / "r18.onnx")
    mod, _, _ = import_onnx(tmp_path / "r18.onnx", None)
    gpu = relax.transform.FoldConstant()(to_fp16(mod))
    assert _conv_layouts(gpu) == Counter({(False, "NCHW"): 20})
    assert _activation_permutes(gpu) == []


def test_default_layout_is_channels_last(monkeypatch):
    monkeypatch.delenv(LAYOUT_ENV, raising=False)
    assert gpu_layout() == "NHWC"


def test_layout_switch_names_bad_values(monkeypatch):
    monkeypatch.setenv(LAYOUT_ENV, "nchw")
    assert gpu_layout() == "NCHW"
    monkeypatch.setenv(LAYOUT_ENV, "NCWH")
    with pytest.raises(MuLayerError, match="NCWH.*NHWC, NCHW"):
        gpu_layout()


@pytest.mark.parametrize("net", sorted(NETS))
def test_numbers_unchanged(net):
    """The converted module computes what the original does (fp32, llvm, fresh input)."""
    mod = NETS[net]()
    x = input_for(mod, seed=int(np.random.default_rng().integers(1 << 30)))
    expected = run_llvm(mod, x)
    got = run_llvm(ChannelsLastGPU("NHWC")(mod), x)
    assert np.isfinite(got).all()
    assert rel_error(got, expected) < 1e-5


def _activation_permutes(mod: tvm.IRModule) -> list[list[int]]:
    found = []

    def visit(expr):
        if (
            isinstance(expr, relax.Call)
            and isinstance(expr.op, tvm.ir.Op)
            and expr.op.name == "relax.permute_dims"
        ):
            found.append([int(a) for a in expr.attrs.axes])

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


def _conv_layouts(mod: tvm.IRModule) -> Counter:
    found = Counter()

    def visit(expr):
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.nn.conv2d":
            found[(int(expr.attrs.groups) > 1, str(expr.attrs.data_layout))] += 1

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


@pytest.mark.parametrize(
    ("net", "convs"),
    [
        ("resnet18", {(False, "NHWC"): 20}),
        ("mobilenetv2", {(False, "NHWC"): 35, (True, "NHWC"): 17}),
    ],
)
def test_gpu_only_form_changes_layout_only_at_its_ends(net, convs, tmp_path, monkeypatch):
    """The GPU-only form of ResNet-18 and MobileNetV2: every conv NHWC (depthwise ones too),
    weights transposed when compiling (folded constants), one transform at the input and one
    before the classifier."""
    monkeypatch.setenv(LAYOUT_ENV, "NHWC")
    zoo.save_model(net, tmp_path / "net.onnx")
    mod, _, _ = import_onnx(tmp_path / "net.onnx", None)
    gpu = relax.transform.FoldConstant()(to_fp16(mod))
    assert _conv_layouts(gpu) == Counter(convs)
    assert _activation_permutes(gpu) == [[0, 2, 3, 1], [0, 3, 1, 2]]


@pytest.mark.parametrize(
    ("layout", "convs"),
    [
        ("NHWC", {(False, "NHWC"): 1, (True, "NHWC"): 1, (True, "NCHW"): 1}),
        ("NCHW", {(False, "NCHW"): 1, (True, "NCHW"): 2}),
    ],
)
def test_cast_gpu_without_a_cpu_part_follows_the_layout(layout, convs):
    """A plan with every layer on the GPU is cast as the GPU-only build is: the same layouts
    (the dense and the depthwise conv NHWC, the two-group conv NCHW)."""
    assert _conv_layouts(CastGPU(layout=layout)(Before)) == Counter(convs)
