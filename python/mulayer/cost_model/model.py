"""The cost model the partitioner queries: per-processor regressors, transfers and sync."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from mulayer.errors import MuLayerError
from mulayer.frontend.layers import Layer

from .data import ProfileData
from .predictors import Predictor, XGBoostConfig, make_predictor
from .transfer import DIRECTIONS, MEMORY_CHOICES, TransferModel, chosen_memory, fit_transfers

PROCESSORS = ("cpu", "gpu")


@dataclass
class CostModelConfig:
    """How a cost model is trained."""

    predictor: str = "xgboost"  # or "flops_linear", "neurosurgeon"
    xgboost: XGBoostConfig = field(default_factory=XGBoostConfig)
    # Host memory whose copy lines price a crossing: "pageable" (TVM's host tensors),
    # "pinned" (the crossing function on page-locked planned buffers) or "auto" (pinned where
    # the profile has it).
    transfer_memory: str = "auto"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> CostModelConfig:
        return cls(
            predictor=raw["predictor"],
            xgboost=XGBoostConfig(**raw["xgboost"]),
            transfer_memory=raw["transfer_memory"],
        )


class CostModel:
    """Predicted latencies of layer parts, copies and syncs on one machine.

    ``shared_memory`` is True when the "GPU" shares the CPU's memory (the llvm stand-in,
    phones' integrated GPUs): copies are then free and :meth:`transfer_time_us` returns 0.
    """

    def __init__(
        self,
        predictors: dict[str, Predictor],
        transfer: TransferModel,
        shared_memory: bool,
        config: CostModelConfig | None = None,
        training: dict | None = None,
    ):
        self.predictors = predictors
        self.transfer = transfer
        self.shared_memory = shared_memory
        self.config = config or CostModelConfig()
        self.training = training or {}
        self._memo: dict[tuple, dict[int, float]] = {}

    @property
    def fingerprint(self) -> dict:
        return self.training.get("fingerprint", {})

    # ------------------------------------------------------------------ partitioner API
    def layer_time_us(self, layer: Layer, processor: str, channels: int) -> float:
        """Time of the part computing ``channels`` output channels of ``layer`` on
        ``processor`` ("cpu": int8, "gpu": fp16); 0 for no channels."""
        return self.layer_times_us(layer, processor, [channels])[0]

    def layer_times_us(self, layer: Layer, processor: str, channels: list[int]) -> list[float]:
        """:meth:`layer_time_us` for many channel counts at once (one model call; memoised)."""
        predictor = self._predictor(processor)
        total = int(layer.out_channels)
        known = self._memo.setdefault((processor, _layer_identity(layer)), {})
        wanted = sorted({min(int(k), total) for k in channels if k > 0} - set(known))
        if wanted:
            for k, t in zip(wanted, predictor.predict([(layer, k) for k in wanted]), strict=True):
                known[k] = float(t)
        return [known[min(int(k), total)] if k > 0 else 0.0 for k in channels]

    def transfer_time_us(self, nbytes: int, direction: str) -> float:
        """Time to copy ``nbytes`` host-to-device ("h2d") or device-to-host ("d2h")."""
        if direction not in DIRECTIONS:
            raise MuLayerError(f"direction {direction!r}: use one of {', '.join(DIRECTIONS)}")
        if nbytes <= 0 or self.shared_memory:
            return 0.0
        return self.transfer.time_us(int(nbytes), direction)

    def sync_time_us(self) -> float:
        """Time of one host-device synchronisation."""
        return float(self.transfer.sync_us)

    def _predictor(self, processor: str) -> Predictor:
        try:
            return self.predictors[processor]
        except KeyError:
            raise MuLayerError(
                f"processor {processor!r}: this cost model knows "
                f"{', '.join(sorted(self.predictors))}"
            ) from None


def _layer_identity(layer: Layer) -> tuple:
    """What the features of a layer depend on (its name does not matter)."""
    return (
        layer.kind,
        tuple(layer.input_shape),
        tuple(layer.output_shape),
        tuple(layer.weight_shape or ()),
        layer.groups,
        tuple(layer.strides),
        layer.flops,
        layer.bytes_in,
        layer.bytes_out,
        tuple(layer.epilogue),
        layer.input_nonneg,
    )


def shared_memory_for(target: dict | None) -> bool:
    """Whether a target's GPU side shares the host's memory (llvm stand-in, OpenCL)."""
    device = (target or {}).get("device")
    return device is None or device.get("kind") in ("llvm", "opencl")


def train_cost_model(data: ProfileData, config: CostModelConfig | None = None) -> CostModel:
    """Fit one regressor per processor, the transfer lines and the sync on ``data``."""
    config = config or CostModelConfig()
    if config.transfer_memory not in MEMORY_CHOICES:
        raise MuLayerError(
            f"transfer memory {config.transfer_memory!r}: use one of {', '.join(MEMORY_CHOICES)}"
        )
    predictors = {}
    traits = data.traits()
    for processor in data.processors():
        parts = [p for p in data.parts if p.processor == processor]
        predictor = make_predictor(config.predictor, config.xgboost, processor, traits)
        samples = [(p.layer, p.channels) for p in parts]
        predictors[processor] = predictor.fit(samples, np.array([p.latency_us for p in parts]))
    if not predictors:
        raise MuLayerError("the profile data holds no successfully timed parts to train on")
    memory = chosen_memory(data.transfers, config.transfer_memory)
    transfer = fit_transfers(data.transfers, data.syncs, memory)
    return CostModel(
        predictors,
        transfer,
        shared_memory_for(data.target),
        config,
        training=data.summary(),
    )
