"""The results of a benchmark run: ``bench.json``, ``bench.md`` and one chart per model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from .peers import PEERS

SCHEMA_VERSION = 1


def _best(rows: list[dict], keep: Callable[[dict], bool]) -> dict | None:
    ok = [r for r in rows if r["status"] == "ok" and keep(r)]
    return min(ok, key=lambda r: r["median_ms"]) if ok else None


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Per model, the issue's goals: GPU-only vs the best PyTorch graph peer, CPU-only vs the
    best onnxruntime, cooperative vs mulayer's best single processor (≤ 1.02x)."""
    summary = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        gpu = _best(mine, lambda r: r["role"] == "gpu")
        cpu = _best(mine, lambda r: r["role"] == "cpu")
        coop = _best(mine, lambda r: r["role"] == "coop")
        torch_best = _best(mine, lambda r: r["key"] in PEERS and PEERS[r["key"]].graph)
        ort_best = _best(mine, lambda r: r["key"] in ("ort_fp32", "ort_int8"))
        single = _best(mine, lambda r: r["role"] in ("cpu", "gpu"))

        def ratio(a, b):
            return None if a is None or b is None else a["median_ms"] / b["median_ms"]

        def keys(a, b):
            return None if a is None or b is None else f"{a['key']} vs {b['key']}"

        entry = {
            "gpu_vs_torch_graph": ratio(gpu, torch_best),
            "gpu_compared": keys(gpu, torch_best),
            "cpu_vs_onnxruntime": ratio(cpu, ort_best),
            "cpu_compared": keys(cpu, ort_best),
            "coop_vs_best_single": ratio(coop, single),
            "coop_compared": keys(coop, single),
        }
        for row in mine:
            if row["role"] == "coop" and row["status"] == "ok" and single is not None:
                row["vs_best_single"] = row["median_ms"] / single["median_ms"]
        summary[model] = entry
    return summary


def fmt(value, spec: str, empty: str = "") -> str:
    return empty if value is None else format(value, spec)


def _build_cell(r: dict) -> str:
    cell = fmt(r.get("build_s"), ".1f")
    if r.get("calibration_s") is not None:
        cell += f" (+{r['calibration_s']:.0f} calibration)"
    return cell


def _accuracy_cell(r: dict) -> str:
    if r.get("photos"):
        return f"{r['top1_equal']}/{r['photos']} ({r['correct_top1']}/{r['photos']} correct)"
    return ""


def markdown(rows: list[dict], summary: dict[str, dict]) -> str:
    lines = [
        "| model | system | target | median ms | p90 ms | build s | top-1 = fp32 (photos) "
        "| SQNR dB vs fp32 | notes |",
        "| --- | --- | --- | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for r in rows:
        notes = r.get("note", "")
        if r.get("vs_best_single") is not None:
            notes = f"{r['vs_best_single']:.2f}x mulayer's best single processor"
        if r.get("placements"):
            layers = ", ".join(f"{n} {k}" for k, n in sorted(r["placements"].items()))
            notes = f"{notes}; layers: {layers}" if notes else f"layers: {layers}"
        target = f"`{r['target']}`" if r["target"] else ""
        sqnr = r.get("sqnr_db")
        sqnr_cell = "exact" if r["status"] == "ok" and sqnr is None else fmt(sqnr, ".1f")
        lines.append(
            f"| {r['model']} | {r['system']} | {target} | {fmt(r.get('median_ms'), '.3f')} "
            f"| {fmt(r.get('p90_ms'), '.3f')} | {_build_cell(r)} "
            f"| {_accuracy_cell(r)} | {sqnr_cell} | {notes} |"
        )
    lines += [
        "",
        "| model | GPU-only / best PyTorch graph (≤ 1) | CPU-only / best onnxruntime (≤ 1) "
        "| cooperative / best single (≤ 1.02) |",
        "| --- | ---: | ---: | ---: |",
    ]

    def goal(value, limit: float, compared: str | None) -> str:
        if value is None:
            return "n/a"
        return f"{value:.2f}x ({'met' if value <= limit else 'not met'}: {compared})"

    for model, s in summary.items():
        lines.append(
            f"| {model} | {goal(s['gpu_vs_torch_graph'], 1.0, s['gpu_compared'])} "
            f"| {goal(s['cpu_vs_onnxruntime'], 1.0, s['cpu_compared'])} "
            f"| {goal(s['coop_vs_best_single'], 1.02, s['coop_compared'])} |"
        )
    return "\n".join(lines) + "\n"


# mulayer by role (blue, green, purple), peers by processor (orange, red).
_COLOURS = {"cpu": "#1f77b4", "gpu": "#2ca02c", "coop": "#9467bd"}
_PEER_COLOURS = {"cpu": "#ff7f0e", "gpu": "#d62728"}


def plot_model(rows: list[dict], model: str, path: Path) -> bool:
    """A horizontal bar chart of one model's median latencies; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    from mulayer.fileio import atomic_write

    mine = [r for r in rows if r["model"] == model]
    ok = [r for r in reversed(mine) if r["status"] == "ok"]
    missing = [f"{r['system']}: {r['status']}" for r in mine if r["status"] != "ok"]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(ok) + 1.5 + 0.2 * len(missing)))
    colours = [
        _COLOURS[r["role"]] if r["role"] in _COLOURS else _PEER_COLOURS[PEERS[r["key"]].processor]
        for r in ok
    ]
    values = [r["median_ms"] for r in ok]
    bars = ax.barh([r["system"] for r in ok], values, color=colours)
    if values and max(values) / min(values) > 20:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlim(min(values) / 1.5, max(values) * 3)
    elif values:
        ax.set_xlim(0, max(values) * 1.2)
    for bar, value in zip(bars, values, strict=True):
        ax.text(value, bar.get_y() + bar.get_height() / 2, f" {value:.3f}", va="center", fontsize=8)
    xlabel = "median latency, ms (batch 1; lower is better)"
    ax.set_xlabel("\n".join([xlabel, *missing]), fontsize=8)
    ax.set_title(model)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return True


def write_results(
    out: Path, machine: dict | list, settings: dict, rows: list[dict], plot: bool, models: list[str]
) -> None:
    """Rewrite bench.json and bench.md (and the charts of ``models``) under ``out``."""
    from mulayer.fileio import atomic_write_text

    summary = summarize(rows)
    document = {
        "schema_version": SCHEMA_VERSION,
        "machine": machine,
        "settings": settings,
        "rows": rows,
        "summary": summary,
    }
    atomic_write_text(out / "bench.json", json.dumps(document, indent=1, default=str))
    machines = machine if isinstance(machine, list) else [machine]
    header = "\n".join(
        f"- {m['date']}: {m['cpu']} ({m['cores']} cores, TVM_NUM_THREADS={m['tvm_num_threads']}), "
        f"GPU {m['gpu']}; TVM {m['tvm']}, onnxruntime {m['onnxruntime']}, torch {m['torch']}, "
        f"mulayer {m['git_commit']}; `{m['command']}`"
        for m in machines
    )
    atomic_write_text(out / "bench.md", f"{header}\n\n{markdown(rows, summary)}")
    if plot:
        for model in models:
            if not plot_model(rows, model, out / f"bench_{model}.png"):
                print("matplotlib is not installed: no charts", flush=True)
                return
