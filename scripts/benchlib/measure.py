"""One model's rows: each system checked against onnxruntime fp32, then timed, one at a time.

mulayer's builds are measured here; the peers in :mod:`.peers`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .models import ModelEntry
from .timing import error_text, sqnr_db, timing_fields
from .variants import Variant, needs_cuda

INPUT_NAME = "input"


@dataclass
class Context:
    """What every measurement of one model shares."""

    entry: ModelEntry
    x: np.ndarray
    reference: np.ndarray
    session: object  # onnxruntime fp32 session: the reference
    repeat: int
    warmup: int
    rows: list[dict] = field(default_factory=list)

    def reference_logits(self, image: np.ndarray) -> np.ndarray:
        return self.session.run(None, {INPUT_NAME: image})[0]


def add_row(ctx: Context, key: str, system: str, role: str, target: str, **fields) -> dict:
    row = {
        "model": ctx.entry.name,
        "key": key,
        "system": system,
        "role": role,
        "target": target,
        "status": "ok",
        **fields,
    }
    ctx.rows.append(row)
    return row


def quality_fields(ctx: Context, predict: Callable[[np.ndarray], np.ndarray]) -> dict:
    """Error against fp32 on the random input; on the photos, top-1 agreement with fp32."""
    from mulayer.models.reference import max_rel_error

    out = np.asarray(predict(ctx.x), dtype=np.float64)
    quality = {
        "rel_error": max_rel_error(out, ctx.reference),
        "sqnr_db": sqnr_db(out, ctx.reference),
    }
    photos = ctx.entry.photos
    if photos is not None:
        from mulayer.models.accuracy import agreement, correct_top1

        result = agreement(predict, ctx.reference_logits, photos.test)
        quality.update(
            top1_equal=result.top1_equal,
            top5_overlap=result.top5_overlap,
            photos=result.photos,
            correct_top1=correct_top1(predict, photos.test, photos.labels),
        )
    return quality


def placements(metadata: dict) -> dict | None:
    decisions = metadata.get("precision")
    if not decisions:
        return None
    counts: dict[str, int] = {}
    for decision in decisions.values():
        kind = str(decision.get("placement", "?")).split()[0]
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def measure_variant(ctx: Context, v: Variant, builds: dict[str, dict], has_cuda: bool) -> None:
    """Load, check and time one mulayer build (or record why there is none)."""
    import mulayer

    def row(**fields) -> None:
        add_row(ctx, v.key, v.label, v.role, v.target, **fields)

    build = builds.get(f"build:{ctx.entry.name}:{v.key}", {"error": "not built"})
    if needs_cuda(v.target) and not has_cuda:
        row(status="n/a", note="n/a: no CUDA", build_s=None)
        return
    if "error" in build:
        row(status="failed", note=f"failed: {build['error']}", build_s=None)
        return
    times = {"build_s": build["build_s"]}
    if v.calibrated and f"calibrate:{ctx.entry.name}" in builds:
        times["calibration_s"] = builds[f"calibrate:{ctx.entry.name}"]["seconds"]
    try:
        begin = time.perf_counter()
        model = mulayer.load(build["artifact"])
        times["load_s"] = time.perf_counter() - begin
        timing = model.benchmark({INPUT_NAME: ctx.x}, repeat=ctx.repeat, warmup=ctx.warmup)
        quality = quality_fields(ctx, lambda image: next(iter(model({INPUT_NAME: image}).values())))
    except Exception as err:  # a benchmark reports a failed run and goes on
        row(status="failed", note=f"failed: {error_text(err)}", **times)
        return
    row(placements=placements(model.metadata), **times, **timing_fields(timing), **quality)
