#!/usr/bin/env python3
"""Two builds of one model, kernel by kernel: every kernel of both timed alone, interleaved.

Takes two scheduled modules written by ``scripts/profile_cpu_int8.py --save-module`` (say one
by the parent commit, with that commit's package first on ``PYTHONPATH``, and one by this tree)
and times each kernel that ``main`` calls in both with ``time_evaluator`` on random arguments of
its call's shapes: rounds alternate the order of the two builds; per round the best of 3 means
of 20 calls; the median over rounds, times the calls in ``main``. Kernels match by name (the
fused functions of one model keep their names when only schedules change).

    TVM_NUM_THREADS=2 python scripts/compare_kernels_cpu_int8.py before.json after.json \\
        --rounds 5 --out kernels.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_cpu_int8 import kernel_args, kernel_calls, kind_of  # noqa: E402


def load(path: Path):
    """The module, its kernels' call counts and argument (shape, dtype) lists."""
    import tvm

    mod = tvm.ir.load_json(path.read_text())
    calls, shapes = kernel_calls(mod)
    return mod, calls, shapes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--top", type=int, default=15, help="largest changes to print")
    parser.add_argument("--out", type=Path, help="JSON results")
    args = parser.parse_args(argv)

    import tvm

    target = tvm.target.Target(args.before.with_suffix(".target").read_text())
    builds = [load(args.before), load(args.after)]
    names = [n for n in builds[0][1] if n in builds[1][1]]
    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    timers = {}
    for name in names:
        for i, (mod, _, shapes) in enumerate(builds):
            func = mod[name].with_attr("global_symbol", "main")
            lib = tvm.tirx.build(tvm.IRModule({"main": func}), target=target)
            tensors = kernel_args(shapes[name], rng, dev)
            timers[name, i] = (lib.time_evaluator("main", dev, number=20, repeat=3), tensors)
    times: dict[tuple[str, int], list[float]] = collections.defaultdict(list)
    for r in range(args.rounds):
        for name in names:
            for i in (0, 1) if r % 2 == 0 else (1, 0):
                timer, tensors = timers[name, i]
                times[name, i].append(1e3 * min(timer(*tensors).results))

    rows = []
    for name in names:
        calls, shapes = builds[0][1][name], builds[0][2][name]
        before, after = (float(np.median(times[name, i])) * calls for i in (0, 1))
        rows.append(
            {
                "kernel": name,
                "kind": kind_of(name, shapes),
                "calls": calls,
                "before_ms": round(before, 4),
                "after_ms": round(after, 4),
                "args": [f"{dtype}{dims}" for dims, dtype in shapes[:2]],
            }
        )
    by_kind: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for row in rows:
        by_kind[row["kind"]][0] += row["before_ms"]
        by_kind[row["kind"]][1] += row["after_ms"]
    total = [sum(v[i] for v in by_kind.values()) for i in (0, 1)]
    print(f"kernels summed: before {total[0]:.3f} ms, after {total[1]:.3f} ms")
    for kind, (before, after) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        print(f"  {kind:22s} {before:8.3f} -> {after:8.3f} ms")
    rows.sort(key=lambda r: -abs(r["before_ms"] - r["after_ms"]))
    for row in rows[: args.top]:
        print(
            f"  {row['before_ms']:8.3f} -> {row['after_ms']:8.3f} ms  x{row['calls']}"
            f"  {row['kind']:16s} {row['args']}"
        )
    if args.out is not None:
        meta = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "before": str(args.before),
            "after": str(args.after),
            "target": str(target),
            "tvm_num_threads": os.environ.get("TVM_NUM_THREADS"),
            "rounds": args.rounds,
            "load_average": [round(v, 2) for v in os.getloadavg()],
        }
        summary = {k: [round(v[0], 3), round(v[1], 3)] for k, v in by_kind.items()}
        result = {
            "meta": meta,
            "total_ms": [round(t, 3) for t in total],
            "by_kind_ms": summary,
            "kernels": rows,
        }
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
