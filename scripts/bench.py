#!/usr/bin/env python3
"""End-to-end benchmark: mulayer against onnxruntime and PyTorch, in one process on one machine.

For each model (batch 1): mulayer's named variants (``--variants``: CPU-only int8, GPU-only
fp16, cooperative with the auto plan) and extra ``--targets``; the peers (``--peers``):
onnxruntime CPU fp32 and static int8 (QDQ, per-channel weights, same calibration samples,
``--threads`` intra-op threads), PyTorch eager fp16 and PyTorch with a captured CUDA graph fp16
(NCHW and channels-last), and optionally ``torch.compile``. The PyTorch peer runs the same ONNX
file through ``scripts/torch_peer.py``.

How: every build (mulayer variants, onnxruntime int8 quantization, the zoo's ONNX files) runs
first, ``--jobs`` at a time in child processes (a crash or a build past ``--build-timeout-s``
fails that row only); then, one model at a time in this process, every system is checked
against onnxruntime fp32 on one random input, timed (warm-up, then the median of ``--repeat``
calls, each synchronised with its device) and, for the pretrained models, run on the test
photos (top-1 agreement with fp32). Results are rewritten under ``--out`` after each model
(``bench.json``, ``bench.md``, ``bench_<model>.png``), so a run cut short still returns data;
builds and other artifacts stay in a temporary folder.

The pretrained models (``mobilenetv2_pretrained``, ``efficientnet_lite0``) are read from
``--real-dir`` (ONNX files and ``photos.npz``, written by
``scripts/make_models.py --for-bench --out DIR``) or, without it, exported here when the
``models`` extra is installed. They calibrate on the calibration photos; the zoo models on
``--calibration-samples`` random inputs.

    TVM_NUM_THREADS=16 python scripts/bench.py --models resnet18 googlenet \\
        --real-dir models/real --jobs 14 --out $OUT
    python scripts/bench.py --merge run1/bench.json run2/bench.json --out docs/bench
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import multiprocessing
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import wait as wait_for_exit
from pathlib import Path

import numpy as np

SCRIPTS = Path(__file__).resolve().parent
SCHEMA_VERSION = 1
INPUT_NAME = "input"


# -- systems ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """A mulayer build: ``target`` may name ``{gpu}``; ``role`` is cpu, gpu or coop."""

    key: str
    label: str
    target: str
    role: str
    calibrated: bool = True


VARIANTS: dict[str, Variant] = {
    v.key: v
    for v in (
        Variant("cpu_int8", "mulayer CPU-only int8", "mulayer -ratio=0, llvm, llvm", "cpu"),
        Variant("gpu_fp16", "mulayer GPU-only fp16", "{gpu}, llvm", "gpu", calibrated=False),
        Variant(
            "coop_auto", "mulayer cooperative auto", "mulayer -split=auto, {gpu}, llvm", "coop"
        ),
    )
}


@dataclass(frozen=True)
class Peer:
    """Another system on the same machine; ``processor`` is cpu or gpu."""

    key: str
    label: str
    processor: str
    graph: bool = False  # a whole-model launch (CUDA graph, compiled): the GPU goal's yardstick


PEERS: dict[str, Peer] = {
    p.key: p
    for p in (
        Peer("ort_fp32", "onnxruntime CPU fp32", "cpu"),
        Peer("ort_int8", "onnxruntime CPU int8 (static, QDQ)", "cpu"),
        Peer("torch_eager", "PyTorch eager fp16", "gpu"),
        Peer("torch_graph", "PyTorch CUDA graph fp16", "gpu", graph=True),
        Peer("torch_graph_cl", "PyTorch CUDA graph fp16, channels-last", "gpu", graph=True),
        Peer("torch_compile", "PyTorch torch.compile fp16", "gpu", graph=True),
    )
}
DEFAULT_PEERS = tuple(k for k in PEERS if k != "torch_compile")


def default_models() -> tuple[str, ...]:
    """The six benchmark zoo models and the two pretrained ones."""
    from mulayer.models.pretrained import PRETRAINED_MODELS
    from mulayer.models.zoo import BENCHMARK_MODELS

    return (*BENCHMARK_MODELS, *PRETRAINED_MODELS)


def resolve_variants(names: list[str], targets: list[str], gpu: str) -> list[Variant]:
    """The named variants, then one per ``--targets`` entry (``NAME=TARGET`` or ``TARGET``)."""
    from mulayer.errors import MuLayerError
    from mulayer.target import parse_target

    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise MuLayerError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    chosen = [
        dataclasses.replace(VARIANTS[n], target=VARIANTS[n].target.format(gpu=gpu)) for n in names
    ]
    for entry in targets:
        # NAME=TARGET when the text before the first "=" is a plain name (a target such as
        # "mulayer -ratio=0.5, llvm, llvm" holds "=" too).
        key, equals, target = entry.partition("=")
        if not equals or not re.fullmatch(r"[A-Za-z_][\w.-]*", key):
            key, target = entry, entry
        spec = parse_target(target)
        role = spec.mode
        if spec.cooperative:
            role = "cpu" if spec.mulayer.ratio == 0 else "coop"
        label = f"mulayer {spec.mode}" if key == target else f"mulayer {key}"
        chosen.append(Variant(key, label, target, role, spec.cooperative))
    keys = [v.key for v in chosen]
    if len(set(keys)) != len(keys):
        raise MuLayerError(f"variant names must be unique, got {keys}")
    return chosen


def needs_cuda(target: str) -> bool:
    from mulayer.target import parse_target

    spec = parse_target(target)
    return spec.device is not None and spec.device["kind"] == "cuda"


# -- models and their inputs ------------------------------------------------------------------


@dataclass
class ModelEntry:
    """One benchmarked model: its ONNX file (made by a task if ``task``), calibration samples
    and, for the pretrained nets, the photos."""

    name: str
    path: Path
    calibration: Path | None  # .npy, (N, C, H, W) float32; None: no samples (no int8)
    task: str | None = None
    photos: object = None  # mulayer.models.pretrained.PhotoSet
    unavailable: str | None = None


def _with_mirrored(calibration: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each calibration photo followed by its mirrored copy, as ``load_photos()`` gives them
    (``make_models.py --for-bench`` leaves the copies out to halve the file)."""
    out = {}
    for name, image in calibration.items():
        out[name] = image
        if not name.endswith("-flip"):
            out[f"{name}-flip"] = calibration.get(
                f"{name}-flip", np.ascontiguousarray(image[..., ::-1])
            )
    return out


