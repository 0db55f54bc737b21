#!/usr/bin/env python3
"""Accuracy of int8/fp16 mulayer builds on real pretrained nets and bundled photos.

Compares, on the test photos (calibrating on the disjoint calibration photos), the fp32
onnxruntime reference with: mulayer CPU-only int8 (ratio 0), mulayer ratio 0.5 (GPU side fp16,
compiled for llvm unless --gpu-target is given), and onnxruntime static int8 (QDQ, per channel).
Needs the ``models`` extra.

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


def evaluate(name: str, gpu_target: str, workdir: Path) -> list[dict]:
    import mulayer
    from mulayer.models.accuracy import agreement, correct_top1
    from mulayer.models.pretrained import load_photos, save_pretrained

    model_path = workdir / f"{name}.onnx"
    save_pretrained(name, model_path)
    photos = load_photos()
    calibration = {"input": photos.calibration_batch()}
    reference = ort_runner(model_path)
    rows = [
        {
            "model": name,
            "system": "onnxruntime fp32 (reference)",
            "correct_top1": correct_top1(reference, photos.test, photos.labels),
            "top1_equal": len(photos.test),
            "top5_overlap": 1.0,
            "photos": len(photos.test),
        }
    ]

    def add(system: str, run) -> None:
        result = agreement(run, reference, photos.test)
        rows.append(
            {
                "model": name,
                "system": system,
                "correct_top1": correct_top1(run, photos.test, photos.labels),
                "top1_equal": result.top1_equal,
                "top5_overlap": result.top5_overlap,
                "photos": result.photos,
            }
        )
        print(f"{name:24s} {system:40s} {result.row()}", flush=True)

    for ratio, label in ((0.0, "mulayer CPU-only int8"), (0.5, "mulayer ratio 0.5 (fp16 | int8)")):
        compiled = mulayer.compile(
            str(model_path),
            target=f"mulayer -ratio={ratio}, {gpu_target}, llvm",
            calibration=calibration,
        )
        artifact = workdir / f"{name}-{ratio}.mulayer"
        compiled.export(artifact)
        model = mulayer.load(artifact)
        add(label, lambda x, m=model: next(iter(m(x).values())))
    quantized = ort_static_int8(model_path, calibration["input"], workdir / f"{name}-int8.onnx")
    add("onnxruntime static int8", ort_runner(quantized))
    return rows


def main(argv: list[str] | None = None) -> int:
    from mulayer.models.pretrained import PRETRAINED_MODELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(PRETRAINED_MODELS))
    parser.add_argument("--gpu-target", default="llvm", help="GPU side target (default llvm)")
    parser.add_argument("--out", type=Path, default=Path("accuracy-results"))
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += evaluate(name, args.gpu_target, Path(tmp))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"date": date.today().isoformat(), "command": " ".join(sys.argv)}
    (args.out / "accuracy.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print("\n| model | system | correct top-1 | top-1 = fp32 | top-5 overlap |")
    print("| --- | --- | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['model']} | {r['system']} | {r['correct_top1']}/{r['photos']} | "
            f"{r['top1_equal']}/{r['photos']} | {100 * r['top5_overlap']:.0f}% |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
