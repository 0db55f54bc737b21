"""Latency regressors of one processor: XGBoost and the two classic baselines.

All three follow one protocol (:class:`Predictor`): ``fit(samples, latencies_us)``,
``predict(samples)`` on ``(Layer, channels)`` samples, and ``to_json`` / ``from_json`` for the
archive, so training, evaluation and the partitioner's queries go through the same code.

- :class:`XGBoostPredictor`: gradient-boosted trees on :mod:`.features`, fitted to
  ``log(latency)`` (so the loss is a relative error). The trees refine an analytic prior
  (``base_margin``): a roofline-like least-squares fit ``t = a + b FLOPs + c bytes`` per layer
  kind, which the trees cannot extrapolate on their own.
- :class:`FlopsLinear` (µLayer, after Neurosurgeon): ``t = a + b FLOPs``, least squares.
- :class:`Neurosurgeon`: per layer kind, a linear or a log-log regression (whichever fits the
  training data better) on the kind's own variables: conv ``(k/s)^2 x filters`` and the input
  size; dense input and output neurons; pooling input and output size.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from mulayer.frontend.layers import Layer

from .features import FEATURE_NAMES, feature_matrix, part_shape

Sample = tuple[Layer, int]
_FLOOR_US = 0.05  # predictions are clipped to at least this


@dataclass
class XGBoostConfig:
    """Hyper-parameters of the XGBoost regressors (one per processor)."""

    n_estimators: int = 600
    max_depth: int = 5
    learning_rate: float = 0.05
    subsample: float = 0.8
    colsample_bytree: float = 0.8
    min_child_weight: float = 2.0
    reg_lambda: float = 1.0
    seed: int = 0
    # Fit the trees to the residual of the analytic prior (see the module docstring).
    analytic_prior: bool = True


class Predictor:
    """Protocol of a latency regressor for one processor."""

    name: str = ""

    def fit(self, samples: list[Sample], latency_us: np.ndarray) -> Predictor:
        raise NotImplementedError

    def predict(self, samples: list[Sample]) -> np.ndarray:
        raise NotImplementedError

    def to_json(self) -> dict:
        raise NotImplementedError


def _lstsq(x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    if weights is not None:
        x, y = x * weights[:, None], y * weights
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return coef


# ----------------------------------------------------------------------------------- baselines
@dataclass
class FlopsLinear(Predictor):
    """µLayer's predictor: latency linear in the part's FLOPs (ordinary least squares)."""

    intercept: float = 0.0
    slope: float = 0.0
    name: str = "flops_linear"

    def fit(self, samples, latency_us):
        flops = np.array([part_shape(layer, k).flops for layer, k in samples])
        x = np.stack([np.ones_like(flops), flops], axis=1)
        self.intercept, self.slope = (float(v) for v in _lstsq(x, np.asarray(latency_us)))
        return self

    def predict(self, samples):
        flops = np.array([part_shape(layer, k).flops for layer, k in samples])
        return np.maximum(self.intercept + self.slope * flops, _FLOOR_US)

    def to_json(self):
        return {"intercept": self.intercept, "slope": self.slope}

    @classmethod
    def from_json(cls, raw: dict) -> FlopsLinear:
        return cls(intercept=raw["intercept"], slope=raw["slope"])


def _neurosurgeon_vars(layer: Layer, channels: int) -> tuple[float, float]:
    """The two regression variables Neurosurgeon uses for the layer's kind."""
    p = part_shape(layer, channels)
    if p.kind == "conv2d":
        return (p.kernel_h / p.stride) ** 2 * p.channels, p.bytes_in
    if p.kind == "dense":
        return float(layer.input_shape[-1]), float(p.channels)
    return p.bytes_in, p.out_elems


@dataclass
class Neurosurgeon(Predictor):
    """Per layer kind: ``t = a + b x1 + c x2`` or ``log t = a + b log x1 + c log x2``."""

    fits: dict[str, dict] = field(default_factory=dict)  # kind -> {"form", "coef"}
    fallback: dict = field(default_factory=dict)
    name: str = "neurosurgeon"

    @staticmethod
    def _design(v: np.ndarray, form: str) -> np.ndarray:
        if form == "log":
            v = np.log(np.maximum(v, 1.0))
        return np.concatenate([np.ones((len(v), 1)), v], axis=1)

    @classmethod
    def _apply(cls, v: np.ndarray, fit: dict) -> np.ndarray:
        out = cls._design(v, fit["form"]) @ np.asarray(fit["coef"])
        return np.exp(out) if fit["form"] == "log" else out

    def fit(self, samples, latency_us):
        y = np.asarray(latency_us, dtype=np.float64)
        v = np.array([_neurosurgeon_vars(layer, k) for layer, k in samples], dtype=np.float64)
        kinds = np.array([layer.kind for layer, _ in samples])
        self.fits = {}
        for kind in sorted(set(kinds)):
            mask = kinds == kind
            self.fits[kind] = self._best(v[mask], y[mask])
        self.fallback = self._best(v, y)
        return self

    def _best(self, v: np.ndarray, y: np.ndarray) -> dict:
        candidates = []
        for form in ("linear", "log"):
            target = np.log(y) if form == "log" else y
            coef = _lstsq(self._design(v, form), target)
            fit = {"form": form, "coef": [float(c) for c in coef]}
            pred = np.maximum(self._apply(v, fit), _FLOOR_US)
            candidates.append((float(np.mean(np.abs(pred - y) / y)), fit))
        return min(candidates, key=lambda c: c[0])[1]

    def predict(self, samples):
        out = np.empty(len(samples))
        for i, (layer, k) in enumerate(samples):
            fit = self.fits.get(layer.kind, self.fallback)
            v = np.array([_neurosurgeon_vars(layer, k)], dtype=np.float64)
            out[i] = self._apply(v, fit)[0]
        return np.maximum(out, _FLOOR_US)

    def to_json(self):
        return {"fits": self.fits, "fallback": self.fallback}

    @classmethod
    def from_json(cls, raw: dict) -> Neurosurgeon:
        return cls(fits=raw["fits"], fallback=raw["fallback"])


