"""CPU fallback, compile side: ``mulayer compile --fallback cpu`` writes a CPU-only library too.

Besides the GPU (or cooperative) library the model is also built for the host CPU alone (fp32,
the same as ``--target llvm``) and stored as the member ``lib.cpu.so``, described under
``metadata["fallback"]["cpu"]``. It costs one more build and about one more library in the file.
Which library runs on a machine is decided at load time by :mod:`mulayer.runtime.fallback`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..runtime.artifact import LIB_NAME, write_artifact
from ..runtime.fallback import CPU_LIB_NAME, LIBRARY_KEYS
from ..target import TargetSpec
from .build import export_options


def needs_cpu_fallback(spec) -> bool:
    """Whether a build for ``spec`` (a :class:`mulayer.target.TargetSpec`) needs a GPU."""
    return spec.device is not None and spec.device["kind"] != "llvm"


def cpu_spec(spec):
    """The CPU-only target of ``spec``: its host llvm target."""
    return TargetSpec(host=dict(spec.host), text="llvm")


def export_with_cpu_fallback(compiled, cpu_compiled, path: str | Path) -> Path:
    """Write ``compiled`` (a :class:`mulayer.compiler.driver.CompiledModel`) to ``path`` with
    ``cpu_compiled`` (the same model built by :func:`cpu_spec`) as its CPU fallback library."""
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="mulayer-export-") as tmp:
        lib_path, cpu_path = Path(tmp) / LIB_NAME, Path(tmp) / CPU_LIB_NAME
        compiled.executable.export_library(str(lib_path), **export_options(compiled.spec))
        cpu_compiled.executable.export_library(str(cpu_path), **export_options(cpu_compiled.spec))
        cpu_meta = cpu_compiled.metadata()
        metadata = compiled.metadata()
        metadata["fallback"] = {
            "cpu": {
                "member": CPU_LIB_NAME,
                "build_seconds": cpu_meta["build_seconds"],
                **{key: cpu_meta[key] for key in LIBRARY_KEYS},
            }
        }
        plan_json = compiled.plan.to_json() if compiled.plan is not None else None
        write_artifact(
            path, lib_path, metadata, plan_json, extra_members={CPU_LIB_NAME: cpu_path.read_bytes()}
        )
    return path
