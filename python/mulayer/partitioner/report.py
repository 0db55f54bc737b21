"""Per-layer plan reports: decisions, predicted and measured times, and a PNG of them.

Used by ``mulayer inspect ARTIFACT --plan [--measure] [--plot plan.png]``. Measured per-layer
times come from traced inferences (:meth:`mulayer.runtime.executor.LoadedModel.trace`): the kernels
of a layer's parts (the op, its epilogues, casts, quantize steps, input slices and the join) summed
per side, the slower side taken, the median over the traced runs. Copies and waits are not in a
layer's measured time (they are in the end-to-end figure); the VM instrument adds a few µs per
kernel, so small layers read high.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import MuLayerError
from ..plan import Plan


@dataclass
class LayerRow:
    """One line of ``inspect --plan``."""

    name: str
    kind: str
    out_channels: int
    placement: str
    gpu_channels: int
    predicted_ms: float | None
    measured_ms: float | None = None
    measured_gpu_ms: float | None = None
    measured_cpu_ms: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


def plan_rows(plan: Plan, layers: list[dict]) -> list[LayerRow]:
    """A row per layer of the artifact's layer table (``metadata["layers"]``)."""
    rows = []
    for layer in layers:
        channels = int(layer["output_shape"][1])
        gpu = plan.gpu_size(layer["name"], channels)
        placement = {0: "cpu", channels: "gpu"}.get(gpu, "split")
        decision = plan.layers.get(layer["name"])
        predicted = decision.predicted_ms if decision is not None else None
        rows.append(LayerRow(layer["name"], layer["kind"], channels, placement, gpu, predicted))
    return rows


def measured_layer_ms(traces: list[dict]) -> dict[str, dict[str, float]]:
    """``{layer: {"gpu": ms, "cpu": ms}}``: median over ``traces`` (Chrome trace dicts)."""
    from ..passes.common import join_of, part_role
    from ..runtime.trace import TRACKS

    track_of = {tid: name for name, (tid, _label) in TRACKS.items()}
    samples: dict[tuple[str, str], list[float]] = {}
    for trace in traces:
        events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
        has_device = any(track_of.get(e.get("tid")) == "gpu" for e in events)
        sums: dict[tuple[str, str], float] = {}
        for event in events:
            track = track_of.get(event.get("tid"))
            if track == "cpu":
                side = "cpu"
            elif track == ("gpu" if has_device else "launch"):
                side = "gpu"
            else:
                continue
            role = part_role(event["name"])
            layer = role[0] if role is not None else join_of(event["name"])
            if layer is None:
                continue
            key = (layer, side)
            sums[key] = sums.get(key, 0.0) + float(event.get("dur", 0.0)) / 1e3
        for key, value in sums.items():
            samples.setdefault(key, []).append(value)
    result: dict[str, dict[str, float]] = {}
    for (layer, side), values in samples.items():
        # A side that ran in only some traces counts 0 in the others.
        values = values + [0.0] * (len(traces) - len(values))
        result.setdefault(layer, {})[side] = statistics.median(values)
    return result


def add_measurements(rows: list[LayerRow], measured: dict[str, dict[str, float]]) -> None:
    for row in rows:
        sides = measured.get(row.name)
        if sides is None:
            continue
        row.measured_gpu_ms = sides.get("gpu", 0.0)
        row.measured_cpu_ms = sides.get("cpu", 0.0)
        row.measured_ms = max(row.measured_gpu_ms, row.measured_cpu_ms)


def plot_plan(rows: list[LayerRow], path: str | Path, title: str) -> None:
    """Write a PNG: the GPU/CPU channel split per layer (top) and per-layer times (bottom)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MuLayerError(
            "--plot needs matplotlib: pip install 'mulayer[plot]' (or pip install matplotlib)"
        ) from None
    from ..fileio import atomic_write, check_output_path

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise MuLayerError(f"--plot {str(path)!r}: give a .png file name")
    check_output_path(path)
    x = list(range(len(rows)))
    width = max(8.0, 0.18 * len(rows) + 2)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(width, 6.5), sharex=True)
    gpu = [r.gpu_channels / r.out_channels if r.out_channels else 0 for r in rows]
    top.bar(x, gpu, color="tab:green", label="GPU channels")
    top.bar(x, [1 - g for g in gpu], bottom=gpu, color="tab:blue", label="CPU channels")
    top.set_ylabel("share of output channels")
    top.set_ylim(0, 1)
    top.legend(loc="upper right", fontsize=8)
    top.set_title(title, fontsize=10)
    predicted = [r.predicted_ms or 0.0 for r in rows]
    if any(r.measured_ms is not None for r in rows):
        measured = [r.measured_ms or 0.0 for r in rows]
        bottom.bar([i - 0.2 for i in x], predicted, width=0.4, label="predicted", color="0.6")
        bottom.bar([i + 0.2 for i in x], measured, width=0.4, label="measured", color="tab:red")
    else:
        bottom.bar(x, predicted, label="predicted", color="0.6")
    bottom.set_ylabel("ms per layer")
    bottom.legend(loc="upper right", fontsize=8)
    bottom.set_xticks(x)
    bottom.set_xticklabels([r.name for r in rows], rotation=90, fontsize=6)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
