"""``mulayer compile MODEL --target T -o OUT``.

The build runs in a child process by default (:mod:`mulayer.compiler.isolation`): a crash of TVM
becomes an ``error:`` line naming the PrimFunc or pass being built, exit code 1, and no output file.
``--in-process`` builds in this process instead (for debuggers and core dumps).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

from ..errors import MuLayerError
from ..fileio import check_output_path
from ..plan import Plan
from ..runtime.fallback import FALLBACKS
from ..target import MULAYER_OPTIONS, parse_target
from .output import print_json, step

EXAMPLE = """example:
  mulayer compile models/resnet18.onnx --target llvm -o resnet18.mulayer
  mulayer compile model.onnx --target "cuda -arch=sm_90, llvm" -o model.mulayer
  mulayer compile model.onnx --target "cuda -arch=sm_90, llvm" --fallback cpu -o model.mulayer
  mulayer compile model.onnx --target "mulayer -split=auto, llvm, llvm" -o model.mulayer
  mulayer compile model.onnx --input-shapes "input:[1,3,224,224]" --target llvm -o m.mulayer
"""
EXIT_INTERNAL = 1  # as in cli.main: a crash is not the user's fault


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
    parser.add_argument(
        "--fallback",
        choices=FALLBACKS,
        help="also build a CPU-only library into the artifact, which `mulayer run --fallback "
        "cpu` runs where the GPU is missing (GPU targets; one more build)",
    )
    parser.add_argument(
        "--tuning-db",
        metavar="DIR",
        help="MetaSchedule records written by `mulayer tune` (CPU-only or GPU-only targets)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="build in this process, not in a child process (a TVM crash then kills mulayer)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    parser.set_defaults(handler=run)


def build_artifact(
    model: str,
    output: str,
    target: str = "llvm",
    extra_mulayer: dict[str, str] | None = None,
    plan: str | None = None,
    calibration: str | None = None,
    input_shapes: str | None = None,
    fallback: str | None = None,
    tuning_db: str | None = None,
) -> dict:
    """Compile ``model`` and write the artifact to ``output``; return a JSON-able summary.

    What ``mulayer compile`` runs, in a child process or in this one (JSON in, JSON out).
    """
    from ..compiler.driver import compile_model
    from ..compiler.fallback import cpu_spec, export_with_cpu_fallback, needs_cpu_fallback
    from ..compiler.isolation import report

    spec = parse_target(target, extra_mulayer=extra_mulayer)
    report(f"compiling for {spec.mode}")
    compiled = compile_model(
        model,
        spec,
        plan=plan,
        calibration=calibration,
        input_shapes=input_shapes,
        tuning_db=tuning_db,
    )
    seconds = compiled.build_seconds
    cpu_compiled = None
    if fallback == "cpu" and needs_cpu_fallback(spec):
        report("compiling the CPU fallback")
        cpu_compiled = compile_model(model, cpu_spec(spec), input_shapes=input_shapes)
        seconds += cpu_compiled.build_seconds
    report("writing the artifact")
    if cpu_compiled is None:
        compiled.export(output)
    else:
        export_with_cpu_fallback(compiled, cpu_compiled, output)
    notes = []
    check = compiled.extra_metadata.get("plan_check")
    if check is not None:  # -split=auto: the plan chosen and why, and the measured check
        notes = [*compiled.plan.notes[:1], check["note"]]
    return {"layers": len(compiled.layers), "build_seconds": seconds, "notes": notes}


def _build_in_child(output: Path, request: dict) -> dict:
    """``build_artifact`` in a child process; the artifact reaches ``output`` only if it
    succeeds (the child writes into a temporary folder next to it, removed in every case)."""
    from ..compiler.isolation import call_in_child

    with tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=output.parent) as tmp:
        staged = Path(tmp) / output.name
        call = "mulayer.cli.compile_cmd:build_artifact"
        summary = call_in_child(call, {**request, "output": str(staged)})
        os.replace(staged, output)
    return summary


def check_request(args: argparse.Namespace, spec) -> None:
    """Everything that can be checked without building, so that bad input fails at once:
    the options against the target, the output path, the model file, the plan, the calibration.
    """
    from ..compiler.build import check_cross_compiler
    from ..compiler.calibration import load_calibration_npz
    from ..compiler.driver import check_plan_target, check_verify
    from ..compiler.fallback import needs_cpu_fallback
    from ..frontend.onnx_import import check_onnx

    check_output_path(Path(args.output))
    check_cross_compiler(spec)
    check_verify(spec)
    if args.plan and not spec.cooperative:
        raise MuLayerError('--plan needs a cooperative target such as "mulayer, cuda, llvm"')
    if args.calibration and not spec.cooperative:
        raise MuLayerError(
            "--calibration is used by the int8 CPU parts of a cooperative target such as "
            '"mulayer -ratio=0.5, cuda, llvm"; this target computes in float'
        )
    _, inputs = check_onnx(args.model, args.input_shapes)
    if args.plan:
        Plan.load(args.plan)
        check_plan_target(spec)
    if args.calibration:
        load_calibration_npz(args.calibration, inputs)
    if args.fallback and not needs_cpu_fallback(spec):
        warnings.warn(
            f"--fallback {args.fallback} has no effect: {args.target!r} needs no GPU", stacklevel=1
        )


def run(args: argparse.Namespace) -> int:
    from ..compiler.fallback import needs_cpu_fallback
    from ..compiler.isolation import ChildFailure

    output = Path(args.output)
    extra = {
        option: getattr(args, f"mulayer_{option.replace('-', '_')}")
        for option in MULAYER_OPTIONS
        if getattr(args, f"mulayer_{option.replace('-', '_')}") is not None
    }
    spec = parse_target(args.target, extra_mulayer=extra)
    check_request(args, spec)
    request = {
        "model": args.model,
        "target": args.target,
        "extra_mulayer": extra,
        "plan": args.plan,
        "calibration": args.calibration,
        "input_shapes": args.input_shapes,
        "fallback": args.fallback,
        "tuning_db": args.tuning_db,
    }
    quiet = args.json
    try:
        with step(f"compiling {args.model} for {spec.mode} ({args.target})", quiet):
            if args.in_process:
                summary = build_artifact(output=str(output), **request)
            else:
                summary = _build_in_child(output, request)
    except ChildFailure as err:
        if args.verbose and err.detail:
            print(err.detail.rstrip(), file=sys.stderr)
        print(
            f"error: {err}; nothing was written to {str(output)!r}. This is a bug in TVM or "
            "mulayer: rerun with --verbose for the child's trace, or with --in-process to debug it",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
    result = {
        "output": str(output),
        "mode": spec.mode,
        "target": spec.to_json(),
        "layers": summary["layers"],
        "build_seconds": round(summary["build_seconds"], 2),
        "fallback": args.fallback if args.fallback and needs_cpu_fallback(spec) else None,
    }
    for note in [*spec.detected, *summary.get("notes", [])]:
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        print_json({**result, "notes": summary.get("notes", [])})
    else:
        with_fallback = " with a CPU fallback" if result["fallback"] else ""
        print(
            f"wrote {output} ({spec.mode}{with_fallback}, {summary['layers']} splittable layers, "
            f"built in {summary['build_seconds']:.1f} s)"
        )
    return 0
