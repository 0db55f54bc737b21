#!/usr/bin/env python3
"""Executor benchmark (issue 16): cooperative models against their zero-overhead ideal.

Per model, variants ``gpu_only`` (GPU build, CUDA graph), ``cpu_only`` (int8 CPU build),
``ratio_1`` (the two-device module with every layer on the GPU), uniform splits
(``split_<r>``) and, on GoogLeNet, ``branch_pool`` (each Inception block's pool branch on the
CPU, the other branches on the GPU). All are built in parallel child processes (``--jobs``),
then measured one at a time in this process:

- ``median_ms``: median of ``--repeat`` calls (inputs uploaded; VM call + sync of both devices);
- ``ideal_ms``: the plan's critical path from its parts measured one by one: one call is run with
  every VM call (GPU graph or kernel, CPU kernel, crossing copy) fenced by device syncs and timed
  alone (the cost of an empty fence subtracted); then, in program order, GPU work and copies
  take the GPU stream, CPU kernels the CPU, a CPU kernel waits for the device-to-host copies
  before it, a host-to-device copy for the CPU kernels before it. That is what an executor with
  no overhead of its own would take;
- crossing cost: the fenced copies' time against plain pinned copies of the same sizes measured
  in the same run (``runtime.TVMTensorCopyFromTo`` between a GPU tensor and a page-aligned host
  buffer locked over every page it touches), also net of the empty fence
  (``crossing_net_over_pinned``); the same crossings replayed one by one on the model's own
  buffers, called from Python as the reference is (``crossing_replayed_over_pinned``: the
  fenced figure also holds the VM instrument's own cost, which an uninstrumented call does not
  pay); and a 4 MiB pinned / pageable reference;
- a Chrome trace of one call per cooperative variant (``--out``/traces).

    TVM_NUM_THREADS=16 python scripts/bench_executor.py --models resnet18 googlenet \\
        mobilenetv2 --jobs 14 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

GPU = "cuda -arch=sm_90"


def variants(model: str, ratios: list[float]) -> dict[str, dict]:
    """Variant tag → compile arguments."""
    table = {
        "gpu_only": {"target": f"{GPU}, llvm"},
        "cpu_only": {"target": f"mulayer -ratio=0, {GPU}, llvm"},
        "ratio_1": {"target": f"mulayer -ratio=1, {GPU}, llvm"},
    }
    for ratio in ratios:
        table[f"split_{ratio:g}"] = {"target": f"mulayer -ratio={ratio:g}, {GPU}, llvm"}
    if model == "googlenet":
        table["branch_pool"] = {"target": f"mulayer, {GPU}, llvm", "plan": "branch_pool"}
    return table


def branch_pool_plan(model_path: str):
    """GoogLeNet: every Inception pool branch (stride-1 max pool + its 1x1 conv) on the CPU."""
    from mulayer.frontend.layers import splittable_layers
    from mulayer.frontend.onnx_import import import_onnx
    from mulayer.plan import LayerDecision, Plan

    mod, _, _ = import_onnx(model_path)
    layers = splittable_layers(mod["main"])
    cpu = {}
    for first, second in zip(layers, layers[1:], strict=False):
        if first.kind == "max_pool2d" and tuple(first.strides) == (1, 1):
            cpu[first.name] = cpu[second.name] = LayerDecision(placement="cpu")
    return Plan(default_ratio=1.0, layers=cpu)


def build_one(model_path: str, tag: str, spec: dict, out_dir: str, samples: int) -> dict:
    """Child process: compile and export one variant; return its build record."""
    import onnx

    import mulayer

    start = time.perf_counter()
    kwargs = {}
    if spec["target"].startswith("mulayer"):
        dims = onnx.load(model_path).graph.input[0].type.tensor_type.shape.dim
        shape = [d.dim_value for d in dims]
        rng = np.random.default_rng(1)
        kwargs["calibration"] = {"input": rng.standard_normal((samples, *shape[1:])).astype("f4")}
    if spec.get("plan") == "branch_pool":
        kwargs["plan"] = branch_pool_plan(model_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = mulayer.compile(model_path, target=spec["target"], **kwargs)
    path = Path(out_dir) / f"{Path(model_path).stem}_{tag}.mulayer"
    compiled.export(path)
    return {"variant": tag, "artifact": str(path), "build_s": time.perf_counter() - start}


# ----------------------------------------------------------------- parts measured one by one
def _nbytes(tensor) -> int:
    return int(np.prod([int(d) for d in tensor.shape])) * np.dtype(str(tensor.dtype)).itemsize


class Fenced:
    """VM instrument: sync the devices around every call and time it alone."""

    def __init__(self, devices, keep_calls: bool = False) -> None:
        self.devices = devices
        # Holding a call's buffers past the call keeps the VM's pool from handing them back on
        # the next call (it allocates new, not yet page-locked, ones): only the last round may.
        self.keep_calls = keep_calls
        self.items: list[dict] = []
        self._start = 0.0

    def _sync(self) -> None:
        for device in self.devices:
            device.sync()

    def __call__(self, _func, symbol, before_run, _ret, *args) -> int:
        symbol = str(symbol)
        graph = symbol == "vm.builtin.cuda_graph.run_or_capture"
        copy = symbol in ("mulayer.crossing.copy", "vm.builtin.to_device")
        if symbol.startswith("vm.builtin.") and not (graph or copy):
            return 0
        self._sync()
        if before_run:
            self._start = time.perf_counter()
            return 0
        dur = (time.perf_counter() - self._start) * 1e6
        if copy and symbol == "mulayer.crossing.copy":
            src, dst = args[0], args[-1]
            to_host = int(dst.device.dlpack_device_type()) == 1
            kind = "d2h" if to_host else "h2d"
            pin = int(args[1]) if len(args) == 3 else 0
            item = {"kind": kind, "us": dur, "bytes": _nbytes(src), "name": symbol, "pin": pin}
            if self.keep_calls:
                item["call"] = (src, pin, dst)  # the model's own buffers, replayed later
            self.items.append(item)
        elif graph:
            self.items.append({"kind": "gpu", "us": dur, "name": "cuda graph"})
        else:
            out = args[-1] if args else None
            dev = getattr(out, "device", None)
            on_cpu = dev is None or int(dev.dlpack_device_type()) == 1
            self.items.append({"kind": "cpu" if on_cpu else "gpu", "us": dur, "name": symbol})
        return 0


def fence_cost_us(devices, rounds: int = 200) -> float:
    """Median time of an empty fence (sync, stamp, sync, stamp)."""
    samples = []
    for _ in range(rounds):
        for d in devices:
            d.sync()
        start = time.perf_counter()
        for d in devices:
            d.sync()
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def critical_path_us(items: list[dict]) -> float:
    """Program-order schedule on two resources (GPU stream incl. copies, CPU); see the module
    docstring."""
    gpu = cpu = last_d2h = 0.0
    for item in items:
        us = item["net_us"]
        if item["kind"] == "gpu":
            gpu += us
        elif item["kind"] == "d2h":
            gpu += us
            last_d2h = gpu
        elif item["kind"] == "h2d":
            gpu = max(gpu, cpu) + us
        else:
            cpu = max(cpu, last_d2h) + us
    return max(gpu, cpu)


def ideal(model, inputs, rounds: int = 3) -> dict:
    """Fence every call of ``rounds`` calls; per item the median; then the critical path."""
    device_inputs = model._placed(inputs)
    fence = fence_cost_us(model.devices)
    runs = []
    for index in range(rounds):
        recorder = Fenced(model.devices, keep_calls=index == rounds - 1)
        with model._lock:
            model._vm.set_instrument(recorder)
            try:
                model._main(*device_inputs, *model._weights)
                for device in model.devices:
                    device.sync()
            finally:
                model._vm.set_instrument(None)
        runs.append(recorder.items)
    items = runs[-1]
    for index, item in enumerate(items):
        item["us"] = statistics.median(run[index]["us"] for run in runs)
        item["net_us"] = max(0.0, item["us"] - fence)
    return {"fence_us": fence, "items": items, "ideal_us": critical_path_us(items)}


def pinned_copy_us(nbytes: int, to_host: bool, cache: dict, repeat: int = 20) -> float:
    """Median of plain copies of ``nbytes`` between the GPU and page-locked host memory (every
    byte copied lies in locked pages: see ``benchlib.host_buffers``)."""
    import tvm
    from benchlib.host_buffers import page_locked

    key = (nbytes, to_host)
    if key not in cache:
        copy = tvm.get_global_func("runtime.TVMTensorCopyFromTo")
        dev = tvm.runtime.empty((max(nbytes, 1),), "uint8", tvm.cuda(0))  # context current
        host = page_locked(max(nbytes, 1))
        src, dst = (dev, host) if to_host else (host, dev)
        samples = []
        for _ in range(repeat + 3):
            tvm.cuda(0).sync()
            start = time.perf_counter()
            copy(src, dst)
            tvm.cuda(0).sync()
            samples.append((time.perf_counter() - start) * 1e6)
        cache[key] = statistics.median(samples[3:])
    return cache[key]


def reference_copies() -> dict:
    """4 MiB copies, pinned (page-locked, page-aligned) and pageable, each direction, µs/MiB."""
    import tvm
    from benchlib.host_buffers import page_locked, ragged

    size = 4 << 20
    dev = tvm.runtime.empty((size,), "uint8", tvm.cuda(0))  # the context current
    copy = tvm.get_global_func("runtime.TVMTensorCopyFromTo")
    out = {}
    for label, host in (("pinned", page_locked(size)), ("pageable", ragged(size))):
        for direction, (src, dst) in (("d2h", (dev, host)), ("h2d", (host, dev))):
            samples = []
            for _ in range(23):
                tvm.cuda(0).sync()
                start = time.perf_counter()
                copy(src, dst)
                tvm.cuda(0).sync()
                samples.append((time.perf_counter() - start) * 1e6 / 4)
            out[f"{label}_{direction}_us_per_mib"] = statistics.median(samples[3:])
    return out


def replayed_copy_us(call: tuple, repeat: int = 20) -> tuple[float, str]:
    """Median time of the registered crossing copy called from Python on a crossing's own
    buffers (``(src, pin, dst)`` as the VM passed them), timed as :func:`pinned_copy_us` times
    its reference: the crossing's cost without the VM instrument's; and where it ran ("C", or
    "python" where any call went to the Python copy)."""
    import tvm

    from mulayer.runtime import crossing

    copy = tvm.get_global_func(crossing.COPY_FUNC)
    before = crossing.NATIVE.counts() if crossing.NATIVE else (0, 0)
    samples = []
    for _ in range(repeat + 3):
        tvm.cuda(0).sync()
        start = time.perf_counter()
        copy(*call)
        tvm.cuda(0).sync()
        samples.append((time.perf_counter() - start) * 1e6)
    after = crossing.NATIVE.counts() if crossing.NATIVE else (0, 1)
    return statistics.median(samples[3:]), "python" if after[1] > before[1] else "C"


def _host_offset(call: tuple) -> int:
    """The host side's address modulo a page (0: the buffer starts on a page)."""
    src, _, dst = call
    host = dst if int(dst.device.dlpack_device_type()) == 1 else src
    return host.data_ptr() % 4096


