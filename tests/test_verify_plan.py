"""``-verify``: a ``-split=auto`` plan is timed against the single-processor builds where this
machine has the target's processors, and the fastest build is kept (issue 17, item 2)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import mulayer
import mulayer.compiler.driver as compiler
import mulayer.partitioner as partitioner_pkg
from mulayer.cli.main import main
from mulayer.partitioner import AnalyticEstimator
from mulayer.target import parse_target

from .conftest import max_rel_error, onnxruntime_reference

AUTO = "mulayer -split=auto, llvm, llvm"


@pytest.fixture
def mixed_plan(monkeypatch):
    """An estimator under which tiny's auto plan mixes GPU, CPU and split layers."""
    est = AnalyticEstimator(gpu_gflops=80, shared_memory=True, sync_us=2.0)
    monkeypatch.setattr(partitioner_pkg, "load_estimator", lambda spec: est)


def _compile(model, target=AUTO):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no calibration: CPU parts stay fp32
        return mulayer.compile(str(model), target=target)


def _matches_onnxruntime(compiled, model, tmp_path):
    path = compiled.export(tmp_path / "m.mulayer")
    loaded = mulayer.load(path)
    inputs = loaded.random_inputs(seed=np.random.randint(1 << 30))
    out = list(loaded(inputs).values())[0]
    assert max_rel_error(out, onnxruntime_reference(model, inputs)[0]) < 2e-2
    return loaded


@pytest.mark.parametrize(("fastest", "built_as"), [("cpu", "cpu"), ("gpu", "gpu"), ("plan", None)])
def test_the_fastest_measured_build_is_kept(
    tiny_onnx, tmp_path, monkeypatch, mixed_plan, fastest, built_as
):
    figures = {"plan": 0.5, "gpu": 0.4, "cpu": 0.3}
    figures = {**figures, fastest: 0.1}
    monkeypatch.setattr(compiler, "_measure_ms", lambda candidates: dict(figures))
    compiled = _compile(tiny_onnx)
    assert len({d.placement for d in compiled.plan.layers.values()}) >= 2  # a mixed plan
    metadata = compiled.metadata()
    assert metadata.get("built_as") == built_as and metadata["mode"] == "cooperative"
    check = metadata["plan_check"]
    assert check["measured"] and check["kept"] == fastest
    assert check["measured_ms"] == figures
    assert "plan 0." in check["note"] and "GPU only 0." in check["note"]
    assert compiled.plan.notes[-1] == check["note"]
    assert metadata["vm_devices"] == (["cpu"] if built_as == "cpu" else ["cpu", "cpu"])
    assert ("kernel_sites" in metadata) == (built_as is None)  # the two-device build
    _matches_onnxruntime(compiled, tiny_onnx, tmp_path)


def test_real_measurement_keeps_the_fastest_of_the_figures(tiny_onnx, tmp_path, mixed_plan):
    compiled = _compile(tiny_onnx)
    check = compiled.metadata()["plan_check"]
    measured = check["measured_ms"]
    assert set(measured) == {"plan", "gpu", "cpu"} and all(v > 0 for v in measured.values())
    assert check["kept"] == min(measured, key=measured.get)
    assert compiled.metadata().get("built_as") == {"plan": None}.get(check["kept"], check["kept"])
    _matches_onnxruntime(compiled, tiny_onnx, tmp_path)


def test_verify_off_keeps_the_plan_and_says_it_was_not_measured(tiny_onnx, mixed_plan):
    compiled = _compile(tiny_onnx, "mulayer -split=auto -verify=off, llvm, llvm")
    metadata = compiled.metadata()
    assert "built_as" not in metadata and "kernel_sites" in metadata
    assert not metadata["plan_check"]["measured"]
    assert "not measured (-verify=off)" in metadata["plan_check"]["note"]
    assert "-verify=measure" in compiled.plan.notes[-1]


def test_cli_prints_the_plan_and_the_figures_on_stderr(tiny_onnx, tmp_path, capsys):
    """With the shipped stand-in cost model, as a user runs it."""
    out = tmp_path / "auto.mulayer"
    assert main(["compile", str(tiny_onnx), "--target", AUTO, "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "note:" not in captured.out
    assert "note: auto plan:" in captured.err
    assert "note: measured here: plan " in captured.err and "CPU only" in captured.err
    assert main(["inspect", str(out)]) == 0
    assert "note: measured here:" in capsys.readouterr().out


def test_where_the_processors_are_missing_nothing_is_measured():
    import tvm

    phone = parse_target("mulayer -split=auto, opencl, llvm -mtriple=aarch64-linux-gnu")
    assert compiler.processors_here(phone).startswith("the target is for aarch64 and this")
    assert compiler.processors_here(parse_target(AUTO)) is None
    if not tvm.cuda(0).exist:
        cuda = parse_target("mulayer -split=auto -verify=measure, cuda -arch=sm_90, llvm")
        assert compiler.processors_here(cuda) == "no cuda device on this machine"
        with pytest.raises(mulayer.MuLayerError, match="-verify=measure times the plan"):
            compiler.check_verify(cuda)


def test_verify_goes_with_the_auto_split():
    with pytest.raises(mulayer.MuLayerError, match="checks a -split=auto plan"):
        parse_target("mulayer -ratio=0.5 -verify=measure, llvm, llvm")
    assert parse_target(AUTO).mulayer.verify == "auto"
