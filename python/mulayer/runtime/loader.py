"""Load an artifact to run it: :func:`load_artifact` (``mulayer.load``).

The file is read and checked (:mod:`~mulayer.runtime.artifact`), the library for this machine
chosen (:mod:`~mulayer.runtime.fallback`) and loaded into a
:class:`~mulayer.runtime.executor.LoadedModel`. Runtime side: the TVM runtime only.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..errors import MuLayerError
from ..tensor_spec import TensorSpec
from .artifact import LIB_NAME, PLAN_NAME, check_runtime_compatible, read_metadata
from .executor import LoadedModel
from .fallback import select_library


def load_artifact(path: str | Path, fallback: str | None = None):
    """Load an artifact into a callable :class:`mulayer.runtime.executor.LoadedModel`.

    ``fallback="cpu"`` runs the artifact's CPU fallback library where a device it needs is
    missing (see :mod:`mulayer.runtime.fallback`).
    """
    import tvm

    metadata, members = read_metadata(path)
    check_runtime_compatible(metadata, path)
    # A clear error for a missing device before the library load fails on a missing runtime.
    metadata, lib_name = select_library(metadata, path, fallback)
    workdir = Path(tempfile.mkdtemp(prefix="mulayer-"))
    try:
        lib_path = workdir / LIB_NAME
        lib_path.write_bytes(members[lib_name])
        try:
            lib = tvm.runtime.load_module(str(lib_path))
        except RuntimeError as err:  # TVM errors derive from RuntimeError
            raise MuLayerError(
                f"artifact {str(path)!r}: the library failed to load: {err}"
            ) from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # the loaded library stays mapped
    plan_json = (members.get(PLAN_NAME, b"").decode() or None) if lib_name == LIB_NAME else None
    return LoadedModel(
        lib,
        metadata,
        inputs=[TensorSpec.from_json(raw) for raw in metadata["inputs"]],
        outputs=[TensorSpec.from_json(raw) for raw in metadata["outputs"]],
        plan_json=plan_json,
    )
