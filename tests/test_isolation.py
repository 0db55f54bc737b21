"""Crash containment: `mulayer compile` builds in a child process; a crash there is a clear error.

The crashes are real: ``MULAYER_TEST_FAULT`` makes the child raise SIGSEGV / SIGABRT (or hang)
at a named step, PrimFunc or TVM pass.
"""

import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import mulayer
from mulayer import MuLayerError
from mulayer.cli.main import main
from mulayer.compiler.isolation import FAULT_ENV, ChildFailure, _where, call_in_child

from .conftest import onnxruntime_reference

REPO_ROOT = Path(__file__).resolve().parent.parent


def small_model(path: Path) -> Path:
    """Conv + ReLU + max pool on a 3x8x8 input: builds in about a second."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype("float32"), "w")
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["y"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
    ]
    graph = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 4, 4])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return small_model(tmp_path_factory.mktemp("isolation") / "small.onnx")


# Functions the child process runs (importable as tests.test_isolation).
def sleep_for(seconds: float) -> None:
    time.sleep(seconds)


def fail() -> None:
    raise ValueError("boom")


def user_error() -> None:
    raise MuLayerError("bad value 'x'; valid: a, b")


def warn_and_return() -> int:
    warnings.warn("careful", stacklevel=1)
    return 7


@pytest.fixture
def importable_tests(monkeypatch):
    """Let the child import this module whatever the working directory."""
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))


def test_isolated_build_equals_in_process_build(model_path, tmp_path, capsys):
    isolated, in_process = tmp_path / "isolated.mulayer", tmp_path / "in_process.mulayer"
    assert main(["compile", str(model_path), "-o", str(isolated)]) == 0
    assert main(["compile", str(model_path), "-o", str(in_process), "--in-process"]) == 0
    assert "wrote" in capsys.readouterr().out
    x = np.random.default_rng().standard_normal((1, 3, 8, 8)).astype("float32")
    a = mulayer.load(isolated)({"input": x})["y"]
    b = mulayer.load(in_process)({"input": x})["y"]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, onnxruntime_reference(model_path, {"input": x})[0], 1e-5, 1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in_process.mulayer", "isolated.mulayer"]


def test_segfault_names_the_primfunc_and_writes_nothing(model_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(FAULT_ENV, "segv@schedule:*conv2d*")
    out = tmp_path / "model.mulayer"
    code = main(["compile", str(model_path), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    line = err.strip().splitlines()[-1]
    assert line.startswith(
        "error: the build crashed (SIGSEGV) while scheduling PrimFunc 'fused_conv2d"
    )
    assert "nothing was written" in line and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no artifact, no staging folder


def test_abort_while_writing_leaves_nothing(model_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(FAULT_ENV, "abort@step:writing*")
    out = tmp_path / "model.mulayer"
    assert main(["compile", str(model_path), "-o", str(out)]) == 1
    assert "crashed (SIGABRT) while writing the artifact" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_crash_in_a_tvm_pass_is_named(model_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(FAULT_ENV, "segv@pass:FuseOps")
    assert main(["-v", "compile", str(model_path), "-o", str(tmp_path / "m.mulayer")]) == 1
    err = capsys.readouterr().err
    assert "crashed (SIGSEGV) in TVM pass 'FuseOps' (step: compiling for cpu)" in err
    assert "Fatal Python error" in err  # --verbose shows the child's crash trace


def test_in_process_opt_out_runs_no_child(model_path, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "segv@schedule:*")  # only a child reads it
    out = tmp_path / "m.mulayer"
    assert main(["compile", str(model_path), "-o", str(out), "--in-process"]) == 0
    assert out.is_file()


def test_user_error_in_the_child_is_exit_2(model_path, tmp_path, capsys):
    target = "mulayer, llvm, llvm"  # the plan sets the ratio
    plan = tmp_path / "plan.json"
    mulayer.Plan(layers={"conv2d.7": mulayer.LayerDecision("gpu")}).save(plan)
    args = ["compile", str(model_path), "--target", target, "--plan", str(plan)]
    assert main([*args, "-o", str(tmp_path / "m.mulayer")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: plan does not match the model: unknown layer(s) conv2d.7")
    assert not (tmp_path / "m.mulayer").exists()


def test_hang_is_stopped_by_the_timeout(importable_tests):
    start = time.perf_counter()
    with pytest.raises(ChildFailure, match="did not finish within 5 s"):
        call_in_child("tests.test_isolation:sleep_for", {"seconds": 600}, timeout=5)
    assert time.perf_counter() - start < 60


def test_child_results_errors_and_warnings(importable_tests):
    with pytest.warns(UserWarning, match="careful"):
        assert call_in_child("tests.test_isolation:warn_and_return", {}) == 7
    with pytest.raises(MuLayerError, match=r"^bad value 'x'; valid: a, b$"):
        call_in_child("tests.test_isolation:user_error", {})
    with pytest.raises(ChildFailure, match=r"failed \(ValueError: boom\)") as info:
        call_in_child("tests.test_isolation:fail", {})
    assert "Traceback" in info.value.detail


def test_where_reads_the_last_complete_record():
    text = (
        "step\tcompiling for cpu\t\n"
        "pass\tFoldConstant\tadd,multiply\n"
        "passdone\tFoldConstant\tadd,multiply\n"
        "schedule\tfused_conv2d_add\t\n"
        "pass\tSplitHo"  # cut short by the crash
    )
    assert _where(text) == "while scheduling PrimFunc 'fused_conv2d_add' (step: compiling for cpu)"
    assert _where("") == "while starting"
    assert _where("pass\tFoldConstant\tadd\n") == "in TVM pass 'FoldConstant' on PrimFunc 'add'"
