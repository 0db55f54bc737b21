"""Rough edges a new user hit (issue 17, items 6 and 8): input dtypes and NaN through the
Python API, file modes, help examples, inspect's reasons, the TVM-flow snippet of the README."""

from __future__ import annotations

import os
import re
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest

import mulayer
from mulayer.target import parse_target

from .conftest import onnxruntime_reference, sqnr_db

ROOT = Path(__file__).resolve().parent.parent
COOPERATIVE = "mulayer -ratio=0.5, llvm, llvm"
INT8_TINY_DB = 25.0  # int8 CPU parts + fp16 GPU parts of tiny against onnxruntime


@pytest.fixture(scope="module")
def tiny_model(tiny_onnx, tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "tiny.mulayer"
    mulayer.compile(str(tiny_onnx), target="llvm").export(path)
    return mulayer.load(path)


# ------------------------------------------------------------------------------ item 6
def test_python_api_nan_inputs_unchecked_by_default_refused_on_request(tiny_model):
    x = np.full(tiny_model.inputs[0].shape, np.nan, "float32")
    tiny_model({"input": x})  # not scanned by default (documented: outputs unspecified)
    with pytest.raises(mulayer.MuLayerError, match="NaN or Inf values in input 'input'"):
        tiny_model.run({"input": x}, check_finite=True)
    finite = np.zeros(tiny_model.inputs[0].shape, "float32")
    assert np.isfinite(tiny_model.run({"input": finite}, check_finite=True)["logits"]).all()


def test_python_api_refuses_integer_inputs_and_converts_float64(tiny_model):
    shape = tiny_model.inputs[0].shape
    for dtype in ("int64", "uint8", "bool"):
        with pytest.raises(mulayer.MuLayerError, match=f"dtype {dtype}; the model expects"):
            tiny_model({"input": np.ones(shape, dtype)})
    x = np.random.default_rng().standard_normal(shape)
    np.testing.assert_array_equal(
        tiny_model({"input": x})["logits"], tiny_model({"input": x.astype("float32")})["logits"]
    )


# ------------------------------------------------------------------------------ item 8
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_follow_the_umask(tiny_onnx, tmp_path, umask):
    from mulayer.models.zoo import save_model

    old = os.umask(umask)
    try:
        mulayer.compile(str(tiny_onnx), target="llvm").export(tmp_path / "m.mulayer")
        save_model("tiny", tmp_path / "tiny.onnx")
        mulayer.Plan.uniform(0.5).save(tmp_path / "plan.json")
    finally:
        os.umask(old)
    for name in ("m.mulayer", "tiny.onnx", "plan.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


def test_compile_help_examples_parse_without_a_gpu():
    from mulayer.cli.compile_cmd import EXAMPLE

    targets = re.findall(r'--target "([^"]+)"', EXAMPLE)
    assert any("--fallback cpu" in line and "-arch=" in line for line in EXAMPLE.splitlines())
    for target in targets:
        parse_target(target)  # "cuda, llvm" needs a GPU to detect -arch from


def test_ratio_that_is_not_a_number_says_so():
    with pytest.raises(mulayer.MuLayerError, match="-ratio='abc' is not a number"):
        parse_target("mulayer -ratio=abc, llvm, llvm")


def test_inspect_says_why_a_layer_is_not_split_or_has_no_sqnr(tiny_onnx):
    """One all-zero calibration sample: conv2d.0 (no bias) computes zeros, so it has no SQNR;
    dense.1 has 10 channels, too few to split at align 8."""
    stats = mulayer.calibrate(str(tiny_onnx), {"input": np.zeros((1, 1, 3, 32, 32), "float32")})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = mulayer.compile(str(tiny_onnx), target=COOPERATIVE, calibration=stats)
    precision = compiled.metadata()["precision"]
    first = precision["conv2d.0"]
    assert first["sqnr_db"] is None and first["precision"] == "float16/int8"
    assert first["reason"].startswith("calibrated; no SQNR: the calibration samples give")
    dense = precision["dense.1"]
    assert dense["placement"] == "gpu"
    assert dense["reason"] == (
        "not split: 10 channels < 2 x align 8; at ratio 0.5 the GPU has the larger share"
    )


def test_readme_tvm_flow_snippet_runs(tiny_onnx):
    """The README's "Inside your own TVM flow" block, with TVM's own ONNX importer, as written
    (for cuda: compiled, not run) and with the GPU side on llvm (run, against onnxruntime)."""
    import tvm
    from tvm import relax

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Inside your own TVM flow") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "from_onnx" in code and "model.onnx" in code
    code = code.replace("model.onnx", str(tiny_onnx))
    samples = {"input": np.random.default_rng(0).standard_normal((4, 1, 3, 32, 32), "float32")}
    scope = {"samples": samples}
    exec(code, scope)  # as written: cuda GPU side
    assert "cuda" in {m.kind for m in _modules(scope["ex"].mod)}
    scope = {"samples": samples}
    exec(code.replace('{"kind": "cuda", "arch": "sm_90"}', '{"kind": "llvm"}'), scope)
    vm = relax.VirtualMachine(scope["ex"], [tvm.cpu(), tvm.cpu()])
    x = np.random.default_rng().standard_normal((1, 3, 32, 32)).astype("float32")
    out = vm["main"](tvm.runtime.tensor(x)).numpy()  # llvm + llvm: no CPU weights to pass
    assert sqnr_db(out, onnxruntime_reference(tiny_onnx, {"input": x})[0]) > INT8_TINY_DB


def _modules(mod):
    from mulayer.compiler.build import all_modules

    return all_modules(mod)
