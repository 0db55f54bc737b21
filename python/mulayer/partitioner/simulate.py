"""Predict a plan's latency: place the ops as the passes will, copy what crosses, run a timeline.

For a GPU share per layer, :func:`simulate` walks ``main`` in program order and mirrors what
SplitChannels and PlaceDevices emit:

- a layer wholly on one side is one part there; a split layer is a GPU part, then a CPU part
  (each reading the whole input, or for pools and grouped convs only its channels' slice, cut
  where the input lives), then a join on the side of the first part that reads the result
  (the GPU when that layer is split: its GPU part comes first);
- any other op (add, concat, reshape, relu left outside a layer) runs where most of its input
  elements are (ties: its first input's side); the function's inputs are on the CPU;
- a tensor read on the other side is copied once, right before its first reader there;
  returned tensors end on the host.

The timeline has two clocks. The host runs CPU ops in program order and launches GPU ops
asynchronously; the GPU runs them in order, each once launched and its inputs are ready, so a CPU
part after a GPU part overlaps it. On a discrete GPU (``shared_memory`` False) a copy waits for
all earlier GPU work and blocks the host (``cudaMemcpy`` on the default stream): sync plus
transfer. With shared memory a copy is free, but reading a GPU result on the CPU still costs a
sync.

Not modelled: channel-wise epilogues (bias, relu) run inside the parts in the real program, which
changes no copy; non-layer ops cost no compute here, only the copies they cause. CPU-side
weights are resident on the host (LiftCPUWeights), so weights never cross.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from .estimator import CachedEstimator
from .graph import LayerGraph

# Layer kinds whose parts read only their own channels of the input (SplitChannels slices it).
PER_CHANNEL_KINDS = ("max_pool2d", "avg_pool2d", "global_avg_pool2d")


def reads_channel_slice(layer) -> bool:
    """True when a part of ``layer`` reads only its channels' slice of the input."""
    return layer.kind in PER_CHANNEL_KINDS or (layer.kind == "conv2d" and layer.groups > 1)


@dataclass
class LayerTime:
    """Predicted µs of one layer: each side's part and the copies its parts and join cause."""

    gpu_us: float = 0.0
    cpu_us: float = 0.0
    copy_us: float = 0.0

    @property
    def total_us(self) -> float:
        return max(self.gpu_us, self.cpu_us) + self.copy_us


@dataclass
class Copy:
    """One tensor crossing: which node's value (or slice), direction, bytes and cost."""

    tensor: str
    direction: str
    nbytes: int
    cost_us: float


@dataclass
class Prediction:
    """A plan's predicted end-to-end time, per-layer times and copies."""

    total_us: float
    layers: list[LayerTime]
    copies: list[Copy]

    @property
    def copy_us(self) -> float:
        return sum(c.cost_us for c in self.copies)


class _Static:
    """What the simulation needs of a graph, independent of the plan."""

    def __init__(self, graph: LayerGraph):
        position = {layer.name: i for i, layer in enumerate(graph.layers)}
        self.position = [position[n.layer.name] if n.layer is not None else -1 for n in graph.nodes]
        self.sliced = [n.layer is not None and reads_channel_slice(n.layer) for n in graph.nodes]
        # The first layer (by program order) reading each node's value through non-layer ops:
        # a split layer's join goes to that layer's first part.
        self.first_reader = [self._first_layer(graph, n.index) for n in graph.nodes]

    def _first_layer(self, graph: LayerGraph, index: int) -> int:
        frontier = list(graph.readers[index])
        heapq.heapify(frontier)
        seen: set[int] = set()
        while frontier:
            reader = heapq.heappop(frontier)
            if reader in seen:
                continue
            seen.add(reader)
            if self.position[reader] >= 0:
                return self.position[reader]
            for nxt in graph.readers[reader]:
                heapq.heappush(frontier, nxt)
        return -1


def _static(graph: LayerGraph) -> _Static:
    cached = getattr(graph, "_simulation_static", None)
    if cached is None:
        cached = _Static(graph)
        graph._simulation_static = cached
    return cached


