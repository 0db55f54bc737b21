"""The split search: per-layer split points, a chain DP, local refinement, branch distribution.

Steps (each one line in :func:`partition`):

1. Per layer, the candidate placements: GPU only, CPU only, and the aligned split that minimises
   the layer's own time (the slower part plus the copy of the other part to the join), once for
   a join on each side.
2. A dynamic program over the layers in program order, whose state is the candidate chosen for
   the previous layer (so where its output lives): a layer's cost is its compute plus the copies
   of inputs that live on the other side, so consecutive layers stay where their inputs are
   unless moving pays (operator chains).
3. Local refinement with the full simulator (:func:`~mulayer.partitioner.simulate.simulate`):
   single-layer changes and runs of layers moved to one processor, while the prediction drops.
4. Branch distribution (µLayer): in every branch block, every assignment of whole branches to
   processors is simulated; it replaces the per-layer splitting of the block when faster.
5. The guarantee: GPU only and CPU only are simulated with the same estimator; a cooperative plan
   is returned only when it is predicted ``min_gain`` faster than the better of them.

Refinement and branch distribution start from the DP result and from the better
single-processor plan; the faster result wins.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from ..frontend.layers import Layer
from ..plan import LayerDecision, Plan
from .estimator import CachedEstimator, LatencyEstimator
from .graph import INPUT, LayerGraph
from .simulate import Prediction, reads_channel_slice, simulate

SIDES = ("gpu", "cpu")


@dataclass
class PartitionerConfig:
    """Knobs of the search.

    ``align``: split sizes are multiples of it (and of a grouped conv's group size).
    ``min_gain``: a cooperative plan must be predicted this much faster (fraction) than the best
    single processor, or the single processor is used. ``shared_memory``: overrides the
    estimator's device option. ``branch_limit``: blocks with more branches are not enumerated.
    """

    align: int = 8
    min_gain: float = 0.02
    shared_memory: bool | None = None
    branch_limit: int = 6
    refine_sweeps: int = 4
    run_lengths: tuple[int, ...] = (2, 4, 8, 16)


@dataclass
class PartitionResult:
    """The plan and what it is predicted to cost."""

    plan: Plan
    gpu: list[int]  # GPU output channels per layer, in program order
    prediction: Prediction
    baselines_us: dict[str, float]  # "gpu" / "cpu": the single-processor predictions
    chosen: str  # "cooperative", "gpu" or "cpu"
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------- 1. split points
def split_points(layer: Layer, align: int) -> list[int]:
    """GPU channel counts ``0 < k < C`` the passes can split ``layer`` at, aligned."""
    step = align
    if layer.kind == "conv2d" and layer.groups > 1:
        per_group = layer.out_channels // layer.groups
        step = align * per_group // math.gcd(align, per_group)
    return list(range(step, layer.out_channels - step + 1, step))


def _copy_us(est: CachedEstimator, nbytes: int, direction: str) -> float:
    if est.shared_memory:
        return est.sync_time_us() if direction == "d2h" else 0.0
    return est.sync_time_us() + est.transfer_time_us(nbytes, direction)


def split_time_us(layer: Layer, k: int, join: str, est: CachedEstimator) -> float:
    """A split layer's own time: the slower part plus the copy of the other part to ``join``."""
    total = layer.out_channels
    compute = max(est.layer_time_us(layer, "gpu", k), est.layer_time_us(layer, "cpu", total - k))
    moved = total - k if join == "gpu" else k
    direction = "h2d" if join == "gpu" else "d2h"
    return compute + _copy_us(est, layer.bytes_out * moved // total, direction)


def best_split(layer: Layer, join: str, est: CachedEstimator, align: int) -> int | None:
    """The split point minimising :func:`split_time_us` (coarse-to-fine over aligned points)."""
    points = split_points(layer, align)
    if not points:
        return None
    lo, hi = 0, len(points) - 1
    while True:
        stride = max(1, (hi - lo) // 16)
        indices = list(range(lo, hi + 1, stride))
        best = min(indices, key=lambda i: split_time_us(layer, points[i], join, est))
        if stride == 1:
            return points[best]
        lo, hi = max(0, best - stride), min(len(points) - 1, best + stride)


@dataclass(frozen=True)
class Candidate:
    gpu: int  # GPU output channels
    out: str  # where the layer's output is assumed to live (the join side of a split)


def candidates(layer: Layer, est: CachedEstimator, align: int) -> list[Candidate]:
    """GPU only, CPU only, and the best split for a join on either side."""
    total = layer.out_channels
    points = split_points(layer, align)
    est.prefetch(layer, "gpu", [*points, total])
    est.prefetch(layer, "cpu", [total - k for k in points] + [total])
    found = [Candidate(total, "gpu"), Candidate(0, "cpu")]
    for join in SIDES:
        k = best_split(layer, join, est, align)
        if k is not None:
            found.append(Candidate(k, join))
    return found


# ------------------------------------------------------------------------------- 2. chain DP
class _ChainCost:
    """A layer's cost given where its predecessors' outputs live (the DP's model)."""

    def __init__(self, graph: LayerGraph, est: CachedEstimator):
        self.graph = graph
        self.est = est
        self.position = {layer.name: i for i, layer in enumerate(graph.layers)}
        self.preds = [
            [-1 if p == INPUT else self.position[p] for p in graph.preds(layer.name)]
            for layer in graph.layers
        ]

    def cost(self, i: int, cand: Candidate, out_of: list[str]) -> float:
        layer, est = self.graph.layers[i], self.est
        total = layer.out_channels
        cost = 0.0
        # Where the input lives: the side holding most predecessor bytes; others cross.
        located = {"gpu": 0, "cpu": 0}
        for p in self.preds[i]:
            side = "cpu" if p < 0 else out_of[p]
            located[side] += layer.bytes_in if p < 0 else self.graph.layers[p].bytes_out
        home = "gpu" if located["gpu"] > located["cpu"] else "cpu"
        for p in self.preds[i]:
            side = "cpu" if p < 0 else out_of[p]
            if side != home:
                nbytes = layer.bytes_in if p < 0 else self.graph.layers[p].bytes_out
                cost += _copy_us(est, nbytes, _direction(home))
        shares = {"gpu": cand.gpu, "cpu": total - cand.gpu}
        for side, channels in shares.items():
            if channels and side != home:
                scale = channels / total if reads_channel_slice(layer) else 1.0
                cost += _copy_us(est, int(layer.bytes_in * scale), _direction(side))
        if 0 < cand.gpu < total:
            return cost + split_time_us(layer, cand.gpu, cand.out, est)
        return cost + est.layer_time_us(layer, cand.out, total)


def _direction(to: str) -> str:
    return "h2d" if to == "gpu" else "d2h"


def chain_dp(graph: LayerGraph, cands: list[list[Candidate]], est: CachedEstimator) -> list[int]:
    """Viterbi over the layers: state = the previous layer's candidate; returns GPU channels.

    A layer whose predecessor is not the previous layer (a skip, a branch) reads that
    predecessor's side off the state's best path.
    """
    model = _ChainCost(graph, est)
    # Per state: (cost so far, the path of candidate indices)
    states: list[tuple[float, list[int]]] = [(0.0, [])]
    for i, options in enumerate(cands):
        nxt = []
        for cand in options:
            best: tuple[float, list[int]] | None = None
            for cost, path in states:
                out_of = [cands[j][c].out for j, c in enumerate(path)]
                total = cost + model.cost(i, cand, out_of)
                if best is None or total < best[0]:
                    best = (total, path)
            nxt.append((best[0], [*best[1], options.index(cand)]))
        states = nxt
    # The result returns to the host.
    last = len(cands) - 1

    def final(state):
        cost, path = state
        if last >= 0 and cands[last][path[-1]].out == "gpu":
            cost += _copy_us(est, graph.layers[last].bytes_out, "d2h")
        return cost

    _, path = min(states, key=final)
    return [cands[i][c].gpu for i, c in enumerate(path)]


# ---------------------------------------------------------------------- 3. local refinement
class _Search:
    """Local moves on a full assignment, scored by the simulator."""

    def __init__(self, graph, cands, est, config: PartitionerConfig):
        self.graph, self.cands, self.est, self.config = graph, cands, est, config
        self.evaluations = 0

    def score(self, gpu: list[int]) -> float:
        self.evaluations += 1
        return simulate(self.graph, gpu, self.est, detail=False).total_us

    def refine(self, gpu: list[int], time: float) -> tuple[list[int], float]:
        """Single-layer changes and runs moved to one side, while the prediction drops.

        After the first sweep only layers near an accepted change are looked at again.
        """
        size = len(self.graph.layers)
        reach = max(self.config.run_lengths, default=1)
        active = set(range(size))
        for _ in range(self.config.refine_sweeps):
            changed: list[int] = []
            for i in sorted(active):
                for values in self._moves(i):
                    stop = i + len(values)
                    if gpu[i:stop] == values:
                        continue
                    trial = [*gpu[:i], *values, *gpu[stop:]]
                    t = self.score(trial)
                    if t < time * (1 - 1e-9):
                        gpu, time = trial, t
                        changed.append(i)
            if not changed:
                break
            active = {
                j for i in changed for j in range(max(0, i - reach), min(size, i + reach + 1))
            }
        return gpu, time

    def _moves(self, i: int) -> list[list[int]]:
        """The new GPU shares of layers ``i, i+1, ...`` that one move at layer ``i`` sets."""
        layers = self.graph.layers
        moves = [[cand.gpu] for cand in self.cands[i]]
        for side, length in itertools.product(SIDES, self.config.run_lengths):
            run = layers[i : i + length]
            moves.append([x.out_channels if side == "gpu" else 0 for x in run])
        return moves

    # ------------------------------------------------------------ 4. branch distribution
    def distribute_branches(self, gpu: list[int], time: float) -> tuple[list[int], float]:
        """Whole branches on processors, per block, where faster than the current plan."""
        position = {layer.name: i for i, layer in enumerate(self.graph.layers)}
        for block in self.graph.blocks:
            if len(block.branches) > self.config.branch_limit:
                continue
            best = None
            for sides in itertools.product(SIDES, repeat=len(block.branches)):
                trial = list(gpu)
                for branch, side in zip(block.branches, sides, strict=True):
                    for name in branch:
                        i = position[name]
                        trial[i] = self.graph.layers[i].out_channels if side == "gpu" else 0
                t = self.score(trial)
                if best is None or t < best[0]:
                    best = (t, trial)
            if best[0] < time * (1 - 1e-9):
                time, gpu = best
        return gpu, time


def describe(graph: LayerGraph, gpu: list[int], prediction: Prediction, limit: int) -> list[str]:
    """Notes on a plan: where branches run, and what crosses between the processors."""
    notes = []
    position = {layer.name: i for i, layer in enumerate(graph.layers)}
    for block in graph.blocks:
        where = [branch_side(graph, gpu, branch, position) for branch in block.branches]
        join = graph.nodes[block.join].var
        if len(block.branches) > limit:
            notes.append(f"block at {join}: {len(block.branches)} branches, not enumerated")
        elif len(set(where)) > 1:
            notes.append(f"branches joined at {join} run on {', '.join(where)}")
    nbytes = sum(c.nbytes for c in prediction.copies)
    notes.append(
        f"{len(prediction.copies)} copies between the processors ({nbytes / 1e6:.2f} MB), "
        f"predicted {prediction.copy_us / 1e3:.3f} ms"
    )
    return notes


def branch_side(graph: LayerGraph, gpu: list[int], branch, position) -> str:
    """``"gpu"`` or ``"cpu"`` when every layer of ``branch`` runs whole there, else ``"split"``."""
    sides = set()
    for name in branch:
        i = position[name]
        total = graph.layers[i].out_channels
        sides.add("gpu" if gpu[i] >= total else "cpu" if gpu[i] <= 0 else "split")
    return sides.pop() if len(sides) == 1 else "split"


# ------------------------------------------------------------------------------ the search
def partition(
    graph: LayerGraph, estimator: LatencyEstimator, config: PartitionerConfig | None = None
) -> PartitionResult:
    """Search a plan for ``graph`` with ``estimator``; see the module docstring."""
    config = config or PartitionerConfig()
    est = (
        estimator
        if isinstance(estimator, CachedEstimator) and config.shared_memory is None
        else CachedEstimator(estimator, config.shared_memory)
    )
    layers = graph.layers
    # 1. Candidate placements per layer
    cands = [candidates(layer, est, config.align) for layer in layers]
    # 5 (the reference points). Single processors, same estimator
    all_gpu = [layer.out_channels for layer in layers]
    all_cpu = [0] * len(layers)
    search = _Search(graph, cands, est, config)
    baselines = {"gpu": search.score(all_gpu), "cpu": search.score(all_cpu)}
    # 2. Operator chains: DP over the layers
    dp = chain_dp(graph, cands, est)
    # 3 + 4. Refine, distribute branches (then refine again), from the DP result and from the
    # better single processor
    single = min(baselines, key=baselines.get)
    best: tuple[float, list[int]] | None = None
    for start in _unique([dp, all_gpu if single == "gpu" else all_cpu]):
        gpu, time = search.refine(start, search.score(start))
        distributed, time = search.distribute_branches(gpu, time)
        if distributed != gpu:
            gpu, time = search.refine(distributed, time)
        if best is None or time < best[0]:
            best = (time, gpu)
    time, gpu = best
    # 5. Never predicted slower than the best single processor
    chosen = "cooperative"
    if not time < baselines[single] * (1 - config.min_gain):
        chosen, gpu = single, all_gpu if single == "gpu" else all_cpu
    prediction = simulate(graph, gpu, est)
    notes = [
        f"auto plan: {chosen}; predicted {prediction.total_us / 1e3:.3f} ms "
        f"(GPU only {baselines['gpu'] / 1e3:.3f} ms, CPU only {baselines['cpu'] / 1e3:.3f} ms)",
        *describe(graph, gpu, prediction, config.branch_limit),
        "channel splits only: the passes do not split by height yet",
        f"{search.evaluations} plans simulated; transfers "
        + ("free (shared memory)" if est.shared_memory else "priced (discrete GPU)"),
    ]
    plan = to_plan(graph, gpu, prediction, baselines, config.align, notes)
    return PartitionResult(plan, gpu, prediction, baselines, chosen, notes)


def to_plan(graph, gpu, prediction, baselines, align, notes) -> Plan:
    """A :class:`Plan` listing every layer, with predicted per-layer and end-to-end times."""
    decisions = {}
    for layer, g, time in zip(graph.layers, gpu, prediction.layers, strict=True):
        ms = round(time.total_us / 1e3, 6)
        if g >= layer.out_channels:
            decisions[layer.name] = LayerDecision("gpu", predicted_ms=ms)
        elif g <= 0:
            decisions[layer.name] = LayerDecision("cpu", predicted_ms=ms)
        else:
            decisions[layer.name] = LayerDecision("split", "channel", g, predicted_ms=ms)
    return Plan(
        default_ratio=1.0,
        align=align,
        layers=decisions,
        predicted_ms=round(prediction.total_us / 1e3, 6),
        baselines_ms={k: round(v / 1e3, 6) for k, v in baselines.items()},
        notes=notes,
    )


def _unique(starts: list[list[int]]) -> list[list[int]]:
    seen: list[list[int]] = []
    for start in starts:
        if start not in seen:
            seen.append(start)
    return seen
