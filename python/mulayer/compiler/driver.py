"""The compile driver: ONNX model + target (+ plan, calibration) → :class:`CompiledModel`.

The pipeline reads top to bottom in :func:`compile_model`, one step a line.
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import tvm

from ..errors import MuLayerError
from ..frontend.layers import Layer, splittable_layers
from ..frontend.onnx_import import import_onnx
from ..plan import Plan
from ..runtime.artifact import write_artifact
from ..target import TargetSpec, parse_target
from ..tensor_spec import TensorSpec
from ..version import __version__
from .build import build_single, export_options, to_fp16

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
    # "gpu" / "cpu": a cooperative plan built as that processor's single-device module
    built_as: str | None = None

    def metadata(self) -> dict:
        device_kind = None if self.spec.device is None else self.spec.device["kind"]
        gpu_kind = {"llvm": "cpu"}.get(device_kind, device_kind)
        built = self.built_as or self.spec.mode
        vm_devices = ["cpu"] if gpu_kind is None or built == "cpu" else [gpu_kind, "cpu"]
        input_device = "cpu" if built != "gpu" else gpu_kind
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
            self.executable.export_library(str(lib_path), **export_options(self.spec))
            plan_json = self.plan.to_json() if self.plan is not None else None
            write_artifact(path, lib_path, self.metadata(), plan_json)
        return path


def compile_model(
    model,
    target: str | TargetSpec = "llvm",
    *,
    plan: Plan | str | Path | None = None,
    calibration=None,
    input_shapes: dict[str, list[int]] | str | None = None,
    cuda_graph: bool = True,
    tuning_db: str | Path | None = None,
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
    cuda_graph : GPU-only CUDA builds capture their kernels in a CUDA graph (TVM's
        ``RewriteCUDAGraph``), launched once per call instead of once per kernel. Cooperative
        builds do not: TVM's capture would record the CPU kernels too (see docs/results.md).
    tuning_db : a folder written by ``mulayer tune`` for this target (single-processor builds).
    """
    start = time.perf_counter()
    spec = parse_target(target) if isinstance(target, str) else target
    if tuning_db is not None and spec.cooperative:
        raise MuLayerError(
            f"--tuning-db {str(tuning_db)!r} applies to CPU-only or GPU-only targets; "
            "cooperative builds use the schedule rules"
        )
    if plan is not None and not spec.cooperative:
        raise MuLayerError('a plan needs a cooperative target such as "mulayer, cuda, llvm"')
    # 1. ONNX → canonical Relax (params bound, BN folded, constants folded)
    mod, inputs, outputs = import_onnx(model, input_shapes)
    layers = splittable_layers(mod["main"])
    extra: dict = {}
    # 2. Build for the processors the target names
    built_as = None
    if spec.cooperative:
        plan = resolve_plan(plan, spec, [layer.name for layer in layers], mod)
        sizes = {layer.name: layer.out_channels for layer in layers}
        if spec.mulayer.split == "auto" and plan.sole_processor(sizes) == "gpu":
            # Every layer on the GPU: the GPU-only module (fused, CUDA graph) is faster than
            # the same plan as a two-device module, so the plan never loses to GPU-only.
            built_as = "gpu"
            executable, extra = _build_gpu_only(mod, spec, cuda_graph, None)
            extra["built_as"] = "gpu"
        elif plan.sole_processor(sizes) == "cpu":
            # Every layer on the CPU: one fused llvm module, int8 layers chained in uint8
            # (no two-device machinery with one side empty).
            built_as = "cpu"
            executable, extra = build_cpu_only(mod, spec, plan, layers, calibration, inputs)
            extra["built_as"] = "cpu"
        else:
            executable, extra = build_cooperative(mod, spec, plan, layers, calibration, inputs)
    elif spec.mode == "gpu":
        executable, extra = _build_gpu_only(mod, spec, cuda_graph, tuning_db)
    else:
        executable = build_single(mod, spec.host_target(), tuning_db=tuning_db)
    return CompiledModel(
        executable=executable,
        spec=spec,
        inputs=inputs,
        outputs=outputs,
        layers=layers,
        plan=plan,
        build_seconds=time.perf_counter() - start,
        extra_metadata=extra,
        built_as=built_as,
    )


def _build_gpu_only(mod, spec: TargetSpec, cuda_graph: bool, tuning_db):
    """fp16 GPU module (CUDA graph on cuda unless disabled); return (executable, meta)."""
    use_graph = cuda_graph and spec.device["kind"] == "cuda"
    with tvm.transform.PassContext(config={"relax.backend.use_cuda_graph": use_graph}):
        executable = build_single(to_fp16(mod), spec.device_target(), tuning_db=tuning_db)
    return executable, {"cuda_graph": use_graph}


