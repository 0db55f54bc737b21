"""Every build of a benchmark run, in child processes, ``--jobs`` at a time, with a timeout.

A build that crashes or runs past ``--build-timeout-s`` fails its own rows only.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for_exit
from pathlib import Path

import numpy as np

from .machine import SCRIPTS
from .measure import INPUT_NAME
from .models import ModelEntry
from .variants import Variant, needs_cuda


def task_make_model(name: str, path: str) -> dict:
    """Write a zoo model or export a pretrained one."""
    from mulayer.models import pretrained, zoo

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
    mulayer.calibrate(model_path, {INPUT_NAME: np.load(samples)}).save(out)
    return {"path": out, "seconds": time.perf_counter() - start}


def task_build(
    model_path: str,
    target: str,
    calibration: str | None,
    artifact: str,
    env: dict[str, str] | None = None,
) -> dict:
    """Compile and export one mulayer variant (``calibration``: a stats file; ``env``: the
    variant's environment, set in this build process only)."""
    import warnings

    os.environ.update(env or {})

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
                "env": dict(v.env),
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
