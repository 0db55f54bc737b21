"""The compile driver: ONNX model + target (+ plan, calibration) → :class:`CompiledModel`.

The pipeline reads top to bottom in :func:`compile_model`, one step a line.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import tvm

from . import __version__
from .artifact import write_artifact
from .build import build_single, to_fp16
from .errors import MuLayerError
from .frontend import import_onnx
from .layers import Layer, splittable_layers
from .plan import Plan
from .target import TargetSpec, parse_target
from .tensor_spec import TensorSpec

log = logging.getLogger(__name__)


@dataclass
class CompiledModel:
    """A built model: ``export(path)`` writes the artifact, ``load()`` runs it in-process."""

    executable: object
    spec: TargetSpec
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    layers: list[Layer]
    plan: Plan | None = None
    build_seconds: float = 0.0
    extra_metadata: dict = field(default_factory=dict)

    def metadata(self) -> dict:
        device_kind = None if self.spec.device is None else self.spec.device["kind"]
        gpu_kind = {"llvm": "cpu"}.get(device_kind, device_kind)
        vm_devices = ["cpu"] if gpu_kind is None else [gpu_kind, "cpu"]
        input_device = "cpu" if self.spec.mode != "gpu" else gpu_kind
        return {
            "mulayer_version": __version__,
            "tvm_version": tvm.__version__,
            "mode": self.spec.mode,
            "target": self.spec.to_json(),
            "vm_devices": vm_devices,
            "input_device": input_device,
            "inputs": [spec.to_json() for spec in self.inputs],
            "outputs": [spec.to_json() for spec in self.outputs],
            "layers": [layer.to_json() for layer in self.layers],
            "build_seconds": round(self.build_seconds, 3),
            **self.extra_metadata,
        }

    def export(self, path: str | Path) -> Path:
        """Write the artifact to ``path`` atomically and return the path."""
        path = Path(path)
        with tempfile.TemporaryDirectory(prefix="mulayer-export-") as tmp:
            lib_path = Path(tmp) / "lib.so"
            self.executable.export_library(str(lib_path), **_export_options(self.spec))
            plan_json = self.plan.to_json() if self.plan is not None else None
            write_artifact(path, lib_path, self.metadata(), plan_json)
        return path


def _export_options(spec: TargetSpec) -> dict:
    """Cross-compile the library when the host target is not this machine (e.g. aarch64)."""
    triple = spec.host.get("mtriple")
    if not triple or triple.startswith("x86_64"):
        return {}
    import shutil

    from tvm.contrib import cc

    compiler = f"{triple}-g++"
    if shutil.which(compiler) is None:
        raise MuLayerError(
            f"exporting for {triple} needs the cross compiler {compiler!r} on PATH "
            f"(Debian: apt-get install g++-{triple.split('-')[0].replace('_', '-')}-linux-gnu)"
        )
    return {"fcompile": cc.cross_compiler(compiler)}


def compile_model(
    model,
    target: str | TargetSpec = "llvm",
    *,
    plan: Plan | str | Path | None = None,
    calibration=None,
    input_shapes: dict[str, list[int]] | str | None = None,
) -> CompiledModel:
    """Compile an ONNX model (path or ``onnx.ModelProto``) for ``target``.

    Parameters
    ----------
    model : path or onnx.ModelProto
    target : tvmc-style target string, e.g. ``"llvm"``, ``"cuda -arch=sm_90, llvm"`` or
        ``"mulayer -ratio=0.5, cuda, llvm"``, or a parsed :class:`TargetSpec`.
    plan : a :class:`Plan` (or its JSON file) for cooperative targets; overrides ``-ratio``.
    calibration : calibration samples for the CPU int8 parts (cooperative targets).
    input_shapes : static shapes for dynamic inputs (``{"input": [1, 3, 224, 224]}``).
    """
    start = time.perf_counter()
    spec = parse_target(target) if isinstance(target, str) else target
    # 1. ONNX → canonical Relax (params bound, BN folded, constants folded)
    mod, inputs, outputs = import_onnx(model, input_shapes)
    layers = splittable_layers(mod["main"])
    # 2. Build for the processors the target names
    if spec.cooperative:
        raise MuLayerError(
            "cooperative targets (mulayer ...) are not available in this build yet; "
            "use a single processor target such as llvm or cuda -arch=sm_90, llvm"
        )
    if spec.mode == "gpu":
        executable = build_single(to_fp16(mod), spec.device_target())
    else:
        executable = build_single(mod, spec.host_target())
    return CompiledModel(
        executable=executable,
        spec=spec,
        inputs=inputs,
        outputs=outputs,
        layers=layers,
        plan=None,
        build_seconds=time.perf_counter() - start,
    )
