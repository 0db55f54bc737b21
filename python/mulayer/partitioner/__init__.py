"""The partitioner: a cost model's predictions in, a :class:`~mulayer.plan.Plan` out.

``-split=auto`` calls :func:`auto_plan`. The pieces, each usable on its own:

- :func:`layer_graph`: ``main`` as a graph of layers, with branch blocks;
- :class:`LatencyEstimator`: what a cost model must answer (:class:`AnalyticEstimator` is a
  synthetic one);
- :func:`simulate`: the predicted latency of any plan, as the passes would build it;
- :func:`partition`: the search (chain DP, refinement, branch distribution) with the guarantee
  that the plan is never predicted slower than GPU only or CPU only.

Plans split by output channel only: the passes cannot split by height yet.
"""

from __future__ import annotations

from .estimator import AnalyticEstimator, CachedEstimator, LatencyEstimator, load_estimator
from .graph import BranchBlock, LayerGraph, Node, layer_graph
from .search import PartitionerConfig, PartitionResult, partition, to_plan
from .simulate import Prediction, simulate

__all__ = [
    "AnalyticEstimator",
    "BranchBlock",
    "CachedEstimator",
    "LatencyEstimator",
    "LayerGraph",
    "Node",
    "PartitionResult",
    "PartitionerConfig",
    "Prediction",
    "auto_plan",
    "layer_graph",
    "load_estimator",
    "partition",
    "simulate",
    "to_plan",
]


def auto_plan(mod, spec, estimator: LatencyEstimator | None = None) -> PartitionResult:
    """The ``-split=auto`` plan for ``mod`` (canonical Relax) on the cooperative target ``spec``.

    ``estimator`` defaults to the target's cost model (``-cost-model=path`` or the default one).
    """
    estimator = estimator if estimator is not None else load_estimator(spec)
    config = PartitionerConfig(align=spec.mulayer.align)
    return partition(layer_graph(mod), estimator, config)