def prepare_models(names: list[str], real_dir: Path | None, work: Path, samples: int):
    """ModelEntry per name; zoo ONNX files and missing pretrained exports become tasks."""
    from mulayer import pretrained, zoo

    entries = []
    for name in names:
        calibration = work / f"{name}.calibration.npy"
        if name in zoo.MODEL_NAMES:
            shape = zoo.get_model_info(name).input_shape
            if samples > 0:
                x = np.random.default_rng(1).standard_normal((samples, *shape[1:]))
                np.save(calibration, x.astype(np.float32))
            else:
                calibration = None
            entries.append(ModelEntry(name, work / f"{name}.onnx", calibration, f"onnx:{name}"))
            continue
        entry = ModelEntry(name, work / f"{name}.onnx", calibration)
        photos_file = None if real_dir is None else real_dir / "photos.npz"
        if real_dir is not None and (real_dir / f"{name}.onnx").is_file() and photos_file.is_file():
            entry.path = real_dir / f"{name}.onnx"
            entry.photos = pretrained.read_photos(photos_file)
            entry.photos.calibration = _with_mirrored(entry.photos.calibration)
        elif pretrained.models_extra_available():
            entry.task = f"onnx:{name}"
            entry.photos = pretrained.load_photos()
        else:
            where = "no --real-dir" if real_dir is None else f"not in {real_dir}"
            entry.unavailable = f"n/a: {name}.onnx, photos.npz {where}, no models extra"
        if entry.photos is not None:
            np.save(calibration, entry.photos.calibration_batch())
        entries.append(entry)
    return entries


# -- child tasks (run in fresh processes) -----------------------------------------------------


def task_make_model(name: str, path: str) -> dict:
    """Write a zoo model or export a pretrained one."""
    from mulayer import pretrained, zoo

    start = time.perf_counter()
    if name in zoo.MODEL_NAMES:
        zoo.save_model(name, path)
    else:
        pretrained.save_pretrained(name, path)
    return {"path": path, "seconds": time.perf_counter() - start}


def task_calibrate(model_path: str, samples: str, out: str) -> dict:
    """mulayer's int8 calibration (as ``mulayer.compile`` runs it), once for every variant."""
    import mulayer

    start = time.perf_counter()
    mulayer.calibrate(model_path, {INPUT_NAME: np.load(samples)}, method="percentile").save(out)
    return {"path": out, "seconds": time.perf_counter() - start}


def task_build(model_path: str, target: str, calibration: str | None, artifact: str) -> dict:
    """Compile and export one mulayer variant (``calibration``: a stats file)."""
    import warnings

    import mulayer
    from mulayer.compiler.calibration import CalibrationStats

    start = time.perf_counter()
    kwargs = {}
    if calibration is not None:
        kwargs["calibration"] = CalibrationStats.load(calibration)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = mulayer.compile(model_path, target=target, **kwargs)
    compiled.export(artifact)
    return {"artifact": artifact, "build_s": time.perf_counter() - start}


def task_quantize(model_path: str, calibration: str, out: str) -> dict:
    """onnxruntime static int8 (QDQ, per-channel weights) calibrated on the same samples."""
    sys.path.insert(0, str(SCRIPTS))
    from eval_accuracy import ort_static_int8

    start = time.perf_counter()
    ort_static_int8(Path(model_path), np.load(calibration), Path(out))
    return {"path": out, "build_s": time.perf_counter() - start}


