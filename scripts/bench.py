#!/usr/bin/env python3
"""End-to-end benchmark: mulayer builds against onnxruntime on the same machine, in one process.

For each model: mulayer CPU fp32 (llvm), GPU fp16 (cuda, when present) and any extra targets
given; onnxruntime CPU fp32 as the peer. Batch 1, warm-up then the median of ``--repeat`` runs.
Writes JSON and a markdown table under ``--out``.

    python scripts/bench.py --models resnet18 googlenet --repeat 50 --out results/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np


def _median_ms(fn, repeat: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _bench_target(
    name, target, model_path, session, input_name, calibration_samples, repeat, warmup, workdir
):
    import mulayer
    from mulayer.reference import max_rel_error

    calibration = None
    if target.startswith("mulayer") and calibration_samples:
        shape = session.get_inputs()[0].shape
        rng = np.random.default_rng(1)
        calibration = {
            input_name: rng.standard_normal((calibration_samples, *shape[1:])).astype("float32")
        }
    start = time.perf_counter()
    compiled = mulayer.compile(str(model_path), target=target, calibration=calibration)
    build_s = time.perf_counter() - start
    artifact = workdir / f"{name}.mulayer"
    compiled.export(artifact)
    model = mulayer.load(artifact)
    x = model.random_inputs(seed=0)
    reference = session.run(None, x)[0]
    out = list(model(x).values())[0]
    error = max_rel_error(out, reference)
    timing = model.benchmark(x, repeat=repeat, warmup=warmup)
    print(
        f"{name:12s} {target:28s} {timing.median_ms:9.3f} ms  build {build_s:5.1f} s  "
        f"err {error:.1e}",
        flush=True,
    )
    return {
        "model": name,
        "system": f"mulayer {compiled.spec.mode}",
        "target": target,
        "median_ms": timing.median_ms,
        "build_s": build_s,
        "rel_error": error,
        "calibrated": calibration is not None,
        "inputs": x,
    }


def bench_model(
    name: str,
    targets: list[str],
    repeat: int,
    warmup: int,
    threads: int,
    workdir: Path,
    calibration_samples: int,
) -> list[dict]:
    from mulayer.reference import onnxruntime_session
    from mulayer.zoo import save_model

    model_path = workdir / f"{name}.onnx"
    save_model(name, model_path)
    session = onnxruntime_session(model_path, threads)
    input_name = session.get_inputs()[0].name
    rows = []
    x = None
    for target in targets:
        try:
            row = _bench_target(
                name,
                target,
                model_path,
                session,
                input_name,
                calibration_samples,
                repeat,
                warmup,
                workdir,
            )
        except Exception as err:  # a benchmark reports a failed build or run and goes on
            message = str(err).strip().splitlines()[-1][:160] if str(err).strip() else ""
            print(f"{name:12s} {target:28s} FAILED: {type(err).__name__}: {message}", flush=True)
            rows.append(
                {
                    "model": name,
                    "system": "mulayer",
                    "target": target,
                    "median_ms": None,
                    "build_s": None,
                    "rel_error": None,
                    "error": f"{type(err).__name__}: {message}",
                }
            )
            continue
        inputs = row.pop("inputs")
        x = inputs if x is None else x
        rows.append(row)
    if x is None:
        x = {
            input_name: np.random.default_rng(0)
            .standard_normal([int(d) for d in session.get_inputs()[0].shape])
            .astype("float32")
        }
    ort_ms = _median_ms(lambda: session.run(None, {input_name: x[input_name]}), repeat, warmup)
    rows.append(
        {
            "model": name,
            "system": "onnxruntime CPU fp32",
            "target": f"{threads} threads",
            "median_ms": ort_ms,
            "build_s": None,
            "rel_error": 0.0,
        }
    )
    print(f"{name:12s} {'onnxruntime CPU fp32':28s} {ort_ms:9.3f} ms", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | system | target | median ms | build s | max rel. error vs ORT |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        head = f"| {r['model']} | {r['system']} | `{r['target']}` |"
        if r["median_ms"] is None:
            lines.append(f"{head} failed: {r['error']} | | |")
            continue
        build = "" if r["build_s"] is None else f"{r['build_s']:.1f}"
        lines.append(f"{head} {r['median_ms']:.3f} | {build} | {r['rel_error']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "googlenet"])
    parser.add_argument("--targets", nargs="+", help="mulayer targets (default: llvm, + cuda)")
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument(
        "--calibration-samples",
        type=int,
        default=4,
        help="random samples to calibrate int8 CPU parts of mulayer targets",
    )
    args = parser.parse_args(argv)

    import tvm

    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    targets = args.targets or (["llvm"] + (["cuda, llvm"] if tvm.cuda(0).exist else []))
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += bench_model(
                name,
                targets,
                args.repeat,
                args.warmup,
                args.threads,
                Path(tmp),
                args.calibration_samples,
            )
    machine = {
        "date": date.today().isoformat(),
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "gpu": tvm.cuda(0).device_name if tvm.cuda(0).exist else None,
        "tvm": tvm.__version__,
    }
    (args.out / "bench.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    (args.out / "bench.md").write_text(markdown(rows))
    print("\n" + markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
