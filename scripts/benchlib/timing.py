"""Timing and checking helpers the benchmark scripts share."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def time_ms(step: Callable[[], object], repeat: int, warmup: int):
    """Median (and spread) of ``repeat`` wall-clock calls of ``step`` after ``warmup`` calls."""
    from mulayer.runtime.executor import Timing

    for _ in range(warmup):
        step()
    samples = []
    for _ in range(repeat):
        begin = time.perf_counter()
        step()
        samples.append((time.perf_counter() - begin) * 1e3)
    return Timing.from_samples(samples)


def timing_fields(timing) -> dict:
    return {
        "median_ms": timing.median_ms,
        "p90_ms": timing.p90_ms,
        "min_ms": timing.min_ms,
        "runs": timing.runs,
    }


def sqnr_db(out: np.ndarray, reference: np.ndarray) -> float | None:
    """Signal-to-noise ratio of ``out`` against ``reference`` in dB (None: identical)."""
    noise = float(((np.asarray(out, dtype=np.float64) - reference) ** 2).sum())
    signal = float((np.asarray(reference, dtype=np.float64) ** 2).sum())
    return None if noise == 0 else 10 * float(np.log10(signal / noise))


def error_text(err: BaseException) -> str:
    """One line for a failed row: the exception type and the last line of its message (TVM
    errors put the message last, after a C++ backtrace)."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"[:300]
