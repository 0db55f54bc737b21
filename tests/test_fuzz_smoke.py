"""The CI run of scripts/fuzz_onnx.py (500 cases; 10,000 in docs/reliability.md), and its own
crash and hang detection."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "fuzz_onnx.py"


@pytest.fixture
def fuzz_module(monkeypatch):
    """scripts/fuzz_onnx.py as a module; its spawned workers import it (and this file) too."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SCRIPT.parent), str(REPO_ROOT)]))
    return importlib.import_module("fuzz_onnx")


# Runners the spawned worker calls (importable as tests.test_fuzz_smoke).
def misbehave(path: str, target: str | None) -> tuple[str, str]:
    if target == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    if target == "hang":
        time.sleep(600)
    return "ok", ""


@pytest.mark.slow
def test_500_cases_end_in_success_or_mulayer_error(tmp_path):
    report = tmp_path / "fuzz.json"
    command = [sys.executable, str(SCRIPT), "--cases", "500", "--seed", "1", "--progress", "0"]
    failures = tmp_path / "failures"
    result = subprocess.run(
        [*command, "--json", str(report), "--failures-dir", str(failures)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert report.is_file(), result.stdout + result.stderr
    figures = json.loads(report.read_text())
    assert figures["cases"] == 500
    assert sum(figures["outcomes"].values()) == 500
    assert figures["failed"] == 0, figures["failures"]
    assert result.returncode == 0
    assert figures["outcomes"]["ok"] > 0 and figures["outcomes"]["error"] > 0
    assert sum(figures["compiled"].values()) == 100  # every 5th case is compiled
    assert not failures.exists()


def test_worker_crash_and_hang_are_failures_not_the_end(fuzz_module):
    from multiprocessing import get_context

    from tests.test_fuzz_smoke import misbehave

    worker = fuzz_module.Worker(get_context("spawn"), runner=misbehave)
    try:
        outcome, message, _ = worker.run(b"", "segv", timeout=120)
        assert outcome == "crash" and "exit code -11" in message
        outcome, message, _ = worker.run(b"", "hang", timeout=3)
        assert outcome == "hang" and "no result within 3 s" in message
        assert worker.run(b"", None, timeout=120)[0] == "ok"  # a fresh worker took over
    finally:
        worker.stop()


def test_replay_runs_one_case_in_process(fuzz_module, tmp_path, capsys):
    bad = tmp_path / "case.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    assert fuzz_module.main(["--replay", str(bad)]) == 0
    assert capsys.readouterr().out.startswith("error: ")
