"""Features of a part: what one processor computes of a layer, and the kernel that computes it.

The partitioner asks for the time of ``channels`` output channels of a
:class:`mulayer.frontend.layers.Layer` on one processor; everything here derives from those two
and the machine's :class:`~.kernels.MachineTraits`, so the profile rows (which carry the layer's
table entry) and the partitioner's queries go through the same :func:`part_features`. The layer
features (shapes, work, alignment) come first, then those of the kernel the schedule rules build
for the part (:mod:`.kernels`: rule, tensor-core / AMX / VNNI path, tiles, CPU tasks per thread,
GPU blocks and waves, bytes moved). The layer's epilogue (how many ops, how many clamp from
above as ReLU6 does) and its input's sign count too: in profiles whose parts ran unfused, ReLU6
parts took 20-27% longer than a model without them predicted (docs/results.md). The
processor's precision (CPU int8, GPU fp16) is implied by which regressor is asked (one per
processor) and recorded in :data:`FEATURE_SCHEMA`.

Bump :data:`FEATURE_SCHEMA_VERSION` whenever :data:`FEATURE_NAMES` or their meaning changes: a
saved model with another schema is refused on load.
"""

from __future__ import annotations

import math

import numpy as np

from mulayer.frontend.epilogue import CLAMPS
from mulayer.frontend.layers import SPLITTABLE_KINDS, Layer

from .kernels import KERNEL_FEATURE_NAMES, MachineTraits, kernel_info, rule_log_features
from .part_shape import part_shape

FEATURE_SCHEMA_VERSION = 3
PRECISIONS = {"cpu": "int8 (pooling float32)", "gpu": "float16 (fp32 accumulation)"}

LAYER_FEATURE_NAMES: tuple[str, ...] = (
    # op
    *(f"is_{kind}" for kind in SPLITTABLE_KINDS),
    "is_depthwise",
    # shapes of the part
    "channels",
    "channel_share",
    "in_channels",
    "in_channels_per_group",
    "in_height",
    "in_width",
    "out_height",
    "out_width",
    "kernel_h",
    "kernel_w",
    "stride",
    "groups_in_part",
    # alignment (what the int8 dot-product / tensor-core rules need)
    "channels_mod16",
    "channels_mod8",
    "in_channels_per_group_mod4",
    # work and data
    "log2_flops",
    "log2_bytes_in",
    "log2_bytes_out",
    "log2_weight_elems",
    "log2_out_elems",
    "log2_intensity",
    # the epilogue in the part and the input's sign (the int8 zero point)
    "epilogue_ops",
    "epilogue_clamps",
    "input_signed",
)
FEATURE_NAMES: tuple[str, ...] = LAYER_FEATURE_NAMES + KERNEL_FEATURE_NAMES
FEATURE_SCHEMA = {
    "version": FEATURE_SCHEMA_VERSION,
    "names": list(FEATURE_NAMES),
    "target": "log(latency_us)",
    "precisions": PRECISIONS,
}


def _log2(x: float) -> float:
    return math.log2(max(x, 1.0))


def part_features(
    layer: Layer, channels: int, processor: str, traits: MachineTraits | None = None
) -> list[float]:
    """The feature vector (:data:`FEATURE_NAMES` order) of ``channels`` channels of ``layer``
    on ``processor`` of a machine with ``traits`` (default: :class:`MachineTraits`)."""
    p = part_shape(layer, channels)
    groups_in_part = max(1, round(p.groups * p.share)) if p.groups > 1 else 1
    cin_per_group = p.in_channels // p.groups if p.kind == "conv2d" else p.in_channels
    traffic = p.bytes_in + p.bytes_out + p.weight_elems
    values = [
        *(float(p.kind == kind) for kind in SPLITTABLE_KINDS),
        float(p.depthwise),
        float(channels),
        p.share,
        float(p.in_channels),
        float(cin_per_group),
        float(p.in_height),
        float(p.in_width),
        float(p.out_height),
        float(p.out_width),
        float(p.kernel_h),
        float(p.kernel_w),
        float(p.stride),
        float(groups_in_part),
        float(channels % 16 == 0),
        float(channels % 8 == 0),
        float(cin_per_group % 4 == 0),
        _log2(p.flops),
        _log2(p.bytes_in),
        _log2(p.bytes_out),
        _log2(p.weight_elems),
        _log2(p.out_elems),
        math.log2(max(p.flops, 1.0) / max(traffic, 1.0)),
        float(len(layer.epilogue)),
        float(sum(op in CLAMPS for op in layer.epilogue)),
        float(not layer.input_nonneg),
    ]
    values += rule_log_features(kernel_info(layer, channels, processor, traits or MachineTraits()))
    assert len(values) == len(FEATURE_NAMES)
    return values


def feature_matrix(
    samples: list[tuple[Layer, int]], processor: str, traits: MachineTraits | None = None
) -> np.ndarray:
    """Rows of :func:`part_features` for ``(layer, channels)`` samples on ``processor``."""
    if not samples:
        return np.zeros((0, len(FEATURE_NAMES)), dtype=np.float64)
    return np.array(
        [part_features(layer, k, processor, traits) for layer, k in samples], dtype=np.float64
    )