class _Timeline:
    """The two clocks, the copies made so far and the per-layer bookkeeping."""

    def __init__(self, est: CachedEstimator, n_layers: int, detail: bool):
        self.est = est
        self.shared = est.shared_memory
        self.sync = est.sync_time_us()
        self.cpu = 0.0
        self.gpu = 0.0
        self.copied: dict[tuple, float] = {}
        self.layer_copy = [0.0] * n_layers
        self.copies: list[Copy] | None = [] if detail else None

    def copy(self, key, name: str, elements: int, ready: float, to: str, layer: int) -> float:
        """Make ``key``'s value available on ``to`` (once); return when it is there."""
        done = self.copied.get(key)
        if done is not None:
            return done
        direction = "h2d" if to == "gpu" else "d2h"
        nbytes = 4 * elements  # tensors cross in fp32: parts cast inside themselves
        if self.shared:
            cost = self.sync if direction == "d2h" else 0.0
            self.cpu = done = max(self.cpu, ready) + cost
        else:
            cost = self.sync + self.est.transfer_time_us(nbytes, direction)
            self.cpu = self.gpu = done = max(self.cpu, self.gpu, ready) + cost
        self.copied[key] = done
        if layer >= 0:
            self.layer_copy[layer] += cost
        if self.copies is not None:
            self.copies.append(Copy(name, direction, nbytes, cost))
        return done

    def run(self, side: str, time: float, inputs_ready: float) -> float:
        """Run an op of ``time`` µs on ``side``; return when its result is ready."""
        if side == "cpu":
            self.cpu = max(self.cpu, inputs_ready) + time
            return self.cpu
        self.gpu = max(self.gpu, self.cpu, inputs_ready) + time
        return self.gpu


def simulate(
    graph: LayerGraph, gpu: list[int], est: CachedEstimator, detail: bool = True
) -> Prediction:
    """Predicted latency of the plan giving ``gpu[i]`` output channels of layer ``i`` to the GPU.

    ``detail=False`` skips the copy list (faster, for the search).
    """
    st = _static(graph)
    nodes = graph.nodes
    home: list[str] = [""] * len(nodes)
    ready = [0.0] * len(nodes)
    gpu_us = [0.0] * len(graph.layers)
    cpu_us = [0.0] * len(graph.layers)
    tl = _Timeline(est, len(graph.layers), detail)
    for node in nodes:
        index = node.index
        if node.kind == "input":
            home[index] = "cpu"
            continue
        i = st.position[index]
        if i < 0:
            # Another op: where most of its input elements are; inputs copied there.
            weight = {"gpu": 0, "cpu": 0}
            for src in node.inputs:
                weight[home[src]] += nodes[src].elements
            if weight["gpu"] == weight["cpu"]:
                side = home[node.inputs[0]] if node.inputs else "cpu"
            else:
                side = "gpu" if weight["gpu"] > weight["cpu"] else "cpu"
            at = 0.0
            for src in node.inputs:
                at = max(at, _read(tl, nodes[src], home[src], ready[src], side, -1))
            home[index], ready[index] = side, tl.run(side, 0.0, at)
            continue
        layer = node.layer
        src = node.inputs[0]
        total, g = layer.out_channels, gpu[i]
        if g <= 0 or g >= total:
            side = "gpu" if g >= total else "cpu"
            at = _read(tl, nodes[src], home[src], ready[src], side, i)
            time = est.layer_time_us(layer, side, total)
            (gpu_us if side == "gpu" else cpu_us)[i] += time
            home[index], ready[index] = side, tl.run(side, time, at)
            continue
        # A split: GPU part, CPU part, join on the side of the first part reading the result.
        parts = []
        for side, channels in (("gpu", g), ("cpu", total - g)):
            if st.sliced[index] and home[src] != side:
                # The slice is cut where the input lives, then only the slice crosses.
                elements = nodes[src].elements * channels // total
                name = f"{layer.name}:{side}_in"
                at = tl.copy((index, side, "in"), name, elements, ready[src], side, i)
            else:
                at = _read(tl, nodes[src], home[src], ready[src], side, i)
            time = est.layer_time_us(layer, side, channels)
            (gpu_us if side == "gpu" else cpu_us)[i] += time
            parts.append((side, channels, tl.run(side, time, at)))
        reader = st.first_reader[index]
        join = "gpu" if reader >= 0 and gpu[reader] > 0 else "cpu"
        at = 0.0
        for side, channels, done in parts:
            if side != join:
                elements = node.elements * channels // total
                done = tl.copy(
                    (index, side, "part"), f"{layer.name}:{side}", elements, done, join, i
                )
            at = max(at, done)
        home[index], ready[index] = join, at
    for out in graph.outputs:
        if home[out] == "gpu":
            _read(tl, nodes[out], "gpu", ready[out], "cpu", -1)
    layers = [LayerTime(g, c, x) for g, c, x in zip(gpu_us, cpu_us, tl.layer_copy, strict=True)]
    return Prediction(max(tl.cpu, tl.gpu), layers, tl.copies or [])


def _read(tl: _Timeline, node, where: str, ready: float, side: str, layer: int) -> float:
    """When ``node``'s value (living on ``where``) is available on ``side``."""
    if where == side:
        return ready
    return tl.copy((node.index, side), node.var, node.elements, ready, side, layer)
