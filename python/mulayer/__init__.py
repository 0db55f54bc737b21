"""mulayer: run every CNN layer on the CPU and the GPU at once, on Apache TVM.

The compiler side (``mulayer.compile``) needs TVM's compiler; the runtime side
(``mulayer.load``) needs only the TVM runtime, so it is imported lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import MuLayerError
from .plan import LayerDecision, Plan

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .artifact import LoadedModel
    from .compiler import CompiledModel


def compile(model, target: str = "llvm", **kwargs) -> CompiledModel:  # noqa: A001
    """Compile an ONNX model (path or ``onnx.ModelProto``) for ``target``; see
    :func:`mulayer.compiler.compile_model`."""
    from .compiler import compile_model

    return compile_model(model, target=target, **kwargs)


def load(path) -> LoadedModel:
    """Load an artifact written by ``CompiledModel.export``; needs only the TVM runtime."""
    from .artifact import load_artifact

    return load_artifact(path)


__all__ = ["MuLayerError", "Plan", "LayerDecision", "compile", "load", "__version__"]
