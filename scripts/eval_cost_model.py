#!/usr/bin/env python3
"""Held-out evaluation of the cost model against the µLayer and Neurosurgeon baselines.

Trains on all profiled models but one and predicts the held-out model's layer parts, for every
model in turn (layer shapes the held-out model shares with others are left out of training
unless ``--shared include``). Prints, per processor, the share of predictions within ±10% of the
measurement and the MAPE, for XGBoost and both baselines side by side; ``--json`` prints the same
keyed by predictor (``xgboost``, ``flops_linear``, ``neurosurgeon``) plus ``measurement``: the
share of single timing repeats within ±10% of their part's latency and the repeats' spread, the
noise ceiling no predictor can beat by much; ``crossing``: the leave-one-size-out error of the
copy lines and the sync's spread; ``kernel_rules``: how often the features' mirror of the
schedule rules names the rule the profile recorded; ``xgboost_breakdown``: XGBoost's accuracy
per schedule rule, per latency bucket and per epilogue (relu6, relu, bias, none; with the
median predicted/measured ratio: where the residual error is). ``--prior`` chooses
how XGBoost uses the roofline prior (margin, feature, none). ``--plot`` writes a
predicted-vs-measured scatter plot (needs matplotlib: ``pip install -e ".[plot]"``).

    python scripts/eval_cost_model.py data/profile-h100.jsonl --plot docs/cost-model.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mulayer.cost_model import PREDICTORS, XGBoostConfig, profile_data
from mulayer.cost_model.data import STATISTICS
from mulayer.cost_model.evaluate import (
    SHARED,
    EvalReport,
    holdout_eval,
    repeatability,
    rule_agreement,
    transfer_eval,
)
from mulayer.cost_model.predictors import PRIOR_USES
from mulayer.errors import MuLayerError
from mulayer.profiler import read_many


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profiles", nargs="+", help="profile data (JSONL) of mulayer profile")
    parser.add_argument("--profile-id", help="the profile to use when the data holds several")
    parser.add_argument(
        "--predictors",
        default=",".join(PREDICTORS),
        help=f"comma-separated predictors (default: {','.join(PREDICTORS)})",
    )
    parser.add_argument(
        "--shared",
        choices=SHARED,
        default="exclude",
        help="train on layer shapes the held-out model shares with others (default: exclude)",
    )
    parser.add_argument(
        "--statistic",
        choices=STATISTICS,
        default="median",
        help="latency of a part from its repeats: median (default) or min (busy machines)",
    )
    parser.add_argument(
        "--prior",
        choices=PRIOR_USES,
        default=XGBoostConfig().prior,
        help="how XGBoost uses the roofline prior: fit the trees to log(measured / prior) "
        f"(margin), give it as a feature, or none (default: {XGBoostConfig().prior})",
    )
    parser.add_argument("--tolerance", type=float, default=0.10, help="relative tolerance")
    parser.add_argument("--per-model", action="store_true", help="also print each held-out model")
    parser.add_argument("--plot", type=Path, help="write a predicted-vs-measured scatter (PNG)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    return parser.parse_args(argv)


def table(metrics: dict, tolerance: float, title: str = "") -> str:
    """Processors down, predictors across: share within tolerance and MAPE."""
    names = list(metrics)
    groups = list(dict.fromkeys(g for m in metrics.values() for g in m))
    pct = f"±{tolerance * 100:g}%"
    head = ["processor", "n"] + [f"{n} {col}" for n in names for col in (pct, "MAPE")]
    rows = []
    for group in groups:
        first = next(m[group] for m in metrics.values() if group in m)
        row = [group, str(first["n"])]
        for name in names:
            m = metrics[name].get(group)
            row += [f"{m['within'] * 100:.1f}%", f"{m['mape']:.1f}%"] if m else ["", ""]
        rows.append(row)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [title] if title else []
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    return "\n".join(lines)


def plot(report: EvalReport, path: Path, tolerance: float) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MuLayerError(
            '--plot needs matplotlib: pip install -e ".[plot]" (or pip install matplotlib)'
        ) from None
    names = list(dict.fromkeys(p.predictor for p in report.predictions))
    metrics = report.metrics(tolerance)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.2), squeeze=False)
    values = [v for p in report.predictions for v in (p.measured_us, p.predicted_us)]
    lo, hi = min(values) / 1.5, max(values) * 1.5
    colors = {"cpu": "tab:blue", "gpu": "tab:orange"}
    for ax, name in zip(axes[0], names, strict=True):
        for processor, color in colors.items():
            mine = [
                p for p in report.predictions if p.predictor == name and p.processor == processor
            ]
            if mine:
                ax.scatter(
                    [p.measured_us for p in mine],
                    [p.predicted_us for p in mine],
                    s=6,
                    alpha=0.6,
                    color=color,
                    label=f"{processor} ({metrics[name][processor]['within'] * 100:.0f}% ±10%)",
                )
        ax.plot([lo, hi], [lo, hi], color="black", lw=0.8)
        for f in (1 - tolerance, 1 + tolerance):
            ax.plot([lo, hi], [lo * f, hi * f], color="gray", lw=0.6, ls="--")
        ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi))
        ax.set(xlabel="measured (µs)", ylabel="predicted (µs)", title=name)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle("held-out models: predicted vs measured part latency")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        data = profile_data(read_many(args.profiles), args.profile_id, args.statistic)
        predictors = tuple(p.strip() for p in args.predictors.split(",") if p.strip())
        xgb_config = XGBoostConfig(prior=args.prior)
        report = holdout_eval(data, predictors, shared=args.shared, xgboost=xgb_config)
        metrics = report.metrics(args.tolerance)
        per_model = report.per_model(args.tolerance)
        if args.plot:
            plot(report, args.plot, args.tolerance)
    except MuLayerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    noise = repeatability(data, args.tolerance)
    crossing = transfer_eval(data, tolerance=args.tolerance)
    rules = rule_agreement(data)
    if args.json:
        out = {
            name: {**groups, "held_out": {m: per_model[m].get(name, {}) for m in per_model}}
            for name, groups in metrics.items()
        }
        out["measurement"] = noise
        out["crossing"] = crossing
        out["kernel_rules"] = rules
        out["runs"] = {"scales": data.run_scales, "unanchored": data.unanchored_runs}
        if "xgboost" in metrics:
            out["xgboost_breakdown"] = report.by_group("xgboost", args.tolerance)
        out["config"] = {"prior": args.prior, "shared": args.shared, "statistic": args.statistic}
        print(json.dumps(out, indent=2, sort_keys=True))
        return 0
    fp = data.fingerprint
    print(
        f"profile {data.profile_id}: {fp.get('cpu_model')} + {fp.get('gpu_name')}; "
        f"{len(data.parts)} parts of {len({p.key for p in data.parts})} layers; held out: "
        + ", ".join(f"{m} ({f['test_layers']} layers)" for m, f in report.folds.items())
    )
    print(table(metrics, args.tolerance))
    for run, scales in data.run_scales.items():
        print(
            f"run {run}: parts scaled to the earliest run's "
            + ", ".join(f"{p} x{f:.3f}" for p, f in sorted(scales.items()))
        )
    if data.unanchored_runs:
        print("runs without anchors (left unscaled): " + ", ".join(data.unanchored_runs))
    print(
        "measurement repeatability (single repeats within "
        f"±{args.tolerance * 100:g}% of their part's latency): "
        + ", ".join(f"{p} {m['within'] * 100:.1f}%" for p, m in noise.items())
    )
    print(
        "crossing model (leave one copy size out): "
        + ", ".join(
            f"{d} {m['within'] * 100:.0f}% within, MAPE {m['mape']:.1f}%"
            for d, m in crossing.items()
            if d != "sync"
        )
        + (f"; sync {crossing['sync']['median_us']:.1f} us" if "sync" in crossing else "")
    )
    print(
        "schedule rule derived = recorded: "
        + ", ".join(f"{p} {m['agree'] * 100:.1f}%" for p, m in rules.items() if p != "mismatches")
    )
    if args.per_model:
        for model, m in per_model.items():
            print()
            print(table(m, args.tolerance, title=f"held out: {model}"))
    if args.plot:
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
