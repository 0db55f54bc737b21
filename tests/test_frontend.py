"""ONNX import: clear errors for bad models, static shapes, canonical form."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mulayer import MuLayerError
from mulayer.frontend.layers import splittable_layers
from mulayer.frontend.onnx_import import import_onnx, parse_input_shapes


def _conv_model(batch_dim="N", op="Relu", domain=""):
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype("float32"), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node(op, ["c"], ["y"], name="act0", domain=domain),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_missing_file(tmp_path):
    with pytest.raises(MuLayerError, match="does not exist"):
        import_onnx(tmp_path / "nope.onnx")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(MuLayerError, match="is empty"):
        import_onnx(path)


def test_not_onnx(tmp_path):
    path = tmp_path / "text.onnx"
    path.write_text("this is not a model\n" * 10)
    with pytest.raises(MuLayerError, match="not an ONNX model"):
        import_onnx(path)


def test_truncated(tmp_path, tiny_onnx):
    data = tiny_onnx.read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(MuLayerError):
        import_onnx(path)


def test_directory(tmp_path):
    with pytest.raises(MuLayerError, match="is a directory"):
        import_onnx(tmp_path)


def test_unsupported_op_names_op_and_node():
    model = _conv_model(batch_dim=1, op="MadeUpOp")
    with pytest.raises(MuLayerError) as info:
        import_onnx(model)
    assert "MadeUpOp" in str(info.value) and "act0" in str(info.value)


def test_custom_domain_rejected():
    model = _conv_model(batch_dim=1, op="Gelu", domain="com.example")
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(MuLayerError, match="com.example::Gelu"):
        import_onnx(model)


def test_dynamic_dims_need_input_shapes():
    model = _conv_model(batch_dim="N")
    with pytest.raises(MuLayerError) as info:
        import_onnx(model)
    assert "dynamic dims (N)" in str(info.value) and "--input-shapes" in str(info.value)
    mod, inputs, outputs = import_onnx(model, "x:[2,3,8,8]")
    assert inputs[0].shape == (2, 3, 8, 8)
    assert outputs[0].shape == (2, 4, 8, 8) and outputs[0].name == "y"


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ("x:[1,3,8]", "rank 3"),
        ("x:[1,4,8,8]", "fixes it to 3"),
        ("z:[1,3,8,8] x:[1,3,8,8]", "unknown input(s) z"),
    ],
)
def test_bad_input_shapes(shapes, message):
    with pytest.raises(MuLayerError, match=message.replace("(", r"\(").replace(")", r"\)")):
        import_onnx(_conv_model(batch_dim="N"), shapes)


@pytest.mark.parametrize("text", ["x", "x:[1,a]", "x:[1,-3]", "x:[]", "x:(1,3)"])
def test_input_shapes_grammar_errors(text):
    with pytest.raises(MuLayerError):
        parse_input_shapes(text)


def test_input_shapes_grammar():
    assert parse_input_shapes("input:[1,3,224,224] mask:[1, 10]") == {
        "input": [1, 3, 224, 224],
        "mask": [1, 10],
    }


def test_cycle_is_rejected():
    model = _conv_model(batch_dim=1)
    # Feed the activation's output back into the conv: not topologically sortable.
    model.graph.node[0].input[0] = "y"
    with pytest.raises(MuLayerError):
        import_onnx(model)


def test_canonical_form_folds_batchnorm(tiny_onnx):
    mod, _, _ = import_onnx(tiny_onnx)
    text = mod.script(show_meta=False)
    assert "batch_norm" not in text
    kinds = {layer.kind for layer in splittable_layers(mod["main"])}
    assert {"conv2d", "dense", "max_pool2d", "global_avg_pool2d"} <= kinds


def test_layer_table_flops(tiny_onnx):
    mod, _, _ = import_onnx(tiny_onnx)
    model = onnx.load(str(tiny_onnx))
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    layers = [layer for layer in splittable_layers(mod["main"]) if layer.kind == "conv2d"]
    assert len(layers) == len(convs)
    names = [layer.name for layer in layers]
    assert names == [f"conv2d.{i}" for i in range(len(layers))]
    for layer in layers:
        out_c, in_per_group, kh, kw = layer.weight_shape
        n, c, h, w = layer.output_shape
        assert c == out_c
        assert layer.flops == 2 * n * c * h * w * in_per_group * kh * kw


def test_layer_table_records_each_layers_epilogue_and_input_sign():
    from tests.relax_nets import odd

    layers = {layer.name: layer for layer in splittable_layers(odd()["main"])}
    # conv + folded BN + ReLU on the net's input (signed)
    assert layers["conv2d.0"].epilogue == ("relax.add", "relax.nn.relu")
    assert not layers["conv2d.0"].input_nonneg
    # after the ReLU: a pool's input is never negative; BN after a pool is channel-wise too
    assert layers["max_pool2d.0"].input_nonneg
    assert layers["max_pool2d.0"].epilogue[-2:] == ("relax.multiply", "relax.add")
    # grouped conv + ReLU6 (maximum, minimum) on the BN's signed output
    assert layers["conv2d.1"].epilogue == ("relax.add", "relax.maximum", "relax.minimum")
    assert not layers["conv2d.1"].input_nonneg
    # the depthwise conv reads the ReLU6 output; the pointwise conv after it does not
    assert layers["conv2d.2"].input_nonneg and not layers["conv2d.3"].input_nonneg
    # a concat is never negative only if every branch is not (the strided conv has no ReLU)
    assert not layers["global_avg_pool2d.0"].input_nonneg
    assert layers["avg_pool2d.0"].epilogue == ()
