"""What the partitioner needs from a cost model, a cache around it, and an analytic stand-in.

The partitioner accepts any object with the members of :class:`LatencyEstimator` (the cost
model of :mod:`mulayer.cost_model` is one). :class:`AnalyticEstimator` (time = work /
throughput + launch overhead) is a model with a known optimum, used by the tests and for
experiments; it is never a silent fallback for a missing cost model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..errors import MuLayerError
from ..frontend.layers import Layer

PROCESSORS = ("gpu", "cpu")
DIRECTIONS = ("h2d", "d2h")


@runtime_checkable
class LatencyEstimator(Protocol):
    """Predicted times in µs.

    ``layer_time_us(layer, processor, channels)`` is the time of the part of ``layer`` that
    computes ``channels`` of its output channels on ``processor`` (``"gpu"``: fp16, ``"cpu"``:
    int8); 0 channels take 0 µs. ``transfer_time_us(nbytes, direction)`` is one copy
    (``"h2d"`` or ``"d2h"``), ``sync_time_us()`` one wait of the host for the GPU.
    ``shared_memory`` is True where both processors share memory (phones, the llvm + llvm
    stand-in): copies are then free. An estimator may also offer
    ``layer_times_us(layer, processor, channels: list[int]) -> list[float]`` (one batched
    prediction); :class:`CachedEstimator` then asks for all split points of a layer at once.
    """

    shared_memory: bool

    def layer_time_us(self, layer: Layer, processor: str, channels: int) -> float: ...

    def transfer_time_us(self, nbytes: int, direction: str) -> float: ...

    def sync_time_us(self) -> float: ...


class CachedEstimator:
    """Memoises an estimator's answers (a learned model may take ~1 ms a prediction)."""

    def __init__(self, estimator: LatencyEstimator, shared_memory: bool | None = None):
        missing = [
            name
            for name in ("layer_time_us", "transfer_time_us", "sync_time_us", "shared_memory")
            if not hasattr(estimator, name)
        ]
        if missing:
            raise MuLayerError(
                f"{type(estimator).__name__} is not a latency estimator: it lacks "
                f"{', '.join(missing)} (see mulayer.partitioner.LatencyEstimator)"
            )
        self.inner = estimator
        self.shared_memory = (
            bool(estimator.shared_memory) if shared_memory is None else shared_memory
        )
        self._layer: dict[tuple[str, str, int], float] = {}
        self._transfer: dict[tuple[int, str], float] = {}
        self._sync: float | None = None

    def layer_time_us(self, layer: Layer, processor: str, channels: int) -> float:
        if channels <= 0:
            return 0.0
        key = (layer.name, processor, channels)
        if key not in self._layer:
            self._layer[key] = max(0.0, float(self.inner.layer_time_us(layer, processor, channels)))
        return self._layer[key]

    def prefetch(self, layer: Layer, processor: str, channels: list[int]) -> None:
        """Predict many channel counts in one batched call, when the estimator offers one."""
        batch = getattr(self.inner, "layer_times_us", None)
        wanted = [k for k in channels if k > 0 and (layer.name, processor, k) not in self._layer]
        if batch is None or not wanted:
            return
        for k, value in zip(wanted, batch(layer, processor, wanted), strict=True):
            self._layer[(layer.name, processor, k)] = max(0.0, float(value))

    def transfer_time_us(self, nbytes: int, direction: str) -> float:
        if self.shared_memory or nbytes <= 0:
            return 0.0
        key = (nbytes, direction)
        if key not in self._transfer:
            value = float(self.inner.transfer_time_us(nbytes, direction))
            self._transfer[key] = max(0.0, value)
        return self._transfer[key]

    def sync_time_us(self) -> float:
        if self._sync is None:
            self._sync = max(0.0, float(self.inner.sync_time_us()))
        return self._sync


@dataclass
class AnalyticEstimator:
    """time = share of the layer's FLOPs / throughput + launch overhead (a synthetic model).

    Throughputs in GFLOP/s; bandwidth in GB/s (``None``: copies cost only their latency).
    """

    gpu_gflops: float = 100.0
    cpu_gflops: float = 100.0
    gpu_launch_us: float = 5.0
    cpu_launch_us: float = 5.0
    bandwidth_gbps: float | None = 10.0
    copy_latency_us: float = 10.0
    sync_us: float = 5.0
    shared_memory: bool = False

    def layer_time_us(self, layer: Layer, processor: str, channels: int) -> float:
        if channels <= 0:
            return 0.0
        share = min(1.0, channels / layer.out_channels)
        gflops = self.gpu_gflops if processor == "gpu" else self.cpu_gflops
        launch = self.gpu_launch_us if processor == "gpu" else self.cpu_launch_us
        return layer.flops * share / (gflops * 1e3) + launch

    def transfer_time_us(self, nbytes: int, direction: str) -> float:
        if self.bandwidth_gbps is None:
            return self.copy_latency_us
        return self.copy_latency_us + nbytes / (self.bandwidth_gbps * 1e3)

    def sync_time_us(self) -> float:
        return self.sync_us


def load_estimator(spec) -> LatencyEstimator:
    """The cost model for ``spec`` (a cooperative :class:`~mulayer.target.TargetSpec`).

    ``-cost-model=path`` picks a file; otherwise :func:`mulayer.cost_model.load_cost_model`
    finds the default one for the target.
    """
    path = spec.mulayer.cost_model if spec.mulayer is not None else None
    try:
        from ..cost_model import load_cost_model
    except ImportError as err:
        raise MuLayerError(
            "the auto split needs a cost model: mulayer.cost_model is not available "
            f"({err}); give a plan (--plan plan.json) or a ratio (-ratio=0.5) instead"
        ) from None
    try:
        return load_cost_model(path=path, target=spec)
    except MuLayerError as err:
        raise MuLayerError(f"the auto split needs a cost model: {err}") from None
    except (OSError, ValueError) as err:
        where = f"-cost-model={path!r}" if path else "the default cost model"
        raise MuLayerError(
            f"the auto split needs a cost model: {where} could not be loaded ({err}); profile "
            "this machine (mulayer profile), train one (python -m mulayer.cost_model train) "
            "and pass -cost-model=PATH"
        ) from None
