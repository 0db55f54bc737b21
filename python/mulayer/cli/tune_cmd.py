"""``mulayer tune MODEL --target T --trials N -o DB``: MetaSchedule on the weakest kernels.

Which kernels, and the database format: :mod:`mulayer.compiler.tune`. ``mulayer compile --tuning-db
DB`` then builds with the tuned schedules.
"""

from __future__ import annotations

import argparse

from ..errors import MuLayerError
from .output import native_stderr_silenced, print_json, print_table

EXAMPLE = """example:
  mulayer tune models/mobilenetv2.onnx --target llvm --trials 512 -o tuned/
  mulayer compile models/mobilenetv2.onnx --target llvm --tuning-db tuned/ -o m.mulayer
  mulayer tune model.onnx --target "cuda -arch=sm_90, llvm" --trials 1000 -o tuned-cuda/
"""


def add_parser(subparsers) -> None:
    from ..compiler.tune import SELECTIONS, STRATEGIES

    parser = subparsers.add_parser(
        "tune",
        help="tune the kernels the schedule rules handle least well (MetaSchedule)",
        description="Tune with MetaSchedule the PrimFuncs of a model that only generic rules "
        "schedule (depthwise/odd convs, pooling on the CPU; all but tensor-core convs on a "
        "GPU), and write a tuning database for `mulayer compile --tuning-db`.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="path of the ONNX model")
    parser.add_argument(
        "--target",
        default="llvm",
        help='single-processor target: "llvm" or "cuda -arch=sm_90, llvm" (default: llvm)',
    )
    parser.add_argument(
        "--trials", type=int, required=True, help="measured trials in all (shared by the tasks)"
    )
    parser.add_argument("-o", "--output", required=True, help="database folder (created)")
    parser.add_argument(
        "--input-shapes", help='static shapes for dynamic inputs, e.g. "input:[1,3,224,224]"'
    )
    parser.add_argument(
        "--select",
        choices=SELECTIONS,
        default="generic",
        help="kernels to tune: those of generic rules (default) or all computing kernels",
    )
    parser.add_argument("--max-tasks", type=int, help="tune only the N heaviest kernels")
    parser.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="evolutionary",
        help="MetaSchedule search (replay-trace: random samples, for smoke tests)",
    )
    parser.add_argument("--seed", type=int, help="random seed of the search")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ..compiler.tune import tune_model
    from ..frontend.onnx_import import check_onnx

    if args.max_tasks is not None and args.max_tasks < 1:
        raise MuLayerError(f"--max-tasks must be at least 1, got {args.max_tasks}")
    check_onnx(args.model, args.input_shapes)
    # TVM's C++ warnings (MetaSchedule and its workers) are noise here; --verbose shows them.
    with native_stderr_silenced(not args.verbose):
        report = tune_model(
            args.model,
            args.target,
            args.trials,
            args.output,
            progress=not args.json,
            input_shapes=args.input_shapes,
            select=args.select,
            max_tasks=args.max_tasks,
            seed=args.seed,
            strategy=args.strategy,
        )
    if args.json:
        print_json({**asdict(report), "db_dir": str(report.db_dir)})
        return 0
    rows = [[t.name, t.rule, t.flops / 1e9, t.calls, t.trials, t.best_us] for t in report.tuned]
    if rows:
        print_table(["kernel", "rule without tuning", "GFLOP", "calls", "trials", "best µs"], rows)
    else:
        print("nothing to tune: the specialised rules schedule every computing kernel")
    print(
        f"wrote {report.db_dir} ({len(report.tuned)} kernels tuned, {len(report.skipped)} left "
        f"to specialised rules, {report.seconds:.0f} s); build with it: mulayer compile "
        f"{args.model} --target {args.target!r} --tuning-db {report.db_dir} -o OUT"
    )
    return 0
