"""``mulayer inspect (MODEL.onnx | ARTIFACT) [--json]``: layers, shapes, FLOPs, placement.

``--plan`` shows a cooperative artifact's plan per layer (placement, GPU channels, predicted
time); ``--measure`` runs the artifact here and adds measured times (see
:mod:`mulayer.partitioner.report` for how); ``--plot plan.png`` draws the split and the times.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import MuLayerError
from .output import print_json, print_table

EXAMPLE = """example:
  mulayer inspect models/resnet18.onnx
  mulayer inspect resnet18.mulayer --json
  mulayer inspect googlenet.mulayer --plan --measure --plot plan.png
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="list a model's or an artifact's layers",
        description="List the splittable layers (op, shapes, FLOPs) of an ONNX model, or the "
        "targets, inputs and layers of an artifact.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("path", help="ONNX model or mulayer artifact")
    parser.add_argument(
        "--input-shapes", help='static shapes for dynamic inputs, e.g. "input:[1,3,224,224]"'
    )
    parser.add_argument("--json", action="store_true", help="print a JSON object")
    parser.add_argument(
        "--plan",
        action="store_true",
        help="show the artifact's plan: per-layer placement, GPU channels, predicted ms",
    )
    parser.add_argument(
        "--measure",
        action="store_true",
        help="with --plan: run the artifact here and add measured per-layer and end-to-end ms",
    )
    parser.add_argument(
        "--repeat", type=int, default=20, help="runs to time with --measure (default 20)"
    )
    parser.add_argument(
        "--plot", metavar="PNG", help="with --plan: write a PNG of the per-layer split and times"
    )
    parser.set_defaults(handler=run)


def _model_report(path: str, input_shapes: str | None) -> dict:
    from ..frontend.layers import splittable_layers
    from ..frontend.onnx_import import import_onnx

    mod, inputs, outputs = import_onnx(path, input_shapes)
    return {
        "kind": "onnx",
        "path": path,
        "inputs": [spec.to_json() for spec in inputs],
        "outputs": [spec.to_json() for spec in outputs],
        "layers": [layer.to_json() for layer in splittable_layers(mod["main"])],
    }


def _artifact_report(path: str) -> dict:
    from ..runtime.artifact import read_metadata

    metadata, _ = read_metadata(path)
    return {"kind": "artifact", "path": path, **metadata}


def _plan_report(path: str, measure: bool, repeat: int) -> dict:
    """The plan of an artifact, per layer, with measurements when asked."""
    from ..partitioner.report import add_measurements, measured_layer_ms, plan_rows
    from ..plan import Plan
    from ..runtime.artifact import PLAN_NAME, read_metadata

    metadata, members = read_metadata(path)
    if PLAN_NAME not in members:
        raise MuLayerError(
            f"{path!r} has no plan: it is a {metadata.get('mode', '?')} build; plans come with "
            'cooperative targets such as "mulayer -split=auto, cuda, llvm"'
        )
    plan = Plan.from_json(members[PLAN_NAME].decode())
    rows = plan_rows(plan, metadata["layers"])
    report = {
        "kind": "plan",
        "path": path,
        "target": metadata["target"]["text"],
        "predicted_ms": plan.predicted_ms,
        "baselines_ms": plan.baselines_ms,
        "notes": plan.notes,
        "measured_ms": None,
    }
    if measure:
        if repeat < 1:
            raise MuLayerError(f"--repeat must be at least 1, got {repeat}")
        import mulayer

        model = mulayer.load(path)
        inputs = model.random_inputs(seed=0)
        report["measured_ms"] = model.benchmark(inputs, repeat=repeat).median_ms
        traces = [model.trace(inputs, warmup=1 if i else 3)[0] for i in range(min(repeat, 5))]
        add_measurements(rows, measured_layer_ms(traces))
    report["layers"] = [row.to_json() for row in rows]
    return report


