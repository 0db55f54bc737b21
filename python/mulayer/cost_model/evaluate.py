"""Held-out evaluation: train on all models but one, predict the held-out model's layers.

For each model M of the profile, every predictor is trained (per processor) on the parts of the
distinct layers that M does not contain (the synthetic sweep's included), and predicts the
parts of M's layers: a layer shape
shared with a training model is not seen in training (``shared="exclude"``, the default and the
harder test) unless ``shared="include"``. Predictions of all folds are pooled per predictor and
processor: the share within ±10% of the measurement and the MAPE.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from mulayer.errors import MuLayerError
from mulayer.frontend.epilogue import CLAMPS
from mulayer.frontend.layers import Layer

from .data import ProfileData
from .kernels import kernel_info, normalize_rule
from .predictors import PREDICTORS, XGBoostConfig, make_predictor, relative_errors
from .transfer import DIRECTIONS, chosen_memory, fit_line

SHARED = ("exclude", "include")
LATENCY_BUCKETS = (
    ("<30us", 30.0),
    ("30-100us", 100.0),
    ("100us-1ms", 1000.0),
    (">=1ms", float("inf")),
)


@dataclass
class Prediction:
    model: str  # the held-out model
    predictor: str
    processor: str
    key: str
    channels: int
    measured_us: float
    predicted_us: float
    rule: str = ""  # the schedule rule of the part's main kernel (:func:`.kernels.kernel_info`)
    epilogue: str = ""  # :func:`epilogue_kind` of the layer


@dataclass
class EvalReport:
    predictions: list[Prediction] = field(default_factory=list)
    folds: dict[str, dict] = field(default_factory=dict)  # held-out model -> train/test sizes

    def metrics(self, tolerance: float = 0.10) -> dict:
        """``{predictor: {processor | "all": {"within", "mape", "n"}}}``."""
        out: dict[str, dict] = {}
        for name in dict.fromkeys(p.predictor for p in self.predictions):
            mine = [p for p in self.predictions if p.predictor == name]
            groups = {}
            for processor in sorted({p.processor for p in mine}):
                groups[processor] = [p for p in mine if p.processor == processor]
            groups["all"] = mine
            out[name] = {g: _metrics(rows, tolerance) for g, rows in groups.items()}
        return out

    def by_group(self, predictor: str, tolerance: float = 0.10) -> dict:
        """Where ``predictor``'s errors are: ``{"rule": {processor/rule: metrics},
        "latency": {processor/bucket: metrics}, "epilogue": {processor/kind: metrics}}``
        (buckets of the measured latency; kinds of :func:`epilogue_kind`)."""
        mine = [p for p in self.predictions if p.predictor == predictor]
        groups: dict[str, dict[str, list[Prediction]]] = {"rule": {}, "latency": {}, "epilogue": {}}
        for p in mine:
            bucket = next(name for name, top in LATENCY_BUCKETS if p.measured_us < top)
            for group, value in (("rule", p.rule), ("latency", bucket), ("epilogue", p.epilogue)):
                groups[group].setdefault(f"{p.processor}/{value}", []).append(p)
        return {
            group: {k: _metrics(v, tolerance) for k, v in sorted(rows.items())}
            for group, rows in groups.items()
        }

    def per_model(self, tolerance: float = 0.10) -> dict:
        """``{held-out model: {predictor: {processor: metrics}}}``."""
        out: dict[str, dict] = {}
        for model in self.folds:
            sub = EvalReport([p for p in self.predictions if p.model == model])
            out[model] = sub.metrics(tolerance)
        return out


def _metrics(rows: list[Prediction], tolerance: float) -> dict:
    if not rows:
        return {"within": 0.0, "mape": 0.0, "median_ratio": 0.0, "n": 0}
    err = relative_errors(
        np.array([r.predicted_us for r in rows]), np.array([r.measured_us for r in rows])
    )
    ratios = np.array([r.predicted_us / r.measured_us for r in rows])
    return {
        "within": float(np.mean(err <= tolerance)),
        "mape": float(np.mean(err) * 100.0),
        "median_ratio": float(np.median(ratios)),  # predicted / measured: the bias
        "n": len(rows),
    }


def epilogue_kind(layer: Layer) -> str:
    """``relu6`` (a clamp from above), ``relu``, ``bias`` (other ops only) or ``none``."""
    if any(op in CLAMPS for op in layer.epilogue):
        return "relu6"
    if "relax.nn.relu" in layer.epilogue:
        return "relu"
    return "bias" if layer.epilogue else "none"


def repeatability(data: ProfileData, tolerance: float = 0.10) -> dict:
    """The noise ceiling, per processor: ``within``, the share of single repeats within
    ``tolerance`` of their part's latency (no predictor can do much better than the measurement
    repeats); ``spread_median`` / ``spread_p90``, the repeats' (max - min) / median over parts;
    ``parts_within``, the share of parts all of whose repeats are within ``tolerance``."""
    out = {}
    for processor in [*data.processors(), "all"]:
        parts = [p for p in data.parts if processor in ("all", p.processor) and p.samples_us]
        errors = [abs(s - p.latency_us) / p.latency_us for p in parts for s in p.samples_us]
        spread = np.array([(max(p.samples_us) - min(p.samples_us)) / p.latency_us for p in parts])
        worst = np.array(
            [max(abs(s - p.latency_us) for s in p.samples_us) / p.latency_us for p in parts]
        )
        out[processor] = {
            "within": float(np.mean(np.array(errors) <= tolerance)) if errors else 0.0,
            "parts_within": float(np.mean(worst <= tolerance)) if parts else 0.0,
            "spread_median": float(np.median(spread)) if parts else 0.0,
            "spread_p90": float(np.percentile(spread, 90)) if parts else 0.0,
            "repeats": int(np.median([len(p.samples_us) for p in parts])) if parts else 0,
            "n": len(parts),
        }
    return out


def rule_agreement(data: ProfileData) -> dict:
    """How often :func:`.kernels.kernel_info` names the rule the profile recorded, per processor
    (parts without a recorded rule are skipped), and the disagreements seen most."""
    traits = data.traits()
    out: dict[str, dict] = {}
    mismatches: Counter = Counter()
    for processor in data.processors():
        parts = [p for p in data.parts if p.processor == processor and p.rule]
        same = 0
        for p in parts:
            ours = kernel_info(p.layer, p.channels, processor, traits).rule
            if ours == normalize_rule(p.rule):
                same += 1
            else:
                mismatches[f"{processor}: recorded {p.rule}, derived {ours}"] += 1
        out[processor] = {"agree": same / len(parts) if parts else 0.0, "n": len(parts)}
    out["mismatches"] = dict(mismatches.most_common(8))
    return out


def transfer_eval(data: ProfileData, memory: str = "auto", tolerance: float = 0.10) -> dict:
    """Leave-one-size-out error of the crossing model's copy lines (per direction) and the
    sync's spread: the line is fitted on the other sizes and predicts the held-out one (the
    lines of ``memory``; "auto" as in training: pinned where the profile has it)."""
    memory = chosen_memory(data.transfers, memory)
    out: dict[str, dict] = {}
    for direction in DIRECTIONS:
        rows = [r for r in data.transfers if r["direction"] == direction and r["memory"] == memory]
        if len(rows) < 3:
            continue
        n = np.array([r["nbytes"] for r in rows], dtype=np.float64)
        t = np.array([r["latency_us"] for r in rows], dtype=np.float64)
        predicted = []
        for i in range(len(rows)):
            keep = np.arange(len(rows)) != i
            a, b = fit_line(n[keep], t[keep])
            predicted.append(a + b * n[i])
        err = relative_errors(np.array(predicted), t)
        out[direction] = {
            "within": float(np.mean(err <= tolerance)),
            "mape": float(np.mean(err) * 100.0),
            "n": len(rows),
            "memory": memory,
        }
    syncs = [s for r in data.syncs for s in (r.get("samples_us") or [r["latency_us"]])]
    if syncs:
        median = float(np.median(syncs))
        err = np.abs(np.array(syncs) - median) / median
        out["sync"] = {
            "median_us": median,
            "within": float(np.mean(err <= tolerance)),
            "n": len(syncs),
        }
    return out


def holdout_eval(
    data: ProfileData,
    predictors: tuple[str, ...] = tuple(PREDICTORS),
    shared: str = "exclude",
    xgboost: XGBoostConfig | None = None,
    models: list[str] | None = None,
) -> EvalReport:
    """Leave-one-model-out evaluation of ``predictors`` on ``data`` (see the module doc)."""
    if shared not in SHARED:
        raise MuLayerError(f"shared={shared!r}: use one of {', '.join(SHARED)}")
    unknown = [p for p in predictors if p not in PREDICTORS]
    if unknown:
        raise MuLayerError(
            f"unknown predictor(s) {', '.join(unknown)}; use {', '.join(PREDICTORS)}"
        )
    measured_keys = {p.key for p in data.parts}
    held_out = [
        m for m in (models or sorted(data.models)) if data.models.get(m, set()) & measured_keys
    ]
    if len(held_out) < 2:
        raise MuLayerError(
            f"held-out evaluation needs at least two profiled models; the data has "
            f"{', '.join(held_out) or 'none'}"
        )
    report = EvalReport()
    traits = data.traits()
    for model in held_out:
        test_keys = data.models[model]
        if shared == "exclude":
            train_keys = measured_keys - test_keys
        else:
            others = (data.models[m] for m in data.models if m != model)
            train_keys = set().union(data.synthetic, *others)
        report.folds[model] = {
            "train_layers": len(train_keys & measured_keys),
            "test_layers": len(test_keys & measured_keys),
        }
        for processor in data.processors():
            train = [p for p in data.parts if p.processor == processor and p.key in train_keys]
            test = [p for p in data.parts if p.processor == processor and p.key in test_keys]
            if not train or not test:
                continue
            y = np.array([p.latency_us for p in train])
            samples = [(p.layer, p.channels) for p in train]
            test_samples = [(p.layer, p.channels) for p in test]
            rules = [kernel_info(p.layer, p.channels, processor, traits).rule for p in test]
            epilogues = [epilogue_kind(p.layer) for p in test]
            for name in predictors:
                predictor = make_predictor(name, xgboost, processor, traits)
                predicted = predictor.fit(samples, y).predict(test_samples)
                report.predictions += [
                    Prediction(
                        model, name, processor, p.key, p.channels, p.latency_us, float(t), *tags
                    )
                    for p, t, *tags in zip(test, predicted, rules, epilogues, strict=True)
                ]
    return report