def crossing_cost(items: list[dict], cache: dict) -> dict:
    """The fenced crossings' time per MiB against plain pinned copies of the same sizes (also
    net of the empty fence, as the ideal counts them), and the same copies replayed from Python
    on the model's own buffers (``crossing_replayed_over_pinned``: called as the reference is,
    without the VM instrument around them)."""
    copies = [i for i in items if i["kind"] in ("d2h", "h2d")]
    if not copies:
        return {}
    mib = sum(i["bytes"] for i in copies) / (1 << 20)
    pinned_each = [pinned_copy_us(i["bytes"], i["kind"] == "d2h", cache) for i in copies]
    pinned = sum(pinned_each)
    replayed = [replayed_copy_us(i["call"]) for i in copies if "call" in i]
    if len(replayed) == len(copies):
        replay = {
            "crossing_replayed_us_per_mib": sum(us for us, _ in replayed) / mib,
            "crossing_replayed_over_pinned": sum(us for us, _ in replayed) / pinned,
            # Per crossing in program order: direction, bytes, pin flag, host address modulo
            # a page, fenced µs, replayed µs, where the replay ran, pinned µs.
            "crossings": [
                [
                    i["kind"],
                    i["bytes"],
                    i["pin"],
                    _host_offset(i["call"]),
                    round(i["us"], 1),
                    round(us, 1),
                    path,
                    round(ref, 1),
                ]
                for i, (us, path), ref in zip(copies, replayed, pinned_each, strict=True)
            ],
        }
    else:
        replay = {}
    return {
        **replay,
        "crossing_mib": mib,
        "crossing_calls": len(copies),
        "crossing_us_per_mib": sum(i["us"] for i in copies) / mib,
        "pinned_same_sizes_us_per_mib": pinned / mib,
        "crossing_over_pinned": sum(i["us"] for i in copies) / pinned,
        "crossing_net_over_pinned": sum(i["net_us"] for i in copies) / pinned,
    }


