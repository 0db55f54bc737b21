"""The quantities of one part (``channels`` output channels of a layer) that the features, the
kernel description (:mod:`.kernels`) and the baseline predictors derive from."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mulayer.frontend.layers import Layer


@dataclass
class PartShape:
    """The quantities of one part that features and baselines use."""

    kind: str
    channels: int
    total: int
    flops: float
    bytes_in: float
    bytes_out: float
    weight_elems: float
    out_elems: float
    in_channels: int
    in_height: int
    in_width: int
    out_height: int
    out_width: int
    kernel_h: int
    kernel_w: int
    stride: int
    groups: int

    @property
    def share(self) -> float:
        return self.channels / self.total

    @property
    def depthwise(self) -> bool:
        return self.kind == "conv2d" and self.groups > 1 and self.groups == self.in_channels


def part_shape(layer: Layer, channels: int) -> PartShape:
    """The part of ``layer`` computing ``channels`` of its output channels."""
    total = int(layer.output_shape[1])
    share = channels / total
    in_shape = list(layer.input_shape) + [1, 1]
    out_shape = list(layer.output_shape) + [1, 1]
    out_elems = float(np.prod(layer.output_shape)) * share
    # The whole input is read by dense and ungrouped conv parts; the rest read their channels.
    reads_all = layer.kind == "dense" or (layer.kind == "conv2d" and layer.groups == 1)
    weight_elems = float(np.prod(layer.weight_shape)) * share if layer.weight_shape else 0.0
    if layer.kind == "conv2d":
        kh, kw = int(layer.weight_shape[2]), int(layer.weight_shape[3])
    elif layer.kind == "dense":
        kh = kw = 1
    else:  # pooling: FLOPs are one op per window element per output
        area = max(1, round(layer.flops / max(1.0, float(np.prod(layer.output_shape)))))
        if layer.kind == "global_avg_pool2d":
            kh, kw = int(in_shape[2]), int(in_shape[3])
        else:
            kh = kw = max(1, round(math.sqrt(area)))
    groups = layer.groups if layer.kind == "conv2d" else total
    return PartShape(
        kind=layer.kind,
        channels=channels,
        total=total,
        flops=float(layer.flops) * share,
        bytes_in=float(layer.bytes_in) * (1.0 if reads_all else share),
        bytes_out=float(layer.bytes_out) * share,
        weight_elems=weight_elems,
        out_elems=out_elems,
        in_channels=int(in_shape[1]),
        in_height=int(in_shape[2]),
        in_width=int(in_shape[3]),
        out_height=int(out_shape[2]),
        out_width=int(out_shape[3]),
        kernel_h=kh,
        kernel_w=kw,
        stride=int(layer.strides[0]) if layer.strides else 1,
        groups=groups,
    )
