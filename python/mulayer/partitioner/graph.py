"""The layer graph: ``main``'s bindings as nodes, the splittable layers among them, branch blocks.

:func:`layer_graph` reads a canonical Relax module (as :mod:`mulayer.frontend.onnx_import` makes
it). Every binding of ``main`` becomes a :class:`Node` (splittable layers carry their
:class:`~mulayer.frontend.layers.Layer`); the function's parameters are ``input`` nodes. The
partitioner needs three views of it:

- the nodes in program order, to simulate what the passes will emit for a plan;
- each layer's predecessor layers through non-splittable ops (add, concat, relu, reshape...);
- branch blocks: a ``concat`` whose inputs come from parallel chains of layers (GoogLeNet's
  Inception, SqueezeNet's Fire). A branch is the set of layers that only that input of the
  concat depends on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tvm import relax

from ..frontend.layers import Layer, splittable_bindings, static_shape

INPUT = "input"  # the predecessor name of layers fed by the function's inputs


@dataclass(frozen=True)
class Node:
    """One binding (or parameter) of ``main``."""

    index: int
    var: str
    kind: str  # "input" | "layer" | "op"
    inputs: tuple[int, ...]  # producer node indices, in the order the value reads them
    elements: int  # output elements (0 when not a tensor)
    layer: Layer | None = None
    op: str = ""

    @property
    def nbytes(self) -> int:
        """Bytes of the output as it crosses between processors (fp32: parts cast back)."""
        return 4 * self.elements


@dataclass(frozen=True)
class BranchBlock:
    """Parallel branches joined by one ``concat`` (``join`` is its node index)."""

    join: int
    branches: tuple[tuple[str, ...], ...]  # layer names per branch, in program order

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(name for branch in self.branches for name in branch)


@dataclass
class LayerGraph:
    """``main`` as nodes; see the module docstring."""

    nodes: list[Node]
    outputs: list[int]  # nodes returned by main (their results end on the host)
    blocks: list[BranchBlock] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.layers: list[Layer] = [n.layer for n in self.nodes if n.layer is not None]
        self.node_of: dict[str, int] = {
            n.layer.name: n.index for n in self.nodes if n.layer is not None
        }
        self.readers: list[list[int]] = [[] for _ in self.nodes]
        for node in self.nodes:
            for src in dict.fromkeys(node.inputs):
                self.readers[src].append(node.index)

    def layer(self, name: str) -> Layer:
        return self.nodes[self.node_of[name]].layer

    def preds(self, name: str) -> list[str]:
        """Layers (or :data:`INPUT`) whose outputs reach layer ``name`` through non-layer ops."""
        found: dict[str, None] = {}
        stack = list(self.nodes[self.node_of[name]].inputs)
        seen: set[int] = set()
        while stack:
            index = stack.pop()
            if index in seen:
                continue
            seen.add(index)
            node = self.nodes[index]
            if node.kind == "layer":
                found[node.layer.name] = None
            elif node.kind == "input":
                found[INPUT] = None
            else:
                stack.extend(node.inputs)
        return list(found)

    def ancestors(self) -> list[int]:
        """For each node, a bitmask of the layers (by position in ``layers``) it depends on."""
        position = {layer.name: i for i, layer in enumerate(self.layers)}
        masks: list[int] = []
        for node in self.nodes:
            mask = 0
            for src in node.inputs:
                mask |= masks[src]
            if node.layer is not None:
                mask |= 1 << position[node.layer.name]
            masks.append(mask)
        return masks


def layer_graph(mod) -> LayerGraph:
    """The :class:`LayerGraph` of ``mod["main"]`` (a canonical Relax module)."""
    func = mod["main"] if not isinstance(mod, relax.Function) else mod
    layers = {binding.var: layer for layer, binding in splittable_bindings(func)}
    nodes: list[Node] = []
    index_of: dict[relax.Var, int] = {}
    for param in func.params:
        index_of[param] = len(nodes)
        nodes.append(Node(len(nodes), param.name, "input", (), _elements(param)))
    for block in func.body.blocks:
        for binding in block.bindings:
            inputs = tuple(index_of[v] for v in _read_vars(binding.value) if v in index_of)
            layer = layers.get(binding.var)
            op = getattr(getattr(binding.value, "op", None), "name", "") or ""
            if layer is not None:
                inputs = inputs[:1]  # the data input; weights are constants
            index_of[binding.var] = len(nodes)
            nodes.append(
                Node(
                    len(nodes),
                    binding.var.name,
                    "layer" if layer is not None else "op",
                    inputs,
                    _elements(binding.var),
                    layer,
                    op,
                )
            )
    outputs = [index_of[v] for v in _read_vars(func.body.body) if v in index_of]
    graph = LayerGraph(nodes, outputs)
    graph.blocks = find_branch_blocks(graph)
    return graph


def find_branch_blocks(graph: LayerGraph) -> list[BranchBlock]:
    """Concats of at least two inputs that each depend on layers no other input depends on."""
    masks = graph.ancestors()
    names = [layer.name for layer in graph.layers]
    blocks = []
    for node in graph.nodes:
        if node.op != "relax.concat" or len(node.inputs) < 2:
            continue
        own = []
        for i, src in enumerate(node.inputs):
            others = 0
            for j, other in enumerate(node.inputs):
                if j != i:
                    others |= masks[other]
            own.append(masks[src] & ~others)
        branches = tuple(
            tuple(names[k] for k in range(len(names)) if mask >> k & 1) for mask in own if mask
        )
        if len(branches) >= 2:
            blocks.append(BranchBlock(node.index, branches))
    return blocks


def _read_vars(expr: relax.Expr) -> list[relax.Var]:
    """Tensor variables ``expr`` reads, first occurrence first (as PlaceDevices sees them)."""
    found: dict[relax.Var, None] = {}

    def visit(e: relax.Expr) -> None:
        if isinstance(e, relax.Var):
            found.setdefault(e, None)

    relax.analysis.post_order_visit(expr, visit)
    return [v for v in found if isinstance(v.ty, relax.TensorType)]


def _elements(var: relax.Var) -> int:
    shape = static_shape(var)
    if shape is None:
        return 0
    count = 1
    for dim in shape:
        count *= dim
    return count
