"""ONNX → PyTorch for the benchmark models: the PyTorch peer of ``scripts/bench.py``.

The zoo models exist only as ONNX and the GPU machine has no onnx2torch and no network, so
:class:`OnnxModule` runs an ONNX graph's nodes in order with ``torch.nn.functional``. It covers
exactly the ops of the benchmark models (the six zoo nets, ``tiny`` and the pretrained
MobileNetV2 and EfficientNet-Lite0, see :data:`SUPPORTED_OPS`) and raises
:class:`~mulayer.errors.MuLayerError` naming any other op. Float initializers become
parameters (so ``.half()``, ``.cuda()`` and ``channels_last`` convert them); Clip bounds, shapes
and axes stay Python constants. A BatchNormalization that follows a Conv is folded into it, as
PyTorch's own inference fusions do (``torch.ao.quantization.fuse_modules``), so the peer does
the same arithmetic as mulayer, whose frontend folds it too.

Runners prepare the module as the benchmark's peers: :func:`eager_runner` (one launch per
kernel), :func:`cuda_graph_runner` (the forward captured once in a CUDA graph, replayed from a
static input buffer) and :func:`compiled_runner` (``torch.compile``).

    module = prepare(onnx.load("resnet18.onnx"), "cuda", half=True)
    runner = cuda_graph_runner(module, x)   # x: float32 numpy [1, 3, 224, 224]
    runner.step()                           # one timed call: replay + synchronize
    logits = runner.predict(x)              # float32 numpy
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from mulayer.errors import MuLayerError

# A step reads the environment (name → tensor) and the parameter list and returns its outputs.
Step = Callable[[dict, list], tuple]


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _pair(values, default: int) -> list[int]:
    return list(values) if values else [default, default]


def _optional_input(node: onnx.NodeProto, index: int) -> str:
    return node.input[index] if len(node.input) > index else ""


class _Graph:
    """What the converters see: static values, parameter registration, folded batch norms."""

    def __init__(self, model: onnx.ModelProto, fold_batchnorm: bool) -> None:
        self.static: dict[str, np.ndarray] = {
            t.name: numpy_helper.to_array(t) for t in model.graph.initializer
        }
        for node in model.graph.node:
            if node.op_type == "Constant":
                self.static[node.output[0]] = numpy_helper.to_array(_attrs(node)["value"])
        self.params: list[np.ndarray] = []
        self._param_index: dict[str, int] = {}
        # Folded batch norms: conv output → (weight, bias), and the output the conv writes.
        self.folded: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.renamed: dict[str, str] = {}
        self.skipped: set[str] = set()  # outputs of the batch norms folded away
        if fold_batchnorm:
            self._fold_batch_norms(model)

    def _fold_batch_norms(self, model: onnx.ModelProto) -> None:
        """Fold each Conv → BatchNormalization pair whose conv output feeds only that BN and
        is no graph output; the folded conv writes the BN's output."""
        uses: dict[str, int] = {}
        for node in model.graph.node:
            for name in node.input:
                uses[name] = uses.get(name, 0) + 1
        graph_outputs = {o.name for o in model.graph.output}
        convs = {n.output[0]: n for n in model.graph.node if n.op_type == "Conv"}
        for node in model.graph.node:
            conv = convs.get(node.input[0]) if node.op_type == "BatchNormalization" else None
            if conv is None or uses[conv.output[0]] != 1 or conv.output[0] in graph_outputs:
                continue
            bias = _optional_input(conv, 2)
            needed = [conv.input[1], *node.input[1:5], *([bias] if bias else [])]
            if not all(name in self.static for name in needed):
                continue
            scale, shift, mean, var = (self.static[n].astype(np.float64) for n in node.input[1:5])
            factor = scale / np.sqrt(var + _attrs(node).get("epsilon", 1e-5))
            w = self.static[conv.input[1]].astype(np.float64)
            b = self.static[bias].astype(np.float64) if bias else np.zeros(len(factor))
            self.folded[conv.output[0]] = (
                (w * factor.reshape(-1, 1, 1, 1)).astype(np.float32),
                ((b - mean) * factor + shift).astype(np.float32),
            )
            self.renamed[conv.output[0]] = node.output[0]
            self.skipped.add(node.output[0])

    def param(self, name: str, value: np.ndarray | None = None) -> int:
        """Index of the parameter holding static ``name`` (or ``value``, unnamed)."""
        if value is not None:
            self.params.append(np.asarray(value, np.float32))
            return len(self.params) - 1
        if name not in self._param_index:
            self._param_index[name] = self.param("", self.static[name])
        return self._param_index[name]

    def scalar(self, name: str) -> float | None:
        return None if not name else float(self.static[name].reshape(()))

    def operand(self, name: str) -> tuple[bool, int | str]:
        """``(is_param, key)``: a static operand becomes a parameter, else it is read from the
        environment."""
        return (True, self.param(name)) if name in self.static else (False, name)


