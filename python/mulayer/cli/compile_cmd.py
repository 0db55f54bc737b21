"""``mulayer compile MODEL --target T -o OUT``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import MuLayerError
from ..fileio import check_output_path
from ..target import MULAYER_OPTIONS, parse_target
from .output import print_json, step

EXAMPLE = """example:
  mulayer compile models/resnet18.onnx --target llvm -o resnet18.mulayer
  mulayer compile model.onnx --target "cuda -arch=sm_90, llvm" -o model.mulayer
  mulayer compile model.onnx --input-shapes "input:[1,3,224,224]" --target llvm -o m.mulayer
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "compile",
        help="compile an ONNX model into a mulayer artifact",
        description="Compile an ONNX model for the CPU, the GPU, or both at once.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="path of the ONNX model")
    parser.add_argument(
        "--target",
        default="llvm",
        help='tvmc-style target: "llvm", "cuda -arch=sm_90, llvm", '
        '"opencl -device=mali, llvm -mtriple=aarch64-linux-gnu" (default: llvm)',
    )
    for option in MULAYER_OPTIONS:
        parser.add_argument(
            f"--target-mulayer-{option}",
            dest=f"mulayer_{option.replace('-', '_')}",
            metavar="VALUE",
            help=f"the mulayer pseudo-target's -{option} option",
        )
    parser.add_argument("-o", "--output", required=True, help="artifact to write")
    parser.add_argument(
        "--input-shapes", help='static shapes for dynamic inputs, e.g. "input:[1,3,224,224]"'
    )
    parser.add_argument("--plan", help="partition plan (JSON) for a cooperative target")
    parser.add_argument(
        "--calibration", help="calibration samples (.npz, one array per input) for int8 parts"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..compiler import compile_model

    output = Path(args.output)
    check_output_path(output)  # fail before a long build
    extra = {
        option: getattr(args, f"mulayer_{option.replace('-', '_')}")
        for option in MULAYER_OPTIONS
        if getattr(args, f"mulayer_{option.replace('-', '_')}") is not None
    }
    spec = parse_target(args.target, extra_mulayer=extra)
    if args.plan and not spec.cooperative:
        raise MuLayerError('--plan needs a cooperative target such as "mulayer, cuda, llvm"')
    quiet = args.json
    with step(f"compiling {args.model} for {spec.mode} ({args.target})", quiet):
        compiled = compile_model(
            args.model,
            spec,
            plan=args.plan,
            calibration=args.calibration,
            input_shapes=args.input_shapes,
        )
    with step(f"writing {output}", quiet):
        compiled.export(output)
    summary = {
        "output": str(output),
        "mode": spec.mode,
        "target": spec.to_json(),
        "layers": len(compiled.layers),
        "build_seconds": round(compiled.build_seconds, 2),
    }
    if args.json:
        print_json(summary)
    else:
        for note in spec.detected:
            print(f"note: {note}")
        print(
            f"wrote {output} ({spec.mode}, {len(compiled.layers)} splittable layers, "
            f"built in {compiled.build_seconds:.1f} s)"
        )
    return 0
