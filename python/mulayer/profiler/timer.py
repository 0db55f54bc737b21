"""Timing: parts with the VM's ``time_evaluator``, transfers and syncs with tensor copies.

- A part is timed with ``time_evaluator`` on its device (``number`` chosen so that one repeat
  lasts ``min_repeat_ms``; the median of ``repeat`` repeats is kept); the first call is a
  warm-up. When the repeats disagree by more than ``max_spread`` the part is timed again (up to
  ``retries`` times) and the attempt with the lowest median is kept. GPU parts get their input
  on the GPU: the copy is a transfer row of its own.
- Transfers (local only), in a loop with ``sync``, for sizes of ``TRANSFER_SIZES``: "pageable",
  ``Tensor.copyfrom`` between a fresh host tensor and a device tensor (a caller's input or
  output); on CUDA also "pinned", the crossing function (``mulayer.crossing.copy``) on a
  page-aligned, page-locked buffer: what a crossing of a planned buffer costs. With an llvm
  "GPU" the copy is a memcpy between two CPU tensors; the truth on a shared-memory device is
  zero-copy (the cost model then treats transfers as free).
- Sync: an empty ``device.sync()``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import tvm

from .parts import PartInfo, random_args

# 4 KiB ... 16 MiB, powers of two.
TRANSFER_SIZES = tuple(1 << s for s in range(12, 25))
DIRECTIONS = ("h2d", "d2h")


@dataclass
class TimingConfig:
    """How long to time each thing."""

    repeat: int = 5
    min_repeat_ms: float = 20.0
    # A part slower than this per call is timed with 3 repeats of 1 call.
    slow_call_ms: float = 200.0
    # Repeats further apart than this (max / min) are timed again, up to `retries` times; the
    # attempt with the lowest median is kept (a busy machine disturbs some attempts only).
    max_spread: float = 1.5
    retries: int = 2


@dataclass
class Timing:
    median_us: float
    samples_us: list[float]
    number: int
    attempts: int = 1

    @property
    def spread(self) -> float:
        return max(self.samples_us) / max(min(self.samples_us), 1e-9)


def _vm(lib, device, cpu):
    from tvm import relax

    devices = [device] if device.dlpack_device_type() % 128 == 1 else [device, cpu]
    return relax.VirtualMachine(lib, devices)


def time_parts(session, library: str, processor: str, infos: dict[str, dict], cfg: TimingConfig):
    """Yield ``(part id, Timing | error message)`` for each part of a built library."""
    lib = session.load(library)
    dev = session.device(processor)
    vm = _vm(lib, dev, session.cpu())
    rng = np.random.default_rng(0)
    for part_id, raw in infos.items():
        info = PartInfo.from_json(raw)
        try:
            args = random_args(info.params, dev, rng)
            yield part_id, _time_function(vm, info.name, dev, args, cfg)
        except (RuntimeError, ValueError) as err:  # TVM errors derive from RuntimeError
            yield part_id, f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
        finally:
            args = None


def _time_function(vm, name: str, dev, args, cfg: TimingConfig) -> Timing:
    # Step 1. Warm up and estimate one call.
    probe = vm.time_evaluator(name, dev, number=1, repeat=1)(*args)
    per_call_ms = probe.mean * 1e3
    # Step 2. Time: enough calls per repeat to last min_repeat_ms.
    if per_call_ms >= cfg.slow_call_ms:
        number, repeat = 1, min(3, cfg.repeat)
    else:
        number = max(1, int(np.ceil(cfg.min_repeat_ms / max(per_call_ms, 1e-3))))
        repeat = cfg.repeat
    # Step 3. Again while the repeats disagree (another process took the cores).
    best = None
    for attempt in range(1 + max(0, cfg.retries)):
        result = vm.time_evaluator(name, dev, number=number, repeat=repeat)(*args)
        samples = [round(float(r) * 1e6, 3) for r in result.results]
        timing = Timing(statistics.median(samples), samples, number, attempt + 1)
        if best is None or timing.median_us < best.median_us:
            best = timing
        best.attempts = attempt + 1
        if timing.spread <= cfg.max_spread:
            break
    return best


def _loop_us(fn, sync, min_seconds: float, min_iters: int = 10) -> list[float]:
    """Per-iteration µs of ``fn(); sync()`` over 5 batches of about ``min_seconds`` / 5 each."""
    fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    one = max(time.perf_counter() - start, 1e-7)
    iters = max(min_iters, int(min_seconds / 5 / one))
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
            sync()
        samples.append((time.perf_counter() - start) / iters * 1e6)
    return samples


def _crossing_copy(src, dst) -> None:
    """What a crossing of a planned buffer runs (the registered copy, as the VM calls it; pin
    flag 2: page-aligned, locked)."""
    from mulayer.runtime import crossing

    tvm.get_global_func(crossing.COPY_FUNC)(src, crossing.PIN_WHOLE_PAGES, dst)


def _host_buffers(device, nbytes: int) -> dict:
    """``{memory: (host tensor, copy(src, dst))}``: "pageable", TVM's copy from or to a fresh
    host tensor; "pinned" (CUDA), the crossing function on a page-aligned, page-locked buffer:
    what the executor pays per crossing."""
    buffers = {"pageable": (tvm.runtime.empty((nbytes,), "uint8", tvm.cpu(0)), _tvm_copy)}
    if device.dlpack_device_type() == 2:  # kDLCUDA
        from mulayer.runtime import crossing

        locked = crossing.page_locked_host(nbytes)
        if locked is not None:
            buffers["pinned"] = (locked, _crossing_copy)
    return buffers


def _tvm_copy(src, dst) -> None:
    dst.copyfrom(src)


def time_transfers(device, sizes=TRANSFER_SIZES, min_seconds: float = 0.05):
    """Yield ``(direction, memory, nbytes, Timing)`` for host<->``device`` copies (local); see
    :func:`_host_buffers` for the memories."""
    for nbytes in sizes:
        dev_tensor = tvm.runtime.empty((nbytes,), "uint8", device)  # the context current
        for memory, (host, copy) in _host_buffers(device, nbytes).items():
            h2d = _loop_us(lambda h=host, d=dev_tensor, c=copy: c(h, d), device.sync, min_seconds)
            d2h = _loop_us(lambda h=host, d=dev_tensor, c=copy: c(d, h), device.sync, min_seconds)
            for direction, samples in (("h2d", h2d), ("d2h", d2h)):
                rounded = [round(s, 3) for s in samples]
                yield direction, memory, nbytes, Timing(statistics.median(samples), rounded, 0)


def time_sync(device, min_seconds: float = 0.05) -> Timing:
    samples = _loop_us(lambda: None, device.sync, min_seconds, min_iters=100)
    return Timing(statistics.median(samples), [round(s, 4) for s in samples], 0)
