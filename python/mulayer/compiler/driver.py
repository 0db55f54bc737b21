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
from .build import build_for_this_cpu, build_single, export_options, to_fp16

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
    plan : a :class:`Plan` (or its JSON file) for cooperative targets; it sets every layer, so
        the target must not give ``-ratio`` too.
    calibration : calibration samples for the CPU int8 parts (cooperative targets).
    input_shapes : static shapes for dynamic inputs (``{"input": [1, 3, 224, 224]}``).
    cuda_graph : CUDA builds capture their GPU kernels in CUDA graphs (TVM's
        ``RewriteCUDAGraph``), launched once per segment instead of once per kernel; in
        cooperative builds each run of GPU kernels between CPU parts is one graph and the CPU
        kernels run outside (``mulayer.passes.RewriteCUDAGraphPerDevice``).
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
    if plan is not None:
        check_plan_target(spec)
    check_verify(spec)
    # 1. ONNX → canonical Relax (params bound, BN folded, constants folded)
    mod, inputs, outputs = import_onnx(model, input_shapes)
    layers = splittable_layers(mod["main"])
    extra: dict = {}
    # 2. Build for the processors the target names
    built_as = None
    if spec.cooperative:
        searched = plan is None and spec.mulayer.split == "auto"  # the partitioner's plan
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
            executable, extra = build_cooperative(
                mod, spec, plan, layers, calibration, inputs, cuda_graph
            )
        if searched:
            # 2b. Keep the fastest of the plan and the single-processor builds, measured here
            executable, extra, built_as = check_auto_plan(
                mod, spec, plan, (executable, extra, built_as), inputs, outputs, cuda_graph
            )
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


def check_plan_target(spec: TargetSpec) -> None:
    """A plan sets every layer: refuse a target ``-ratio`` that it would silently override."""
    if spec.mulayer is not None and spec.mulayer.ratio is not None:
        raise MuLayerError(
            f"--plan sets every layer's split, so -ratio={spec.mulayer.ratio:g} would be "
            "ignored: drop -ratio from the target (the plan's default_ratio covers the layers it "
            'does not name), e.g. "mulayer, cuda, llvm"'
        )


# ------------------------------------------------------------------- -verify: measure the plan
VERIFY_ROUNDS = 3  # rounds of timed runs, candidates interleaved (a noisy machine)
VERIFY_REPEAT = 10  # timed runs per candidate and round (after 2 warm-up runs)


def check_verify(spec: TargetSpec) -> None:
    """``-verify=measure`` needs the target's processors on this machine."""
    if spec.mulayer is None or spec.mulayer.verify != "measure":
        return
    why_not = processors_here(spec)
    if why_not is not None:
        raise MuLayerError(
            f"mulayer -verify=measure times the plan on this machine, but {why_not}: compile "
            "on a machine with the target's processors, or use -verify=auto (measures where it "
            "can) or -verify=off"
        )


def processors_here(spec: TargetSpec) -> str | None:
    """``None`` when this machine can run both sides of ``spec``, else why not."""
    import platform

    machine = platform.machine().lower().replace("amd64", "x86_64")
    for side in (spec.host, spec.device):
        triple = (side or {}).get("mtriple")
        if triple and not triple.startswith(machine):
            return f"the target is for {triple.split('-')[0]} and this machine is {machine}"
    kind = spec.device["kind"] if spec.device is not None else "llvm"
    if kind != "llvm" and not tvm.device(kind, 0).exist:
        return f"no {kind} device on this machine"
    return None


def _measure_ms(candidates: dict[str, CompiledModel]) -> dict[str, float]:
    """Median latency (ms) of each in-memory build on the same random inputs, the best of
    ``VERIFY_ROUNDS`` interleaved rounds."""
    from ..runtime.executor import LoadedModel

    loaded = {}
    with tempfile.TemporaryDirectory(prefix="mulayer-verify-") as tmp:
        for name, c in candidates.items():
            # Exported and loaded, not ``jit()``-ed: TVM warns when exporting a jitted executable.
            lib_path = Path(tmp) / f"{len(loaded)}.so"
            c.executable.export_library(str(lib_path))
            lib = tvm.runtime.load_module(str(lib_path))
            loaded[name] = LoadedModel(lib, c.metadata(), c.inputs, c.outputs)
    inputs = next(iter(loaded.values())).random_inputs(seed=0)
    best = dict.fromkeys(loaded, float("inf"))
    for _ in range(VERIFY_ROUNDS):
        for name, model in loaded.items():
            ms = model.benchmark(inputs, repeat=VERIFY_REPEAT, warmup=2).median_ms
            best[name] = min(best[name], ms)
    return best


