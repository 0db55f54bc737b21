#!/usr/bin/env python3
"""Soak a loaded model: many inferences in a loop, resident memory (RSS) before and after.

The model is compiled, exported and loaded as a user would (``mulayer.load``). After
``--warmup`` inferences (allocators, thread pools and caches settle), RSS is sampled every
``--inferences / 20`` calls; the report gives the growth from the end of the warm-up to the end
of the loop, in percent. Inputs cycle through 8 fixed random arrays and every output is compared
bit for bit with the first output for the same input, so a leak that corrupts results shows too.

Examples
--------
    python scripts/soak.py                                   # tiny, llvm, 10,000 inferences
    python scripts/soak.py --target "mulayer -ratio=0.5, llvm, llvm" --json soak.json
    python scripts/soak.py --model resnet18 --inferences 2000

Exit code 0 when RSS grew by less than ``--max-growth`` percent and every output repeated.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

INPUT_POOL = 8
SAMPLES = 20


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc/self/statm``; else peak RSS)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_model(model: str, target: str, workdir: Path):
    """Compile a zoo model (or an .onnx path) for ``target`` with ``mulayer compile`` in another
    process, then load the artifact here: this process holds only the runtime, as a deployment
    would (the compiler would add ~300 MiB to RSS and dilute the growth figure)."""
    import mulayer

    source = model
    if not model.endswith(".onnx"):
        source = str(workdir / "model.onnx")
        save = f"from mulayer.models.zoo import save_model; save_model({model!r}, {source!r})"
        subprocess.run([sys.executable, "-c", save], check=True)
    artifact = workdir / "model.mulayer"
    compile_cmd = [sys.executable, "-m", "mulayer.cli.main", "compile", source]
    subprocess.run([*compile_cmd, "--target", target, "-o", str(artifact)], check=True)
    return mulayer.load(artifact)


def soak(model, inferences: int, warmup: int) -> dict:
    """Run the loop on a loaded model; return the figures (see the module docstring)."""
    rng = np.random.default_rng(0)
    pool = [model.random_inputs(int(rng.integers(1 << 30))) for _ in range(INPUT_POOL)]
    expected = [model(inputs) for inputs in pool]
    for i in range(warmup):
        model(pool[i % INPUT_POOL])
    gc.collect()
    start_rss = rss_bytes()
    every = max(1, inferences // SAMPLES)
    samples, mismatches = [], 0
    start = time.perf_counter()
    for i in range(inferences):
        outputs = model(pool[i % INPUT_POOL])
        if i % INPUT_POOL == 0 or i == inferences - 1:
            want = expected[i % INPUT_POOL]
            mismatches += any(not np.array_equal(outputs[k], want[k]) for k in want)
        if (i + 1) % every == 0:
            samples.append(rss_bytes())
    seconds = time.perf_counter() - start
    gc.collect()
    end_rss = rss_bytes()
    return {
        "inferences": inferences,
        "warmup": warmup,
        "rss_after_warmup_mib": round(start_rss / 2**20, 2),
        "rss_end_mib": round(end_rss / 2**20, 2),
        "rss_max_mib": round(max([*samples, end_rss]) / 2**20, 2),
        "growth_percent": round(100.0 * (end_rss - start_rss) / start_rss, 3),
        "growth_bytes_per_inference": round((end_rss - start_rss) / inferences, 1),
        "rss_samples_mib": [round(s / 2**20, 2) for s in samples],
        "mean_ms": round(1e3 * seconds / inferences, 4),
        "checked_outputs_mismatched": mismatches,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python scripts/soak.py --inferences 10000 --json soak.json",
    )
    parser.add_argument("--model", default="tiny", help="zoo model name or .onnx path (tiny)")
    parser.add_argument("--target", default="llvm", help="compile target (llvm)")
    parser.add_argument("--inferences", type=int, default=10_000, help="timed loop (10000)")
    parser.add_argument("--warmup", type=int, default=500, help="inferences before (500)")
    parser.add_argument(
        "--max-growth", type=float, default=1.0, help="allowed RSS growth in percent (1.0)"
    )
    parser.add_argument("--json", help="write the figures as JSON to this file")
    args = parser.parse_args(argv)
    if args.inferences < SAMPLES or args.warmup < 0:
        parser.error(f"--inferences must be at least {SAMPLES}, --warmup 0 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mulayer-soak-") as tmp:
        model = load_model(args.model, args.target, Path(tmp))
        result = soak(model, args.inferences, args.warmup)
    result = {
        "model": args.model,
        "target": args.target,
        "tvm_num_threads": os.environ.get("TVM_NUM_THREADS"),
        **result,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(
        f"{args.model} on {args.target!r}: {result['inferences']} inferences after "
        f"{result['warmup']} warm-up, {result['mean_ms']} ms each; RSS "
        f"{result['rss_after_warmup_mib']} -> {result['rss_end_mib']} MiB "
        f"({result['growth_percent']:+.3f}%, {result['growth_bytes_per_inference']:g} B per "
        f"inference), max {result['rss_max_mib']} MiB; "
        f"{result['checked_outputs_mismatched']} repeated outputs differed"
    )
    ok = result["growth_percent"] < args.max_growth and not result["checked_outputs_mismatched"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
