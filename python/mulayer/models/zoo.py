"""The benchmark model zoo: classic CNN architectures written with ``onnx.helper``.

Every model is batch 1, NCHW float32, with one input named ``input`` and one output named
``logits``, opset 17. Weights are random but deterministic (``numpy.random.default_rng(seed)``),
He-initialised and then calibrated so activations keep a sane magnitude through the whole net
(see :class:`GraphBuilder`). Batch norms keep their own nodes, as in a model exported from a
framework before any folding. Node and initializer names follow torchvision's module paths
(``layer1.0.conv1``, ``features.3.squeeze``) so error messages can name a layer.

The architectures follow torchvision: ResNet v1.5 (stride on the 3x3 conv of a bottleneck),
GoogLeNet with batch norms, a 3x3 conv in its "5x5" branch and no auxiliary heads, SqueezeNet
1.1, MobileNetV2 (width 1.0) and VGG-16 without batch norms. ``tiny`` is a small net (32x32
input, 10 classes) holding one of every op the splitter handles, for tests and the demo.

Real pretrained weights are in :mod:`mulayer.models.pretrained` (needs the ``models`` extra).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import MuLayerError
from ..fileio import atomic_write_bytes

OPSET = 17
# The IR version that introduced opset 17: older runtimes accept it, newer ones still do.
IR_VERSION = 8
INPUT_NAME = "input"
OUTPUT_NAME = "logits"

# Gain of the batch norm (or normalized conv) closing a residual branch: the residual stream's
# variance grows by about its square at every block, as in a trained net, without blowing up.
RESIDUAL_GAIN = 0.5

Shape = tuple[int, ...]


class GraphBuilder:
    """Accumulates the nodes and initializers of one NCHW float32 graph, batch 1.

    Each layer helper takes the name of an existing tensor, appends one node whose name is also
    the name of its output tensor, and returns that name.

    Weights are He-initialised, then calibrated the way a trained net's statistics are set:
    the builder runs every node in numpy as it is added, on a calibration batch of two random
    images (one white noise, one photo-like), batch norms get the running mean and variance
    they actually see, and convolutions and dense layers without a batch norm are rescaled so
    that each output channel gets a chosen spread (data-dependent init, Kraehenbuehl et al.
    2015). Without this the per-channel means of a random net grow layer after layer and swamp
    the signal. As the statistics average both images, neither kind of input can drift far.

    Parameters
    ----------
    input_shape
        Shape of the graph input ``input``, NCHW with batch 1.
    seed
        Seed of the weights and of the calibration input.
    """

    def __init__(self, input_shape: Shape, seed: int) -> None:
        if len(input_shape) != 4 or input_shape[0] != 1:
            raise ValueError(f"the zoo builds batch-1 NCHW models, not {input_shape}")
        self.rng = np.random.default_rng(seed)
        # Filled in place: copying VGG-16's 550 MB of weights between messages takes seconds.
        self.model = onnx.ModelProto()
        self.graph = self.model.graph
        # The value of every tensor on the calibration batch.
        calibration = _calibration_batch(input_shape[1:], np.random.default_rng([seed, 1]))
        self.values: dict[str, np.ndarray] = {INPUT_NAME: calibration}
        self._names: set[str] = {INPUT_NAME}
        self._clip_bounds: list[str] | None = None

    def shape(self, x: str) -> Shape:
        """Shape of tensor ``x`` in the model (batch 1)."""
        return (1, *self.values[x].shape[1:])

    def channels(self, x: str) -> int:
        return self.values[x].shape[1]

    # -- plumbing -------------------------------------------------------------------------

    def _claim(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"duplicate name {name!r} in the graph")
        self._names.add(name)
        return name

    def param(self, name: str, value: np.ndarray) -> str:
        """Add a float32 initializer and return its name."""
        value = np.asarray(value, dtype=np.float32)
        self.graph.initializer.add(
            name=self._claim(name),
            dims=value.shape,
            data_type=TensorProto.FLOAT,
            raw_data=value.astype("<f4", copy=False).tobytes(),
        )
        return name

    def node(self, op: str, inputs: Sequence[str], name: str, value: np.ndarray, **attrs) -> str:
        """Append a node named ``name`` whose only output, also ``name``, is ``value``."""
        node = helper.make_node(op, list(inputs), [self._claim(name)], name=name, **attrs)
        self.graph.node.append(node)
        self.values[name] = value.astype(np.float32, copy=False)
        return name

    def _he_normal(self, shape: Shape, fan_in: int) -> np.ndarray:
        # Drawn in float32 and scaled in place: VGG-16's first dense layer alone is 400 MB.
        w = self.rng.standard_normal(shape, dtype=np.float32)
        w *= np.float32(math.sqrt(2.0 / fan_in))
        return w

    def _normalize(
        self, y: np.ndarray, w: np.ndarray, out_std: float, shift_std: float, per_channel: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scale ``w`` (output channels first) in place and pick a bias so that its output
        ``y`` (N, C, ...) gets std ``out_std`` and a mean drawn with std
        ``shift_std * out_std``, per channel or over the whole tensor.

        Returns the new output and the bias.
        """
        c = y.shape[1]
        flat = np.moveaxis(y, 1, 0).reshape(c, -1).astype(np.float64)
        if per_channel:
            mean, std = flat.mean(axis=1), flat.std(axis=1)
        else:
            mean, std = np.full(c, flat.mean()), np.full(c, flat.std())
        scale = out_std / np.maximum(std, 1e-6)
        bias = (self.rng.normal(0.0, shift_std, c) - mean / np.maximum(std, 1e-6)) * out_std
        w *= scale.astype(np.float32).reshape(-1, *([1] * (w.ndim - 1)))
        per_channel_shape = (1, c) + (1,) * (y.ndim - 2)
        return y * scale.reshape(per_channel_shape) + bias.reshape(per_channel_shape), bias

    # -- layers ---------------------------------------------------------------------------

    def conv(
        self,
        x: str,
        name: str,
        out_channels: int,
        kernel: int,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        bias: bool = True,
        out_std: float = 1.0,
        shift_std: float = 0.1,
    ) -> str:
        """2-D convolution, square kernel, ``padding`` defaulting to ``kernel // 2``.

        With ``bias`` (no batch norm follows), each output channel is normalized to std
        ``out_std`` and a random mean of std ``shift_std * out_std``.
        """
        value = self.values[x]
        c = value.shape[1]
        if c % groups or out_channels % groups:
            raise ValueError(f"{name}: {c} -> {out_channels} channels not divisible by {groups}")
        pad = kernel // 2 if padding is None else padding
        w = self._he_normal((out_channels, c // groups, kernel, kernel), c // groups * kernel**2)
        y = _conv2d(value, w, stride, pad)
        if bias:
            # Per channel where there are enough values to measure a channel's spread.
            per_channel = y.size // out_channels >= 16
            y, b = self._normalize(y, w, out_std, shift_std, per_channel=per_channel)
        inputs = [x, self.param(f"{name}.weight", w)]
        if bias:
            inputs.append(self.param(f"{name}.bias", b))
        return self.node(
            "Conv",
            inputs,
            name,
            y,
            kernel_shape=[kernel, kernel],
            strides=[stride, stride],
            pads=[pad] * 4,
            dilations=[1, 1],
            group=groups,
        )

    def bn(self, x: str, name: str, gain: float = 1.0, eps: float = 1e-5) -> str:
        """Inference-mode BatchNormalization whose running statistics are those of its input
        on the calibration batch; its output has std about ``gain`` per channel."""
        value = self.values[x]
        c = value.shape[1]
        mean = value.mean(axis=(0, 2, 3), dtype=np.float64)
        var = value.var(axis=(0, 2, 3), dtype=np.float64)
        scale = gain * self.rng.uniform(0.8, 1.2, c)
        shift = gain * self.rng.normal(0.0, 0.1, c)
        per_channel = (1, c, 1, 1)
        y = (value - mean.reshape(per_channel)) * (scale / np.sqrt(var + eps)).reshape(per_channel)
        y += shift.reshape(per_channel)
        inputs = [x]
        for suffix, param in (
            ("weight", scale),
            ("bias", shift),
            ("running_mean", mean),
            ("running_var", var),
        ):
            inputs.append(self.param(f"{name}.{suffix}", param))
        return self.node("BatchNormalization", inputs, name, y, epsilon=eps)

    def relu(self, x: str, name: str) -> str:
        return self.node("Relu", [x], name, np.maximum(self.values[x], 0))

    def relu6(self, x: str, name: str) -> str:
        """ReLU6 as ``Clip(x, 0, 6)``; opset 17 takes the bounds as (shared) initializers."""
        if self._clip_bounds is None:
            self._clip_bounds = [
                self.param("relu6.min", np.array(0.0)),
                self.param("relu6.max", np.array(6.0)),
            ]
        return self.node("Clip", [x, *self._clip_bounds], name, np.clip(self.values[x], 0, 6))

    def maxpool(
        self, x: str, name: str, kernel: int, stride: int, padding: int = 0, ceil: bool = False
    ) -> str:
        """Max pool; ``ceil`` rounds the output size up, as PyTorch's ``ceil_mode``."""
        y = _pool2d(self.values[x], kernel, stride, padding, ceil, average=False)
        return self.node("MaxPool", [x], name, y, **_pool_attrs(kernel, stride, padding, ceil))

    def avgpool(self, x: str, name: str, kernel: int, stride: int, padding: int = 0) -> str:
        """Average pool; padding is left out of the average (ONNX's default)."""
        y = _pool2d(self.values[x], kernel, stride, padding, False, average=True)
        return self.node("AveragePool", [x], name, y, **_pool_attrs(kernel, stride, padding))

    def global_avgpool(self, x: str, name: str) -> str:
        y = self.values[x].mean(axis=(2, 3), keepdims=True)
        return self.node("GlobalAveragePool", [x], name, y)

    def flatten(self, x: str, name: str) -> str:
        value = self.values[x]
        return self.node("Flatten", [x], name, value.reshape(len(value), -1), axis=1)

    def gemm(self, x: str, name: str, out_features: int, out_std: float = 1.0) -> str:
        """Dense layer ``x @ W.T + b``, ``W`` laid out (out, in) as in PyTorch, scaled so the
        output has std ``out_std`` over all features (two calibration images are too few to
        measure each feature's spread)."""
        value = self.values[x]
        w = self._he_normal((out_features, value.shape[1]), value.shape[1])
        y, b = self._normalize(value @ w.T, w, out_std, 0.1, per_channel=False)
        inputs = [x, self.param(f"{name}.weight", w), self.param(f"{name}.bias", b)]
        return self.node("Gemm", inputs, name, y, transB=1)

    def add(self, a: str, b: str, name: str) -> str:
        if self.shape(a) != self.shape(b):
            raise ValueError(f"{name}: cannot add {self.shape(a)} and {self.shape(b)}")
        return self.node("Add", [a, b], name, self.values[a] + self.values[b])

    def concat(self, xs: Sequence[str], name: str) -> str:
        """Join NCHW tensors along the channel axis."""
        shapes = [self.shape(x)[2:] for x in xs]
        if len(set(shapes)) != 1:
            raise ValueError(f"{name}: cannot concatenate spatial sizes {shapes}")
        y = np.concatenate([self.values[x] for x in xs], axis=1)
        return self.node("Concat", xs, name, y, axis=1)

    # -- composites -----------------------------------------------------------------------

    def conv_bn(
        self,
        x: str,
        conv_name: str,
        bn_name: str,
        out_channels: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        bn_gain: float = 1.0,
        eps: float = 1e-5,
    ) -> str:
        """Convolution without bias followed by its batch norm."""
        y = self.conv(x, conv_name, out_channels, kernel, stride, groups=groups, bias=False)
        return self.bn(y, bn_name, gain=bn_gain, eps=eps)

    # -- result ---------------------------------------------------------------------------

    def finish(self, output: str, graph_name: str) -> onnx.ModelProto:
        """Rename ``output`` to ``logits`` and wrap the graph into a checked opset-17 model.

        Every intermediate tensor gets a ``value_info`` with its shape.
        """
        producer = self.graph.node[-1]
        if producer.output[0] != output:
            raise ValueError(f"the output {output!r} must come from the last node")
        producer.output[0] = OUTPUT_NAME
        self.values[OUTPUT_NAME] = self.values.pop(output)

        def info(name: str) -> onnx.ValueInfoProto:
            return helper.make_tensor_value_info(name, TensorProto.FLOAT, self.shape(name))

        self.graph.name = graph_name
        self.graph.input.append(info(INPUT_NAME))
        self.graph.output.append(info(OUTPUT_NAME))
        self.graph.value_info.extend(info(n.output[0]) for n in self.graph.node[:-1])
        model = self.model
        model.ir_version = IR_VERSION
        model.producer_name = "mulayer.zoo"
        model.opset_import.append(helper.make_opsetid("", OPSET))
        # The full check runs ONNX's shape inference against the shapes computed here.
        onnx.checker.check_model(model, full_check=True)
        return model


def _calibration_batch(shape: Shape, rng: np.random.Generator) -> np.ndarray:
    """Two random images (2, C, H, W), each channel standardized: white noise, and 1/f
    ("pink") noise whose channels share most of their signal, as a colour photo's do.

    Calibrated on white noise alone, a deep net fed photos (whose neighbouring pixels agree)
    grows about 1.3x per Inception block (GoogLeNet's logits reach std ~25); calibrated on
    photo-like noise alone, white noise grows instead (SqueezeNet). Statistics over both keep
    the mean square of every layer at 1 over the pair, so neither can stray far.
    """
    c, h, w = shape
    f = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :])
    f[0, 0] = 1.0 / max(h, w)

    def pink(channels: int) -> np.ndarray:
        noise = rng.standard_normal((channels, h, w))
        return _standardize(np.fft.ifft2(np.fft.fft2(noise) / f).real)

    photo_like = _standardize(0.8 * pink(1) + 0.6 * pink(c))
    white = _standardize(rng.standard_normal((c, h, w)))
    return np.stack([white, photo_like]).astype(np.float32)


