"""``mulayer inspect (MODEL.onnx | ARTIFACT) [--json]``: layers, shapes, FLOPs, placement."""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

from ..errors import MuLayerError
from .output import print_json, print_table

EXAMPLE = """example:
  mulayer inspect models/resnet18.onnx
  mulayer inspect resnet18.mulayer --json
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
    parser.set_defaults(handler=run)


def _model_report(path: str, input_shapes: str | None) -> dict:
    from ..frontend import import_onnx
    from ..layers import splittable_layers

    mod, inputs, outputs = import_onnx(path, input_shapes)
    return {
        "kind": "onnx",
        "path": path,
        "inputs": [spec.to_json() for spec in inputs],
        "outputs": [spec.to_json() for spec in outputs],
        "layers": [layer.to_json() for layer in splittable_layers(mod["main"])],
    }


def _artifact_report(path: str) -> dict:
    from ..artifact import read_metadata

    metadata, _ = read_metadata(path)
    return {"kind": "artifact", "path": path, **metadata}


def run(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not path.is_file():
        raise MuLayerError(f"{args.path!r} does not exist or is not a file")
    report = (
        _artifact_report(args.path)
        if zipfile.is_zipfile(path)
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
                decision.get("placement", report.get("mode", "")),
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
