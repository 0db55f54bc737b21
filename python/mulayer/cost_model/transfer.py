"""Transfer and sync costs: a line per copy direction, fitted on the profiled copy sizes.

A copy costs a fixed latency plus bytes over bandwidth: ``t = a + b * nbytes``, fitted to
relative error (weights ``1/t``) so 4 KiB copies count as much as 16 MiB ones. That is the
physics of a DMA transfer, so a line beats trees here (and extrapolates past 16 MiB).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DIRECTIONS = ("h2d", "d2h")
MEMORIES = ("pageable", "pinned")
# "auto": "pinned" where the profile has pinned rows (the crossing function on page-locked
# buffers: what the executor pays for a planned buffer's crossing), else "pageable".
MEMORY_CHOICES = ("auto", *MEMORIES)


def chosen_memory(transfer_rows: list[dict], memory: str) -> str:
    """The host memory whose copy lines to fit (``memory`` unless it is "auto")."""
    if memory != "auto":
        return memory
    return "pinned" if any(r["memory"] == "pinned" for r in transfer_rows) else "pageable"


@dataclass
class TransferModel:
    """``{direction: [latency_us, us_per_byte]}`` for one host memory kind, and the sync."""

    memory: str = "pageable"
    lines: dict[str, list[float]] = field(default_factory=dict)
    sync_us: float = 0.0

    def time_us(self, nbytes: int, direction: str) -> float:
        a, b = self.lines.get(direction, (0.0, 0.0))
        return float(a + b * nbytes)

    def to_json(self) -> dict:
        return {"memory": self.memory, "lines": self.lines, "sync_us": self.sync_us}

    @classmethod
    def from_json(cls, raw: dict) -> TransferModel:
        return cls(raw["memory"], {k: list(v) for k, v in raw["lines"].items()}, raw["sync_us"])


def fit_line(nbytes: np.ndarray, latency_us: np.ndarray) -> list[float]:
    """Non-negative ``[a, b]`` of ``t = a + b n``, least squares on relative error."""
    x = np.stack([np.ones_like(nbytes, dtype=np.float64), nbytes.astype(np.float64)], axis=1)
    w = 1.0 / latency_us
    coef, *_ = np.linalg.lstsq(x * w[:, None], latency_us * w, rcond=None)
    if coef[0] < 0:  # no fixed cost: refit the slope alone
        coef = [0.0, float(np.sum(nbytes * latency_us * w * w) / np.sum((nbytes * w) ** 2))]
    return [float(max(c, 0.0)) for c in coef]


def fit_transfers(transfer_rows: list[dict], sync_rows: list[dict], memory: str) -> TransferModel:
    """Fit :class:`TransferModel` on ``transfer`` rows of host memory ``memory``."""
    lines = {}
    for direction in DIRECTIONS:
        rows = [r for r in transfer_rows if r["direction"] == direction and r["memory"] == memory]
        if len(rows) >= 2:
            n = np.array([r["nbytes"] for r in rows], dtype=np.float64)
            t = np.array([r["latency_us"] for r in rows], dtype=np.float64)
            lines[direction] = fit_line(n, t)
    sync = float(np.median([r["latency_us"] for r in sync_rows])) if sync_rows else 0.0
    return TransferModel(memory, lines, sync)