def without_bounce(model, x, repeat: int, warmup: int, cache: dict) -> dict:
    """Median and crossing cost again with the partial pages sent to the driver pageable
    (``MULAYER_CROSSING_BOUNCE=0``), in the same process: the A/B of the bounce pages."""
    from mulayer.runtime import crossing

    before = crossing.BOUNCE.enabled
    crossing.set_bounce(False)
    try:
        return timed_again(model, x, repeat, warmup, cache)
    finally:
        crossing.set_bounce(before)


def timed_again(model, x, repeat: int, warmup: int, cache: dict) -> dict:
    """An A/B side: median, ideal and crossing cost of ``model`` as things stand now."""
    timing = model.benchmark(x, repeat=repeat, warmup=warmup)
    measured = ideal(model, x)
    return {
        "median_ms": timing.median_ms,
        "ideal_ms": measured["ideal_us"] / 1e3,
        **crossing_cost(measured["items"], cache),
    }


def with_python_crossings(artifact: str, x, repeat: int, warmup: int, cache: dict) -> dict:
    """Median, ideal and crossing cost of the artifact loaded again with the Python crossing
    copy registered instead of the C one, in the same process: the A/B of the C copy."""
    import tvm

    import mulayer
    from mulayer.runtime import crossing

    registered = tvm.get_global_func(crossing.COPY_FUNC)
    tvm.register_global_func(crossing.COPY_FUNC, crossing.copy, override=True)
    try:
        model = mulayer.load(artifact)  # the VM looks its functions up when it is loaded
        return timed_again(model, x, repeat, warmup, cache)
    finally:
        tvm.register_global_func(crossing.COPY_FUNC, registered, override=True)


