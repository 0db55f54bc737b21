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

This script is the command; the pieces (models, builds, peers, timing, report) are
``scripts/benchlib/``, shared with ``bench_executor.py`` and ``bench_kernels.py``.

    TVM_NUM_THREADS=16 python scripts/bench.py --models resnet18 googlenet \\
        --real-dir models/real --jobs 14 --out $OUT
    python scripts/bench.py --merge run1/bench.json run2/bench.json --out docs/bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from benchlib.builds import plan_tasks, run_tasks
from benchlib.machine import machine_info
from benchlib.measure import INPUT_NAME, Context, measure_variant
from benchlib.models import ModelEntry, default_models, prepare_models
from benchlib.peers import DEFAULT_PEERS, PEERS, measure_ort, measure_torch, torch_device
from benchlib.report import fmt, markdown, summarize, write_results
from benchlib.timing import error_text
from benchlib.variants import VARIANTS, Variant, resolve_variants


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
        shown = fmt(r.get("median_ms"), "9.3f", r.get("note", "")[:100])
        print(f"  {r['system']:42s} {shown}", flush=True)
    return ctx.rows


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
                    problem = f"failed: {error_text(err)}"
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
