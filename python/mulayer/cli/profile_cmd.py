"""``mulayer profile --target T --models M... -o data/profile-<device>.jsonl``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import MuLayerError
from ..fileio import check_output_path
from .output import print_json

EXAMPLE = """example:
  mulayer profile --target "mulayer, llvm, llvm" --models tiny -o profile-local.jsonl
  mulayer profile --target "mulayer, cuda -arch=sm_90, llvm" --models models/*.onnx \\
      -o data/profile-h100.jsonl --max-seconds 540      # rerun the same command to resume
  mulayer profile --target "mulayer, opencl -device=mali, llvm -mtriple=aarch64-linux-gnu" \\
      --models resnet18 --rpc-tracker 10.0.0.2:9190 --rpc-key pixel7 -o profile-pixel7.jsonl

Models are ONNX files or zoo names (resnet18, mobilenetv2, ...). Rows already measured (same
machine, target and options) are skipped, so an interrupted run continues where it stopped.
"""


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or any(not 0.0 < v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give comma-separated shares in (0, 1], e.g. 0.25,0.5,0.75,1"
        )
    return values


def _default_jobs() -> int:
    return max(1, min(16, (os.cpu_count() or 2) - 2))


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "profile",
        help="time every layer's CPU and GPU parts for the cost model",
        description="Time the CPU int8 and GPU fp16 parts of every distinct layer over a grid "
        "of channel slices, and host<->device copies, into a JSONL data set.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--target",
        required=True,
        help='the cooperative target, e.g. "mulayer, cuda -arch=sm_90, llvm" or '
        '"mulayer, llvm, llvm" (the GPU side compiled for the CPU)',
    )
    parser.add_argument("--models", nargs="+", required=True, help="ONNX files or zoo model names")
    parser.add_argument("-o", "--output", required=True, help="profile data (JSONL) to append to")
    parser.add_argument(
        "--slices",
        type=_floats,
        default=(0.25, 0.5, 0.75, 1.0),
        help="shares of the output channels to time, besides --align (default: 0.25,0.5,0.75,1)",
    )
    parser.add_argument(
        "--align", type=int, default=8, help="channel alignment of the slices (default: 8)"
    )
    parser.add_argument(
        "--processors",
        default="cpu,gpu",
        help="which sides to time: cpu, gpu or cpu,gpu (default)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=_default_jobs(),
        help=f"build processes (default: cores - 2, here {_default_jobs()})",
    )
    parser.add_argument(
        "--chunk-size", type=int, default=8, help="parts built into one library (default: 8)"
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        help="stop before a round that would end later than this; rerun to resume",
    )
    parser.add_argument("--repeat", type=int, default=5, help="timed repeats per part")
    parser.add_argument(
        "--min-repeat-ms", type=float, default=20.0, help="minimum length of one repeat (ms)"
    )
    parser.add_argument(
        "--sweep",
        type=int,
        default=0,
        metavar="N",
        help="also time N random layers covering the nets' shape space (training data for the "
        "cost model, never held out; default: 0)",
    )
    parser.add_argument("--max-layers", type=int, help="profile only the first N distinct layers")
    parser.add_argument(
        "--anchors",
        type=int,
        default=12,
        metavar="N",
        help="a resumed run first times N parts per processor of the earliest run again, so that "
        "training puts its rows on that run's scale (default: 12; 0: none)",
    )
    parser.add_argument(
        "--no-transfers", action="store_true", help="skip the host<->device copy timings"
    )
    parser.add_argument(
        "--prepack",
        action="store_true",
        help="fold the CPU weight packing at build time (cooperative builds do not, yet)",
    )
    parser.add_argument("--rpc-tracker", metavar="HOST:PORT", help="time on a remote device")
    parser.add_argument("--rpc-key", metavar="KEY", help="the remote device's tracker key")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..profiler import ProfileConfig, TimingConfig, profile
    from ..profiler.parts import PROCESSORS

    output = Path(args.output)
    check_output_path(output)
    processors = tuple(p.strip() for p in args.processors.split(",") if p.strip())
    if not processors or any(p not in PROCESSORS for p in processors):
        raise MuLayerError(f"--processors {args.processors!r}: use cpu, gpu or cpu,gpu")
    if args.sweep < 0:
        raise MuLayerError("--sweep must be 0 or more")
    if args.anchors < 0:
        raise MuLayerError(f"--anchors {args.anchors}: give 0 (none) or more")
    for name in ("align", "jobs", "chunk_size", "repeat"):
        if getattr(args, name) < 1:
            raise MuLayerError(f"--{name.replace('_', '-')} must be at least 1")
    cfg = ProfileConfig(
        target=args.target,
        models=args.models,
        output=output,
        slices=args.slices,
        align=args.align,
        processors=processors,
        chunk_size=args.chunk_size,
        jobs=args.jobs,
        max_seconds=args.max_seconds,
        timing=TimingConfig(repeat=args.repeat, min_repeat_ms=args.min_repeat_ms),
        transfers=not args.no_transfers,
        prepack=args.prepack,
        rpc_tracker=args.rpc_tracker,
        rpc_key=args.rpc_key,
        sweep=args.sweep,
        max_layers=args.max_layers,
        anchors=args.anchors,
        progress=not args.json,
    )
    summary = profile(cfg)
    if args.json:
        print_json(summary.to_json())
        return 0
    state = (
        "complete"
        if summary.complete
        else (f"stopped with {summary.parts_left} parts left: rerun the same command to resume")
    )
    print(
        f"{summary.output}: {summary.parts_measured} parts timed, {summary.parts_failed} failed, "
        f"{summary.transfer_rows} transfer rows, {summary.anchors_measured} anchors timed again "
        f"in {summary.seconds:.0f} s; {state}"
    )
    if summary.parts_failed:
        print("failed parts carry an 'error' field in their rows", file=sys.stderr)
    return 0
