"""The cooperative path end to end on the llvm + llvm stand-in (no GPU needed)."""

import json
import warnings

import numpy as np
import pytest

import mulayer
from mulayer.cli.main import main

from .conftest import max_rel_error, onnxruntime_reference, sqnr_db

# Documented tolerances (docs/results.md), against onnxruntime fp32 on random inputs:
# fp16 GPU parts: max |out - ref| / max |ref| below FP16_TOLERANCE; int8 CPU parts: output
# SQNR above INT8_TINY_DB (3 quantized layers) and INT8_DEEP_DB (GoogLeNet, 57 layers, random
# weights; the quantization noise of every layer adds up).
FP16_TOLERANCE = 2e-2
INT8_TINY_DB = 25.0
INT8_DEEP_DB = 12.0


def _calibration(shape, count=8, seed=123):
    rng = np.random.default_rng(seed)
    return {"input": rng.standard_normal((count, *shape[1:])).astype("float32")}


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 1.0])
def test_tiny_ratios_without_int8_match_fp32(tiny_onnx, tmp_path, ratio):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = mulayer.compile(str(tiny_onnx), target=f"mulayer -ratio={ratio}, llvm, llvm")
    compiled.export(tmp_path / "t.mulayer")
    model = mulayer.load(tmp_path / "t.mulayer")
    assert model.mode == "cooperative"
    inputs = model.random_inputs(seed=np.random.randint(1 << 30))
    out = list(model(inputs).values())[0]
    ref = onnxruntime_reference(tiny_onnx, inputs)[0]
    assert np.all(np.isfinite(out))
    # Ratio 0 is all CPU in fp32 (no calibration): exact up to fp32 rounding.
    tolerance = 1e-5 if ratio == 0.0 else FP16_TOLERANCE
    assert max_rel_error(out, ref) < tolerance


def test_no_calibration_warns(tiny_onnx):
    with pytest.warns(UserWarning, match="no calibration data"):
        mulayer.compile(str(tiny_onnx), target="mulayer -ratio=0.5, llvm, llvm")


def test_int8_cpu_parts_with_calibration(tiny_onnx, tmp_path):
    compiled = mulayer.compile(
        str(tiny_onnx),
        target="mulayer -ratio=0.5, llvm, llvm",
        calibration=_calibration((1, 3, 32, 32)),
    )
    decisions = compiled.metadata()["precision"]
    assert any("int8" in d["precision"] for d in decisions.values())
    assert all(
        d["placement"].startswith("split")
        for name, d in decisions.items()
        if name.startswith("conv2d") and name != "conv2d.4" and name != "conv2d.5"
    )
    compiled.export(tmp_path / "q.mulayer")
    model = mulayer.load(tmp_path / "q.mulayer")
    inputs = model.random_inputs(seed=np.random.randint(1 << 30))
    out = list(model(inputs).values())[0]
    ref = onnxruntime_reference(tiny_onnx, inputs)[0]
    assert sqnr_db(out, ref) > INT8_TINY_DB


def test_plan_file_and_mismatch(tiny_onnx, tmp_path):
    plan = mulayer.Plan(default_ratio=1.0, layers={"conv2d.0": mulayer.LayerDecision("cpu")})
    plan.save(tmp_path / "plan.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = mulayer.compile(
            str(tiny_onnx), target="mulayer, llvm, llvm", plan=tmp_path / "plan.json"
        )
    assert compiled.metadata()["precision"]["conv2d.0"]["placement"] == "cpu"
    assert compiled.metadata()["precision"]["conv2d.1"]["placement"] == "gpu"
    bad = mulayer.Plan(layers={"conv2d.42": mulayer.LayerDecision("gpu")})
    with pytest.raises(mulayer.MuLayerError, match="conv2d.42"):
        mulayer.compile(str(tiny_onnx), target="mulayer, llvm, llvm", plan=bad)
    with pytest.raises(mulayer.MuLayerError, match="needs -ratio"):
        mulayer.compile(str(tiny_onnx), target="mulayer, llvm, llvm")


@pytest.mark.slow
def test_googlenet_cli_ratio_half(tmp_path, capsys):
    """The issue's acceptance command, on the CPU-only stand-in."""
    from mulayer.models.zoo import save_model

    model_path = tmp_path / "googlenet.onnx"
    save_model("googlenet", model_path)
    calibration = tmp_path / "cal.npz"
    np.savez(calibration, **_calibration((1, 3, 224, 224), count=4))
    artifact = tmp_path / "g.mulayer"
    assert (
        main(
            [
                "compile",
                str(model_path),
                "--target",
                "mulayer -ratio=0.5, llvm, llvm",
                "--calibration",
                str(calibration),
                "-o",
                str(artifact),
            ]
        )
        == 0
    )
    x = np.random.default_rng().standard_normal((1, 3, 224, 224)).astype("float32")
    np.savez(tmp_path / "x.npz", input=x)
    assert (
        main(
            [
                "run",
                str(artifact),
                "--inputs",
                str(tmp_path / "x.npz"),
                "--output",
                str(tmp_path / "y.npz"),
                "--repeat",
                "1",
                "--warmup",
                "0",
            ]
        )
        == 0
    )
    with np.load(tmp_path / "y.npz") as data:
        out = data[data.files[0]]
    ref = onnxruntime_reference(model_path, {"input": x})[0]
    assert sqnr_db(out, ref) > INT8_DEEP_DB
    capsys.readouterr()
    assert main(["inspect", str(artifact), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "cooperative"
    assert report["precision"]["conv2d.0"]["placement"].startswith("split")
