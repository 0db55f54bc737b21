"""What the commands print besides their results: no debug lines, no TVM C++ warnings, notes
once and on stderr (issue 17, item 4)."""

from __future__ import annotations

import logging
import os
import sys
import warnings

import pytest

import mulayer.compiler.tune as tune
from mulayer.cli.main import main
from mulayer.target import parse_target

COOPERATIVE = "mulayer -ratio=0.5, llvm, llvm"


def _profile_argv(model, out):
    return [
        "profile", "--target", "mulayer, llvm, llvm", "--models", str(model), "-o", str(out),
        "--max-layers", "1", "--processors", "cpu", "--slices", "1", "--repeat", "1",
        "--min-repeat-ms", "1", "--jobs", "1", "--json",
    ]  # fmt: skip


def test_profile_prints_no_debug_lines_without_verbose(tiny_onnx, tmp_path, caplog):
    assert main(_profile_argv(tiny_onnx, tmp_path / "p.jsonl")) == 0
    debug = [r for r in caplog.records if r.levelno < logging.INFO]
    assert debug == [], debug[:3]


def test_profile_rule_records_still_reach_verbose_logging(tiny_onnx, tmp_path, caplog):
    """With debug logging on (--verbose), the schedule records are shown as before."""
    with caplog.at_level(logging.DEBUG, logger="mulayer.schedules"):
        assert main(["--verbose", *_profile_argv(tiny_onnx, tmp_path / "p.jsonl")]) == 0
    assert any(r.name == "mulayer.schedules" and r.levelno == logging.DEBUG for r in caplog.records)


def _fake_tune_model(model, target, trials, output, progress=True, **_kwargs):
    """What tuning prints: TVM's C++ logging (and its workers) on descriptor 2, mulayer's
    progress bar through Python's ``sys.stderr``."""
    os.write(2, b"[12:00:00] /project/src/meta_schedule/x.cc:1: Warning: native noise\n")
    print("task 1/1 progress line", file=sys.stderr)
    return tune.TuneReport(db_dir=output, target=target, target_kind="llvm")


@pytest.mark.parametrize("verbose", [False, True])
def test_tune_hides_tvm_native_warnings_unless_verbose(
    tiny_onnx, tmp_path, monkeypatch, capfd, verbose
):
    monkeypatch.setattr(tune, "tune_model", _fake_tune_model)
    argv = ["tune", str(tiny_onnx), "--target", "llvm", "--trials", "1", "-o", str(tmp_path)]
    assert main(["--verbose", *argv] if verbose else argv) == 0
    err = capfd.readouterr().err
    assert ("native noise" in err) == verbose
    assert "task 1/1 progress line" in err
    os.write(2, b"descriptor 2 is restored\n")
    assert "descriptor 2 is restored" in capfd.readouterr().err


def test_detected_cpu_is_noted_once_on_stderr(tiny_onnx, tmp_path, capsys):
    spec = parse_target(COOPERATIVE)
    assert len(spec.detected) == 1 and spec.detected[0].startswith("llvm -mcpu=")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        argv = ["compile", str(tiny_onnx), "--target", COOPERATIVE, "--in-process"]
        assert main([*argv, "-o", str(tmp_path / "m.mulayer")]) == 0
    captured = capsys.readouterr()
    assert "note:" not in captured.out
    assert captured.err.count("note: llvm -mcpu=") == 1
