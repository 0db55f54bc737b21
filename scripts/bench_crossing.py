#!/usr/bin/env python3
"""Crossing copies one by one (issue 16): where a crossing's time goes, per size and direction.

Each row times one copy between a GPU tensor and a host buffer (median of ``--repeat``, each
followed by a device sync), these ways:

- ``pinned``: ``runtime.TVMTensorCopyFromTo`` on a page-aligned, page-locked host buffer (the
  reference issue 16 compares crossings with);
- ``crossing_aligned_async``: ``mulayer.crossing.copy`` as registered (the C copy of
  ``crossing_copy.c`` where it was built; called through the FFI as the VM calls it) on the same
  buffer: an asynchronous copy and a stream sync; ``crossing_aligned``: the same with
  ``MULAYER_CROSSING_SYNC_COPY=1`` (one synchronous copy);
- ``python_aligned``: the Python copy (:func:`mulayer.runtime.crossing.copy`, called through the
  FFI) on the same buffer: what the C copy saves;
- ``crossing_bounce``: the copy on a buffer that starts and ends inside pages, as 64-byte aligned
  planned buffers do (partial first and last pages through the bounce pages; Python);
- ``crossing_no_bounce``: the same buffer with ``MULAYER_CROSSING_BOUNCE=0`` (partial pages sent
  to the driver pageable).

    python scripts/bench_crossing.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

SIZES = (16 << 10, 64 << 10, 200_704, 802_816, 3 << 20)  # 802816: 64x56x56 fp32


def _timed(call, sync, repeat: int) -> float:
    samples = []
    for _ in range(repeat + 3):
        sync()
        start = time.perf_counter()
        call()
        sync()
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples[3:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES), help="bytes")
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("bench-crossing"))
    args = parser.parse_args(argv)

    import tvm
    from benchlib.host_buffers import page_locked
    from benchlib.host_buffers import ragged as ragged_buffer

    from mulayer.runtime import crossing

    gpu_dev = tvm.cuda(0)
    if not gpu_dev.exist:
        print("error: no CUDA GPU here", file=sys.stderr)
        return 2
    import tvm_ffi

    tvm_copy = tvm.get_global_func("runtime.TVMTensorCopyFromTo")
    ffi_copy = tvm.get_global_func(crossing.COPY_FUNC)
    python_copy = tvm_ffi.convert(crossing.copy)
    print(f"registered copy: {'C' if crossing.NATIVE else 'Python'}", flush=True)
    default_sync_last, default_bounce = crossing.SYNC_LAST, crossing.BOUNCE.enabled
    rows = []
    for size in args.sizes:
        gpu = tvm.runtime.empty((size,), "uint8", gpu_dev)  # the context current on this thread
        aligned = page_locked(size)
        ragged = ragged_buffer(size)
        for direction in ("d2h", "h2d"):
            pairs = {"aligned": (gpu, aligned), "ragged": (gpu, ragged)}
            if direction == "h2d":
                pairs = {k: (h, g) for k, (g, h) in pairs.items()}
            row = {"bytes": size, "direction": direction}
            src, dst = pairs["aligned"]
            row["pinned_us"] = _timed(
                lambda s=src, d=dst: tvm_copy(s, d), gpu_dev.sync, args.repeat
            )
            for label, sync_last in (
                ("crossing_aligned_us", True),
                ("crossing_aligned_async_us", False),
            ):
                crossing.set_sync_copy(sync_last)
                row[label] = _timed(
                    lambda s=src, d=dst: ffi_copy(s, 1, d), gpu_dev.sync, args.repeat
                )
            crossing.set_sync_copy(default_sync_last)
            row["python_aligned_us"] = _timed(
                lambda s=src, d=dst: python_copy(s, 1, d), gpu_dev.sync, args.repeat
            )
            src, dst = pairs["ragged"]
            for label, bounce in (("crossing_bounce_us", True), ("crossing_no_bounce_us", False)):
                crossing.set_bounce(bounce)
                row[label] = _timed(
                    lambda s=src, d=dst: ffi_copy(s, 1, d), gpu_dev.sync, args.repeat
                )
            crossing.set_bounce(default_bounce)
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "machine": {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join(["scripts/bench_crossing.py", *(argv or sys.argv[1:])]),
            "gpu": gpu_dev.device_name,
            "tvm": tvm.__version__,
            "registered_copy": "C" if crossing.NATIVE else "Python",
        },
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "crossing.json").write_text(json.dumps(result, indent=2))
    print(
        "| bytes | dir | pinned µs | crossing aligned, sync copy | aligned, async + sync "
        "| Python, aligned | ragged, bounce | ragged, no bounce |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['bytes']} | {r['direction']} | {r['pinned_us']:.1f} | "
            f"{r['crossing_aligned_us']:.1f} | {r['crossing_aligned_async_us']:.1f} | "
            f"{r['python_aligned_us']:.1f} | "
            f"{r['crossing_bounce_us']:.1f} | "
            f"{r['crossing_no_bounce_us']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
