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

This module is the runtime side; the compile side is :mod:`mulayer.compiler.fallback`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from ..errors import MuLayerError
from .artifact import LIB_NAME

FALLBACKS = ("cpu",)
CPU_LIB_NAME = "lib.cpu.so"
# Metadata entries that describe the library being run: the fallback brings its own.
LIBRARY_KEYS = ("mode", "target", "vm_devices", "input_device")


def check_fallback(fallback: str | None) -> None:
    if fallback is not None and fallback not in FALLBACKS:
        raise MuLayerError(f"fallback {fallback!r} is not one of {', '.join(FALLBACKS)}")


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
    selected = {**metadata, **{key: entry[key] for key in LIBRARY_KEYS}, "fallback_used": "cpu"}
    return selected, entry["member"]