def _standardize(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit std per channel of a (C, H, W) array."""
    x = x - x.mean(axis=(1, 2), keepdims=True)
    return x / x.std(axis=(1, 2), keepdims=True)


# -- numpy reference of the layers, batch 1, channels first ----------------------------------


def _conv2d(x: np.ndarray, w: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """Convolution of ``x`` (N, C, H, W) by ``w`` (O, C/groups, K, K)."""
    n, c = x.shape[:2]
    out_channels, group_channels, k, _ = w.shape
    groups = c // group_channels
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh = (xp.shape[2] - k) // stride + 1
    ow = (xp.shape[3] - k) // stride + 1
    # Each tap is (C, N * OH * OW): the input pixels that kernel position (i, j) sees.
    taps = [
        xp[:, :, i : i + stride * oh : stride, j : j + stride * ow : stride]
        .transpose(1, 0, 2, 3)
        .reshape(c, -1)
        for i in range(k)
        for j in range(k)
    ]
    if group_channels == 1 and out_channels == c:
        # Depthwise: a weighted sum of the taps.
        y = sum(w[:, 0, i // k, i % k, None] * tap for i, tap in enumerate(taps))
    else:
        # im2col, rows ordered (channel, kernel row, kernel column) as in the weight's layout.
        cols = np.stack(taps, axis=1)
        per_group = out_channels // groups
        y = np.empty((out_channels, n * oh * ow), np.float32)
        for g in range(groups):
            rows = slice(g * per_group, (g + 1) * per_group)
            block = cols[g * group_channels : (g + 1) * group_channels].reshape(-1, n * oh * ow)
            y[rows] = w[rows].reshape(per_group, -1) @ block
    return np.asarray(y, np.float32).reshape(out_channels, n, oh, ow).transpose(1, 0, 2, 3)


def _pool_size(size: int, kernel: int, stride: int, padding: int, ceil: bool) -> int:
    span = size + 2 * padding - kernel
    out = (-(-span // stride) if ceil else span // stride) + 1
    if ceil and (out - 1) * stride >= size + padding:
        # The last window would start in the right padding: PyTorch and onnxruntime drop it,
        # ONNX's shape inference keeps it. Refuse rather than build a model they disagree on.
        raise ValueError(f"ceil-mode pool of {size} by {kernel}/{stride} pad {padding}: ambiguous")
    return out


def _pool2d(
    x: np.ndarray, kernel: int, stride: int, padding: int, ceil: bool, average: bool
) -> np.ndarray:
    """Max or average pool of ``x`` (N, C, H, W); padding never counts."""
    h, w = x.shape[2:]
    oh = _pool_size(h, kernel, stride, padding, ceil)
    ow = _pool_size(w, kernel, stride, padding, ceil)
    # Pad (with NaN, ignored below) far enough on the right for every window of a ceil pool.
    bottom = max(0, (oh - 1) * stride + kernel - h - padding)
    right = max(0, (ow - 1) * stride + kernel - w - padding)
    pads = ((0, 0), (0, 0), (padding, bottom), (padding, right))
    xp = np.pad(x, pads, constant_values=np.nan)
    taps = np.stack(
        [
            xp[:, :, i : i + stride * oh : stride, j : j + stride * ow : stride][..., :oh, :ow]
            for i in range(kernel)
            for j in range(kernel)
        ]
    )
    return np.nanmean(taps, axis=0) if average else np.nanmax(taps, axis=0)


def _pool_attrs(kernel: int, stride: int, padding: int, ceil: bool = False) -> dict:
    attrs = {"kernel_shape": [kernel, kernel], "strides": [stride, stride], "pads": [padding] * 4}
    if ceil:
        attrs["ceil_mode"] = 1
    return attrs


# -- architectures ----------------------------------------------------------------------------


def _basic_block(b: GraphBuilder, x: str, p: str, planes: int, stride: int) -> str:
    y = b.conv_bn(x, f"{p}.conv1", f"{p}.bn1", planes, 3, stride)
    y = b.relu(y, f"{p}.relu1")
    y = b.conv_bn(y, f"{p}.conv2", f"{p}.bn2", planes, 3, bn_gain=RESIDUAL_GAIN)
    return b.relu(b.add(y, _shortcut(b, x, p, planes, stride), f"{p}.add"), f"{p}.relu2")


def _bottleneck(b: GraphBuilder, x: str, p: str, planes: int, stride: int) -> str:
    y = b.relu(b.conv_bn(x, f"{p}.conv1", f"{p}.bn1", planes, 1), f"{p}.relu1")
    y = b.relu(b.conv_bn(y, f"{p}.conv2", f"{p}.bn2", planes, 3, stride), f"{p}.relu2")
    y = b.conv_bn(y, f"{p}.conv3", f"{p}.bn3", planes * 4, 1, bn_gain=RESIDUAL_GAIN)
    return b.relu(b.add(y, _shortcut(b, x, p, planes * 4, stride), f"{p}.add"), f"{p}.relu3")


def _shortcut(b: GraphBuilder, x: str, p: str, channels: int, stride: int) -> str:
    if stride == 1 and b.channels(x) == channels:
        return x
    return b.conv_bn(x, f"{p}.downsample.0", f"{p}.downsample.1", channels, 1, stride)


def _resnet(seed: int, bottleneck: bool, depths: Sequence[int]) -> onnx.ModelProto:
    b = GraphBuilder((1, 3, 224, 224), seed)
    x = b.conv(INPUT_NAME, "conv1", 64, 7, stride=2, padding=3, bias=False)
    x = b.relu(b.bn(x, "bn1"), "relu")
    x = b.maxpool(x, "maxpool", 3, 2, padding=1)
    block = _bottleneck if bottleneck else _basic_block
    for stage, (planes, depth) in enumerate(zip((64, 128, 256, 512), depths, strict=True)):
        for i in range(depth):
            stride = 2 if stage > 0 and i == 0 else 1
            x = block(b, x, f"layer{stage + 1}.{i}", planes, stride)
    x = b.flatten(b.global_avgpool(x, "avgpool"), "flatten")
    return b.finish(b.gemm(x, "fc", 1000), "resnet50" if bottleneck else "resnet18")


def _resnet18(seed: int) -> onnx.ModelProto:
    return _resnet(seed, bottleneck=False, depths=(2, 2, 2, 2))


def _resnet50(seed: int) -> onnx.ModelProto:
    return _resnet(seed, bottleneck=True, depths=(3, 4, 6, 3))


# (expansion t, output channels c, repeats n, first stride s), as in the MobileNetV2 paper.
MOBILENETV2_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2))
MOBILENETV2_BLOCKS += ((6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _mobilenetv2(seed: int) -> onnx.ModelProto:
    b = GraphBuilder((1, 3, 224, 224), seed)

    def conv_bn_relu6(x: str, p: str, channels: int, kernel: int, stride: int = 1, groups=1):
        # A batch-norm gain of 2 makes a few values reach ReLU6's ceiling, as in a trained net.
        y = b.conv_bn(x, f"{p}.0", f"{p}.1", channels, kernel, stride, groups, bn_gain=2.0)
        return b.relu6(y, f"{p}.2")

    x = conv_bn_relu6(INPUT_NAME, "features.0", 32, 3, stride=2)
    index = 1
    for t, c, n, s in MOBILENETV2_BLOCKS:
        for i in range(n):
            stride = s if i == 0 else 1
            p = f"features.{index}.conv"
            cin = b.channels(x)
            hidden = cin * t
            y, j = x, 0
            if t != 1:
                y, j = conv_bn_relu6(y, f"{p}.0", hidden, 1), 1
            y = conv_bn_relu6(y, f"{p}.{j}", hidden, 3, stride, groups=hidden)
            residual = stride == 1 and cin == c
            # The linear projection: damped only where it is added to the residual stream.
            gain = RESIDUAL_GAIN if residual else 1.0
            y = b.conv_bn(y, f"{p}.{j + 1}", f"{p}.{j + 2}", c, 1, bn_gain=gain)
            x = b.add(x, y, f"features.{index}.add") if residual else y
            index += 1
    x = conv_bn_relu6(x, f"features.{index}", 1280, 1)
    x = b.flatten(b.global_avgpool(x, "avgpool"), "flatten")
    return b.finish(b.gemm(x, "classifier.1", 1000), "mobilenetv2")


# (1x1, 3x3 reduce, 3x3, "5x5" reduce, "5x5", pool projection) of each Inception block.
_INCEPTION_BLOCKS = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}
# Max pools between Inception blocks: (name, kernel) before the block named.
_INCEPTION_POOLS = {"4a": ("maxpool3", 3), "5a": ("maxpool4", 2)}


def _googlenet(seed: int) -> onnx.ModelProto:
    b = GraphBuilder((1, 3, 224, 224), seed)

    def basic_conv(x: str, p: str, channels: int, kernel: int, stride: int = 1) -> str:
        y = b.conv_bn(x, f"{p}.conv", f"{p}.bn", channels, kernel, stride, eps=1e-3)
        return b.relu(y, f"{p}.relu")

    x = basic_conv(INPUT_NAME, "conv1", 64, 7, stride=2)
    x = b.maxpool(x, "maxpool1", 3, 2, ceil=True)
    x = basic_conv(x, "conv2", 64, 1)
    x = basic_conv(x, "conv3", 192, 3)
    x = b.maxpool(x, "maxpool2", 3, 2, ceil=True)
    for block, (c1, c3r, c3, c5r, c5, cp) in _INCEPTION_BLOCKS.items():
        if block in _INCEPTION_POOLS:
            pool, kernel = _INCEPTION_POOLS[block]
            x = b.maxpool(x, pool, kernel, 2, ceil=True)
        p = f"inception{block}"
        branch1 = basic_conv(x, f"{p}.branch1", c1, 1)
        branch2 = basic_conv(basic_conv(x, f"{p}.branch2.0", c3r, 1), f"{p}.branch2.1", c3, 3)
        branch3 = basic_conv(basic_conv(x, f"{p}.branch3.0", c5r, 1), f"{p}.branch3.1", c5, 3)
        pooled = b.maxpool(x, f"{p}.branch4.0", 3, 1, padding=1, ceil=True)
        branch4 = basic_conv(pooled, f"{p}.branch4.1", cp, 1)
        x = b.concat([branch1, branch2, branch3, branch4], p)
    x = b.flatten(b.global_avgpool(x, "avgpool"), "flatten")
    return b.finish(b.gemm(x, "fc", 1000), "googlenet")


# (squeeze, expand 1x1, expand 3x3) of the Fire modules; None marks a 3x3/2 max pool.
_SQUEEZENET_FEATURES = (None, (16, 64, 64), (16, 64, 64), None, (32, 128, 128), (32, 128, 128))
_SQUEEZENET_FEATURES += (None, (48, 192, 192), (48, 192, 192), (64, 256, 256), (64, 256, 256))


def _squeezenet1_1(seed: int) -> onnx.ModelProto:
    b = GraphBuilder((1, 3, 224, 224), seed)
    x = b.conv(INPUT_NAME, "features.0", 64, 3, stride=2, padding=0)
    x = b.relu(x, "features.1")
    for index, fire in enumerate(_SQUEEZENET_FEATURES, start=2):
        p = f"features.{index}"
        if fire is None:
            x = b.maxpool(x, p, 3, 2, ceil=True)
            continue
        squeeze, e1, e3 = fire
        s = b.relu(b.conv(x, f"{p}.squeeze", squeeze, 1), f"{p}.squeeze_activation")
        y1 = b.relu(b.conv(s, f"{p}.expand1x1", e1, 1), f"{p}.expand1x1_activation")
        y3 = b.relu(b.conv(s, f"{p}.expand3x3", e3, 3), f"{p}.expand3x3_activation")
        x = b.concat([y1, y3], f"{p}.concat")
    # A wide spread of per-class biases, else the pooled ReLU outputs of all classes look alike.
    x = b.conv(x, "classifier.1", 1000, 1, shift_std=1.0)
    x = b.relu(x, "classifier.2")
    x = b.flatten(b.global_avgpool(x, "classifier.3"), "flatten")
    return b.finish(x, "squeezenet1_1")


_VGG16_FEATURES = (64, 64, None, 128, 128, None, 256, 256, 256, None)
_VGG16_FEATURES += (512, 512, 512, None, 512, 512, 512, None)


def _vgg16(seed: int) -> onnx.ModelProto:
    b = GraphBuilder((1, 3, 224, 224), seed)
    x, index = INPUT_NAME, 0
    for channels in _VGG16_FEATURES:
        if channels is None:
            x = b.maxpool(x, f"features.{index}", 2, 2)
            index += 1
        else:
            x = b.conv(x, f"features.{index}", channels, 3)
            x = b.relu(x, f"features.{index + 1}")
            index += 2
    # torchvision's adaptive 7x7 average pool is the identity on a 224x224 input: left out.
    x = b.flatten(x, "flatten")
    x = b.relu(b.gemm(x, "classifier.0", 4096), "classifier.1")
    x = b.relu(b.gemm(x, "classifier.3", 4096), "classifier.4")
    return b.finish(b.gemm(x, "classifier.6", 1000), "vgg16")


def _tiny(seed: int) -> onnx.ModelProto:
    b = GraphBuilder((1, 3, 32, 32), seed)
    # conv + BatchNormalization + Relu
    x = b.relu(b.conv_bn(INPUT_NAME, "stem.conv", "stem.bn", 16, 3), "stem.relu")
    # grouped conv (2 groups) + ReLU6, then a max pool
    x = b.relu6(b.conv(x, "group.conv", 32, 3, groups=2), "group.relu6")
    x = b.maxpool(x, "pool1", 2, 2)
    # depthwise conv + BN + ReLU6, pointwise conv, residual Add
    y = b.relu6(b.conv_bn(x, "dw.conv", "dw.bn", 32, 3, groups=32), "dw.relu6")
    y = b.conv(y, "pw.conv", 32, 1, out_std=RESIDUAL_GAIN)
    x = b.relu(b.add(x, y, "res.add"), "res.relu")
    # two branches joined by Concat, then an average pool
    a = b.relu(b.conv(x, "branch_a.conv", 16, 1), "branch_a.relu")
    c = b.relu(b.conv(x, "branch_b.conv", 16, 3), "branch_b.relu")
    x = b.avgpool(b.concat([a, c], "cat"), "pool2", 2, 2)
    # regular conv, global pooling, two dense layers
    x = b.relu(b.conv(x, "head.conv", 64, 3), "head.relu")
    x = b.flatten(b.global_avgpool(x, "gap"), "flatten")
    x = b.relu(b.gemm(x, "fc1", 64), "fc1.relu")
    return b.finish(b.gemm(x, "fc2", 10), "tiny")


# -- public API -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZooModel:
    """One entry of the zoo: its input shape, its class count and how to build it."""

    name: str
    input_shape: Shape
    num_classes: int
    build: Callable[[int], onnx.ModelProto]
    description: str


_IMAGENET = ((1, 3, 224, 224), 1000)
ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel("tiny", (1, 3, 32, 32), 10, _tiny, "every op kind the splitter handles"),
        ZooModel("resnet18", *_IMAGENET, _resnet18, "ResNet-18, basic blocks"),
        ZooModel("resnet50", *_IMAGENET, _resnet50, "ResNet-50 v1.5, bottlenecks"),
        ZooModel("mobilenetv2", *_IMAGENET, _mobilenetv2, "MobileNetV2 1.0, depthwise"),
        ZooModel("googlenet", *_IMAGENET, _googlenet, "GoogLeNet, Inception v1 branches"),
        ZooModel("squeezenet1_1", *_IMAGENET, _squeezenet1_1, "SqueezeNet 1.1, Fire modules"),
        ZooModel("vgg16", *_IMAGENET, _vgg16, "VGG-16, 13 convs and 3 dense (~550 MB)"),
    )
}
MODEL_NAMES: tuple[str, ...] = tuple(ZOO)
# The ImageNet-sized nets that benchmarks compare; ``tiny`` is for tests and the demo.
BENCHMARK_MODELS: tuple[str, ...] = tuple(n for n in MODEL_NAMES if n != "tiny")


def get_model_info(name: str) -> ZooModel:
    """Look up a zoo entry, raising :class:`MuLayerError` with the valid names if unknown."""
    try:
        return ZOO[name]
    except KeyError:
        raise MuLayerError(
            f"unknown zoo model {name!r}; choose one of: {', '.join(MODEL_NAMES)}"
        ) from None


def build_model(name: str, seed: int = 0) -> onnx.ModelProto:
    """Build a zoo model with deterministic random weights.

    Parameters
    ----------
    name
        One of :data:`MODEL_NAMES`.
    seed
        Seed of the weights; the same seed gives byte-identical models (on another CPU, the
        BLAS kernels of the calibration pass may round differently in the last bit).

    Returns
    -------
    onnx.ModelProto
        A checked opset-17 model with input ``input`` and output ``logits``.
    """
    info = get_model_info(name)
    model = info.build(seed)
    helper.set_model_props(model, {"mulayer.zoo.model": name, "mulayer.zoo.seed": str(seed)})
    return model


def save_model(name: str, path: str | Path, seed: int = 0) -> Path:
    """Build a zoo model and write it to ``path`` atomically; return the path."""
    path = Path(path)
    model = build_model(name, seed)
    atomic_write_bytes(path, model.SerializeToString())
    return path


def random_input(name: str, seed: int = 0) -> np.ndarray:
    """A standard-normal input of the model's shape (ImageNet-normalized images have std ~1)."""
    shape = get_model_info(name).input_shape
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