def measure(
    record: dict,
    model_path: Path,
    repeat: int,
    warmup: int,
    traces: Path,
    cache,
    bounce_ab: bool = False,
    python_ab: bool = False,
) -> dict:
    import mulayer
    from mulayer.models.reference import max_rel_error, onnxruntime_outputs

    model = mulayer.load(record["artifact"])
    x = model.random_inputs(seed=0)
    out = list(model(x).values())[0]
    ref = onnxruntime_outputs(model_path, x)[0]
    from mulayer.runtime import crossing

    before = crossing.NATIVE.counts() if crossing.NATIVE else (0, 0)
    timing = model.benchmark(x, repeat=repeat, warmup=warmup)
    after = crossing.NATIVE.counts() if crossing.NATIVE else (0, 0)
    row = {
        **{k: v for k, v in record.items() if k != "artifact"},
        # Crossing calls during the timed calls: copied in C, handed to the Python copy.
        "crossings_c_python": [after[0] - before[0], after[1] - before[1]],
        "median_ms": timing.median_ms,
        "min_ms": timing.min_ms,
        "rel_error": max_rel_error(out, ref),
        "all_finite": bool(np.all(np.isfinite(out))),
        "built_as": model.metadata.get("built_as"),
        "cuda_graph": model.metadata.get("cuda_graph"),
    }
    if len(model.devices) < 2:
        return row
    measured = ideal(model, x)
    items = measured["items"]
    row["ideal_ms"] = measured["ideal_us"] / 1e3
    row["ideal_over_median"] = row["ideal_ms"] / row["median_ms"]
    row["fence_us"] = measured["fence_us"]
    for kind in ("gpu", "cpu", "d2h", "h2d"):
        row[f"{kind}_us"] = sum(i["net_us"] for i in items if i["kind"] == kind)
        row[f"{kind}_calls"] = sum(1 for i in items if i["kind"] == kind)
    row.update(crossing_cost(items, cache))
    for item in items:  # let the VM's pool have its buffers back (see Fenced)
        item.pop("call", None)
    if bounce_ab:
        row["no_bounce"] = without_bounce(model, x, repeat, warmup, cache)
    if python_ab:
        row["python_crossings"] = with_python_crossings(
            record["artifact"], x, repeat, warmup, cache
        )
    trace, summary = model.trace(x, warmup=2)
    name = f"{Path(model_path).stem}_{record['variant']}.json"
    (traces / name).write_text(json.dumps(trace))
    row["trace"] = {"file": name, **summary.to_json()}
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "googlenet", "mobilenetv2"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.9])
    parser.add_argument(
        "--variants",
        nargs="+",
        metavar="TAG",
        help="only these variants (gpu_only, cpu_only, ratio_1, split_<ratio>, branch_pool)",
    )
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--calibration-samples", type=int, default=4)
    parser.add_argument(
        "--bounce-ab",
        action="store_true",
        help="measure each split plan again with MULAYER_CROSSING_BOUNCE=0 (row key no_bounce)",
    )
    parser.add_argument(
        "--python-ab",
        action="store_true",
        help="measure each split plan again with the Python crossing copy (row key "
        "python_crossings)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-executor"))
    args = parser.parse_args(argv)

    import tvm

    from mulayer.models.zoo import save_model

    args.out.mkdir(parents=True, exist_ok=True)
    traces = args.out / "traces"
    traces.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-executor-"))
    paths = {}
    for name in args.models:
        paths[name] = work / f"{name}.onnx"
        save_model(name, paths[name])
    tables = {name: variants(name, args.ratios) for name in args.models}
    if args.variants:
        known = {tag for table in tables.values() for tag in table}
        unknown = sorted(set(args.variants) - known)
        if unknown:
            parser.error(f"unknown variant(s) {unknown}; valid: {sorted(known)}")
        tables = {
            m: {t: s for t, s in table.items() if t in args.variants} for m, table in tables.items()
        }
    builds: dict[tuple[str, str], dict] = {}
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        futures = {
            pool.submit(
                build_one, str(paths[name]), tag, spec, str(work), args.calibration_samples
            ): (name, tag)
            for name, table in tables.items()
            for tag, spec in table.items()
        }
        for future in as_completed(futures):
            name, tag = futures[future]
            try:
                builds[(name, tag)] = future.result()
                print(f"built {name} {tag} in {builds[(name, tag)]['build_s']:.0f} s", flush=True)
            except Exception as err:  # report and go on
                error = f"{type(err).__name__}: {err}"[:300]
                builds[(name, tag)] = {"variant": tag, "error": error}
                print(f"build FAILED {name} {tag}: {builds[(name, tag)]['error']}", flush=True)
    print(f"builds done in {time.perf_counter() - start:.0f} s", flush=True)

    cache: dict = {}
    rows = []
    machine = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["scripts/bench_executor.py", *(argv or sys.argv[1:])]),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "tvm_num_threads": os.environ.get("TVM_NUM_THREADS"),
        "gpu": tvm.cuda(0).device_name if tvm.cuda(0).exist else None,
        "tvm": tvm.__version__,
    }
    for name, table in tables.items():
        for tag in table:
            record = {"model": name, **builds[(name, tag)]}
            if "error" not in record:
                try:
                    record = measure(
                        record,
                        paths[name],
                        args.repeat,
                        args.warmup,
                        traces,
                        cache,
                        args.bounce_ab,
                        args.python_ab,
                    )
                except Exception as err:  # report and go on
                    record["error"] = f"{type(err).__name__}: {err}"[:300]
                    record["traceback"] = traceback.format_exc()[-3000:]
                    traceback.print_exc()
            record.pop("artifact", None)
            rows.append(record)
            print(json.dumps({k: v for k, v in record.items() if k != "trace"}), flush=True)
            partial = {"machine": machine, "rows": rows}  # kept if the run is cut short
            (args.out / "executor.json").write_text(json.dumps(partial, indent=2, default=str))
    result = {"machine": machine, "copies": reference_copies(), "rows": rows}
    (args.out / "executor.json").write_text(json.dumps(result, indent=2, default=str))
    print("\n" + markdown(result))
    return 0