# ------------------------------------------------------------------------------------ XGBoost
def _prior_vars(samples: list[Sample]) -> tuple[np.ndarray, np.ndarray]:
    shapes = [part_shape(layer, k) for layer, k in samples]
    x = np.array(
        [[1.0, p.flops, p.bytes_in + p.bytes_out + p.weight_elems] for p in shapes],
        dtype=np.float64,
    )
    kinds = np.array([p.kind for p in shapes])
    return x, kinds


@dataclass
class AnalyticPrior:
    """``t = a + b FLOPs + c bytes`` per layer kind, fitted to relative error (non-negative)."""

    coef: dict[str, list[float]] = field(default_factory=dict)
    fallback: list[float] = field(default_factory=lambda: [1.0, 0.0, 0.0])

    @staticmethod
    def _fit(x: np.ndarray, y: np.ndarray) -> list[float]:
        coef = _lstsq(x, y, weights=1.0 / y)
        # Negative costs make no sense; refit without the offending terms.
        keep = coef > 0
        if not keep.all():
            sub = np.zeros_like(coef)
            if keep.any():
                sub[keep] = _lstsq(x[:, keep], y, weights=1.0 / y)
            coef = np.maximum(sub, 0.0)
            if not coef.any():
                coef[0] = float(np.median(y))
        return [float(c) for c in coef]

    def fit(self, samples, y) -> AnalyticPrior:
        x, kinds = _prior_vars(samples)
        self.coef = {kind: self._fit(x[kinds == kind], y[kinds == kind]) for kind in set(kinds)}
        self.fallback = self._fit(x, y)
        return self

    def predict(self, samples) -> np.ndarray:
        x, kinds = _prior_vars(samples)
        coef = np.array([self.coef.get(k, self.fallback) for k in kinds])
        return np.maximum((x * coef).sum(axis=1), _FLOOR_US)


class XGBoostPredictor(Predictor):
    """XGBoost on :data:`~.features.FEATURE_NAMES`, target ``log(latency_us)``."""

    name = "xgboost"

    def __init__(self, config: XGBoostConfig | None = None):
        self.config = config or XGBoostConfig()
        self.booster = None
        self.prior: AnalyticPrior | None = None

    def _margin(self, samples) -> np.ndarray | None:
        if self.prior is None:
            return None
        return np.log(self.prior.predict(samples))

    def fit(self, samples, latency_us):
        import xgboost as xgb

        y = np.asarray(latency_us, dtype=np.float64)
        cfg = self.config
        self.prior = AnalyticPrior().fit(samples, y) if cfg.analytic_prior else None
        dtrain = xgb.DMatrix(
            feature_matrix(samples),
            label=np.log(y),
            base_margin=self._margin(samples),
            feature_names=list(FEATURE_NAMES),
        )
        params = {
            "objective": "reg:squarederror",
            "max_depth": cfg.max_depth,
            "eta": cfg.learning_rate,
            "subsample": cfg.subsample,
            "colsample_bytree": cfg.colsample_bytree,
            "min_child_weight": cfg.min_child_weight,
            "lambda": cfg.reg_lambda,
            "seed": cfg.seed,
            "nthread": 1,
        }
        if self.prior is not None:
            params["base_score"] = 0.0
        self.booster = xgb.train(params, dtrain, num_boost_round=cfg.n_estimators)
        return self

    def predict(self, samples):
        if not samples:
            return np.zeros(0)
        log_us = self.booster.inplace_predict(
            feature_matrix(samples), base_margin=self._margin(samples)
        )
        return np.maximum(np.exp(log_us), _FLOOR_US)

    def to_json(self):
        raw = bytes(self.booster.save_raw(raw_format="json"))
        return {
            "config": asdict(self.config),
            "prior": asdict(self.prior) if self.prior is not None else None,
            "booster": json.loads(raw),
        }

    @classmethod
    def from_json(cls, raw: dict) -> XGBoostPredictor:
        import xgboost as xgb

        self = cls(XGBoostConfig(**raw["config"]))
        if raw.get("prior") is not None:
            self.prior = AnalyticPrior(**raw["prior"])
        self.booster = xgb.Booster()
        self.booster.load_model(bytearray(json.dumps(raw["booster"]).encode()))
        return self


PREDICTORS: dict[str, type] = {
    "xgboost": XGBoostPredictor,
    "flops_linear": FlopsLinear,
    "neurosurgeon": Neurosurgeon,
}


def make_predictor(name: str, xgboost: XGBoostConfig | None = None) -> Predictor:
    if name == "xgboost":
        return XGBoostPredictor(xgboost)
    return PREDICTORS[name]()


def predictor_from_json(name: str, raw: dict) -> Predictor:
    return PREDICTORS[name].from_json(raw)


def relative_errors(predicted: np.ndarray, measured: np.ndarray) -> np.ndarray:
    return np.abs(np.asarray(predicted) - np.asarray(measured)) / np.asarray(measured)
