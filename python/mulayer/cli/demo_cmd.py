"""``mulayer demo``: build a bundled model, compile it for the processors present, run, check."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from .output import print_json, print_table

EXAMPLE = """example:
  mulayer demo
  mulayer demo --model resnet18 --repeat 20
"""


def add_parser(subparsers) -> None:
    from ..models.zoo import BENCHMARK_MODELS

    parser = subparsers.add_parser(
        "demo",
        help="compile and run a bundled model on every processor present",
        description="Build a bundled model, compile it for each processor configuration this "
        "machine has, run it, and check the outputs against onnxruntime.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default="tiny",
        choices=("tiny", *BENCHMARK_MODELS),
        help="bundled model (default: tiny)",
    )
    parser.add_argument("--repeat", type=int, default=20, help="timed runs (default 20)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of rows")
    parser.set_defaults(handler=run)


def demo_targets() -> list[tuple[str, str, float]]:
    """(label, target, tolerance) for each configuration this machine can run."""
    from ..target import detect_cuda_arch

    configs = [("CPU fp32", "llvm", 1e-4)]
    arch = detect_cuda_arch()
    if arch is not None:
        configs.append(("GPU fp16", f"cuda -arch={arch}, llvm", 2e-2))
    return configs


def run(args: argparse.Namespace) -> int:
    from .. import compile as compile_model
    from .. import load
    from ..models.reference import max_rel_error, onnxruntime_outputs
    from ..models.zoo import save_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="mulayer-demo-") as tmp:
        model_path = Path(tmp) / f"{args.model}.onnx"
        save_model(args.model, model_path)
        reference = None
        for label, target, tolerance in demo_targets():
            artifact = Path(tmp) / f"{label.replace(' ', '_')}.mulayer"
            compiled = compile_model(str(model_path), target=target)
            compiled.export(artifact)
            model = load(artifact)
            inputs = model.random_inputs(seed=0)
            if reference is None:
                reference = onnxruntime_outputs(model_path, inputs)
            outputs = list(model.run(inputs).values())
            error = max(
                max_rel_error(out, ref) for out, ref in zip(outputs, reference, strict=True)
            )
            timing = model.benchmark(inputs, repeat=args.repeat)
            rows.append(
                {
                    "config": label,
                    "target": target,
                    "build_s": round(compiled.build_seconds, 2),
                    "median_ms": timing.median_ms,
                    "rel_error": error,
                    "check": "ok" if error <= tolerance else "FAIL",
                }
            )
    if args.json:
        print_json(rows)
    else:
        print(f"model {args.model}, reference onnxruntime (CPU fp32)\n")
        print_table(
            ["config", "target", "build s", "median ms", "max rel. error", "check"],
            [
                [
                    r["config"],
                    r["target"],
                    r["build_s"],
                    r["median_ms"],
                    f"{r['rel_error']:.2e}",
                    r["check"],
                ]
                for r in rows
            ],
        )
    return 0 if all(r["check"] == "ok" for r in rows) else 1