@dataclass
class Task:
    key: str
    fn: Callable[..., dict]
    kwargs: dict
    after: tuple[str, ...] = ()


def _child(fn: Callable[..., dict], kwargs: dict, result: str, threads: int) -> None:
    os.setpgid(0, 0)  # its own process group: a timeout ends whatever the task started too
    os.environ["TVM_NUM_THREADS"] = str(threads)
    try:
        record = fn(**kwargs)
    except Exception as err:  # the parent reports it as the failed row
        lines = str(err).strip().splitlines()
        record = {
            "error": f"{type(err).__name__}: {lines[-1] if lines else ''}"[:300],
            "traceback": traceback.format_exc()[-2000:],
        }
    Path(result + ".tmp").write_text(json.dumps(record))
    os.replace(result + ".tmp", result)


def _stop(process: multiprocessing.Process) -> None:
    """End a task's process group: SIGTERM, then SIGKILL after 5 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        process.join(5)
        if not process.is_alive():
            break


def run_tasks(tasks: list[Task], jobs: int, timeout_s: float, work: Path) -> dict[str, dict]:
    """Run ``tasks`` in spawned processes, ``jobs`` at a time, each after its ``after`` tasks.

    Returns task key → the function's record, or ``{"error": ...}`` for a failure, a crash, a
    failed dependency, or a task still running (or waiting) ``timeout_s`` after the start.
    """
    context = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    pending, running, results = list(tasks), {}, {}
    numbers = itertools.count()
    start = time.monotonic()
    last_note = start
    try:
        while pending or running:
            for task in list(pending):
                failed = [d for d in task.after if "error" in results.get(d, {})]
                if failed:
                    error = results[failed[0]]["error"]
                    results[task.key] = {"error": f"{failed[0]} failed: {error}"}
                    pending.remove(task)
            while len(running) < jobs:
                ready = next((t for t in pending if all(d in results for d in t.after)), None)
                if ready is None:
                    break
                pending.remove(ready)
                out = work / f"task-{next(numbers)}.json"
                process = context.Process(
                    target=_child, args=(ready.fn, ready.kwargs, str(out), threads)
                )
                process.start()
                running[ready.key] = (process, out, time.monotonic())
            if not running:
                break
            left = timeout_s - (time.monotonic() - start)
            if left <= 0:
                break
            wait_for_exit([p.sentinel for p, _, _ in running.values()], timeout=min(left, 10))
            for key, (process, out, began) in list(running.items()):
                if process.exitcode is None:
                    continue
                process.join()
                del running[key]
                if out.is_file():
                    results[key] = json.loads(out.read_text())
                elif process.exitcode < 0:
                    name = signal.Signals(-process.exitcode).name
                    results[key] = {"error": f"the build process crashed ({name})"}
                else:
                    results[key] = {"error": f"the build process exited with {process.exitcode}"}
                state = results[key].get("error", "done")
                took = time.monotonic() - began
                print(
                    f"  [{time.monotonic() - start:5.0f} s] {key}: {state} ({took:.0f} s)",
                    flush=True,
                )
            if time.monotonic() - last_note > 60 and running:
                last_note = time.monotonic()
                print(f"  [{last_note - start:5.0f} s] running: {', '.join(running)}", flush=True)
    finally:
        for key, (process, _, _) in running.items():
            _stop(process)
            results[key] = {"error": f"did not finish within --build-timeout-s={timeout_s:g}"}
            print(f"  {key}: stopped, {results[key]['error']}", flush=True)
    for task in pending:
        failed = [d for d in task.after if "error" in results.get(d, {})]
        error = f"{failed[0]} failed: {results[failed[0]]['error']}" if failed else None
        results[task.key] = {
            "error": error or f"not started within --build-timeout-s={timeout_s:g}"
        }
    return results


def plan_tasks(
    entries: list[ModelEntry],
    variants: list[Variant],
    peers: list[str],
    work: Path,
    has_cuda: bool,
) -> list[Task]:
    """The build tasks: ONNX files, mulayer calibration, mulayer variants, onnxruntime int8
    models. Build times (``build_s``) leave out the ONNX file and the shared calibration."""
    tasks = []
    for entry in entries:
        if entry.unavailable:
            continue
        after = (entry.task,) if entry.task else ()
        if entry.task:
            kwargs = {"name": entry.name, "path": str(entry.path)}
            tasks.append(Task(entry.task, task_make_model, kwargs))
        stats = None
        if entry.calibration is not None and any(v.calibrated for v in variants):
            stats = str(work / f"{entry.name}.calibration.json")
            kwargs = {
                "model_path": str(entry.path),
                "samples": str(entry.calibration),
                "out": stats,
            }
            tasks.append(Task(f"calibrate:{entry.name}", task_calibrate, kwargs, after))
        for v in variants:
            if needs_cuda(v.target) and not has_cuda:
                continue
            calibration = stats if v.calibrated else None
            kwargs = {
                "model_path": str(entry.path),
                "target": v.target,
                "calibration": calibration,
                "artifact": str(work / f"{entry.name}.{v.key}.mulayer"),
            }
            needs = (*after, f"calibrate:{entry.name}") if calibration else after
            tasks.append(Task(f"build:{entry.name}:{v.key}", task_build, kwargs, needs))
        if "ort_int8" in peers and entry.calibration is not None:
            kwargs = {
                "model_path": str(entry.path),
                "calibration": str(entry.calibration),
                "out": str(work / f"{entry.name}.int8.onnx"),
            }
            tasks.append(Task(f"quantize:{entry.name}", task_quantize, kwargs, after))
    # Started in this order when ready: the heads of the longest chains first.
    kinds = ("onnx", "calibrate", "build", "quantize")
    weight = {"vgg16": 3, "resnet50": 2, "googlenet": 2}
    return sorted(
        tasks, key=lambda t: (kinds.index(t.key.split(":")[0]), -weight.get(t.key.split(":")[1], 1))
    )


# -- measuring (in this process, one system at a time) ----------------------------------------


@dataclass
class Context:
    """What every measurement of one model shares."""

    entry: ModelEntry
    x: np.ndarray
    reference: np.ndarray
    session: object  # onnxruntime fp32 session: the reference
    repeat: int
    warmup: int
    rows: list[dict] = field(default_factory=list)

    def reference_logits(self, image: np.ndarray) -> np.ndarray:
        return self.session.run(None, {INPUT_NAME: image})[0]


def time_ms(step: Callable[[], object], repeat: int, warmup: int):
    """Median (and spread) of ``repeat`` wall-clock calls of ``step`` after ``warmup`` calls."""
    from mulayer.runtime.executor import Timing

    for _ in range(warmup):
        step()
    samples = []
    for _ in range(repeat):
        begin = time.perf_counter()
        step()
        samples.append((time.perf_counter() - begin) * 1e3)
    return Timing.from_samples(samples)


def _row(ctx: Context, key: str, system: str, role: str, target: str, **fields) -> dict:
    row = {
        "model": ctx.entry.name,
        "key": key,
        "system": system,
        "role": role,
        "target": target,
        "status": "ok",
        **fields,
    }
    ctx.rows.append(row)
    return row


def _error_text(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"[:300]


def _quality(ctx: Context, predict: Callable[[np.ndarray], np.ndarray]) -> dict:
    """Error against fp32 on the random input; on the photos, top-1 agreement with fp32."""
    from mulayer.models.reference import max_rel_error

    out = np.asarray(predict(ctx.x), dtype=np.float64)
    noise = float(((out - ctx.reference) ** 2).sum())
    signal = float((ctx.reference.astype(np.float64) ** 2).sum())
    quality = {
        "rel_error": max_rel_error(out, ctx.reference),
        "sqnr_db": None if noise == 0 else 10 * float(np.log10(signal / noise)),
    }
    photos = ctx.entry.photos
    if photos is not None:
        from mulayer.models.accuracy import agreement, correct_top1

        result = agreement(predict, ctx.reference_logits, photos.test)
        quality.update(
            top1_equal=result.top1_equal,
            top5_overlap=result.top5_overlap,
            photos=result.photos,
            correct_top1=correct_top1(predict, photos.test, photos.labels),
        )
    return quality


def _timing_fields(timing) -> dict:
    return {
        "median_ms": timing.median_ms,
        "p90_ms": timing.p90_ms,
        "min_ms": timing.min_ms,
        "runs": timing.runs,
    }


def _placements(metadata: dict) -> dict | None:
    decisions = metadata.get("precision")
    if not decisions:
        return None
    counts: dict[str, int] = {}
    for decision in decisions.values():
        kind = str(decision.get("placement", "?")).split()[0]
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def measure_variant(ctx: Context, v: Variant, builds: dict[str, dict], has_cuda: bool) -> None:
    """Load, check and time one mulayer build (or record why there is none)."""
    import mulayer

    def row(**fields) -> None:
        _row(ctx, v.key, v.label, v.role, v.target, **fields)

    build = builds.get(f"build:{ctx.entry.name}:{v.key}", {"error": "not built"})
    if needs_cuda(v.target) and not has_cuda:
        row(status="n/a", note="n/a: no CUDA", build_s=None)
        return
    if "error" in build:
        row(status="failed", note=f"failed: {build['error']}", build_s=None)
        return
    times = {"build_s": build["build_s"]}
    if v.calibrated and f"calibrate:{ctx.entry.name}" in builds:
        times["calibration_s"] = builds[f"calibrate:{ctx.entry.name}"]["seconds"]
    try:
        begin = time.perf_counter()
        model = mulayer.load(build["artifact"])
        times["load_s"] = time.perf_counter() - begin
        timing = model.benchmark({INPUT_NAME: ctx.x}, repeat=ctx.repeat, warmup=ctx.warmup)
        quality = _quality(ctx, lambda image: next(iter(model({INPUT_NAME: image}).values())))
    except Exception as err:  # a benchmark reports a failed run and goes on
        row(status="failed", note=f"failed: {_error_text(err)}", **times)
        return
    row(placements=_placements(model.metadata), **times, **_timing_fields(timing), **quality)


def measure_ort(ctx: Context, key: str, builds: dict[str, dict], threads: int) -> None:
    """Time onnxruntime fp32 (the reference session) or the static int8 model."""
    from mulayer.models.reference import onnxruntime_session

    def row(**fields) -> None:
        _row(ctx, key, PEERS[key].label, "peer", f"{threads} intra-op threads", **fields)

    build = {"build_s": None}
    if key == "ort_int8":
        build = builds.get(f"quantize:{ctx.entry.name}", {"error": "not built (no calibration)"})
        if "error" in build:
            row(status="failed", note=f"failed: {build['error']}", build_s=None)
            return
    try:
        session = ctx.session if key == "ort_fp32" else onnxruntime_session(build["path"], threads)
        x = {INPUT_NAME: ctx.x}
        timing = time_ms(lambda: session.run(None, x), ctx.repeat, ctx.warmup)
        quality = _quality(ctx, lambda image: session.run(None, {INPUT_NAME: image})[0])
    except Exception as err:  # report and go on
        row(status="failed", note=f"failed: {_error_text(err)}", build_s=build["build_s"])
        return
    row(build_s=build["build_s"], **_timing_fields(timing), **quality)


def measure_torch(
    ctx: Context,
    keys: list[str],
    device: str | None,
    why_not: str,
    compile_mode: str,
    time_left: Callable[[], float],
) -> None:
    """The PyTorch peers, fp16 on CUDA; on a CPU ``device`` (local check) eager fp32 only."""
    if device is None or not keys:
        for key in keys:
            _row(ctx, key, PEERS[key].label, "peer", "", status="n/a", note=f"n/a: {why_not}")
        return
    import onnx
    import torch

    sys.path.insert(0, str(SCRIPTS))
    import torch_peer

    half = device == "cuda"
    model = onnx.load(str(ctx.entry.path))
    modules: dict[bool, torch_peer.OnnxModule] = {}  # by channels-last: shared by the peers
    for key in keys:
        channels_last = key == "torch_graph_cl"
        cpu_eager = key == "torch_eager" and not half
        label = PEERS[key].label.replace("fp16", "CPU fp32") if cpu_eager else PEERS[key].label
        target = f"{device}, {'channels-last' if channels_last else 'NCHW'}"
        if key == "torch_compile":
            target = f"{device}, mode={compile_mode}"
        row = functools.partial(_row, ctx, key, label, "peer", target)

        if key != "torch_eager" and not half:
            row(status="n/a", note="n/a: needs CUDA")
            continue
        if key == "torch_compile" and time_left() < 180:
            row(status="n/a", note="n/a: skipped, under 180 s of --budget-s left")
            continue
        try:
            begin = time.perf_counter()
            if channels_last not in modules:
                modules[channels_last] = torch_peer.prepare(model, device, half, channels_last)
            module = modules[channels_last]
            if key == "torch_eager":
                runner = torch_peer.eager_runner(module, ctx.x)
            elif key == "torch_compile":
                runner = torch_peer.compiled_runner(module, ctx.x, compile_mode)
            else:
                runner = torch_peer.cuda_graph_runner(module, ctx.x, channels_last)
            setup_s = time.perf_counter() - begin
            timing = time_ms(runner.step, ctx.repeat, ctx.warmup)
            quality = _quality(ctx, runner.predict)
            del runner  # frees a CUDA graph's memory pool
        except Exception as err:  # report and go on (torch.compile is optional)
            row(status="failed", note=f"failed: {_error_text(err)}", build_s=None)
            continue
        row(build_s=setup_s, **_timing_fields(timing), **quality)
    modules.clear()
    if half:
        torch.cuda.empty_cache()


def measure_model(
    entry: ModelEntry,
    variants: list[Variant],
    builds: dict[str, dict],
    has_cuda: bool,
    device: str | None,
    why_not: str,
    args: argparse.Namespace,
    time_left: Callable[[], float],
) -> list[dict]:
    """Every system's row for one model, measured one after the other."""
    from mulayer.models.reference import onnxruntime_session

    session = onnxruntime_session(entry.path, args.threads)
    shape = [int(d) for d in session.get_inputs()[0].shape]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    reference = session.run(None, {INPUT_NAME: x})[0].astype(np.float64)
    ctx = Context(entry, x, reference, session, args.repeat, args.warmup)
    for v in variants:
        measure_variant(ctx, v, builds, has_cuda)
    for key in (k for k in args.peers if k.startswith("ort")):
        measure_ort(ctx, key, builds, args.threads)
    torch_keys = [k for k in args.peers if k.startswith("torch")]
    measure_torch(ctx, torch_keys, device, why_not, args.torch_compile_mode, time_left)
    for r in ctx.rows:
        shown = _fmt(r.get("median_ms"), "9.3f", r.get("note", "")[:100])
        print(f"  {r['system']:42s} {shown}", flush=True)
    return ctx.rows