def check_auto_plan(mod, spec: TargetSpec, plan: Plan, built, inputs, outputs, cuda_graph):
    """``-verify``: time the ``-split=auto`` build against the GPU-only and CPU-only builds
    and keep the fastest, where this machine has the target's processors.

    ``built`` is ``(executable, extra metadata, built_as)`` of the plan; returns the same for the
    build kept. The figures go into the plan's notes and ``extra["plan_check"]``.
    """
    executable, extra, built_as = built
    why_not = processors_here(spec)
    verify = spec.mulayer.verify
    if verify == "off" or why_not is not None:  # (-verify=measure was checked up front)
        reason = "-verify=off" if verify == "off" else why_not
        note = (
            f"plan chosen by the cost model alone, not measured ({reason}); on a machine with "
            "the target's processors -verify=measure times it against the GPU-only and "
            "CPU-only builds and keeps the fastest"
        )
        plan.notes.append(note)
        extra["plan_check"] = {"measured": False, "note": note}
        return executable, extra, built_as

    def candidate(exe, meta, as_):
        return CompiledModel(
            exe, spec, inputs, outputs, [], plan, extra_metadata=meta, built_as=as_
        )

    shown = {"gpu": "GPU only", "cpu": "CPU only"}
    # An all-GPU plan is built as the GPU module already: then it is the "plan" candidate.
    shown["plan"] = f"plan ({shown[built_as]})" if built_as else "plan"
    candidates = {"plan": candidate(executable, extra, built_as)}
    if built_as != "gpu":
        gpu_exe, gpu_meta = _build_gpu_only(mod, spec, cuda_graph, None)
        candidates["gpu"] = candidate(gpu_exe, {**gpu_meta, "built_as": "gpu"}, "gpu")
    candidates["cpu"] = candidate(build_single(mod, spec.host_target()), {"built_as": "cpu"}, "cpu")
    measured = _measure_ms(candidates)
    kept = min(measured, key=measured.get)
    figures = ", ".join(f"{shown[k]} {v:.3f} ms" for k, v in measured.items())
    if kept == "plan":
        note = f"measured here: {figures}: kept the plan (fastest)"
    else:
        note = (
            f"measured here: {figures}: built as {shown[kept]} (faster than the plan; "
            "-verify=off keeps the plan)"
        )
    log.info(note)
    plan.notes.append(note)
    chosen = candidates[kept]
    check = {
        "measured": True,
        "measured_ms": {k: round(v, 4) for k, v in measured.items()},
        "kept": kept,
        "note": note,
    }
    return chosen.executable, {**chosen.extra_metadata, "plan_check": check}, chosen.built_as


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
    return calibrate(mod, calibration, method="search", build=build_for_this_cpu)


def build_cooperative(
    mod, spec: TargetSpec, plan: Plan, layers, calibration, inputs, cuda_graph: bool = True
):
    """Split, quantize, cast, place and build a two-device module; return (executable, meta).

    On ``cuda`` (unless ``cuda_graph`` is off) each run of GPU kernels between CPU parts is
    captured as a CUDA graph (:class:`~mulayer.passes.rewrite_cuda_graph_per_device.
    RewriteCUDAGraphPerDevice`).
    """
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
    use_graph = cuda_graph and spec.device["kind"] == "cuda"
    with tvm.transform.PassContext(config={"relax.backend.use_cuda_graph": use_graph}):
        executable = compile_lowered(mod)
    meta = {
        "cuda_graph": use_graph,
        "input_device": _input_device(mod, spec),
        "precision": _decisions(plan, layers, precision),
        "calibrated": stats is not None,
        "kernel_sites": sites,
    }
    if cpu_weights:
        meta["cpu_weights"] = {"function": WEIGHTS_FUNC, "count": cpu_weights}
    return executable, meta


def _input_device(mod, spec: TargetSpec) -> str:
    """Where ``main`` wants its inputs: the GPU when PlaceDevices put them there (no CPU part)."""
    params = mod["main"].params[:1]
    vdevice = getattr(params[0].ty, "vdevice", None) if params else None
    kind = vdevice.target.kind.name if vdevice is not None else "llvm"
    cpu_vdevice = mod.global_infos["vdevice"][1]
    on_cpu = vdevice is None or vdevice.__chandle__() == cpu_vdevice.__chandle__()
    return "cpu" if on_cpu or kind in ("llvm", "c") else kind


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
        why = plan.placement_reason(layer.name, layer.out_channels)
        if why:  # e.g. too few channels to split at -align: say so in inspect's "why"
            reasons = [why, decisions[layer.name].get("reason", "")]
            decisions[layer.name]["reason"] = "; ".join(r for r in reasons if r)
    return decisions
