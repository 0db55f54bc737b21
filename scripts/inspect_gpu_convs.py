#!/usr/bin/env python3
"""Which rule schedules each conv of the benchmark nets in a GPU-only fp16 build (no GPU needed).

Per net: the model is lowered as ``mulayer compile`` lowers it for ``cuda -arch=sm_90, llvm``
(fp16, legalized, fused), and every PrimFunc holding a conv2d is offered to the GPU rules in
order (:func:`mulayer.schedules.apply.claiming_rule`); the script prints the convs that our
tensor-core rule does not take, with the rule that does. The six zoo nets are built here;
``efficientnet_lite0`` (a pretrained net, which needs PyTorch to export) is checked on its
dense conv shapes (stem, expansions, projections, head: EfficientNet-Lite0 at 224x224), and
``mobilenetv2_pretrained`` is the zoo's MobileNetV2 architecture.

    python scripts/inspect_gpu_convs.py [--models resnet18 googlenet ...] [--json out.json]

Convs with fewer than 64 outputs take the tensor-core rule only with
``MULAYER_GPU_NARROW_CONV=1`` (``schedules/gpu_conv2d.py``); run with and without it to see both.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TARGET = "cuda -arch=sm_90, llvm"
# EfficientNet-Lite0 (224x224): (in channels, size, out channels, kernel, stride) of its
# stem, expansion (x6) and projection 1x1 convs and its head; depthwise convs left out.
LITE0_STAGES = ((32, 16, 1, 1), (16, 24, 2, 2), (24, 40, 2, 2), (40, 80, 3, 2))
LITE0_STAGES += ((80, 112, 3, 1), (112, 192, 4, 2), (192, 320, 1, 1))


def lite0_dense_convs() -> list[tuple[int, int, int, int, int]]:
    """(c, input size, f, k, stride) of EfficientNet-Lite0's dense convs, one per shape."""
    shapes = [(3, 224, 32, 3, 2)]
    size = 112
    for cin, cout, repeats, stride in LITE0_STAGES:
        expand = 1 if cin == 32 else 6  # the first stage has no expansion conv
        for i in range(repeats):
            c = cin if i == 0 else cout
            if expand > 1:
                shapes.append((c, size, c * expand, 1, 1))
            if i == 0:
                size //= stride  # the depthwise conv strides
            shapes.append((c * expand, size, cout, 1, 1))
    shapes.append((320, size, 1280, 1, 1))
    return list(dict.fromkeys(shapes))


def _rule_name(rule) -> str:
    inner = getattr(rule, "rule", None)
    return type(inner if inner is not None else rule).__name__ if rule else "none"


def _conv_funcs(mod):
    from tvm import s_tir, tirx

    from mulayer.schedules.conv2d_analysis import find_conv2d

    for gv, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        info = find_conv2d(s_tir.Schedule(func), layouts=("NCHW", "NHWC"))
        if info is not None:
            yield gv.name_hint, func, info


def _describe(info) -> str:
    return (
        f"{info.cg * info.groups}->{info.f} out {info.oh}x{info.ow} k{info.kh}x{info.kw} "
        f"s{info.stride[0]} g{info.groups} {info.in_dtype}->{info.out_dtype}"
    )


def check_zoo(name: str) -> list[dict]:
    from mulayer.compiler.tune import lower_model
    from mulayer.models.zoo import build_model
    from mulayer.schedules.apply import claiming_rule

    mod, target = lower_model(build_model(name), TARGET)
    rows = []
    for func_name, func, info in _conv_funcs(mod):
        rule = claiming_rule(func, target)
        rows.append({"func": func_name, "conv": _describe(info), "rule": _rule_name(rule)})
    return rows


def check_lite0() -> list[dict]:
    from mulayer.schedules.apply import claiming_rule
    from mulayer.schedules.testing import ConvCase, conv2d_module, prim_funcs, standard_pipeline
    from mulayer.target import parse_target

    target = parse_target(TARGET).device_target()
    rows = []
    for c, hw, f, k, s in lite0_dense_convs():
        case = ConvCase(c, hw, hw, f, k=k, stride=s, pad=k // 2)
        mod = conv2d_module(case, "float16", out_dtype="float32", cast_to="float16")
        (func,) = prim_funcs(standard_pipeline(mod)).values()
        rows.append(
            {"func": str(case), "conv": str(case), "rule": _rule_name(claiming_rule(func, target))}
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    from mulayer.models.zoo import BENCHMARK_MODELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[*BENCHMARK_MODELS, "efficientnet_lite0"])
    parser.add_argument("--json", type=Path, help="write every conv's rule here")
    args = parser.parse_args(argv)
    doc = {}
    missed = 0
    for name in args.models:
        rows = check_lite0() if name == "efficientnet_lite0" else check_zoo(name)
        doc[name] = rows
        others = [r for r in rows if r["rule"] != "Conv2dTensorCore"]
        missed += len([r for r in others if r["rule"] != "DepthwiseConv2d"])
        print(
            f"{name}: {len(rows)} conv PrimFuncs, {len(rows) - len(others)} tensor-core", flush=True
        )
        for row in others:
            print(f"  {row['rule']:18s} {row['conv']}  ({row['func']})", flush=True)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))
    print(f"dense convs not on the tensor-core rule: {missed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
