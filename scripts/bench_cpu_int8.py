#!/usr/bin/env python3
"""mulayer CPU-only int8 against onnxruntime static int8 on the same threads, interleaved.

For each zoo model: build the ONNX file, calibrate on ``--samples`` random inputs (the same
samples as ``scripts/bench.py``), compile ``mulayer -ratio=0, llvm, llvm`` and quantize the
model with onnxruntime (static, QDQ, per-channel weights, uint8 activations:
``scripts/eval_accuracy.py::ort_static_int8``). Then time the systems in rounds, one block of
``--repeat`` calls each per round, in turn, so that noise from other processes on a shared
machine falls on all of them alike. ``--extra model:label=artifact.mulayer`` adds an already
built artifact (e.g. the same model built by an older checkout) to the rounds.

Each system is timed as one call on inputs already in place (mulayer: the VM call; onnxruntime:
``session.run``). SQNR is measured against onnxruntime fp32 over ``--sqnr-inputs`` random
inputs (the first is the input of ``scripts/bench.py``: ``standard_normal``, seed 0).

    TVM_NUM_THREADS=2 python scripts/bench_cpu_int8.py --models resnet18 resnet50 \\
        --threads 2 --out docs/bench/cpu-int8-dev.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from benchlib.machine import cpu_model

SCRIPTS = Path(__file__).resolve().parent
INPUT_NAME = "input"
TARGET = "mulayer -ratio=0, llvm, llvm"


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def sqnr_db(run, reference, xs: list[np.ndarray]) -> float | None:
    """Output SQNR against fp32 over the inputs ``xs`` (total signal / total noise)."""
    signal = noise = 0.0
    for x in xs:
        ref = np.asarray(reference(x), dtype=np.float64)
        signal += float((ref**2).sum())
        noise += float(((np.asarray(run(x), dtype=np.float64) - ref) ** 2).sum())
    return None if noise == 0 else round(10 * float(np.log10(signal / noise)), 2)


def prepare(name: str, work: Path, samples: int, threads: int) -> dict:
    """Build, calibrate, compile and quantize one zoo model; return its runners."""
    import mulayer
    from mulayer.models import zoo
    from mulayer.models.reference import onnxruntime_session

    sys.path.insert(0, str(SCRIPTS))
    from eval_accuracy import ort_static_int8

    model_path = zoo.save_model(name, work / f"{name}.onnx")
    shape = zoo.get_model_info(name).input_shape
    calibration = np.random.default_rng(1).standard_normal((samples, *shape[1:]))
    calibration = calibration.astype(np.float32)
    start = time.perf_counter()
    samples_by_input = {INPUT_NAME: calibration}
    compiled = mulayer.compile(str(model_path), target=TARGET, calibration=samples_by_input)
    build_s = time.perf_counter() - start
    artifact = compiled.export(work / f"{name}.mulayer")
    start = time.perf_counter()
    quantized = ort_static_int8(model_path, calibration, work / f"{name}-int8.onnx")
    quantize_s = time.perf_counter() - start
    return {
        "model_path": model_path,
        "artifact": artifact,
        "build_s": round(build_s, 1),
        "ort_int8": onnxruntime_session(quantized, threads),
        "ort_quantize_s": round(quantize_s, 1),
        "reference": onnxruntime_session(model_path, threads),
        "precision": compiled.metadata().get("precision", {}),
    }


def mulayer_runner(artifact: Path):
    import mulayer

    model = mulayer.load(artifact)
    return lambda x: next(iter(model({INPUT_NAME: x}).values()))


def interleaved(runners: dict, x: np.ndarray, rounds: int, repeat: int, warmup: int) -> dict:
    """Per system: every call's ms over ``rounds`` rounds of ``repeat`` calls each."""
    samples: dict[str, list[float]] = {key: [] for key in runners}
    for run in runners.values():
        for _ in range(warmup):
            run(x)
    for _ in range(rounds):
        for key, run in runners.items():
            time.sleep(0.05)  # let the previous system's spinning workers go idle
            for _ in range(repeat):
                begin = time.perf_counter()
                run(x)
                samples[key].append((time.perf_counter() - begin) * 1e3)
    return samples


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    return {
        "median_ms": round(statistics.median(ordered), 3),
        "min_ms": round(ordered[0], 3),
        "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))], 3),
        "runs": len(ordered),
    }


