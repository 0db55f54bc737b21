"""scripts/torch_peer.py: the ONNX → PyTorch peer of the benchmark, checked against onnxruntime
on the CPU in fp32 (needs torch, from the ``models`` extra)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("torch")

import torch  # noqa: E402

from mulayer.errors import MuLayerError  # noqa: E402
from mulayer.models import zoo  # noqa: E402
from mulayer.models.reference import max_rel_error, onnxruntime_session  # noqa: E402

pytestmark = pytest.mark.models

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture(scope="module")
def torch_peer():
    spec = importlib.util.spec_from_file_location("torch_peer", SCRIPTS / "torch_peer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["torch_peer"] = module
    spec.loader.exec_module(module)
    return module


def _against_onnxruntime(torch_peer, model: onnx.ModelProto, tmp_path: Path, **kwargs) -> float:
    """max rel. error of the PyTorch module against onnxruntime on a fresh random input."""
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    dims = model.graph.input[0].type.tensor_type.shape.dim
    x = np.random.default_rng().standard_normal([d.dim_value for d in dims]).astype(np.float32)
    expected = onnxruntime_session(path).run(None, {model.graph.input[0].name: x})[0]
    module = torch_peer.OnnxModule(model, **kwargs).eval()
    with torch.inference_mode():
        actual = module(torch.from_numpy(x)).numpy()
    assert actual.shape == expected.shape
    return max_rel_error(actual, expected)


_FAST_ZOO = [n for n in zoo.MODEL_NAMES if n != "vgg16"]


@pytest.mark.parametrize("name", [*_FAST_ZOO, pytest.param("vgg16", marks=pytest.mark.slow)])
def test_zoo_model_matches_onnxruntime(torch_peer, name: str, tmp_path: Path) -> None:
    model = zoo.build_model(name)
    assert _against_onnxruntime(torch_peer, model, tmp_path) < 1e-4


def test_batch_norm_unfolded_matches_too(torch_peer, tmp_path: Path) -> None:
    model = zoo.build_model("tiny")
    folded = torch_peer.OnnxModule(model)
    assert folded.folded_batchnorms == 2, "tiny has two Conv → BatchNormalization pairs"
    assert torch_peer.OnnxModule(model, fold_batchnorm=False).folded_batchnorms == 0
    assert _against_onnxruntime(torch_peer, model, tmp_path, fold_batchnorm=False) < 1e-4


def _graph_model(nodes, inits, in_shape, out_shape, opset: int = 18) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_op_variants_of_the_pretrained_exports(torch_peer, tmp_path: Path) -> None:
    """What the pretrained exports use beyond the zoo: asymmetric conv pads, Mul/Add by
    constants, Clip bounds from Constant nodes, ReduceMean with axes as an input, Reshape with a
    0, Gemm with alpha/beta; and a ceil-mode average pool."""
    rng = np.random.default_rng()
    f32 = np.float32
    inits = {
        "scale": rng.uniform(0.5, 2, (1, 3, 1, 1)).astype(f32),
        "shift": rng.normal(0, 1, (1, 3, 1, 1)).astype(f32),
        "w": rng.normal(0, 0.3, (8, 3, 3, 3)).astype(f32),
        "b": rng.normal(0, 0.1, 8).astype(f32),
        "axes": np.array([2, 3], np.int64),
        "shape": np.array([0, -1], np.int64),
        "fc_w": rng.normal(0, 0.3, (8, 5)).astype(f32),
        "fc_b": rng.normal(0, 0.1, 5).astype(f32),
    }
    lo = helper.make_tensor("lo", TensorProto.FLOAT, [], [0.0])
    hi = helper.make_tensor("hi", TensorProto.FLOAT, [], [6.0])
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["m"]),
        helper.make_node("Add", ["m", "shift"], ["a"]),
        helper.make_node("Conv", ["a", "w", "b"], ["c"], pads=[0, 0, 1, 1], strides=[2, 2]),
        helper.make_node("Constant", [], ["lo"], value=lo),
        helper.make_node("Constant", [], ["hi"], value=hi),
        helper.make_node("Clip", ["c", "lo", "hi"], ["r"]),
        helper.make_node(
            "AveragePool", ["r"], ["p"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1
        ),
        helper.make_node("ReduceMean", ["p", "axes"], ["g"], keepdims=1),
        helper.make_node("Reshape", ["g", "shape"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], alpha=0.5, beta=2.0),
    ]
    model = _graph_model(nodes, inits, [1, 3, 17, 17], [1, 5])
    assert _against_onnxruntime(torch_peer, model, tmp_path) < 1e-5


def test_unsupported_op_is_named(torch_peer) -> None:
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Relu", ["s"], ["y"])]
    model = _graph_model(nodes, {}, [1, 4], [1, 4])
    with pytest.raises(MuLayerError, match="Sigmoid.*supported: Add"):
        torch_peer.OnnxModule(model)


def test_eager_runner_predicts_like_the_module(torch_peer) -> None:
    model = zoo.build_model("tiny")
    x = zoo.random_input("tiny", seed=np.random.default_rng().integers(1000))
    module = torch_peer.prepare(model, "cpu", half=False)
    runner = torch_peer.eager_runner(module, x)
    runner.step()
    with torch.inference_mode():
        expected = module(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(runner.predict(x), expected)
    with pytest.raises(MuLayerError, match="CUDA graph needs"):
        torch_peer.cuda_graph_runner(module, x)


@pytest.mark.slow
def test_pretrained_models_match_onnxruntime(torch_peer, tmp_path: Path) -> None:
    from mulayer.models import pretrained

    if not pretrained.models_extra_available():
        pytest.skip("the models extra is not installed")
    for name in pretrained.PRETRAINED_MODELS:
        model = pretrained.export_pretrained(name)
        assert _against_onnxruntime(torch_peer, model, tmp_path) < 1e-4, name