def _read(ref: tuple[bool, int | str], env: dict, params: list) -> torch.Tensor:
    is_param, key = ref
    return params[key] if is_param else env[key]


# -- converters: (graph, node, attributes) → Step, or (Step, output names) ----------------------


def _conv(g: _Graph, node: onnx.NodeProto, a: dict) -> tuple[Step, list[str]]:
    x, out, bias = node.input[0], node.output[0], _optional_input(node, 2)
    w, b = g.folded.get(out, (g.static[node.input[1]], g.static[bias] if bias else None))
    w_i = g.param("", w)
    b_i = None if b is None else g.param("", b)
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID"):
        raise MuLayerError(f"Conv {node.name!r}: auto_pad={a['auto_pad']!r} is not supported")
    pads = list(a.get("pads", [0, 0, 0, 0]))
    stride, dilation = _pair(a.get("strides"), 1), _pair(a.get("dilations"), 1)
    groups = a.get("group", 1)
    if pads[:2] == pads[2:]:
        padding, pre = pads[:2], None
    else:  # asymmetric (EfficientNet's "same" padding): pad explicitly, then a valid conv
        padding, pre = [0, 0], [pads[1], pads[3], pads[0], pads[2]]

    def step(env, p):
        data = env[x] if pre is None else F.pad(env[x], pre)
        bias_value = None if b_i is None else p[b_i]
        return (F.conv2d(data, p[w_i], bias_value, stride, padding, dilation, groups),)

    return step, [g.renamed.get(out, out)]


def _batch_norm(g: _Graph, node: onnx.NodeProto, a: dict) -> Step:
    x = node.input[0]
    scale, shift, mean, var = (g.param(n) for n in node.input[1:5])
    eps = a.get("epsilon", 1e-5)
    return lambda env, p: (
        F.batch_norm(env[x], p[mean], p[var], p[scale], p[shift], False, 0.0, eps),
    )


def _clip(g: _Graph, node: onnx.NodeProto, a: dict) -> Step:
    x = node.input[0]
    lo, hi = g.scalar(_optional_input(node, 1)), g.scalar(_optional_input(node, 2))
    if lo is None and hi is None:
        return lambda env, p: (env[x],)
    if lo == 0.0 and hi == 6.0:
        return lambda env, p: (F.relu6(env[x]),)
    return lambda env, p: (torch.clamp(env[x], lo, hi),)


def _pool_args(node: onnx.NodeProto, a: dict) -> tuple:
    if a.get("auto_pad", b"NOTSET") != b"NOTSET":
        raise MuLayerError(f"{node.op_type} {node.name!r}: auto_pad is not supported")
    pads = list(a.get("pads", [0, 0, 0, 0]))
    if pads[:2] != pads[2:]:
        raise MuLayerError(f"{node.op_type} {node.name!r}: asymmetric pads {pads} not supported")
    return list(a["kernel_shape"]), _pair(a.get("strides"), 1), pads[:2], bool(a.get("ceil_mode"))


def _max_pool(g: _Graph, node: onnx.NodeProto, a: dict) -> Step:
    x = node.input[0]
    kernel, stride, padding, ceil = _pool_args(node, a)
    dilation = _pair(a.get("dilations"), 1)
    return lambda env, p: (F.max_pool2d(env[x], kernel, stride, padding, dilation, ceil),)


def _average_pool(g: _Graph, node: onnx.NodeProto, a: dict) -> Step:
    x = node.input[0]
    kernel, stride, padding, ceil = _pool_args(node, a)
    include_pad = bool(a.get("count_include_pad", 0))
    return lambda env, p: (F.avg_pool2d(env[x], kernel, stride, padding, ceil, include_pad),)


def _global_average_pool(g: _Graph, node: onnx.NodeProto, a: dict) -> Step:
    x = node.input[0]
    return lambda env, p: (F.adaptive_avg_pool2d(env[x], 1),)


def _binary(op: Callable) -> Callable:
    def convert(g: _Graph, node: onnx.NodeProto, a: dict) -> Step:
        left, right = g.operand(node.input[0]), g.operand(node.input[1])
        return lambda env, p: (op(_read(left, env, p), _read(right, env, p)),)

    return convert


