"""scripts/benchlib: a variant's environment reaches its build, and only its build."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture(scope="module")
def benchlib():
    sys.path.insert(0, str(SCRIPTS))
    try:
        from benchlib import builds, models, variants

        yield builds, models, variants
    finally:
        sys.path.remove(str(SCRIPTS))


def test_nhwc_variant_builds_with_the_layout_switch(benchlib, tmp_path):
    builds, models, variants = benchlib
    chosen = variants.resolve_variants(["gpu_fp16", "gpu_fp16_nhwc"], [], "cuda -arch=sm_90")
    entry = models.ModelEntry("tiny", tmp_path / "tiny.onnx", None)
    tasks = {t.key: t for t in builds.plan_tasks([entry], chosen, [], tmp_path, has_cuda=True)}
    assert tasks["build:tiny:gpu_fp16_nhwc"].kwargs["env"] == {"MULAYER_GPU_LAYOUT": "NHWC"}
    assert tasks["build:tiny:gpu_fp16"].kwargs["env"] == {}
    assert (
        tasks["build:tiny:gpu_fp16"].kwargs["target"]
        == tasks["build:tiny:gpu_fp16_nhwc"].kwargs["target"]
    )


def test_build_task_sets_the_environment_before_compiling(benchlib, tmp_path, monkeypatch):
    builds, _, _ = benchlib
    seen = {}

    def fake_compile(path, target, **kwargs):
        seen["layout"] = os.environ.get("MULAYER_GPU_LAYOUT")
        raise RuntimeError("stop here")

    import mulayer

    monkeypatch.setattr(mulayer, "compile", fake_compile)
    monkeypatch.setenv("MULAYER_GPU_LAYOUT", "NCHW")  # restored after the test
    with pytest.raises(RuntimeError, match="stop here"):
        builds.task_build(
            "m.onnx", "cuda, llvm", None, str(tmp_path / "a"), {"MULAYER_GPU_LAYOUT": "NHWC"}
        )
    assert seen["layout"] == "NHWC"
