"""mulayer's builds in the benchmark: the named variants and the ``--targets`` ones."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    """A mulayer build: ``target`` may name ``{gpu}``; ``role`` is cpu, gpu or coop; ``env``:
    environment variables its build sets (``(name, value)`` pairs)."""

    key: str
    label: str
    target: str
    role: str
    calibrated: bool = True
    env: tuple[tuple[str, str], ...] = ()


VARIANTS: dict[str, Variant] = {
    v.key: v
    for v in (
        Variant("cpu_int8", "mulayer CPU-only int8", "mulayer -ratio=0, llvm, llvm", "cpu"),
        Variant("gpu_fp16", "mulayer GPU-only fp16", "{gpu}, llvm", "gpu", calibrated=False),
        Variant(
            "gpu_fp16_nhwc",
            "mulayer GPU-only fp16, NHWC convs",
            "{gpu}, llvm",
            "gpu",
            calibrated=False,
            env=(("MULAYER_GPU_LAYOUT", "NHWC"),),
        ),
        Variant(
            "gpu_fp16_nchw",
            "mulayer GPU-only fp16, NCHW convs",
            "{gpu}, llvm",
            "gpu",
            calibrated=False,
            env=(("MULAYER_GPU_LAYOUT", "NCHW"),),
        ),
        Variant(
            "coop_auto", "mulayer cooperative auto", "mulayer -split=auto, {gpu}, llvm", "coop"
        ),
    )
}


def resolve_variants(names: list[str], targets: list[str], gpu: str) -> list[Variant]:
    """The named variants, then one per ``--targets`` entry (``NAME=TARGET`` or ``TARGET``)."""
    from mulayer.errors import MuLayerError
    from mulayer.target import parse_target

    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise MuLayerError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    chosen = [
        dataclasses.replace(VARIANTS[n], target=VARIANTS[n].target.format(gpu=gpu)) for n in names
    ]
    for entry in targets:
        # NAME=TARGET when the text before the first "=" is a plain name (a target such as
        # "mulayer -ratio=0.5, llvm, llvm" holds "=" too).
        key, equals, target = entry.partition("=")
        if not equals or not re.fullmatch(r"[A-Za-z_][\w.-]*", key):
            key, target = entry, entry
        spec = parse_target(target)
        role = spec.mode
        if spec.cooperative:
            role = "cpu" if spec.mulayer.ratio == 0 else "coop"
        label = f"mulayer {spec.mode}" if key == target else f"mulayer {key}"
        chosen.append(Variant(key, label, target, role, spec.cooperative))
    keys = [v.key for v in chosen]
    if len(set(keys)) != len(keys):
        raise MuLayerError(f"variant names must be unique, got {keys}")
    return chosen


def needs_cuda(target: str) -> bool:
    from mulayer.target import parse_target

    spec = parse_target(target)
    return spec.device is not None and spec.device["kind"] == "cuda"