def resolve_plan(
    plan: Plan | str | Path | None, spec: TargetSpec, names: list[str], mod=None
) -> Plan:
    """The plan to build: ``--plan`` if given, else the ``-split=auto`` search on ``mod``
    (canonical Relax; needs a cost model), else a uniform ``-ratio``."""
    split = spec.mulayer.split
    if plan is None and split == "auto":
        if mod is None:
            raise MuLayerError("-split=auto needs the model: call resolve_plan(..., mod)")
        if spec.mulayer.ratio is not None:
            warnings.warn(
                "-ratio is ignored with -split=auto (the plan sets every layer)", stacklevel=3
            )
        from ..partitioner import auto_plan

        result = auto_plan(mod, spec)
        log.info("auto plan: %s", "; ".join(result.notes))
        plan = result.plan
    elif plan is None:
        if split == "height":
            raise MuLayerError(
                "mulayer -split=height is not supported yet (the passes split output channels "
                "only); use -split=channel with -ratio=R, or -split=auto"
            )
        if spec.mulayer.ratio is None:
            raise MuLayerError(
                "a cooperative target needs -ratio=R (share of channels on the GPU, 0..1), "
                '-split=auto or --plan plan.json, e.g. "mulayer -ratio=0.5, cuda, llvm"'
            )
        plan = Plan.uniform(spec.mulayer.ratio, align=spec.mulayer.align)
    elif not isinstance(plan, Plan):
        plan = Plan.load(plan)
    plan.check_layers(names)
    return plan


def _calibration_stats(mod, calibration, inputs):
    """Calibration stats from a ``.npz`` path, samples, or ready stats (``None``: no int8)."""
    from .calibration import CalibrationStats, calibrate, load_calibration_npz

    if calibration is None or isinstance(calibration, CalibrationStats):
        return calibration
    if isinstance(calibration, (str, Path)):
        calibration = load_calibration_npz(calibration, inputs)
    return calibrate(mod, calibration, method="percentile")


def build_cooperative(mod, spec: TargetSpec, plan: Plan, layers, calibration, inputs):
    """Split, quantize, cast, place and build a two-device module; return (executable, meta)."""
    from mulayer.passes.build_helpers import kernel_sites
    from mulayer.passes.lift_cpu_weights import WEIGHTS_FUNC
    from mulayer.passes.pipeline import compile_lowered, cooperative_passes, lower_two_device
    from mulayer.passes.place_devices import make_vdevices
    from mulayer.passes.quantize_cpu import precision_report

    gpu_target, cpu_target = spec.device_target(), spec.host_target()
    stats = _stats_or_warn(mod, calibration, inputs)
    # Split each layer's output channels, CPU parts in int8 (calibrated, guarded), GPU parts in
    # fp16, VDevices and copies (GPU launches first), CPU weights copied to the host once.
    passes = cooperative_passes(plan, gpu_target, cpu_target, stats, spec.mulayer.guard_db)
    mod = passes(mod)
    precision = precision_report(mod)
    cpu_weights = len(mod["main"].params) - len(inputs)
    mod = lower_two_device(mod, make_vdevices(gpu_target, cpu_target)["gpu"].target)
    sites = kernel_sites(mod)
    executable = compile_lowered(mod)
    meta = {
        "precision": _decisions(plan, layers, precision),
        "calibrated": stats is not None,
        "kernel_sites": sites,
    }
    if cpu_weights:
        meta["cpu_weights"] = {"function": WEIGHTS_FUNC, "count": cpu_weights}
    return executable, meta


def build_cpu_only(mod, spec: TargetSpec, plan: Plan, layers, calibration, inputs):
    """A plan with every layer on the CPU: one fused llvm module; return (executable, meta).

    CPU parts run in int8 where calibrated (the accuracy guard decides per layer), consecutive
    int8 layers chained in uint8 (:class:`~mulayer.passes.chain_int8.ChainInt8`).
    """
    from mulayer.passes.pipeline import cpu_only_passes
    from mulayer.passes.quantize_cpu import precision_report

    stats = _stats_or_warn(mod, calibration, inputs)
    mod = cpu_only_passes(plan, stats, spec.mulayer.guard_db)(mod)
    precision = precision_report(mod)
    executable = build_single(mod, spec.host_target())
    meta = {"precision": _decisions(plan, layers, precision), "calibrated": stats is not None}
    return executable, meta


def _stats_or_warn(mod, calibration, inputs):
    stats = _calibration_stats(mod, calibration, inputs)
    if stats is None:
        warnings.warn(
            "no calibration data: the CPU parts stay in fp32; give --calibration samples.npz "
            "(or calibration=...) for int8",
            stacklevel=4,
        )
    return stats


def _decisions(plan: Plan, layers, precision: dict) -> dict:
    """Per layer: placement, GPU channels, precision of each side and the guard's figures."""
    decisions = {}
    for layer in layers:
        gpu = plan.gpu_size(layer.name, layer.out_channels)
        placement = {0: "cpu", layer.out_channels: "gpu"}.get(
            gpu, f"split {gpu}/{layer.out_channels - gpu}"
        )
        cpu_precision = precision.get(layer.name, {}).get(
            "precision", "float32" if gpu < layer.out_channels else ""
        )
        decisions[layer.name] = {
            "placement": placement,
            "gpu_channels": gpu,
            "precision": "/".join(
                p
                for p in (
                    "float16" if gpu else "",
                    cpu_precision if gpu < layer.out_channels else "",
                )
                if p
            ),
            **{k: v for k, v in precision.get(layer.name, {}).items() if k != "precision"},
        }
    return decisions
