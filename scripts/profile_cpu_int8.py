#!/usr/bin/env python3
"""Where a CPU-only int8 build's time goes: every kernel of the fused module timed alone.

Builds a zoo model ``mulayer -ratio=0, llvm, llvm`` with the calibration samples of
``scripts/bench_cpu_int8.py``, keeps the scheduled module the build compiles, then compiles
each PrimFunc the model calls on its own and times it with TVM's ``time_evaluator`` on random
arguments of its call's shapes (the best of ``--repeat`` means of ``--number`` calls; times the
number of calls in ``main``). The sum leaves out the VM's own overhead (allocation, calls).
Kernels are grouped by kind (depthwise, pointwise 1x1, kxk conv, pooling, ...).

    TVM_NUM_THREADS=2 python scripts/profile_cpu_int8.py --model mobilenetv2 --out prof.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

TARGET = "mulayer -ratio=0, llvm, llvm"


def kernel_calls(mod) -> tuple[collections.Counter, dict[str, list[tuple[list[int], str]]]]:
    """The kernels ``main`` calls: how often each, and its arguments' (shape, dtype) list."""
    from tvm import relax

    calls: collections.Counter[str] = collections.Counter()
    shapes: dict[str, list[tuple[list[int], str]]] = {}

    def visit(expr) -> None:
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.call_tir":
            name = expr.args[0].name_hint
            calls[name] += 1
            types = [arg.ty for arg in expr.args[1].fields] + [expr.ty]
            shapes[name] = [([int(d) for d in t.shape], str(t.dtype)) for t in types]

    relax.analysis.post_order_visit(mod["main"], visit)
    return calls, shapes


def kernel_args(shapes: list[tuple[list[int], str]], rng: np.random.Generator, dev) -> list:
    """Random arguments of a kernel: small positive floats (scales, biases), integers in
    [0, 100) (activations, weights)."""
    import tvm

    tensors = []
    for dims, dtype in shapes:
        if dtype.startswith("float"):
            value = np.abs(rng.standard_normal(dims)) * 0.01  # scales, biases
        else:
            value = rng.integers(0, 100, dims)
        tensors.append(tvm.runtime.tensor(value.astype(dtype), dev))
    return tensors


def kind_of(name: str, shapes: list[tuple[list[int], str]]) -> str:
    """A kernel's group, from its name and argument shapes (weight second for convs)."""
    if "conv2d" in name:
        weight = shapes[1][0]  # OIHW, or a packed OIHW{o}{i} layout: KH at index 2 in both
        kh = weight[2]
        if len(weight) == 4 and weight[1] == 1:
            return f"depthwise {kh}x{kh}"
        if shapes[0][0][1] == 4:  # a stem padded to 4 input channels
            return "stem conv"
        return "pointwise 1x1" if kh == 1 else f"{kh}x{kh} conv"
    if "pool" in name:
        return "pooling"
    if "matmul" in name:
        return "dense"
    if "pad" in name:
        return "input quantize + pad"
    return "other"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  TVM_NUM_THREADS=2 python scripts/profile_cpu_int8.py "
        "--model mobilenetv2",
    )
    parser.add_argument("--model", default="mobilenetv2")
    parser.add_argument(
        "--target",
        default=TARGET,
        help=f"CPU-only target (default {TARGET!r}; e.g. append -mattr=-amx-int8,-amx-tile to "
        "both llvm parts for a build without AMX)",
    )
    parser.add_argument("--samples", type=int, default=4, help="calibration samples")
    parser.add_argument("--number", type=int, default=20, help="calls per timing")
    parser.add_argument("--repeat", type=int, default=7, help="timings; the best is kept")
    parser.add_argument("--top", type=int, default=15, help="kernels to print")
    parser.add_argument("--out", type=Path, help="JSON results")
    parser.add_argument(
        "--save-module",
        type=Path,
        help="also write the scheduled module (TVM JSON, with a .target file beside it) for "
        "scripts/compare_kernels_cpu_int8.py",
    )
    args = parser.parse_args(argv)

    import tvm
    from tvm import tirx

    import mulayer
    import mulayer.compiler.build as build
    from mulayer.models import zoo

    # Step 1. Build, keeping the scheduled module that tvm.compile receives.
    kept = {}
    lower = build.lower_for_target

    def keep(mod, target, tuning_db=None):
        kept["mod"], kept["target"] = lower(mod, target, tuning_db), target
        return kept["mod"]

    build.lower_for_target = keep
    work = Path(os.environ.get("TMPDIR", "/tmp"))
    model_path = zoo.save_model(args.model, work / f"{args.model}.onnx")
    shape = zoo.get_model_info(args.model).input_shape
    samples = np.random.default_rng(1).standard_normal((args.samples, *shape[1:]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mulayer.compile(
            str(model_path), target=args.target, calibration={"input": samples.astype(np.float32)}
        )
    build.lower_for_target = lower
    mod, target = kept["mod"], kept["target"]
    if args.save_module is not None:
        args.save_module.write_text(tvm.ir.save_json(mod))
        args.save_module.with_suffix(".target").write_text(str(target))

    # Step 2. The kernels main calls, how often, and their arguments' shapes.
    calls, shapes = kernel_calls(mod)

    # Step 3. Each kernel alone.
    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    rows = []
    for gvar, func in mod.functions_items():
        name = gvar.name_hint
        if not isinstance(func, tirx.PrimFunc) or name not in calls:
            continue
        lib = tvm.tirx.build(
            tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target
        )
        tensors = kernel_args(shapes[name], rng, dev)
        timer = lib.time_evaluator("main", dev, number=args.number, repeat=args.repeat)
        ms = 1e3 * min(timer(*tensors).results)
        rows.append(
            {
                "kernel": name,
                "kind": kind_of(name, shapes[name]),
                "calls": calls[name],
                "ms_per_call": round(ms, 4),
                "ms_total": round(ms * calls[name], 4),
                "args": [f"{dtype}{dims}" for dims, dtype in shapes[name]],
            }
        )
    rows.sort(key=lambda r: -r["ms_total"])
    by_kind: collections.Counter[str] = collections.Counter()
    for row in rows:
        by_kind[row["kind"]] += row["ms_total"]
    total = sum(by_kind.values())
    print(f"{args.model}: {len(rows)} kernels, {total:.3f} ms summed")
    for kind, ms in by_kind.most_common():
        print(f"  {kind:22s} {ms:8.3f} ms  {100 * ms / total:5.1f}%")
    for row in rows[: args.top]:
        print(f"  {row['ms_total']:8.3f} ms  x{row['calls']}  {row['kind']:20s} {row['args'][:2]}")
    if args.out is not None:
        meta = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "model": args.model,
            "target": str(target),
            "tvm_num_threads": os.environ.get("TVM_NUM_THREADS"),
            "load_average": [round(v, 2) for v in os.getloadavg()],
        }
        summary = {k: round(v, 3) for k, v in by_kind.most_common()}
        result = {"meta": meta, "total_ms": round(total, 3), "by_kind_ms": summary, "kernels": rows}
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
