"""Top-1 / top-5 agreement of a compiled model with the fp32 reference on real photos.

Used by ``scripts/eval_accuracy.py`` and the ``models`` tests (needs the ``models`` extra).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Agreement:
    """How often a model's predictions agree with the fp32 reference's."""

    top1_equal: int
    top5_overlap: float  # mean share of the reference top-5 found in the model's top-5
    photos: int

    def row(self) -> str:
        return f"{self.top1_equal}/{self.photos} top-1, {100 * self.top5_overlap:.0f}% top-5"


def top_k(logits: np.ndarray, k: int) -> list[int]:
    return [int(i) for i in np.argsort(-logits.reshape(-1))[:k]]


def agreement(run, reference, photos: dict[str, np.ndarray]) -> Agreement:
    """Compare ``run(x) -> logits`` with ``reference(x) -> logits`` on every photo."""
    equal, overlap = 0, 0.0
    for image in photos.values():
        ours, ref = run(image), reference(image)
        equal += top_k(ours, 1) == top_k(ref, 1)
        overlap += len(set(top_k(ours, 5)) & set(top_k(ref, 5))) / 5
    return Agreement(equal, overlap / len(photos), len(photos))


def correct_top1(run, photos: dict[str, np.ndarray], labels: dict[str, tuple[int, ...]]) -> int:
    """Photos whose top-1 class is one of their accepted labels."""
    return sum(top_k(run(photos[name]), 1)[0] in labels[name] for name in photos)


def output_sqnr_db(run, reference, inputs: dict[str, np.ndarray]) -> float:
    """SQNR in dB of ``run``'s outputs against ``reference``'s over all ``inputs`` (total
    signal energy / total error energy, float64); inf when they agree exactly."""
    signal = noise = 0.0
    for x in inputs.values():
        ref = np.asarray(reference(x), dtype=np.float64)
        err = np.asarray(run(x), dtype=np.float64) - ref
        signal += float((ref**2).sum())
        noise += float((err**2).sum())
    return float("inf") if noise == 0 else float(10 * np.log10(signal / noise))
