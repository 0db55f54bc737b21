"""The benchmarked models: ONNX files, calibration samples and, for the pretrained nets, photos."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


def default_models() -> tuple[str, ...]:
    """The six benchmark zoo models and the two pretrained ones."""
    from mulayer.models.pretrained import PRETRAINED_MODELS
    from mulayer.models.zoo import BENCHMARK_MODELS

    return (*BENCHMARK_MODELS, *PRETRAINED_MODELS)


@dataclass
class ModelEntry:
    """One benchmarked model: its ONNX file (made by a task if ``task``), calibration samples
    and, for the pretrained nets, the photos."""

    name: str
    path: Path
    calibration: Path | None  # .npy, (N, C, H, W) float32; None: no samples (no int8)
    task: str | None = None
    photos: object = None  # mulayer.models.pretrained.PhotoSet
    unavailable: str | None = None


def _with_mirrored(calibration: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each calibration photo followed by its mirrored copy, as ``load_photos()`` gives them
    (``make_models.py --for-bench`` leaves the copies out to halve the file)."""
    out = {}
    for name, image in calibration.items():
        out[name] = image
        if not name.endswith("-flip"):
            out[f"{name}-flip"] = calibration.get(
                f"{name}-flip", np.ascontiguousarray(image[..., ::-1])
            )
    return out


def prepare_models(names: list[str], real_dir: Path | None, work: Path, samples: int):
    """ModelEntry per name; zoo ONNX files and missing pretrained exports become tasks."""
    from mulayer.models import pretrained, zoo

    entries = []
    for name in names:
        calibration = work / f"{name}.calibration.npy"
        if name in zoo.MODEL_NAMES:
            shape = zoo.get_model_info(name).input_shape
            if samples > 0:
                x = np.random.default_rng(1).standard_normal((samples, *shape[1:]))
                np.save(calibration, x.astype(np.float32))
            else:
                calibration = None
            entries.append(ModelEntry(name, work / f"{name}.onnx", calibration, f"onnx:{name}"))
            continue
        entry = ModelEntry(name, work / f"{name}.onnx", calibration)
        photos_file = None if real_dir is None else real_dir / "photos.npz"
        if real_dir is not None and (real_dir / f"{name}.onnx").is_file() and photos_file.is_file():
            entry.path = real_dir / f"{name}.onnx"
            entry.photos = pretrained.read_photos(photos_file)
            entry.photos.calibration = _with_mirrored(entry.photos.calibration)
        elif pretrained.models_extra_available():
            entry.task = f"onnx:{name}"
            entry.photos = pretrained.load_photos()
        else:
            where = "no --real-dir" if real_dir is None else f"not in {real_dir}"
            entry.unavailable = f"n/a: {name}.onnx, photos.npz {where}, no models extra"
        if entry.photos is not None:
            np.save(calibration, entry.photos.calibration_batch())
        entries.append(entry)
    return entries
