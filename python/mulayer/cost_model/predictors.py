"""Latency regressors of one processor: XGBoost and the two classic baselines.

All three follow one protocol (:class:`Predictor`): ``fit(samples, latencies_us)``,
``predict(samples)`` on ``(Layer, channels)`` samples, and ``to_json`` / ``from_json`` for the
archive, so training, evaluation and the partitioner's queries go through the same code.

- :class:`XGBoostPredictor`: gradient-boosted trees on :mod:`.features` (the layer and the kernel
  its schedule rule builds), fitted to ``log(latency)`` (so the loss is a relative error). The
  trees refine an analytic prior (:class:`RooflinePrior`, ``base_margin``): ``overhead +
  max(FLOPs / peak, bytes / bandwidth)`` of the kernel, constants fitted per schedule rule, which
  extrapolates to sizes the trees never saw.
- :class:`FlopsLinear` (µLayer, after Neurosurgeon): ``t = a + b FLOPs``, least squares.
- :class:`Neurosurgeon`: per layer kind, a linear or a log-log regression (whichever fits the
  training data better) on the kind's own variables: conv ``(k/s)^2 x filters`` and the input
  size; dense input and output neurons; pooling input and output size.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from mulayer.errors import MuLayerError
from mulayer.frontend.layers import Layer

from .features import FEATURE_NAMES, feature_matrix
from .kernels import MachineTraits, kernel_info, roofline_terms
from .part_shape import part_shape

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
    # How the trees use the roofline prior: "margin" (fit log(measured / prior)), "feature" or
    # "none" (see XGBoostPredictor).
    prior: str = "margin"


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
def _roofline_vars(samples: list[Sample], processor: str, traits: MachineTraits) -> tuple:
    infos = [kernel_info(layer, k, processor, traits) for layer, k in samples]
    terms = np.array([roofline_terms(i) for i in infos], dtype=np.float64).reshape(-1, 2)
    return terms[:, 0], terms[:, 1], np.array([i.rule for i in infos])


ROOFLINE_FORMS = ("max", "sum")


def _roofline(params, flops: np.ndarray, nbytes: np.ndarray, form: str = "max") -> np.ndarray:
    """``overhead + max(flops / peak, bytes / bandwidth)`` (form "max": compute and memory
    overlap) or ``overhead + flops / peak + bytes / bandwidth`` ("sum"); ``params`` are the
    logs of ``(overhead, 1 / peak, 1 / bandwidth)``."""
    overhead, inv_peak, inv_bw = np.exp(np.asarray(params, dtype=np.float64))
    compute, memory = flops * inv_peak, nbytes * inv_bw
    return overhead + (np.maximum(compute, memory) if form == "max" else compute + memory)


@dataclass
class RooflinePrior:
    """The analytic estimate the trees correct: ``t = o + max(F / P, B / W)`` (µs).

    ``F`` is the kernel's work including tile padding and idle threads / SMs, ``B`` its bytes
    (:func:`~.kernels.roofline_terms`); the overhead ``o`` (launches, syncs, thread pool wake-up),
    peak ``P`` and bandwidth ``W`` are fitted on the training parts (log-space least squares), per
    schedule rule where the rule has at least :attr:`MIN_PARTS` parts, else one set per processor.
    Where the kernel does not overlap compute and memory (``o + F / P + B / W`` fits better) that
    form is kept instead.
    """

    MIN_PARTS = 12
    # rule -> {"form": "max" | "sum", "log": log(o, 1/P, 1/W)}
    params: dict[str, dict] = field(default_factory=dict)
    fallback: dict = field(default_factory=lambda: {"form": "max", "log": [0.0, -30.0, -30.0]})

    @staticmethod
    def _fit(flops: np.ndarray, nbytes: np.ndarray, y: np.ndarray, start=None) -> dict:
        from scipy.optimize import least_squares

        if start is None:
            start = [
                np.log(max(np.min(y) * 0.5, 1e-3)),
                np.log(np.median(y / np.maximum(flops, 1.0))),
                np.log(np.median(y / np.maximum(nbytes, 1.0))),
            ]
        log_y = np.log(y)
        best = None
        for form in ROOFLINE_FORMS:
            fit = least_squares(
                lambda p, form=form: np.log(_roofline(p, flops, nbytes, form)) - log_y,
                start,
                loss="soft_l1",
            )
            if best is None or fit.cost < best[0]:
                best = (fit.cost, {"form": form, "log": [float(v) for v in fit.x]})
        return best[1]

    def fit(self, flops, nbytes, rules, y) -> RooflinePrior:
        self.fallback = self._fit(flops, nbytes, y)
        self.params = {}
        for rule in sorted(set(rules)):
            mask = rules == rule
            if mask.sum() >= self.MIN_PARTS:
                start = self.fallback["log"]
                self.params[rule] = self._fit(flops[mask], nbytes[mask], y[mask], start)
        return self

    def predict(self, flops, nbytes, rules) -> np.ndarray:
        out = np.empty(len(rules))
        for rule in set(rules):
            mask = rules == rule
            fit = self.params.get(rule, self.fallback)
            out[mask] = _roofline(fit["log"], flops[mask], nbytes[mask], fit["form"])
        return np.maximum(out, _FLOOR_US)


PRIOR_USES = ("margin", "feature", "none")


class XGBoostPredictor(Predictor):
    """XGBoost on :data:`~.features.FEATURE_NAMES` of one processor, target ``log(latency_us)``.

    ``config.prior``: "margin" fits the trees to ``log(measured / prior)`` (the prior is the
    base margin), "feature" gives them ``log2(prior)`` as one more feature, "none" neither.
    """

    name = "xgboost"

    def __init__(
        self,
        config: XGBoostConfig | None = None,
        processor: str = "cpu",
        traits: MachineTraits | None = None,
    ):
        self.config = config or XGBoostConfig()
        if self.config.prior not in PRIOR_USES:
            raise MuLayerError(f"prior {self.config.prior!r}: use one of {', '.join(PRIOR_USES)}")
        self.processor = processor
        self.traits = traits or MachineTraits()
        self.booster = None
        self.prior: RooflinePrior | None = None

    def _inputs(self, samples) -> tuple[np.ndarray, np.ndarray | None]:
        """The feature matrix and the base margin."""
        x = feature_matrix(samples, self.processor, self.traits)
        if self.prior is None:
            return x, None
        log_prior = np.log(
            self.prior.predict(*_roofline_vars(samples, self.processor, self.traits))
        )
        if self.config.prior == "feature":
            return np.concatenate([x, log_prior[:, None] / np.log(2.0)], axis=1), None
        return x, log_prior

    def _feature_names(self) -> list[str]:
        extra = ["log2_prior_us"] if self.config.prior == "feature" else []
        return [*FEATURE_NAMES, *extra]

    def fit(self, samples, latency_us):
        import xgboost as xgb

        y = np.asarray(latency_us, dtype=np.float64)
        cfg = self.config
        self.prior = None
        if cfg.prior != "none":
            flops, nbytes, rules = _roofline_vars(samples, self.processor, self.traits)
            self.prior = RooflinePrior().fit(flops, nbytes, rules, y)
        x, margin = self._inputs(samples)
        dtrain = xgb.DMatrix(
            x, label=np.log(y), base_margin=margin, feature_names=self._feature_names()
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
        if margin is not None:
            params["base_score"] = 0.0
        self.booster = xgb.train(params, dtrain, num_boost_round=cfg.n_estimators)
        return self

    def predict(self, samples):
        if not samples:
            return np.zeros(0)
        x, margin = self._inputs(samples)
        log_us = self.booster.inplace_predict(x, base_margin=margin)
        return np.maximum(np.exp(log_us), _FLOOR_US)

    def to_json(self):
        raw = bytes(self.booster.save_raw(raw_format="json"))
        return {
            "config": asdict(self.config),
            "processor": self.processor,
            "traits": self.traits.to_json(),
            "prior": asdict(self.prior) if self.prior is not None else None,
            "booster": json.loads(raw),
        }

    @classmethod
    def from_json(cls, raw: dict) -> XGBoostPredictor:
        import xgboost as xgb

        self = cls(
            XGBoostConfig(**raw["config"]),
            raw["processor"],
            MachineTraits.from_json(raw["traits"]),
        )
        if raw.get("prior") is not None:
            self.prior = RooflinePrior(**raw["prior"])
        self.booster = xgb.Booster()
        self.booster.load_model(bytearray(json.dumps(raw["booster"]).encode()))
        return self


PREDICTORS: dict[str, type] = {
    "xgboost": XGBoostPredictor,
    "flops_linear": FlopsLinear,
    "neurosurgeon": Neurosurgeon,
}


def make_predictor(
    name: str,
    xgboost: XGBoostConfig | None = None,
    processor: str = "cpu",
    traits: MachineTraits | None = None,
) -> Predictor:
    """A new predictor ``name`` for ``processor`` of a machine with ``traits``."""
    if name == "xgboost":
        return XGBoostPredictor(xgboost, processor, traits)
    return PREDICTORS[name]()


def predictor_from_json(name: str, raw: dict) -> Predictor:
    return PREDICTORS[name].from_json(raw)


def relative_errors(predicted: np.ndarray, measured: np.ndarray) -> np.ndarray:
    return np.abs(np.asarray(predicted) - np.asarray(measured)) / np.asarray(measured)