def torch_device(choice: str) -> tuple[str | None, str]:
    """The PyTorch peers' device, or None and why not."""
    try:
        import torch
    except ImportError:
        return None, "torch is not installed"
    if choice == "cpu":
        return "cpu", ""
    if not torch.cuda.is_available():
        return None, "no CUDA for PyTorch (--torch-device cpu runs eager fp32 on the CPU)"
    torch.backends.cudnn.benchmark = True  # the strongest peer: cuDNN picks its algorithms
    return "cuda", ""


# -- report -----------------------------------------------------------------------------------


def _best(rows: list[dict], keep: Callable[[dict], bool]) -> dict | None:
    ok = [r for r in rows if r["status"] == "ok" and keep(r)]
    return min(ok, key=lambda r: r["median_ms"]) if ok else None


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Per model, the issue's goals: GPU-only vs the best PyTorch graph peer, CPU-only vs the
    best onnxruntime, cooperative vs mulayer's best single processor (≤ 1.02x)."""
    summary = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        gpu = _best(mine, lambda r: r["role"] == "gpu")
        cpu = _best(mine, lambda r: r["role"] == "cpu")
        coop = _best(mine, lambda r: r["role"] == "coop")
        torch_best = _best(mine, lambda r: r["key"] in PEERS and PEERS[r["key"]].graph)
        ort_best = _best(mine, lambda r: r["key"] in ("ort_fp32", "ort_int8"))
        single = _best(mine, lambda r: r["role"] in ("cpu", "gpu"))

        def ratio(a, b):
            return None if a is None or b is None else a["median_ms"] / b["median_ms"]

        def keys(a, b):
            return None if a is None or b is None else f"{a['key']} vs {b['key']}"

        entry = {
            "gpu_vs_torch_graph": ratio(gpu, torch_best),
            "gpu_compared": keys(gpu, torch_best),
            "cpu_vs_onnxruntime": ratio(cpu, ort_best),
            "cpu_compared": keys(cpu, ort_best),
            "coop_vs_best_single": ratio(coop, single),
            "coop_compared": keys(coop, single),
        }
        for row in mine:
            if row["role"] == "coop" and row["status"] == "ok" and single is not None:
                row["vs_best_single"] = row["median_ms"] / single["median_ms"]
        summary[model] = entry
    return summary