def _relu(g: _Graph, node: onnx.NodeProto, a: dict) -> Step:
    x = node.input[0]
    return lambda env, p: (F.relu(env[x]),)


def _concat(g: _Graph, node: onnx.NodeProto, a: dict) -> Step:
    xs, axis = list(node.input), a["axis"]
    return lambda env, p: (torch.cat([env[x] for x in xs], axis),)


def _flatten(g: _Graph, node: onnx.NodeProto, a: dict) -> Step:
    x, axis = node.input[0], a.get("axis", 1)
    if axis == 0:
        return lambda env, p: (env[x].reshape(1, -1),)
    # (d0, ..., d[axis-1], rest) → (d0 * ... * d[axis-1], rest)
    return lambda env, p: (env[x].flatten(axis).flatten(0, axis - 1),)


def _gemm(g: _Graph, node: onnx.NodeProto, a: dict) -> Step:
    x, w_name, c = node.input[0], node.input[1], _optional_input(node, 2)
    if w_name not in g.static or (c and c not in g.static):
        raise MuLayerError(f"Gemm {node.name!r}: only constant B and C are supported")
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    # F.linear computes x @ W.T: lay B out as W = B.T (B itself when transB), alpha folded in.
    w = g.static[w_name] if a.get("transB", 0) else g.static[w_name].T
    w_i = g.param("", alpha * w)
    b_i = g.param("", beta * g.static[c]) if c else None
    trans_a = bool(a.get("transA", 0))

    def step(env, p):
        data = env[x].t() if trans_a else env[x]
        return (F.linear(data, p[w_i], None if b_i is None else p[b_i]),)

    return step


def _reduce_mean(g: _Graph, node: onnx.NodeProto, a: dict) -> Step:
    x = node.input[0]
    axes = a.get("axes")  # opset < 18: an attribute; opset 18: an optional input
    if axes is None and _optional_input(node, 1):
        axes = g.static[node.input[1]].tolist()
    keepdims = bool(a.get("keepdims", 1))
    if not axes:
        if a.get("noop_with_empty_axes", 0):
            return lambda env, p: (env[x],)
        return lambda env, p: (env[x].mean(dim=None, keepdim=keepdims),)
    dims = [int(d) for d in axes]
    return lambda env, p: (env[x].mean(dim=dims, keepdim=keepdims),)


def _reshape(g: _Graph, node: onnx.NodeProto, a: dict) -> Step:
    x = node.input[0]
    if node.input[1] not in g.static:
        raise MuLayerError(f"Reshape {node.name!r}: only a constant shape is supported")
    shape = [int(d) for d in g.static[node.input[1]]]
    if a.get("allowzero", 0) or 0 not in shape:
        return lambda env, p: (env[x].reshape(shape),)
    # Without allowzero, a 0 copies the input's dimension at that position.
    return lambda env, p: (
        env[x].reshape([env[x].shape[i] if d == 0 else d for i, d in enumerate(shape)]),
    )


_CONVERTERS: dict[str, Callable] = {
    "Add": _binary(torch.add),
    "AveragePool": _average_pool,
    "BatchNormalization": _batch_norm,
    "Clip": _clip,
    "Concat": _concat,
    "Conv": _conv,
    "Flatten": _flatten,
    "Gemm": _gemm,
    "GlobalAveragePool": _global_average_pool,
    "MaxPool": _max_pool,
    "Mul": _binary(torch.mul),
    "ReduceMean": _reduce_mean,
    "Relu": _relu,
    "Reshape": _reshape,
}
# Constant nodes are not run: their values join the initializers as static values.
SUPPORTED_OPS: tuple[str, ...] = tuple(sorted([*_CONVERTERS, "Constant"]))


