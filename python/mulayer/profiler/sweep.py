"""A synthetic sweep of layers that covers the shape space the benchmark nets live in.

The layers of a handful of nets leave gaps (only MobileNetV2 has depthwise convs, only VGG-16 has
wide 224x224 convs), and a cost model evaluated on a held-out net must predict layers unlike any
it was trained on. As CoDL does, the profiler can also time random layers drawn from the space
of CNN layers (``mulayer profile --sweep N``): conv 1x1 / 3x3 / 5x5 / 7x7, strided or not,
depthwise (3x3 and 5x5, stride 1 or 2) or not, 7..224 pixels wide (odd sizes such as 27 and 55
too), 3..1024 channels including odd counts (3, 27, 40, 100, 1000), with a bias and a ReLU, a
ReLU6 or neither; dense; max and global pooling. They are recorded as the synthetic model
``sweep``, used for training and never held out.
"""

from __future__ import annotations

import numpy as np

from .layer_spec import LayerSpec

SWEEP_MODEL = "sweep"
_CHANNELS = (16, 24, 32, 48, 64, 96, 128, 144, 160, 192, 256, 320, 384, 512, 576, 768, 960, 1024)
# Channel counts off the 8/16 alignment the int8 and tensor-core rules want (first convs,
# SqueezeNet's and classifier convs): drawn for one conv side in five.
_ODD_CHANNELS = (3, 27, 40, 100, 1000)
_SIZES = (7, 13, 14, 27, 28, 55, 56, 112, 224)
_MAX_FLOPS = 4e9
_MAX_INPUT = 64 * 112 * 112 * 2


def _epilogue(cout: int, draw: float) -> list[dict]:
    """Bias add, then ReLU (half the draws), ReLU6 (one in five: MobileNets) or nothing."""
    bias = {
        "op": "relax.add",
        "const_shape": [1, cout, 1, 1],
        "const_dtype": "float32",
        "const_first": False,
    }
    if draw < 0.5:
        return [bias, {"op": "relax.nn.relu"}]
    if draw < 0.7:
        bound = {"const_shape": [], "const_dtype": "float32", "const_first": False}
        return [
            bias,
            {"op": "relax.maximum", **bound, "const_value": 0.0},
            {"op": "relax.minimum", **bound, "const_value": 6.0},
        ]
    return [bias]


def _channels(rng: np.random.Generator) -> int:
    return int(rng.choice(_ODD_CHANNELS if rng.random() < 0.2 else _CHANNELS))


def _conv(rng: np.random.Generator) -> LayerSpec | None:
    k = int(rng.choice([1, 3, 5, 7], p=[0.45, 0.4, 0.1, 0.05]))
    stride = int(rng.choice([1, 2], p=[0.75, 0.25]))
    hw = int(rng.choice(_SIZES))
    cin = _channels(rng)
    depthwise = k in (3, 5) and rng.random() < 0.35
    cout = cin if depthwise else _channels(rng)
    groups = cin if depthwise else 1
    pad = k // 2
    out_hw = (hw + 2 * pad - k) // stride + 1
    flops = 2.0 * cout * out_hw * out_hw * (cin // groups) * k * k
    if flops > _MAX_FLOPS or cin * hw * hw > _MAX_INPUT:
        return None
    return LayerSpec(
        kind="conv2d",
        input_shape=[1, cin, hw, hw],
        output_shape=[1, cout, out_hw, out_hw],
        weight_shape=[cout, cin // groups, k, k],
        attrs={"strides": [stride] * 2, "padding": [pad] * 4, "dilation": [1, 1], "groups": groups},
        epilogue=_epilogue(cout, float(rng.random())),
        input_nonneg=bool(rng.random() < 0.85),
    )


def _dense(rng: np.random.Generator) -> LayerSpec:
    n_in = int(rng.choice([256, 512, 1024, 1280, 2048, 4096, 9216, 25088]))
    n_out = int(rng.choice([10, 100, 1000, 4096]))
    return LayerSpec(
        kind="dense",
        input_shape=[1, n_in],
        output_shape=[1, n_out],
        weight_shape=[n_in, n_out],
        epilogue=[
            {
                "op": "relax.add",
                "const_shape": [1, n_out],
                "const_dtype": "float32",
                "const_first": False,
            }
        ],
        input_nonneg=True,
    )


def _pool(rng: np.random.Generator) -> LayerSpec | None:
    c = int(rng.choice(_CHANNELS))
    hw = int(rng.choice(_SIZES))
    if c * hw * hw > _MAX_INPUT:
        return None
    if rng.random() < 0.3:
        return LayerSpec(
            kind="global_avg_pool2d",
            input_shape=[1, c, hw, hw],
            output_shape=[1, c, 1, 1],
            attrs={"form": "adaptive"},
            input_nonneg=True,
        )
    k = int(rng.choice([2, 3]))
    pad = 1 if k == 3 and rng.random() < 0.5 else 0
    out_hw = (hw + 2 * pad - k) // 2 + 1
    return LayerSpec(
        kind="max_pool2d",
        input_shape=[1, c, hw, hw],
        output_shape=[1, c, out_hw, out_hw],
        attrs={
            "pool_size": [k, k],
            "strides": [2, 2],
            "padding": [pad] * 4,
            "dilation": [1, 1],
            "ceil_mode": False,
            "count_include_pad": False,
        },
        input_nonneg=True,
    )


def sweep_specs(count: int, seed: int = 0) -> list[LayerSpec]:
    """``count`` distinct random layers (seeded: the same count and seed give the same list)."""
    rng = np.random.default_rng(seed)
    specs: dict[str, LayerSpec] = {}
    while len(specs) < count:
        draw = rng.random()
        spec = _conv(rng) if draw < 0.75 else _dense(rng) if draw < 0.85 else _pool(rng)
        if spec is not None:
            specs.setdefault(spec.key, spec)
    return list(specs.values())
