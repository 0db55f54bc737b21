#!/usr/bin/env python3
"""Executor benchmark: cooperative models at several uniform ratios, GPU-only with and without
CUDA graphs, in one run.

Builds every variant in parallel child processes (``--jobs``), then, one at a time in this
process: checks the output against onnxruntime, times ``--repeat`` calls (median), and traces
one call. Reports per variant: end-to-end latency, kernel time per processor (GPU from CUDA
events), copy time, executor overhead per split layer (latency minus the busy time of the
traced call, divided by the split layers), and the fraction of CPU kernel time that overlapped
GPU work. GPU-only: launch overhead per kernel with and without a CUDA graph. The overhead per
split layer is the traced call's idle time (neither processor running a kernel or copy) divided
by the split layers; it includes the tracer's callbacks, so it is an upper bound.

    TVM_NUM_THREADS=16 python scripts/bench_executor.py --models resnet18 googlenet \\
        --ratios 0.5 0.8 0.9 0.95 1.0 --jobs 8 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import date
from pathlib import Path

import numpy as np
from benchlib.timing import sqnr_db


def variants(ratios: list[float], gpu: str) -> dict[str, dict]:
    """Variant tag → compile arguments (``gpu`` = llvm: the stand-in, cooperative only)."""
    table = {}
    if not gpu.startswith("llvm"):
        table["gpu_graph"] = {"target": f"{gpu}, llvm", "cuda_graph": True}
        table["gpu_nograph"] = {"target": f"{gpu}, llvm", "cuda_graph": False}
    for ratio in ratios:
        table[f"coop_{ratio:g}"] = {"target": f"mulayer -ratio={ratio:g}, {gpu}, llvm"}
    return table


def build_one(model_path: str, tag: str, spec: dict, out_dir: str, samples: int) -> dict:
    """Child process: compile and export one variant; return its build record."""
    import mulayer

    start = time.perf_counter()
    kwargs = {"cuda_graph": spec["cuda_graph"]} if "cuda_graph" in spec else {}
    if spec["target"].startswith("mulayer") and samples:
        import onnx

        dims = onnx.load(model_path).graph.input[0].type.tensor_type.shape.dim
        shape = [d.dim_value for d in dims]
        rng = np.random.default_rng(1)
        kwargs["calibration"] = {"input": rng.standard_normal((samples, *shape[1:])).astype("f4")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = mulayer.compile(model_path, target=spec["target"], **kwargs)
    path = Path(out_dir) / f"{Path(model_path).stem}_{tag}.mulayer"
    compiled.export(path)
    return {"tag": tag, "artifact": str(path), "build_s": time.perf_counter() - start}


def measure(record: dict, model_path: Path, repeat: int, warmup: int) -> dict:
    import mulayer
    from mulayer.models.reference import max_rel_error, onnxruntime_outputs

    model = mulayer.load(record["artifact"])
    x = model.random_inputs(seed=0)
    out = list(model(x).values())[0]
    ref = onnxruntime_outputs(model_path, x)[0]
    timing = model.benchmark(x, repeat=repeat, warmup=warmup)
    _, summary = model.trace(x, warmup=2)
    split_layers = sum(
        1
        for d in model.metadata.get("precision", {}).values()
        if str(d.get("placement", "")).startswith("split")
    )
    kernels = len(model.metadata.get("kernel_sites", [])) or None
    sqnr = sqnr_db(out, ref)
    return {
        **record,
        "median_ms": timing.median_ms,
        "rel_error": max_rel_error(out, ref),
        "sqnr_db": float("inf") if sqnr is None else sqnr,
        "split_layers": split_layers,
        "kernels": kernels,
        "trace": summary.to_json(),
        # Idle time of the traced call (no kernel or copy running on either processor) per
        # split layer: VM dispatch, syncs and the tracer's own callbacks (an upper bound).
        "overhead_per_split_layer_us": (
            (summary.wall_us - summary.busy_us) / split_layers if split_layers else None
        ),
    }


def gpu_launch_overhead(rows: list[dict]) -> dict | None:
    """Per-kernel launch overhead with and without a CUDA graph (GPU-only variants)."""
    by_tag = {r["tag"]: r for r in rows if "median_ms" in r}
    nograph, graph = by_tag.get("gpu_nograph"), by_tag.get("gpu_graph")
    if not nograph or not graph:
        return None
    # The graph replay runs the same kernels back to back: its device time is the kernel sum.
    kernel_us = graph["trace"]["kernel_us"]["gpu"]
    launches = nograph["trace"]["kernel_count"]["gpu"]
    if not launches or not kernel_us:
        return None
    return {
        "gpu_kernel_sum_us": kernel_us,
        "kernels": launches,
        "host_launch_us_per_kernel": nograph["trace"]["host_launch_us"] / launches,
        "overhead_per_kernel_us_without_graph": (nograph["median_ms"] * 1e3 - kernel_us) / launches,
        "overhead_per_kernel_us_with_graph": (graph["median_ms"] * 1e3 - kernel_us) / launches,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "googlenet"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.8, 0.9, 0.95, 1.0])
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--repeat", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--calibration-samples", type=int, default=4)
    parser.add_argument("--gpu", default="cuda -arch=sm_90", help="GPU target (llvm: stand-in)")
    parser.add_argument("--out", type=Path, default=Path("bench-executor"))
    args = parser.parse_args(argv)

    import tvm

    from mulayer.models.zoo import save_model

    args.out.mkdir(parents=True, exist_ok=True)
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="bench-executor-"))
    table = variants(args.ratios, args.gpu)
    paths = {}
    for name in args.models:
        paths[name] = work / f"{name}.onnx"
        save_model(name, paths[name])
    builds: dict[tuple[str, str], dict] = {}
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        futures = {
            pool.submit(
                build_one, str(paths[name]), tag, spec, str(work), args.calibration_samples
            ): (name, tag)
            for name in args.models
            for tag, spec in table.items()
        }
        for future in as_completed(futures):
            name, tag = futures[future]
            try:
                builds[(name, tag)] = future.result()
                print(f"built {name} {tag} in {builds[(name, tag)]['build_s']:.0f} s", flush=True)
            except Exception as err:  # report and go on
                builds[(name, tag)] = {"tag": tag, "error": f"{type(err).__name__}: {err}"[:300]}
                print(f"build FAILED {name} {tag}: {builds[(name, tag)]['error']}", flush=True)
    print(f"builds done in {time.perf_counter() - start:.0f} s", flush=True)

    results = {}
    for name in args.models:
        rows = []
        for tag in table:
            record = {"model": name, **builds[(name, tag)]}
            if "error" not in record:
                try:
                    record = measure(record, paths[name], args.repeat, args.warmup)
                except Exception as err:  # report and go on
                    record["error"] = f"{type(err).__name__}: {err}"[:300]
            rows.append(record)
            print(json.dumps({k: v for k, v in record.items() if k != "artifact"}), flush=True)
        coop = [r for r in rows if r["tag"].startswith("coop") and "median_ms" in r]
        best = min(coop, key=lambda r: r["median_ms"])["tag"] if coop else None
        results[name] = {"rows": rows, "best_uniform": best, "launch": gpu_launch_overhead(rows)}

    machine = {
        "date": date.today().isoformat(),
        "command": " ".join(["scripts/bench_executor.py", *(argv or sys.argv[1:])]),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "tvm_num_threads": os.environ.get("TVM_NUM_THREADS"),
        "gpu": tvm.cuda(0).device_name if tvm.cuda(0).exist else None,
        "tvm": tvm.__version__,
    }
    (args.out / "bench_executor.json").write_text(
        json.dumps({"machine": machine, "results": results}, indent=2, default=str)
    )
    print("\n" + markdown(results))
    (args.out / "bench_executor.md").write_text(markdown(results))
    return 0


def markdown(results: dict) -> str:
    lines = [
        "| model | variant | median ms | GPU kernels µs | CPU kernels µs | copies µs | "
        "CPU overlapped | overhead / split layer µs | SQNR dB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, result in results.items():
        for r in result["rows"]:
            if "median_ms" not in r:
                lines.append(f"| {name} | {r['tag']} | failed: {r.get('error', '?')} |||||||")
                continue
            t = r["trace"]
            over = r["overhead_per_split_layer_us"]
            lines.append(
                f"| {name} | {r['tag']}{' (best)' if r['tag'] == result['best_uniform'] else ''} "
                f"| {r['median_ms']:.3f} | {t['kernel_us']['gpu']:.0f} | "
                f"{t['kernel_us']['cpu']:.0f} | {sum(t['copy_us'].values()):.0f} | "
                f"{t['cpu_overlapped_fraction']:.0%} | {'' if over is None else f'{over:.1f}'} | "
                f"{r['sqnr_db']:.1f} |"
            )
        launch = result["launch"]
        if launch:
            lines.append(
                f"\n{name}: GPU-only, {launch['kernels']} kernels, "
                f"{launch['gpu_kernel_sum_us']:.0f} µs of kernels (graph replay); latency above "
                f"that per kernel: {launch['overhead_per_kernel_us_without_graph']:.1f} µs "
                f"without a CUDA graph, {launch['overhead_per_kernel_us_with_graph']:.1f} µs "
                f"with; host launch call {launch['host_launch_us_per_kernel']:.1f} µs/kernel\n"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
