"""The command line: exit codes, one-line errors, JSON output."""

import json
import subprocess
import sys

import numpy as np
import pytest

from mulayer.cli.main import main


def _mulayer(*args, cwd=None):
    """Run the real console entry point in a subprocess (exit code, stdout, stderr)."""
    result = subprocess.run(
        [sys.executable, "-m", "mulayer.cli.main", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
    )
    return result.returncode, result.stdout, result.stderr


def test_compile_not_a_model_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "not-a-model.onnx"
    bad.write_text("hello")
    code, out, err = _mulayer("compile", bad, "--target", "llvm", "-o", tmp_path / "x")
    assert code == 2
    assert err.strip().count("\n") == 0 and err.startswith("error: ")
    assert "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_bad_target_exits_2(tiny_onnx, tmp_path):
    code, _, err = _mulayer("compile", tiny_onnx, "--target", "lvm", "-o", tmp_path / "x")
    assert code == 2 and "unknown target kind 'lvm'" in err


def test_missing_model_exits_2(tmp_path):
    code, _, err = _mulayer("compile", tmp_path / "none.onnx", "-o", tmp_path / "x")
    assert code == 2 and "does not exist" in err


def test_output_is_a_directory_exits_2(tiny_onnx, tmp_path):
    code, _, err = _mulayer("compile", tiny_onnx, "-o", tmp_path)
    assert code == 2 and "is a directory" in err


def test_usage_error_exits_2():
    code, _, err = _mulayer("compile")
    assert code == 2 and "usage" in err


def test_compile_run_inspect(tiny_onnx, tmp_path, capsys):
    artifact = tmp_path / "tiny.mulayer"
    assert main(["compile", str(tiny_onnx), "--target", "llvm", "-o", str(artifact)]) == 0
    capsys.readouterr()

    inputs = tmp_path / "x.npz"
    rng = np.random.default_rng()
    x = rng.standard_normal((1, 3, 32, 32)).astype("float32")
    np.savez(inputs, input=x)
    outputs = tmp_path / "y.npz"
    assert (
        main(
            [
                "run",
                str(artifact),
                "--inputs",
                str(inputs),
                "--output",
                str(outputs),
                "--repeat",
                "2",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["median_ms"] > 0
    assert report["outputs"][0]["shape"] == [1, 10]
    with np.load(outputs) as data:
        from tests.conftest import onnxruntime_reference

        np.testing.assert_allclose(
            data[report["outputs"][0]["name"]],
            onnxruntime_reference(tiny_onnx, {"input": x})[0],
            rtol=1e-4,
            atol=1e-4,
        )

    assert main(["inspect", str(artifact), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["kind"] == "artifact" and meta["mode"] == "cpu"
    assert main(["inspect", str(tiny_onnx)]) == 0
    text = capsys.readouterr().out
    assert "conv2d.0" in text and "dense.0" in text and "MFLOP" in text


def test_run_rejects_bad_inputs(tiny_onnx, tmp_path):
    artifact = tmp_path / "tiny.mulayer"
    assert main(["compile", str(tiny_onnx), "-o", str(artifact)]) == 0
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, input=np.zeros((1, 3, 8, 8), "float32"))
    code, _, err = _mulayer("run", artifact, "--inputs", wrong)
    assert code == 2 and "expects [1, 3, 32, 32]" in err
    nan = tmp_path / "nan.npz"
    np.savez(nan, input=np.full((1, 3, 32, 32), np.nan, "float32"))
    code, _, err = _mulayer("run", artifact, "--inputs", nan)
    assert code == 2 and "NaN" in err
    code, _, err = _mulayer("run", artifact, "--random", "--repeat", "0")
    assert code == 2 and "--repeat" in err
    code, _, err = _mulayer("run", tmp_path / "missing.mulayer", "--random")
    assert code == 2 and "does not exist" in err


def test_every_subcommand_help_has_an_example(capsys):
    from mulayer.cli.main import SUBCOMMANDS

    names = [module.__name__.rsplit(".", 1)[-1].removesuffix("_cmd") for module in SUBCOMMANDS]
    assert {"compile", "run", "inspect", "demo", "profile", "tune"} <= set(names)
    for command in names:
        _check_help_example(command, capsys)


def _check_help_example(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "example:" in capsys.readouterr().out


def test_demo_runs_and_checks(capsys):
    assert main(["demo", "--repeat", "2"]) == 0
    out = capsys.readouterr().out
    assert "CPU fp32" in out and "ok" in out and "FAIL" not in out
