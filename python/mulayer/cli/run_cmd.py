"""``mulayer run OUT (--inputs in.npz | --random) [--output out.npz] [--repeat N] [--json]``."""

from __future__ import annotations

import argparse
import warnings
import zipfile
from pathlib import Path

import numpy as np

from ..errors import MuLayerError
from ..fileio import atomic_write, check_output_path
from ..runtime.fallback import FALLBACKS
from .output import print_json, print_table

EXAMPLE = """example:
  mulayer run resnet18.mulayer --random --repeat 100
  mulayer run model.mulayer --inputs x.npz --output y.npz --json
  mulayer run gpu-model.mulayer --random --fallback cpu
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a compiled artifact and report its latency",
        description="Run an artifact on given or random inputs; print the median latency.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("artifact", help="artifact written by mulayer compile")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--inputs", help=".npz with one array per model input (by name)")
    source.add_argument("--random", action="store_true", help="random normal inputs")
    parser.add_argument("--seed", type=int, default=0, help="seed for --random (default 0)")
    parser.add_argument("--output", help="write the outputs to this .npz")
    parser.add_argument("--repeat", type=int, default=20, help="timed runs (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    parser.add_argument(
        "--fallback",
        choices=FALLBACKS,
        help="where a device the artifact needs is missing, run its CPU fallback library "
        "(built by `mulayer compile --fallback cpu`) instead of failing",
    )
    parser.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="run inputs holding NaN or Inf (by default they are refused)",
    )
    parser.add_argument(
        "--trace",
        metavar="TRACE.json",
        help="also trace one call: Chrome/Perfetto JSON with a track per processor and copy "
        "direction (open in ui.perfetto.dev or chrome://tracing)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON object")
    parser.set_defaults(handler=run)


def load_npz_inputs(path: str) -> dict[str, np.ndarray]:
    """Read a .npz of inputs keyed by input name."""
    file = Path(path)
    if not file.is_file():
        raise MuLayerError(f"inputs file {path!r} does not exist")
    if not zipfile.is_zipfile(file):
        raise MuLayerError(
            f"inputs file {path!r} is not a .npz archive; write one with "
            "numpy.savez(path, input_name=array)"
        )
    try:
        with np.load(file, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (ValueError, OSError) as err:
        raise MuLayerError(f"inputs file {path!r} is not a readable .npz: {err}") from None


def nonfinite(arrays: dict[str, np.ndarray]) -> dict[str, int]:
    """``{name: count}`` of NaN/Inf values in the floating-point arrays that hold any."""
    counts = {}
    for name, array in arrays.items():
        array = np.asarray(array)
        if np.issubdtype(array.dtype, np.floating):
            count = int(array.size - np.count_nonzero(np.isfinite(array)))
            if count:
                counts[name] = count
    return counts


def _describe(counts: dict[str, int], arrays: dict[str, np.ndarray]) -> str:
    return ", ".join(
        f"{name!r} ({n} of {np.asarray(arrays[name]).size})" for name, n in counts.items()
    )


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    atomic_write(path, write)


def run(args: argparse.Namespace) -> int:
    from ..runtime.loader import load_artifact

    if args.repeat < 1:
        raise MuLayerError(f"--repeat must be at least 1, got {args.repeat}")
    if args.warmup < 0:
        raise MuLayerError(f"--warmup must be 0 or more, got {args.warmup}")
    if args.output:
        check_output_path(Path(args.output))
    if args.trace:
        check_output_path(Path(args.trace))
    model = load_artifact(args.artifact, fallback=args.fallback)
    inputs = model.random_inputs(args.seed) if args.random else load_npz_inputs(args.inputs)
    bad = nonfinite(inputs)
    if bad and not args.allow_nonfinite:
        raise MuLayerError(
            f"NaN or Inf values in input(s) {_describe(bad, inputs)}; fix the inputs, or pass "
            "--allow-nonfinite to run them anyway"
        )
    if bad:
        warnings.warn(
            f"running NaN or Inf values in input(s) {_describe(bad, inputs)}: what the model "
            "computes from them is unspecified (TVM's max pooling and ReLU may turn a NaN into "
            "a finite value where onnxruntime propagates it)",
            stacklevel=1,
        )
    outputs = model.run(inputs)
    bad_out = nonfinite(outputs)
    if bad_out:  # from finite inputs: an overflow (fp16 parts) or a bad model
        warnings.warn(f"NaN or Inf values in output(s) {_describe(bad_out, outputs)}", stacklevel=1)
    timing = model.benchmark(inputs, repeat=args.repeat, warmup=args.warmup)
    if args.output:
        save_npz(Path(args.output), outputs)
    summary = None
    if args.trace:
        from ..runtime.trace import write_trace

        trace, summary = model.trace(inputs)
        write_trace(args.trace, trace)
    result = {
        "artifact": args.artifact,
        "mode": model.mode,
        "fallback_used": model.metadata.get("fallback_used"),
        "median_ms": timing.median_ms,
        "mean_ms": timing.mean_ms,
        "min_ms": timing.min_ms,
        "p90_ms": timing.p90_ms,
        "runs": timing.runs,
        "outputs": [
            {"name": name, "shape": list(value.shape), "dtype": str(value.dtype)}
            for name, value in outputs.items()
        ],
    }
    if summary is not None:
        result["trace"] = {"path": args.trace, **summary.to_json()}
    if args.json:
        print_json(result)
        return 0
    rows = [
        [name, list(value.shape), str(value.dtype), float(value.min()), float(value.max())]
        for name, value in outputs.items()
    ]
    print_table(["output", "shape", "dtype", "min", "max"], rows)
    print(
        f"\n{model.mode}: median {timing.median_ms:.3f} ms over {timing.runs} runs "
        f"(min {timing.min_ms:.3f}, p90 {timing.p90_ms:.3f})"
    )
    if args.output:
        print(f"wrote {args.output}")
    if summary is not None:
        k = summary.kernel_us
        print(
            f"wrote {args.trace}: kernels GPU {k['gpu']:.0f} µs, CPU {k['cpu']:.0f} µs, "
            f"copies {sum(summary.copy_us.values()):.0f} µs, "
            f"{summary.cpu_overlapped_fraction:.0%} of CPU time overlapped with GPU work"
        )
    return 0
