#!/usr/bin/env python3
"""Accuracy of int8/fp16 mulayer builds on real pretrained nets and bundled photos.

Compares, on the test photos (calibrating on the disjoint calibration photos), the fp32
onnxruntime reference with: mulayer CPU-only int8 (ratio 0), mulayer ratio 0.5 (GPU side fp16,
compiled for llvm unless --gpu-target is given), and onnxruntime static int8 (QDQ, per channel).
Four photos are a thin sample, so each system is also scored on ``--views`` augmented views of
each test photo (random crops, flips and scales; :func:`mulayer.models.pretrained.augmented_view`):
top-1 agreement with fp32 and the output SQNR over all views. Needs the ``models`` extra.

    python scripts/eval_accuracy.py --out results/
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np


def ort_runner(path: Path):
    from mulayer.models.reference import onnxruntime_session

    session = onnxruntime_session(path)
    return lambda x: session.run(None, {"input": x})[0]


def ort_static_int8(model_path: Path, calibration: np.ndarray, out: Path) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"input": calibration[i : i + 1]} for i in range(len(calibration))])

        def get_next(self):
            return next(self.items, None)

    prepared = out.with_suffix(".pre.onnx")
    quant_pre_process(str(model_path), str(prepared))
    quantize_static(
        str(prepared),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )
    return out


def evaluate(
    name: str, gpu_target: str, workdir: Path, views_per_photo: int, systems: list[str]
) -> list[dict]:
    import mulayer
    from mulayer.models.accuracy import agreement, correct_top1, output_sqnr_db
    from mulayer.models.pretrained import augmented_test_views, load_photos, save_pretrained

    model_path = workdir / f"{name}.onnx"
    save_pretrained(name, model_path)
    photos = load_photos()
    calibration = {"input": photos.calibration_batch()}
    reference = ort_runner(model_path)
    views = augmented_test_views(views_per_photo) if views_per_photo else {}
    rows = [
        {
            "model": name,
            "system": "onnxruntime fp32 (reference)",
            "correct_top1": correct_top1(reference, photos.test, photos.labels),
            "top1_equal": len(photos.test),
            "top5_overlap": 1.0,
            "photos": len(photos.test),
            "views": len(views),
        }
    ]

    def add(system: str, run) -> None:
        result = agreement(run, reference, photos.test)
        row = {
            "model": name,
            "system": system,
            "correct_top1": correct_top1(run, photos.test, photos.labels),
            "top1_equal": result.top1_equal,
            "top5_overlap": result.top5_overlap,
            "photos": result.photos,
            "sqnr_db": round(output_sqnr_db(run, reference, photos.test), 2),
            "views": len(views),
        }
        if views:
            on_views = agreement(run, reference, views)
            row["views_top1_equal"] = on_views.top1_equal
            row["views_top5_overlap"] = round(on_views.top5_overlap, 4)
            row["views_sqnr_db"] = round(output_sqnr_db(run, reference, views), 2)
        rows.append(row)
        print(f"{name:24s} {system:40s} {result.row()}", flush=True)

    builds = (
        ("int8", 0.0, "mulayer CPU-only int8"),
        ("ratio0.5", 0.5, "mulayer ratio 0.5 (fp16 | int8)"),
    )
    for key, ratio, label in builds:
        if key not in systems:
            continue
        compiled = mulayer.compile(
            str(model_path),
            target=f"mulayer -ratio={ratio}, {gpu_target}, llvm",
            calibration=calibration,
        )
        artifact = workdir / f"{name}-{ratio}.mulayer"
        compiled.export(artifact)
        model = mulayer.load(artifact)
        add(label, lambda x, m=model: next(iter(m(x).values())))
    if "ort_int8" in systems:
        quantized = ort_static_int8(model_path, calibration["input"], workdir / f"{name}-int8.onnx")
        add("onnxruntime static int8", ort_runner(quantized))
    return rows


def main(argv: list[str] | None = None) -> int:
    from mulayer.models.pretrained import PRETRAINED_MODELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(PRETRAINED_MODELS))
    parser.add_argument("--gpu-target", default="llvm", help="GPU side target (default llvm)")
    parser.add_argument("--out", type=Path, default=Path("accuracy-results"))
    parser.add_argument(
        "--views", type=int, default=50, help="augmented views per test photo (0: none)"
    )
    parser.add_argument(
        "--systems",
        nargs="+",
        choices=["int8", "ratio0.5", "ort_int8"],
        default=["int8", "ratio0.5", "ort_int8"],
        help="systems to score besides fp32",
    )
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += evaluate(name, args.gpu_target, Path(tmp), args.views, args.systems)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"date": date.today().isoformat(), "command": " ".join(sys.argv)}
    (args.out / "accuracy.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(
        "\n| model | system | correct top-1 | top-1 = fp32 | top-5 overlap | SQNR dB "
        "| views: top-1 = fp32 | views: SQNR dB |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        views = (
            f"{r['views_top1_equal']}/{r['views']} | {r['views_sqnr_db']}"
            if "views_top1_equal" in r
            else "- | -"
        )
        print(
            f"| {r['model']} | {r['system']} | {r['correct_top1']}/{r['photos']} | "
            f"{r['top1_equal']}/{r['photos']} | {100 * r['top5_overlap']:.0f}% | "
            f"{r.get('sqnr_db', '-')} | {views} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
