"""CPU fallback: an artifact built for a GPU may carry a CPU-only library for machines without it.

A library compiled for CUDA (or OpenCL) cannot run on the CPU, and the artifact does not hold the
ONNX model to recompile from, so the only honest fallback is one built ahead of time:

- compile side, ``mulayer compile --fallback cpu``: besides the GPU (or cooperative) library the
  model is also built for the host CPU alone (fp32, the same as ``--target llvm``) and stored as
  the member ``lib.cpu.so``, described under ``metadata["fallback"]["cpu"]``. It costs one more
  build and about one more library in the file;
- runtime side, ``mulayer run --fallback cpu`` / ``load_artifact(path, fallback="cpu")``: when a
  device the artifact needs is missing, the CPU library runs instead, with a warning. Without
  ``--fallback`` a missing device stays an error (naming the flag when the artifact has a
  fallback), so a GPU artifact never runs on the CPU silently.

Runtime side only at import time (the compiler is imported inside the compile-side function).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

from ..errors import MuLayerError
from .artifact import LIB_NAME, write_artifact

FALLBACKS = ("cpu",)
CPU_LIB_NAME = "lib.cpu.so"
# Metadata entries that describe the library being run: the fallback brings its own.
_LIBRARY_KEYS = ("mode", "target", "vm_devices", "input_device")


def check_fallback(fallback: str | None) -> None:
    if fallback is not None and fallback not in FALLBACKS:
        raise MuLayerError(f"fallback {fallback!r} is not one of {', '.join(FALLBACKS)}")


# ---------------------------------------------------------------------------- compile side
def needs_cpu_fallback(spec) -> bool:
    """Whether a build for ``spec`` (a :class:`mulayer.target.TargetSpec`) needs a GPU."""
    return spec.device is not None and spec.device["kind"] != "llvm"


def cpu_spec(spec):
    """The CPU-only target of ``spec``: its host llvm target."""
    from ..target import TargetSpec

    return TargetSpec(host=dict(spec.host), text="llvm")


def export_with_cpu_fallback(compiled, cpu_compiled, path: str | Path) -> Path:
    """Write ``compiled`` (a :class:`mulayer.compiler.driver.CompiledModel`) to ``path`` with
    ``cpu_compiled`` (the same model built by :func:`cpu_spec`) as its CPU fallback library."""
    from ..compiler.driver import _export_options

    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="mulayer-export-") as tmp:
        lib_path, cpu_path = Path(tmp) / LIB_NAME, Path(tmp) / CPU_LIB_NAME
        compiled.executable.export_library(str(lib_path), **_export_options(compiled.spec))
        cpu_compiled.executable.export_library(str(cpu_path), **_export_options(cpu_compiled.spec))
        cpu_meta = cpu_compiled.metadata()
        metadata = compiled.metadata()
        metadata["fallback"] = {
            "cpu": {
                "member": CPU_LIB_NAME,
                "build_seconds": cpu_meta["build_seconds"],
                **{key: cpu_meta[key] for key in _LIBRARY_KEYS},
            }
        }
        plan_json = compiled.plan.to_json() if compiled.plan is not None else None
        write_artifact(
            path, lib_path, metadata, plan_json, extra_members={CPU_LIB_NAME: cpu_path.read_bytes()}
        )
    return path


# ---------------------------------------------------------------------------- runtime side
def select_library(metadata: dict, path: str | Path, fallback: str | None) -> tuple[dict, str]:
    """The metadata and member name of the library to load on this machine.

    The artifact's own library when every device it needs is present; its CPU fallback when one
    is missing and ``fallback == "cpu"``; otherwise a ``MuLayerError`` naming the missing device.
    """
    from .executor import make_device

    check_fallback(fallback)
    missing = None
    for kind in metadata.get("vm_devices", ["cpu"]):
        try:
            make_device(kind)
        except MuLayerError as err:
            missing = (kind, err)
            break
    if missing is None:
        return metadata, LIB_NAME
    kind, err = missing
    entry = metadata.get("fallback", {}).get("cpu")
    if fallback is None:
        if entry is None:
            raise err
        raise MuLayerError(
            f"{err} (this artifact carries a CPU fallback library: run it with --fallback cpu)"
        ) from None
    if entry is None:
        raise MuLayerError(
            f"artifact {str(path)!r} needs a {kind} device, none is present on this machine, and "
            "it carries no CPU fallback library: recompile it with `mulayer compile --fallback "
            "cpu`, or for the CPU alone (--target llvm)"
        )
    warnings.warn(
        f"no {kind} device on this machine: running the artifact's CPU fallback library "
        "(fp32 on the CPU) instead",
        stacklevel=3,
    )
    selected = {**metadata, **{key: entry[key] for key in _LIBRARY_KEYS}, "fallback_used": "cpu"}
    return selected, entry["member"]
