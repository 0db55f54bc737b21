"""Benchmark mulayer's schedule rules on single layers (ResNet-18/50 shapes).

Each layer is built the way the mulayer build does it: weights bound as constants, legalized,
fused (conv + bias + relu, or conv + requantize for int8), scheduled with
``mulayer.schedules.apply_schedules`` (which packs the constant weights at compile time).
Times are the best of several repeats (robust to other processes on a shared machine).

Examples::

    TVM_NUM_THREADS=2 python scripts/bench_kernels.py               # CPU fp32 + int8
    TVM_NUM_THREADS=2 python scripts/bench_kernels.py --baseline    # also unscheduled
    python scripts/bench_kernels.py --device cuda --json out.json   # GPU fp16 (on a GPU host)
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import tvm
from tvm import relax

from mulayer.schedules import PadConvInputChannels, apply_schedules
from mulayer.schedules.testing import ConvCase, conv2d_module, matmul_module, standard_pipeline

LAYERS = {
    "r18_3x3_64_56": ConvCase(64, 56, 56, 64),
    "r18_3x3_128_28": ConvCase(128, 28, 28, 128),
    "r18_3x3_256_14": ConvCase(256, 14, 14, 256),
    "r18_3x3_512_7": ConvCase(512, 7, 7, 512),
    "r50_1x1_256_64_56": ConvCase(256, 56, 56, 64, k=1, pad=0),
    "r50_1x1_64_256_56": ConvCase(64, 56, 56, 256, k=1, pad=0),
    "r50_1x1_1024_256_14": ConvCase(1024, 14, 14, 256, k=1, pad=0),
    "r50_3x3s2_128_56": ConvCase(128, 56, 56, 128, stride=2),
    "stem_7x7s2_3_64": ConvCase(3, 224, 224, 64, k=7, stride=2, pad=3),
    "mbv2_dw_3x3_96_56": ConvCase(96, 56, 56, 96, groups=96),
}
DENSE = {"fc_2048_1000": (1, 2048, 1000), "gemm_128_1024_1024": (128, 1024, 1024)}


def _target(device: str) -> tvm.target.Target:
    if device == "cuda":
        return tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host={"kind": "llvm"})
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    import os

    cores = int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1))
    return tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": cores})


def _compile(mod: tvm.IRModule, target, schedule: bool) -> tuple[relax.VirtualMachine, float]:
    t0 = time.perf_counter()
    mod = standard_pipeline(mod)
    if schedule:
        mod = apply_schedules(mod, target)  # packs the constant weights at compile time
    elif target.kind.name == "cuda":
        from tvm.s_tir import dlight as dl

        with target:
            mod = dl.ApplyDefaultSchedule(dl.gpu.Fallback())(mod)
    ex = tvm.compile(mod, target=target)
    dev = tvm.cuda() if target.kind.name == "cuda" else tvm.cpu()
    return relax.VirtualMachine(ex, dev), time.perf_counter() - t0


def _time(vm: relax.VirtualMachine, args, dev, repeat: int) -> float:
    ev = vm.time_evaluator("main", dev, number=10, repeat=repeat)
    return float(min(ev(*args).results))


def bench_conv(name, case, kind, target, baseline, repeat):
    rng = np.random.default_rng(0)
    dev = tvm.cuda() if target.kind.name == "cuda" else tvm.cpu()
    xshape = (case.n, case.c, case.h, case.w)
    wshape = (case.f, case.c // case.groups, case.k, case.k)
    if kind == "int8":
        x = rng.integers(0, 256, xshape).astype("uint8")
        w = rng.integers(-128, 128, wshape).astype("int8")
        b = rng.integers(-1000, 1000, (1, case.f, 1, 1)).astype("int32")
        mod = conv2d_module(
            case, "uint8", "int8", "int32", epilogue="requant", params={"w": w, "b": b}
        )
        mod = PadConvInputChannels()(mod)  # RGB stem: 3 -> 4 channels for the dot product
    else:
        dtype = "float16" if kind == "fp16" else "float32"
        x = rng.standard_normal(xshape).astype(dtype)
        w = (rng.standard_normal(wshape) * 0.1).astype(dtype)
        b = rng.standard_normal((1, case.f, 1, 1)).astype(dtype)
        mod = conv2d_module(case, dtype, params={"w": w, "b": b})
    row = {"layer": name, "kind": kind, "shape": str(case)}
    for label, sched in (("scheduled", True), ("baseline", False)):
        if label == "baseline" and not baseline:
            continue
        vm, build_s = _compile(mod, target, sched)
        secs = _time(vm, [tvm.runtime.tensor(x, dev)], dev, repeat)
        row[f"{label}_ms"] = round(secs * 1e3, 4)
        row[f"{label}_gops"] = round(case.flops / secs / 1e9, 1)
        row[f"{label}_build_s"] = round(build_s, 2)
    return row


def bench_dense(name, mkn, kind, target, repeat):
    m, k, n = mkn
    rng = np.random.default_rng(0)
    dev = tvm.cpu()
    if kind == "int8":
        x = rng.integers(0, 256, (m, k)).astype("uint8")
        w = rng.integers(-128, 128, (k, n)).astype("int8")
        b = rng.integers(-1000, 1000, (n,)).astype("int32")
        mod = matmul_module(m, k, n, "uint8", "int8", "int32", params={"w": w, "b": b})
    else:
        x = rng.standard_normal((m, k)).astype("float32")
        w = rng.standard_normal((k, n)).astype("float32")
        b = rng.standard_normal((n,)).astype("float32")
        mod = matmul_module(m, k, n, params={"w": w, "b": b})
    vm, build_s = _compile(mod, target, True)
    secs = _time(vm, [tvm.runtime.tensor(x, dev)], dev, repeat)
    return {
        "layer": name,
        "kind": kind,
        "shape": f"{m}x{k}x{n}",
        "scheduled_ms": round(secs * 1e3, 4),
        "scheduled_gops": round(2 * m * n * k / secs / 1e9, 1),
        "scheduled_build_s": round(build_s, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--kinds", default=None, help="comma list of fp32,int8,fp16")
    parser.add_argument("--layers", default=None, help="comma list of layer names")
    parser.add_argument("--baseline", action="store_true", help="also time unscheduled code")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", default=None, help="write the rows to this file")
    args = parser.parse_args(argv)
    target = _target(args.device)
    kinds = (args.kinds or ("fp16" if args.device == "cuda" else "fp32,int8")).split(",")
    names = args.layers.split(",") if args.layers else list(LAYERS)
    rows = []
    for kind in kinds:
        for name in names:
            if name in LAYERS:
                rows.append(
                    bench_conv(name, LAYERS[name], kind, target, args.baseline, args.repeat)
                )
            elif name in DENSE and args.device == "cpu":
                rows.append(bench_dense(name, DENSE[name], kind, target, args.repeat))
            print(json.dumps(rows[-1]) if rows else "", flush=True)
        if args.layers is None and args.device == "cpu":
            for name, mkn in DENSE.items():
                rows.append(bench_dense(name, mkn, kind, target, args.repeat))
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'layer':24} {'kind':5} {'ms':>9} {'GOP/s':>8}  target={target}")
    for r in rows:
        base = f"  (unscheduled {r['baseline_gops']:.1f})" if "baseline_gops" in r else ""
        print(
            f"{r['layer']:24} {r['kind']:5} {r['scheduled_ms']:9.3f} {r['scheduled_gops']:8.1f}"
            + base
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"schema": 1, "target": str(target), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