def _print_plan(report: dict) -> None:
    print(f"plan of {report['path']} (target {report['target']!r})")
    predicted, baselines = report["predicted_ms"], report["baselines_ms"]
    if predicted is not None:
        line = f"  predicted {predicted:.3f} ms end to end"
        if baselines:
            line += " (" + ", ".join(f"{k.upper()} only {v:.3f} ms" for k, v in baselines.items())
            line += ")"
        print(line)
    if report["measured_ms"] is not None:
        print(f"  measured {report['measured_ms']:.3f} ms end to end (median)")
    for note in report["notes"]:
        print(f"  note: {note}")
    measured = report["measured_ms"] is not None
    headers = ["layer", "placement", "GPU ch", "CPU ch", "predicted ms"]
    if measured:
        headers += ["measured ms", "GPU ms", "CPU ms"]
    rows = []
    for layer in report["layers"]:
        row = [
            layer["name"],
            layer["placement"],
            layer["gpu_channels"],
            layer["out_channels"] - layer["gpu_channels"],
            layer["predicted_ms"],
        ]
        if measured:
            row += [layer["measured_ms"], layer["measured_gpu_ms"], layer["measured_cpu_ms"]]
        rows.append(row)
    print()
    print_table(headers, rows)
    if measured:
        print(
            "\nmeasured per layer: kernel time of its parts per side (the slower side), median "
            "of traced runs; copies and waits count only end to end"
        )


def run(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not path.is_file():
        raise MuLayerError(f"{args.path!r} does not exist or is not a file")
    if (args.measure or args.plot) and not args.plan:
        raise MuLayerError("--measure and --plot go with --plan")
    from ..runtime.artifact import looks_like_artifact

    if args.plan:
        if not looks_like_artifact(path):
            raise MuLayerError(f"--plan needs a mulayer artifact; {args.path!r} is not one")
        report = _plan_report(args.path, args.measure, args.repeat)
        if args.plot:
            from ..partitioner.report import LayerRow, plot_plan

            rows = [LayerRow(**layer) for layer in report["layers"]]
            plot_plan(rows, args.plot, f"{path.name}: {report['target']}")
        if args.json:
            print_json(report)
        else:
            _print_plan(report)
            if args.plot:
                print(f"\nwrote {args.plot}")
        return 0
    report = (
        _artifact_report(args.path)
        if looks_like_artifact(path)
        else _model_report(args.path, args.input_shapes)
    )
    if args.json:
        print_json(report)
        return 0
    if report["kind"] == "artifact":
        target = report["target"]
        print(f"artifact {args.path}: {report['mode']} build, target {target['text']!r}")
        print(
            f"  mulayer {report['mulayer_version']}, TVM {report['tvm_version']}, "
            f"schema v{report['schema_version']}"
        )
        if report.get("plan_check"):
            print(f"  note: {report['plan_check']['note']}")
    for direction in ("inputs", "outputs"):
        for spec in report[direction]:
            print(f"  {direction[:-1]} {spec['name']}: {spec['dtype']}{spec['shape']}")
    precision = report.get("precision", {})
    rows = []
    for layer in report["layers"]:
        decision = precision.get(layer["name"], {})
        rows.append(
            [
                layer["name"],
                layer["input_shape"],
                layer["output_shape"],
                layer["weight_shape"] or "",
                layer["flops"] / 1e6,
                decision.get("placement", report.get("built_as") or report.get("mode", "")),
                decision.get("precision", ""),
                "" if decision.get("sqnr_db") is None else round(decision["sqnr_db"], 1),
                decision.get("reason", ""),
            ]
        )
    print()
    print_table(
        ["layer", "input", "output", "weight", "MFLOP", "placement", "precision", "SQNR dB", "why"],
        rows,
    )
    total = sum(layer["flops"] for layer in report["layers"])
    print(f"\n{len(rows)} splittable layers, {total / 1e9:.3f} GFLOP")
    return 0