class OnnxModule(torch.nn.Module):
    """An ONNX model (the benchmark models' ops) as a ``torch.nn.Module``.

    Parameters
    ----------
    model
        The ONNX model; its float initializers become parameters (``requires_grad=False``).
    fold_batchnorm
        Fold each BatchNormalization that follows a Conv into the conv's weights and bias.

    Raises
    ------
    MuLayerError
        If the model uses an op outside :data:`SUPPORTED_OPS`, naming every such op.
    """

    def __init__(self, model: onnx.ModelProto, fold_batchnorm: bool = True) -> None:
        super().__init__()
        unknown = sorted({n.op_type for n in model.graph.node} - set(SUPPORTED_OPS))
        if unknown:
            raise MuLayerError(
                f"the PyTorch peer does not support the ONNX op(s) {', '.join(unknown)}; "
                f"supported: {', '.join(SUPPORTED_OPS)}"
            )
        g = _Graph(model, fold_batchnorm)
        self.folded_batchnorms = len(g.folded)
        self._steps: list[tuple[Step, list[str]]] = []
        for node in model.graph.node:
            if node.op_type == "Constant" or node.output[0] in g.skipped:
                continue
            step = _CONVERTERS[node.op_type](g, node, _attrs(node))
            self._steps.append(step if isinstance(step, tuple) else (step, list(node.output)))
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter(torch.from_numpy(np.array(v, np.float32)), requires_grad=False)
            for v in g.params
        )
        self.input_names = [i.name for i in model.graph.input if i.name not in g.static]
        self.output_names = [o.name for o in model.graph.output]

    def forward(self, *inputs: torch.Tensor):
        env = dict(zip(self.input_names, inputs, strict=True))
        params = list(self.weights)
        for step, outputs in self._steps:
            for name, value in zip(outputs, step(env, params), strict=True):
                env[name] = value
        results = [env[name] for name in self.output_names]
        return results[0] if len(results) == 1 else tuple(results)


# -- runners ----------------------------------------------------------------------------------


@dataclass
class Runner:
    """A prepared PyTorch peer: ``step()`` is one timed call, ``predict(x)`` gives logits."""

    step: Callable[[], None]
    predict: Callable[[np.ndarray], np.ndarray]


def prepare(
    model: onnx.ModelProto, device: str, half: bool, channels_last: bool = False
) -> OnnxModule:
    """The module on ``device`` in eval mode, fp16 when ``half``, channels-last if asked."""
    module = OnnxModule(model).eval().to(device)
    if half:
        module = module.half()
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module


def _device(module: OnnxModule) -> torch.device:
    return next(iter(module.parameters())).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _to_input(module: OnnxModule, x: np.ndarray, channels_last: bool) -> torch.Tensor:
    param = next(iter(module.parameters()))
    tensor = torch.from_numpy(np.ascontiguousarray(x)).to(param.device, param.dtype)
    return tensor.contiguous(memory_format=torch.channels_last) if channels_last else tensor


def eager_runner(module: OnnxModule, x: np.ndarray, channels_last: bool = False) -> Runner:
    """One forward a call, kernels launched one by one (PyTorch eager), input already on the
    device."""
    device = _device(module)
    static = _to_input(module, x, channels_last)

    def step() -> None:
        with torch.inference_mode():
            module(static)
        _sync(device)

    def predict(image: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return _first(module(_to_input(module, image, channels_last))).float().cpu().numpy()

    return Runner(step, predict)


def cuda_graph_runner(
    module: OnnxModule, x: np.ndarray, channels_last: bool = False, warmup: int = 3
) -> Runner:
    """The forward captured once in a CUDA graph; a call replays it on the static input."""
    device = _device(module)
    if device.type != "cuda":
        raise MuLayerError(f"a CUDA graph needs the module on a CUDA device, not {device}")
    static = _to_input(module, x, channels_last)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.inference_mode():
        # Warm up on a side stream before capturing (cuDNN picks its algorithms here).
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                module(static)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _first(module(static))
    torch.cuda.synchronize(device)

    def step() -> None:
        graph.replay()
        torch.cuda.synchronize(device)

    def predict(image: np.ndarray) -> np.ndarray:
        static.copy_(_to_input(module, image, channels_last))
        graph.replay()
        return out.float().cpu().numpy()

    return Runner(step, predict)


def compiled_runner(
    module: OnnxModule, x: np.ndarray, mode: str = "max-autotune", channels_last: bool = False
) -> Runner:
    """``torch.compile(module, mode=mode)``, compiled by a first call that is not timed."""
    device = _device(module)
    compiled = torch.compile(module, mode=mode, fullgraph=True)
    static = _to_input(module, x, channels_last)
    with torch.inference_mode():
        compiled(static)
    _sync(device)

    def step() -> None:
        with torch.inference_mode():
            compiled(static)
        _sync(device)

    def predict(image: np.ndarray) -> np.ndarray:
        # Into the static buffer: the CUDA-graph modes replay on it.
        static.copy_(_to_input(module, image, channels_last))
        with torch.inference_mode():
            return _first(compiled(static)).float().cpu().numpy()

    return Runner(step, predict)
