"""Held-out evaluation: train on all models but one, predict the held-out model's layers.

For each model M of the profile, every predictor is trained (per processor) on the parts of the
distinct layers that M does not contain (the synthetic sweep's included), and predicts the
parts of M's layers: a layer shape
shared with a training model is not seen in training (``shared="exclude"``, the default and the
harder test) unless ``shared="include"``. Predictions of all folds are pooled per predictor and
processor: the share within ±10% of the measurement and the MAPE.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mulayer.errors import MuLayerError

from .data import ProfileData
from .predictors import PREDICTORS, XGBoostConfig, make_predictor, relative_errors

SHARED = ("exclude", "include")


@dataclass
class Prediction:
    model: str  # the held-out model
    predictor: str
    processor: str
    key: str
    channels: int
    measured_us: float
    predicted_us: float


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

    def per_model(self, tolerance: float = 0.10) -> dict:
        """``{held-out model: {predictor: {processor: metrics}}}``."""
        out: dict[str, dict] = {}
        for model in self.folds:
            sub = EvalReport([p for p in self.predictions if p.model == model])
            out[model] = sub.metrics(tolerance)
        return out


def _metrics(rows: list[Prediction], tolerance: float) -> dict:
    if not rows:
        return {"within": 0.0, "mape": 0.0, "n": 0}
    err = relative_errors(
        np.array([r.predicted_us for r in rows]), np.array([r.measured_us for r in rows])
    )
    return {
        "within": float(np.mean(err <= tolerance)),
        "mape": float(np.mean(err) * 100.0),
        "n": len(rows),
    }


def repeatability(data: ProfileData, tolerance: float = 0.10) -> dict:
    """The noise ceiling: the share of single repeats within ``tolerance`` of their part's
    latency, per processor (no predictor can do much better than the measurement repeats)."""
    out = {}
    for processor in [*data.processors(), "all"]:
        parts = [p for p in data.parts if processor in ("all", p.processor) and p.samples_us]
        errors = [abs(s - p.latency_us) / p.latency_us for p in parts for s in p.samples_us]
        out[processor] = {
            "within": float(np.mean(np.array(errors) <= tolerance)) if errors else 0.0,
            "n": len(parts),
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
            for name in predictors:
                predicted = make_predictor(name, xgboost).fit(samples, y).predict(test_samples)
                report.predictions += [
                    Prediction(model, name, processor, p.key, p.channels, p.latency_us, float(t))
                    for p, t in zip(test, predicted, strict=True)
                ]
    return report
