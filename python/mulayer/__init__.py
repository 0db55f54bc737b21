"""mulayer: run every CNN layer on the CPU and the GPU at once, on Apache TVM.

The compiler side (``mulayer.compile``) needs TVM's compiler; the runtime side
(``mulayer.load``) needs only the TVM runtime, so it is imported lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import MuLayerError
from .plan import LayerDecision, Plan
from .version import __version__

if TYPE_CHECKING:
    from .compiler.driver import CompiledModel
    from .runtime.executor import LoadedModel


def compile(model, target: str = "llvm", **kwargs) -> CompiledModel:  # noqa: A001
    """Compile an ONNX model (path or ``onnx.ModelProto``) for ``target``; see
    :func:`mulayer.compiler.driver.compile_model`."""
    from .compiler.driver import compile_model

    return compile_model(model, target=target, **kwargs)


def calibrate(model, samples, method: str = "search", input_shapes=None):
    """Calibrate the int8 CPU parts of an ONNX model on ``samples``; pass the result to
    ``mulayer.compile(..., calibration=stats)``. See
    :func:`mulayer.compiler.calibration.calibrate`."""
    from .compiler.build import build_for_this_cpu
    from .compiler.calibration import calibrate as _calibrate
    from .frontend.onnx_import import import_onnx

    mod, _, _ = import_onnx(model, input_shapes)
    return _calibrate(mod, samples, method=method, build=build_for_this_cpu)


def load(path, fallback: str | None = None) -> LoadedModel:
    """Load an artifact written by ``CompiledModel.export``; needs only the TVM runtime.

    ``fallback="cpu"`` runs the artifact's CPU library (``mulayer compile --fallback cpu``)
    where its GPU is missing.
    """
    from .runtime.loader import load_artifact

    return load_artifact(path, fallback=fallback)


__all__ = ["MuLayerError", "Plan", "LayerDecision", "calibrate", "compile", "load", "__version__"]