def parse_extra(items: list[str]) -> dict[str, dict[str, Path]]:
    extra: dict[str, dict[str, Path]] = {}
    for item in items:
        try:
            key, path = item.split("=", 1)
            model, label = key.split(":", 1)
        except ValueError:
            raise SystemExit(f"--extra {item!r}: expected model:label=path.mulayer") from None
        extra.setdefault(model, {})[label] = Path(path)
    return extra


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  TVM_NUM_THREADS=2 python scripts/bench_cpu_int8.py "
        "--models resnet18 --threads 2 --out cpu-int8.json",
    )
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--threads", type=int, default=2, help="TVM and onnxruntime threads")
    parser.add_argument("--samples", type=int, default=4, help="calibration samples")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=10, help="calls per system and round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--sqnr-inputs", type=int, default=8, help="random inputs for SQNR")
    parser.add_argument("--extra", nargs="*", default=[], help="model:label=artifact.mulayer")
    parser.add_argument("--out", type=Path, help="JSON results")
    args = parser.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    if os.environ["TVM_NUM_THREADS"] != str(args.threads):
        print(f"warning: TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}, --threads {args.threads}")
    import onnxruntime
    import tvm

    extra = parse_extra(args.extra)
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "scripts/bench_cpu_int8.py", *argv]),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": args.threads,
        "tvm_num_threads": os.environ.get("TVM_NUM_THREADS"),
        "tvm": tvm.__version__,
        "onnxruntime": onnxruntime.__version__,
        "load_before": load_average(),
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="mulayer-bench-int8-") as tmp:
        for name in args.models:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                entry = prepare(name, Path(tmp), args.samples, args.threads)
            from mulayer.models import zoo

            x = np.random.default_rng(0).standard_normal(zoo.get_model_info(name).input_shape)
            x = x.astype(np.float32)
            session = entry["reference"]
            reference = lambda image, s=session: s.run(None, {INPUT_NAME: image})[0]  # noqa: E731
            # bench.py's input (seed 0) and seven more: the SQNR of one image is noisy.
            xs = [x] + [
                np.random.default_rng(seed).standard_normal(x.shape).astype(np.float32)
                for seed in range(100, 100 + args.sqnr_inputs - 1)
            ]
            ort = entry["ort_int8"]
            runners = {"mulayer int8": mulayer_runner(entry["artifact"])}
            for label, path in extra.get(name, {}).items():
                runners[f"mulayer int8 ({label})"] = mulayer_runner(path)
            runners["onnxruntime int8"] = lambda image, s=ort: s.run(None, {INPUT_NAME: image})[0]
            load = load_average()
            samples = interleaved(runners, x, args.rounds, args.repeat, args.warmup)
            ort_median = statistics.median(samples["onnxruntime int8"])
            for key, values in samples.items():
                row = {
                    "model": name,
                    "system": key,
                    **summary(values),
                    "vs_ort_int8": round(statistics.median(values) / ort_median, 2),
                    "sqnr_db": sqnr_db(runners[key], reference, xs),
                    "load_during": load,
                }
                if key == "mulayer int8":
                    row["build_s"] = entry["build_s"]
                    precision = [d.get("precision", "") for d in entry["precision"].values()]
                    row["int8_layers"] = sum(p.endswith("int8") for p in precision)
                    row["layers"] = len(precision)
                rows.append(row)
                print(
                    f"{name:10s} {key:28s} median {row['median_ms']:8.3f} ms  "
                    f"min {row['min_ms']:8.3f}  x{row['vs_ort_int8']:.2f} ORT  "
                    f"SQNR {row['sqnr_db']} dB",
                    flush=True,
                )
    meta["load_after"] = load_average()
    print(f"load average before {meta['load_before']}, after {meta['load_after']}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