def _fmt(value, spec: str, empty: str = "") -> str:
    return empty if value is None else format(value, spec)


def _build_cell(r: dict) -> str:
    cell = _fmt(r.get("build_s"), ".1f")
    if r.get("calibration_s") is not None:
        cell += f" (+{r['calibration_s']:.0f} calibration)"
    return cell


def _accuracy_cell(r: dict) -> str:
    if r.get("photos"):
        return f"{r['top1_equal']}/{r['photos']} ({r['correct_top1']}/{r['photos']} correct)"
    return ""


def markdown(rows: list[dict], summary: dict[str, dict]) -> str:
    lines = [
        "| model | system | target | median ms | p90 ms | build s | top-1 = fp32 (photos) "
        "| SQNR dB vs fp32 | notes |",
        "| --- | --- | --- | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for r in rows:
        notes = r.get("note", "")
        if r.get("vs_best_single") is not None:
            notes = f"{r['vs_best_single']:.2f}x mulayer's best single processor"
        if r.get("placements"):
            layers = ", ".join(f"{n} {k}" for k, n in sorted(r["placements"].items()))
            notes = f"{notes}; layers: {layers}" if notes else f"layers: {layers}"
        target = f"`{r['target']}`" if r["target"] else ""
        sqnr = r.get("sqnr_db")
        sqnr_cell = "exact" if r["status"] == "ok" and sqnr is None else _fmt(sqnr, ".1f")
        lines.append(
            f"| {r['model']} | {r['system']} | {target} | {_fmt(r.get('median_ms'), '.3f')} "
            f"| {_fmt(r.get('p90_ms'), '.3f')} | {_build_cell(r)} "
            f"| {_accuracy_cell(r)} | {sqnr_cell} | {notes} |"
        )
    lines += [
        "",
        "| model | GPU-only / best PyTorch graph (≤ 1) | CPU-only / best onnxruntime (≤ 1) "
        "| cooperative / best single (≤ 1.02) |",
        "| --- | ---: | ---: | ---: |",
    ]

    def goal(value, limit: float, compared: str | None) -> str:
        if value is None:
            return "n/a"
        return f"{value:.2f}x ({'met' if value <= limit else 'not met'}: {compared})"

    for model, s in summary.items():
        lines.append(
            f"| {model} | {goal(s['gpu_vs_torch_graph'], 1.0, s['gpu_compared'])} "
            f"| {goal(s['cpu_vs_onnxruntime'], 1.0, s['cpu_compared'])} "
            f"| {goal(s['coop_vs_best_single'], 1.02, s['coop_compared'])} |"
        )
    return "\n".join(lines) + "\n"


# mulayer by role (blue, green, purple), peers by processor (orange, red).
_COLOURS = {"cpu": "#1f77b4", "gpu": "#2ca02c", "coop": "#9467bd"}
_PEER_COLOURS = {"cpu": "#ff7f0e", "gpu": "#d62728"}


def plot_model(rows: list[dict], model: str, path: Path) -> bool:
    """A horizontal bar chart of one model's median latencies; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    from mulayer.fileio import atomic_write

    mine = [r for r in rows if r["model"] == model]
    ok = [r for r in reversed(mine) if r["status"] == "ok"]
    missing = [f"{r['system']}: {r['status']}" for r in mine if r["status"] != "ok"]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(ok) + 1.5 + 0.2 * len(missing)))
    colours = [
        _COLOURS[r["role"]] if r["role"] in _COLOURS else _PEER_COLOURS[PEERS[r["key"]].processor]
        for r in ok
    ]
    values = [r["median_ms"] for r in ok]
    bars = ax.barh([r["system"] for r in ok], values, color=colours)
    if values and max(values) / min(values) > 20:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlim(min(values) / 1.5, max(values) * 3)
    elif values:
        ax.set_xlim(0, max(values) * 1.2)
    for bar, value in zip(bars, values, strict=True):
        ax.text(value, bar.get_y() + bar.get_height() / 2, f" {value:.3f}", va="center", fontsize=8)
    xlabel = "median latency, ms (batch 1; lower is better)"
    ax.set_xlabel("\n".join([xlabel, *missing]), fontsize=8)
    ax.set_title(model)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return True


def machine_info(argv: list[str]) -> dict:
    import onnxruntime
    import tvm

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "scripts/bench.py", *argv]),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "tvm_num_threads": os.environ.get("TVM_NUM_THREADS"),
        "gpu": tvm.cuda(0).device_name if tvm.cuda(0).exist else None,
        "tvm": tvm.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    try:
        commit = subprocess.run(
            ["git", "-C", str(SCRIPTS), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        info["git_commit"] = commit.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def write_results(
    out: Path, machine: dict | list, settings: dict, rows: list[dict], plot: bool, models: list[str]
) -> None:
    """Rewrite bench.json and bench.md (and the charts of ``models``) under ``out``."""
    from mulayer.fileio import atomic_write_text

    summary = summarize(rows)
    document = {
        "schema_version": SCHEMA_VERSION,
        "machine": machine,
        "settings": settings,
        "rows": rows,
        "summary": summary,
    }
    atomic_write_text(out / "bench.json", json.dumps(document, indent=1, default=str))
    machines = machine if isinstance(machine, list) else [machine]
    header = "\n".join(
        f"- {m['date']}: {m['cpu']} ({m['cores']} cores, TVM_NUM_THREADS={m['tvm_num_threads']}), "
        f"GPU {m['gpu']}; TVM {m['tvm']}, onnxruntime {m['onnxruntime']}, torch {m['torch']}, "
        f"mulayer {m['git_commit']}; `{m['command']}`"
        for m in machines
    )
    atomic_write_text(out / "bench.md", f"{header}\n\n{markdown(rows, summary)}")
    if plot:
        for model in models:
            if not plot_model(rows, model, out / f"bench_{model}.png"):
                print("matplotlib is not installed: no charts", flush=True)
                return


# -- driver -----------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  TVM_NUM_THREADS=16 python scripts/bench.py --models resnet18 "
        "mobilenetv2_pretrained --real-dir models/real --jobs 14 --out $OUT",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        metavar="NAME",
        help="zoo or pretrained model names (default: the six benchmark zoo "
        "models and the two pretrained ones)",
    )
    parser.add_argument(
        "--variants",
        nargs="*",
        default=list(VARIANTS),
        metavar="NAME",
        help=f"named mulayer builds: {', '.join(VARIANTS)} (default: all; "
        "none with a bare --variants)",
    )
    parser.add_argument(
        "--targets",
        nargs="+",
        default=[],
        metavar="[NAME=]TARGET",
        help='extra mulayer targets, e.g. cpu_fp32=llvm "mulayer -ratio=0.5, llvm, llvm"',
    )
    parser.add_argument(
        "--peers",
        nargs="*",
        default=list(DEFAULT_PEERS),
        metavar="NAME",
        help=f"peers: {', '.join(PEERS)} (default: all but torch_compile)",
    )
    parser.add_argument("--gpu", default="cuda -arch=sm_90", help="GPU target of the variants")
    parser.add_argument(
        "--real-dir",
        type=Path,
        help="folder with mobilenetv2_pretrained.onnx, efficientnet_lite0.onnx "
        "and photos.npz (scripts/make_models.py --for-bench)",
    )
    parser.add_argument("--repeat", type=int, default=50, help="timed calls (median)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls first")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count(),
        help="onnxruntime intra-op threads; TVM_NUM_THREADS if unset",
    )
    parser.add_argument(
        "--calibration-samples",
        type=int,
        default=4,
        help="random calibration samples for the zoo models",
    )
    parser.add_argument(
        "--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="builds in parallel"
    )
    parser.add_argument(
        "--build-timeout-s",
        type=float,
        default=330,
        help="builds still running after this fail their rows",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=570,
        help="models not started within this (from launch) are skipped",
    )
    parser.add_argument(
        "--torch-device",
        choices=("auto", "cpu"),
        default="auto",
        help="cpu: PyTorch eager fp32 on the CPU, for a check without a GPU",
    )
    parser.add_argument(
        "--torch-compile-mode", default="reduce-overhead", help="mode of the torch_compile peer"
    )
    parser.add_argument(
        "--plot",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one PNG bar chart per model (needs matplotlib)",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        metavar="BENCH_JSON",
        help="measure nothing: merge these bench.json files into --out",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    return parser.parse_args(argv)


def merge(paths: list[Path], out: Path, plot: bool) -> int:
    rows, machines = [], []
    for path in paths:
        document = json.loads(path.read_text())
        machines.append(document["machine"])
        rows += document["rows"]
    out.mkdir(parents=True, exist_ok=True)
    models = list(dict.fromkeys(r["model"] for r in rows))
    write_results(out, machines, {"merged": [str(p) for p in paths]}, rows, plot, models)
    print(markdown(rows, summarize(rows)))
    return 0


def main(argv: list[str] | None = None) -> int:
    launched = time.monotonic()
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out, args.plot)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    import tvm

    from mulayer.errors import MuLayerError

    models = args.models or list(default_models())
    known = (*default_models(), "tiny")
    unknown = [m for m in models if m not in known]
    unknown_peers = [p for p in args.peers if p not in PEERS]
    try:
        if unknown or unknown_peers:
            raise MuLayerError(
                f"unknown model(s) {unknown} or peer(s) {unknown_peers}; models: "
                f"{', '.join(known)}; peers: {', '.join(PEERS)}"
            )
        variants = resolve_variants(args.variants, args.targets, args.gpu)
    except MuLayerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    has_cuda = bool(tvm.cuda(0).exist)
    device, why_not = torch_device(args.torch_device)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = machine_info(argv)
    settings = {
        "repeat": args.repeat,
        "warmup": args.warmup,
        "threads": args.threads,
        "calibration_samples": args.calibration_samples,
        "gpu": args.gpu,
        "variants": [v.__dict__ for v in variants],
        "peers": args.peers,
        "torch_device": device,
    }
    print(f"machine: {json.dumps(machine)}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="mulayer-bench-"))
    rows: list[dict] = []
    try:
        entries = prepare_models(models, args.real_dir, work, args.calibration_samples)
        tasks = plan_tasks(entries, variants, args.peers, work, has_cuda)
        print(f"building {len(tasks)} task(s), {args.jobs} at a time", flush=True)
        builds = run_tasks(tasks, args.jobs, args.build_timeout_s, work)
        for entry in entries:
            left = args.budget_s - (time.monotonic() - launched)
            problem = entry.unavailable
            if entry.task and "error" in builds[entry.task]:
                problem = f"failed: {builds[entry.task]['error']}"
            if problem is None and left < 30:
                problem = f"n/a: skipped, under 30 s of --budget-s={args.budget_s:g} left"
            if problem is None:
                print(f"measuring {entry.name} ({left:.0f} s of the budget left)", flush=True)
                try:
                    model_rows = measure_model(
                        entry,
                        variants,
                        builds,
                        has_cuda,
                        device,
                        why_not,
                        args,
                        lambda: args.budget_s - (time.monotonic() - launched),
                    )
                except Exception as err:  # e.g. onnxruntime, the reference, cannot load it
                    problem = f"failed: {_error_text(err)}"
            if problem is not None:
                print(f"{entry.name}: {problem}", flush=True)
                model_rows = [
                    {
                        "model": entry.name,
                        "key": "model",
                        "system": "(model)",
                        "role": "none",
                        "target": "",
                        "status": "n/a",
                        "note": problem,
                    }
                ]
            rows += model_rows
            write_results(args.out, machine, settings, rows, args.plot, [entry.name])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_results(args.out, machine, settings, rows, False, [])
    print("\n" + markdown(rows, summarize(rows)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
