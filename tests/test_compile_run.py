"""Single-processor builds: CPU fp32 runs and matches onnxruntime; GPU builds compile."""

import numpy as np
import pytest
import tvm

import mulayer
from mulayer.compiler.build import all_modules, check_device_module

from .conftest import max_rel_error, onnxruntime_reference


def _compile_and_compare(model_path, target, tmp_path, tolerance, seed):
    artifact = tmp_path / "model.mulayer"
    mulayer.compile(str(model_path), target=target).export(artifact)
    model = mulayer.load(artifact)
    inputs = model.random_inputs(seed=seed)
    outputs = list(model(inputs).values())
    reference = onnxruntime_reference(model_path, inputs)
    assert len(outputs) == len(reference)
    for out, ref in zip(outputs, reference, strict=True):
        assert out.shape == ref.shape
        assert np.all(np.isfinite(out))
        assert max_rel_error(out, ref) < tolerance
    return model


def test_tiny_cpu_fp32_matches_onnxruntime(tiny_onnx, tmp_path):
    model = _compile_and_compare(tiny_onnx, "llvm", tmp_path, 1e-4, seed=np.random.randint(1 << 30))
    assert model.benchmark(repeat=2, warmup=0).median_ms > 0


@pytest.mark.slow
def test_resnet18_cpu_fp32_matches_onnxruntime(resnet18_onnx, tmp_path):
    _compile_and_compare(resnet18_onnx, "llvm", tmp_path, 1e-4, seed=np.random.randint(1 << 30))


def test_cuda_build_has_a_cuda_module(tiny_onnx):
    compiled = mulayer.compile(str(tiny_onnx), target="cuda -arch=sm_90, llvm")
    check_device_module(compiled.executable, "cuda")
    source = "".join(
        m.inspect_source() for m in all_modules(compiled.executable.mod) if m.kind == "cuda"
    )
    assert "__global__" in source and "half" in source  # fp16 kernels


def test_cuda_artifact_exports_and_refuses_to_run_without_gpu(tiny_onnx, tmp_path):
    path = tmp_path / "gpu.mulayer"
    mulayer.compile(str(tiny_onnx), target="cuda -arch=sm_90, llvm").export(path)
    if tvm.cuda(0).exist:
        pytest.skip("a GPU is present; covered by the gpu test")
    with pytest.raises(mulayer.MuLayerError, match="needs a cuda device"):
        mulayer.load(path)


def test_opencl_build_exports(tiny_onnx, tmp_path):
    compiled = mulayer.compile(str(tiny_onnx), target="opencl -device=mali, llvm")
    check_device_module(compiled.executable, "opencl")
    compiled.export(tmp_path / "mali.mulayer")
    assert (tmp_path / "mali.mulayer").stat().st_size > 0


@pytest.mark.gpu
def test_tiny_gpu_fp16_matches_onnxruntime(tiny_onnx, tmp_path):
    _compile_and_compare(tiny_onnx, "cuda, llvm", tmp_path, 2e-2, seed=np.random.randint(1 << 30))


@pytest.mark.gpu
def test_resnet18_gpu_fp16_matches_onnxruntime(resnet18_onnx, tmp_path):
    _compile_and_compare(resnet18_onnx, "cuda, llvm", tmp_path, 2e-2, seed=7)


def test_conv_with_silu_epilogue_builds_and_matches(tmp_path):
    """An epilogue reading the conv result twice (SiLU, found by the fuzzer) builds on llvm."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng()
    w = numpy_helper.from_array(rng.standard_normal((16, 8, 3, 3)).astype("f4"), "w")
    b = numpy_helper.from_array(rng.standard_normal(16).astype("f4"), "b")
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c"], ["s"]),
        helper.make_node("Mul", ["c", "s"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "silu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 16, 16])],
        [w, b],
    )
    path = tmp_path / "silu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    mulayer.compile(str(path), target="llvm").export(tmp_path / "silu.mulayer")
    model = mulayer.load(tmp_path / "silu.mulayer")
    x = model.random_inputs(seed=int(rng.integers(1 << 30)))
    assert max_rel_error(model(x)["y"], onnxruntime_reference(path, x)[0]) < 1e-5