def _ab(row: dict, key: str) -> str:
    """``median ms, crossing / pinned`` of an A/B measurement, or nothing."""
    other = row.get(key, {})
    if "crossing_over_pinned" not in other:
        return ""
    return f"{other['median_ms']:.3f}, {other['crossing_over_pinned']:.2f}"


def markdown(result: dict) -> str:
    lines = [
        "| model | variant | median ms | ideal ms | ideal/median "
        "| crossing / pinned (net of the fence, replayed) "
        "| no bounce: median ms, crossing / pinned | Python copy: median ms, crossing / pinned "
        "| rel err |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        if "median_ms" not in r:
            lines.append(f"| {r['model']} | {r['variant']} | failed: {r.get('error', '?')} ||||||")
            continue
        ideal_ms = f"{r['ideal_ms']:.3f}" if "ideal_ms" in r else ""
        ratio = f"{r['ideal_over_median']:.2f}" if "ideal_over_median" in r else ""
        cross = (
            f"{r['crossing_over_pinned']:.2f} ({r['crossing_net_over_pinned']:.2f}, "
            f"{r.get('crossing_replayed_over_pinned', float('nan')):.2f})"
            if "crossing_over_pinned" in r
            else ""
        )
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['median_ms']:.3f} | {ideal_ms} | {ratio} | "
            f"{cross} | {_ab(r, 'no_bounce')} | {_ab(r, 'python_crossings')} | "
            f"{r['rel_error']:.2e} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
