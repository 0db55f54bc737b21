#!/usr/bin/env python3
"""GPU rule benchmark: mulayer's depthwise/pooling/GEMV kernels against dlight and cuDNN.

Per layer (batch 1, fp16 operands, fp32 accumulation, bias + relu fused, fp16 out; the shapes
of MobileNetV2's depthwise layers and two 5x5 EfficientNet-Lite0 ones), one PrimFunc each:

- ``dlight``: what the build did before mulayer had the rule (the rule list without it);
- ``default``: the rule with its per-shape tile; ``--sweep`` adds every tile of
  :data:`SWEEP` (to choose the heuristic);
- ``cudnn``: ``F.conv2d`` + bias + relu in fp16 through PyTorch.

Every output is checked against a float64 numpy reference, with the output buffer poisoned
(NaN) first so that an unwritten element fails. Timing: each kernel is captured 20 times in a
CUDA graph (TVM launches follow PyTorch's stream through ``tvm_ffi.use_torch_stream``) and the
graph replayed between CUDA events, so launch overhead is not counted for anyone; where capture
fails, TVM's ``time_evaluator`` (CUDA events around back-to-back launches) is used and the
cell says so. ``--e2e`` also times MobileNetV2 GPU-only (``cuda -arch=sm_XY, llvm``) built
with and without the rule, next to PyTorch with a CUDA graph.

``--conv`` does the same for the tensor-core conv rule on the dense convs of :data:`DENSE`:
``dlight`` for convs with fewer than 64 outputs (the rules without ours: what the build had
before the rule took them), ``default`` (``choose_tile``) and, with ``--sweep``, the tiles and
load layouts of :func:`conv_sweep_tiles`, next to cuDNN in NCHW and channels-last;
``--layers`` picks layers by name. Each layer's
variants go into one exported module (one NVRTC compile at load); ``--build-only`` builds them
for sm_90 on a machine without a GPU into ``--conv-dir``, which the GPU machine then times.

On the GPU machine (TVM installed, see ../shared/device/README.md)::

    PYTHONUNBUFFERED=1 python3 scripts/bench_gpu_rules.py --sweep --e2e --out $OUT
    # dense convs, built here first: --conv --sweep --no-depthwise --build-only --conv-dir conv
    PYTHONUNBUFFERED=1 python3 scripts/bench_gpu_rules.py --conv --sweep --no-depthwise \
        --conv-dir conv --out $OUT
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np

SCRIPTS = Path(__file__).resolve().parent
PEERS = ("cudnn", "dlight")  # the cells that are not our rule

# (channels, height, width, kernel, stride) of the depthwise layers.
DEPTHWISE = (
    (32, 112, 112, 3, 1),
    (96, 112, 112, 3, 2),
    (144, 56, 56, 3, 1),
    (144, 56, 56, 3, 2),
    (192, 28, 28, 3, 1),
    (192, 28, 28, 3, 2),
    (384, 14, 14, 3, 1),
    (576, 14, 14, 3, 1),
    (576, 14, 14, 3, 2),
    (960, 7, 7, 3, 1),
    (240, 28, 28, 5, 1),
    (672, 14, 14, 5, 2),
)


def sweep_tiles():
    """Tiles tried by ``--sweep``: registers only, and shared-memory staging."""
    from mulayer.schedules.gpu_depthwise import DepthwiseTile

    tiles = [DepthwiseTile(vec=v, threads=t) for v in (1, 2, 4) for t in (64, 128, 256)]
    tiles += [DepthwiseTile(vec=v, threads=t, shared=True) for v in (1, 2, 4) for t in (128, 256)]
    return tiles


def tile_name(tile) -> str:
    kind = "shared" if tile.shared else "flat"
    return f"{kind}_v{tile.vec}_t{tile.threads}"


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def cuda_graph_us(fn, per_graph: int = 20, replays: int = 50, repeat: int = 7) -> float:
    """µs per call of ``fn``: median over batches of graph replays (up to ``replays``, about
    20 ms a batch), CUDA events around them."""
    import torch
    import tvm_ffi

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), tvm_ffi.use_torch_stream():
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), tvm_ffi.use_torch_stream():
        for _ in range(per_graph):
            fn()
    begin = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    replays = max(3, min(replays, int(0.02 / max(1e-6, time.perf_counter() - begin))))
    samples = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / (replays * per_graph))
    return statistics.median(samples)


def evaluator_us(lib, args) -> float:
    """µs per call: TVM's ``time_evaluator`` for a module, else (one function of a module)
    CUDA events around 200 back-to-back launches on PyTorch's stream."""
    import torch
    import tvm
    import tvm_ffi

    if hasattr(lib, "time_evaluator"):
        ev = lib.time_evaluator("main", tvm.cuda(0), number=200, repeat=7)
        return statistics.median(ev(*args).results) * 1e6
    with tvm_ffi.use_torch_stream():
        for _ in range(3):
            lib(*args)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(200):
            lib(*args)
        end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / 200


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
def gpu_target():
    import tvm

    try:
        import torch
    except ImportError:
        torch = None
    if (
        torch is None or not torch.cuda.is_available()
    ):  # building only (--build-only): the GPU machine's arch
        return tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host={"kind": "llvm"})
    major, minor = torch.cuda.get_device_capability(0)
    return tvm.target.Target({"kind": "cuda", "arch": f"sm_{major}{minor}"}, host={"kind": "llvm"})


def dlight_rules(target):
    from mulayer.schedules.gpu import DepthwiseConv2d, default_gpu_rules

    return [r for r in default_gpu_rules(target) if not isinstance(r, DepthwiseConv2d)]


def schedule_with(func, target, rules):
    """(rule name, scheduled PrimFunc) of the first rule in ``rules`` that applies."""
    for rule in rules:
        with target:
            sch = rule.apply(func, target, False)
        if sch is not None:
            sch = sch[0] if isinstance(sch, list) else sch
            name = type(getattr(rule, "rule", rule)).__name__
            return name, sch.mod["main"]
    raise RuntimeError("no rule applies")


def measure_kernel(func, target, inputs, out_shape, ref, tol=2e-2) -> dict:
    """Build ``func``, check it against ``ref`` (output poisoned first), time it."""
    import tvm

    from mulayer.schedules.testing import build_prim_func

    cell: dict = {}
    begin = time.perf_counter()
    lib = build_prim_func(func, target)
    cell["build_s"] = round(time.perf_counter() - begin, 2)
    cell.update(_time_lib(lib["main"], inputs, out_shape, ref, tvm.cuda(0), tol, evaluator=lib))
    return cell


def torch_us(fn) -> float:
    return round(cuda_graph_us(fn), 3)


def depthwise_rows(target, sweep: bool) -> list[dict]:
    import torch
    import torch.nn.functional as F
    from tvm import s_tir

    from mulayer.schedules.conv2d_analysis import find_conv2d
    from mulayer.schedules.gpu_depthwise import DepthwiseConv2d, choose_tile
    from mulayer.schedules.testing import (
        ConvCase,
        conv2d_module,
        conv2d_reference,
        prim_funcs,
        standard_pipeline,
    )

    rows = []
    rng = np.random.default_rng(0)
    tiles = sweep_tiles() if sweep else []
    for c, h, w, k, s in DEPTHWISE:
        case = ConvCase(c, h, w, c, k=k, stride=s, pad=k // 2, groups=c)
        x = rng.standard_normal((1, c, h, w)).astype("float16")
        wt = (rng.standard_normal((c, 1, k, k)) * 0.3).astype("float16")
        b = rng.standard_normal((1, c, 1, 1)).astype("float32")
        ref = np.maximum(conv2d_reference(x, wt, case) + b, 0)
        mod = conv2d_module(case, "float16", out_dtype="float32", cast_to="float16")
        (func,) = prim_funcs(standard_pipeline(mod)).values()
        oh, ow = case.out_hw
        row = {"layer": f"dw{k}x{k}s{s}_{c}x{h}x{w}", "shape": str(case), "cells": {}}
        print(row["layer"], flush=True)
        variants = [("dlight", dlight_rules(target)), ("default", [DepthwiseConv2d()])]
        variants += [(tile_name(t), [DepthwiseConv2d(t)]) for t in tiles]
        for name, rules in variants:
            try:
                rule, sched = schedule_with(func, target, rules)
                cell = measure_kernel(sched, target, [x, wt, b], (1, c, oh, ow), ref)
                cell["rule"] = rule
            except Exception as err:  # noqa: BLE001 - one failing variant is one cell
                cell = {"error": f"{type(err).__name__}: {err}"[:300]}
            row["cells"][name] = cell
            print(f"  {name:22s} {cell}", flush=True)
        xt, wtt = torch.from_numpy(x).cuda(), torch.from_numpy(wt).cuda()
        bt = torch.from_numpy(b.reshape(c)).half().cuda()
        conv = functools.partial(F.conv2d, xt, wtt, bt, stride=s, padding=k // 2, groups=c)
        with torch.no_grad():
            row["cells"]["cudnn"] = {
                "us": torch_us(lambda f=conv: F.relu(f())),
                "timing": "cuda graph",
            }
        row["default_tile"] = tile_name(choose_tile(find_conv2d(s_tir.Schedule(func))))
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Dense convs (the tensor-core implicit GEMM rule)
# ---------------------------------------------------------------------------------------------
# (channels, height, width, outputs, kernel, stride) of dense convs of the benchmarked nets.
DENSE = (
    (64, 56, 56, 64, 3, 1),
    (128, 28, 28, 128, 3, 1),
    (256, 14, 14, 256, 3, 1),
    (512, 7, 7, 512, 3, 1),
    (64, 56, 56, 128, 3, 2),
    (128, 28, 28, 256, 3, 2),
    (256, 14, 14, 512, 3, 2),
    (64, 224, 224, 64, 3, 1),
    (256, 56, 56, 256, 3, 1),
    (512, 28, 28, 512, 3, 1),
    (512, 14, 14, 512, 3, 1),
    (64, 56, 56, 256, 1, 1),
    (256, 56, 56, 64, 1, 1),
    (1024, 14, 14, 256, 1, 1),
    (256, 14, 14, 1024, 1, 1),
    (2048, 7, 7, 512, 1, 1),
    (512, 7, 7, 2048, 1, 1),
    (3, 224, 224, 64, 7, 2),
    # VGG-16's second block, and convs with fewer than 64 outputs (which dlight's rules had):
    # GoogLeNet, SqueezeNet 1.1, MobileNetV2 and EfficientNet-Lite0; a 16-input 1x1 (K = 16).
    (128, 112, 112, 128, 3, 1),
    (480, 14, 14, 16, 1, 1),
    (192, 28, 28, 16, 1, 1),
    (16, 28, 28, 32, 3, 1),
    (16, 14, 14, 48, 3, 1),
    (512, 14, 14, 24, 1, 1),
    (832, 7, 7, 48, 1, 1),
    (64, 55, 55, 16, 1, 1),
    (128, 27, 27, 32, 1, 1),
    (384, 13, 13, 48, 1, 1),
    (32, 112, 112, 16, 1, 1),
    (96, 56, 56, 24, 1, 1),
    (144, 28, 28, 40, 1, 1),
    (3, 224, 224, 32, 3, 2),
    (16, 112, 112, 96, 1, 1),
)


def layer_name(spec) -> str:
    c, h, w, f, k, s = spec
    return f"conv{k}x{k}s{s}_{c}x{h}x{w}_{f}"


def conv_sweep_tiles(info) -> list:
    """Tiles tried by ``--conv --sweep``: the default tile (split-K included) and two others
    (I x J tiles, J narrowed to the output channels under 64), each with pixel-major im2col
    loads (``a_by_pixel``), K ordered by tap (``k_by_tap``), and both. NHWC convs (whose K is
    contiguous already) try tile sizes instead: :func:`nhwc_sweep_tiles`."""
    from mulayer.schedules.gpu_conv2d import ConvTile, base_tile, choose_tile

    if info.layout == "NHWC":
        return nhwc_sweep_tiles(info)
    base = base_tile(info)
    k = base.k_frags
    tiles = [choose_tile(info)]
    if info.f < 64:
        tiles.append(ConvTile(1, 2, 1, base.j_frags, k))
    else:
        tiles += [ConvTile(2, 2, 4, 2, k), ConvTile(4, 2, 2, 2, k)]
        tiles = [t for t in tiles if t.tile_j <= max(64, info.f)]
    out = []
    for t in tiles:
        out += [t, replace(t, a_by_pixel=True), replace(t, k_by_tap=True)]
        out.append(replace(t, a_by_pixel=True, k_by_tap=True))
    return [t for t in dict.fromkeys(out[1:]) if t.launchable]


def nhwc_sweep_tiles(info) -> list:
    """NHWC tiles: 32x64 to 128x128 blocks with K steps of 32 or 64, each unsplit and with the
    default tile's split-K."""
    from mulayer.schedules.gpu_conv2d import ConvTile, choose_tile

    default = choose_tile(info)
    shapes = [(1, 2, 2, 2, 4), (2, 2, 2, 2, 2), (4, 2, 2, 2, 4), (2, 2, 4, 2, 4), (4, 2, 4, 2, 2)]
    shapes += [(4, 2, 4, 2, 4), (2, 4, 2, 4, 2)]
    out = []
    for shape in shapes:
        tile = ConvTile(*shape)
        if info.f < 64 or tile.tile_j > max(64, info.f):
            continue
        out += [tile, replace(tile, split_k=default.split_k)]
    return [t for t in dict.fromkeys(out) if t.launchable and t != default]


LAYOUT: list[str] = ["NCHW"]  # --layout of the conv benchmark


def _conv_func(spec):
    from mulayer.schedules.testing import ConvCase, conv2d_module, prim_funcs, standard_pipeline

    c, h, w, f, k, s = spec
    case = ConvCase(c, h, w, f, k=k, stride=s, pad=k // 2)
    mod = conv2d_module(case, "float16", out_dtype="float32", cast_to="float16", layout=LAYOUT[0])
    (func,) = prim_funcs(standard_pipeline(mod)).values()
    return case, func


def _build_conv(job) -> tuple[str, dict[str, str]]:
    """Build every variant of one layer into one module (one NVRTC compile when it is loaded
    on the GPU machine), exported to ``path``; returns (path, errors by variant). A worker."""
    index, variants, path = job
    errors: dict[str, str] = {}
    try:
        import tvm

        from mulayer.schedules.gpu_conv2d import Conv2dTensorCore

        target = _TARGET[0]
        _, func = _conv_func(DENSE[index])
        funcs = {}
        for name, tile in variants:
            try:
                if tile == "dlight":  # the rules without ours: what the build had before
                    rules = [
                        r for r in dlight_rules(target) if type(r).__name__ != "Conv2dTensorCore"
                    ]
                    _, prim = schedule_with(func, target, rules)
                    funcs[_symbol(name)] = prim.with_attr("global_symbol", _symbol(name))
                    continue
                with target:
                    sch = Conv2dTensorCore(tile).apply(func, target, False)
                if sch is None:
                    errors[name] = "rule does not apply"
                    continue
                symbol = _symbol(name)
                funcs[symbol] = sch.mod["main"].with_attr("global_symbol", symbol)
            except Exception as err:  # noqa: BLE001 - one failing variant is one cell
                errors[name] = f"{type(err).__name__}: {err}"[-300:]
        tvm.tirx.build(tvm.IRModule(funcs), target=target).export_library(path)
    except Exception as err:  # noqa: BLE001
        errors["*"] = f"{type(err).__name__}: {err}"[-300:]
    return path, errors


def _to_nhwc(array: np.ndarray) -> np.ndarray:
    """NCHW (or OIHW) -> NHWC (or OHWI)."""
    return np.ascontiguousarray(array.transpose(0, 2, 3, 1))


def _symbol(name: str) -> str:
    return "v_" + name.replace("-", "_")


_TARGET: list = []


def conv_rows(
    target,
    sweep: bool,
    jobs: int,
    workdir: Path | None = None,
    build_only: bool = False,
    layers: list[str] | None = None,
) -> list[dict]:
    """Dense convs: our rule (default tile, the old fixed tile, the sweep) against cuDNN.

    Each layer's kernels are exported to one module in ``workdir`` (a fresh temporary one by
    default); modules already there are used as they are (built beforehand with
    ``--build-only``, e.g. on a machine without a GPU)."""
    import multiprocessing

    import tvm
    from tvm import s_tir

    from mulayer.schedules._intrin import load_tvm_tensor_intrinsics
    from mulayer.schedules.conv2d_analysis import find_conv2d
    from mulayer.schedules.gpu_conv2d import choose_tile
    from mulayer.schedules.testing import conv2d_reference

    load_tvm_tensor_intrinsics()
    _TARGET[:] = [target]
    workdir = workdir or Path(tempfile.mkdtemp(prefix="convsweep"))
    workdir.mkdir(parents=True, exist_ok=True)
    plan = []  # (layer index, [(cell name, tile or "dlight")], path)
    for index, spec in enumerate(DENSE):
        if layers and not any(part in layer_name(spec) for part in layers):
            continue
        _, func = _conv_func(spec)
        info = find_conv2d(s_tir.Schedule(func), layouts=("NCHW", "NHWC"))
        tiles = [("dlight", "dlight")] if info.f < 64 else []
        tiles.append(("default", choose_tile(info)))
        if sweep:
            tiles += [(t.name(), t) for t in conv_sweep_tiles(info)]
        plan.append((index, tiles, str(workdir / f"layer{index}.so")))
    print(f"building {sum(len(t) for _, t, _ in plan)} conv kernels, {jobs} processes", flush=True)
    begin = time.perf_counter()
    todo = [job for job in plan if not Path(job[2]).exists()]
    errors_json = workdir / "errors.json"
    built = json.loads(errors_json.read_text()) if errors_json.exists() else {}
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        built.update(dict(pool.map(_build_conv, todo)))
    errors_json.write_text(json.dumps(built, indent=1))
    print(f"built {len(todo)} modules in {time.perf_counter() - begin:.0f} s", flush=True)
    if build_only:
        return [{"errors": {p: e for p, e in built.items() if e}}]
    import torch
    import torch.nn.functional as F

    rows = []
    rng = np.random.default_rng(3)
    dev = tvm.cuda(0)
    torch.backends.cudnn.benchmark = True
    for index, variants, path in plan:
        spec = DENSE[index]
        case, func = _conv_func(spec)
        c, h, w, f, k, s = spec
        oh, ow = case.out_hw
        x = rng.standard_normal((1, c, h, w)).astype("float16")
        wt = (rng.standard_normal((f, c, k, k)) / np.sqrt(c * k * k)).astype("float16")
        b = rng.standard_normal((1, f, 1, 1)).astype("float32")
        ref = np.maximum(conv2d_reference(x, wt, case) + b, 0)
        info = find_conv2d(s_tir.Schedule(func), layouts=("NCHW", "NHWC"))
        nhwc = info.layout == "NHWC"
        row = {
            "layer": layer_name(spec),
            "layout": info.layout,
            "shape": str(case),
            "gflop": case.flops / 1e9,
            "default_tile": choose_tile(info).name(),
            "cells": {},
        }
        print(row["layer"], flush=True)
        errors = built.get(path, {})
        begin = time.perf_counter()
        lib = tvm.runtime.load_module(path) if "*" not in errors else None
        for name, _ in variants:
            if name in errors or lib is None:
                row["cells"][name] = {"error": errors.get(name, errors.get("*"))}
                continue
            try:
                if nhwc:
                    args = [_to_nhwc(x), _to_nhwc(wt), _to_nhwc(b)]
                    cell = _time_lib(lib[_symbol(name)], args, (1, oh, ow, f), _to_nhwc(ref), dev)
                else:
                    cell = _time_lib(lib[_symbol(name)], [x, wt, b], (1, f, oh, ow), ref, dev)
            except Exception as err:  # noqa: BLE001
                cell = {"error": f"{type(err).__name__}: {err}"[:300]}
            row["cells"][name] = cell
            print(f"  {name:22s} {cell}", flush=True)
        row["load_and_time_s"] = round(time.perf_counter() - begin, 1)
        xt, wtt = torch.from_numpy(x).cuda(), torch.from_numpy(wt).cuda()
        bt = torch.from_numpy(b.reshape(f)).half().cuda()
        conv = functools.partial(F.conv2d, xt, wtt, bt, stride=s, padding=k // 2)
        with torch.no_grad():
            conv()
            row["cells"]["cudnn"] = {
                "us": torch_us(lambda f=conv: F.relu(f())),
                "timing": "cuda graph",
            }
            xcl = xt.to(memory_format=torch.channels_last)
            wcl = wtt.to(memory_format=torch.channels_last)
            conv_cl = functools.partial(F.conv2d, xcl, wcl, bt, stride=s, padding=k // 2)
            conv_cl()
            row["cells"]["cudnn_cl"] = {
                "us": torch_us(lambda f=conv_cl: F.relu(f())),
                "timing": "cuda graph",
            }
        print(f"  cudnn {row['cells']['cudnn']} cl {row['cells']['cudnn_cl']}", flush=True)
        rows.append(row)
    return rows


def _time_lib(fn, inputs, out_shape, ref, dev, tol=2e-2, evaluator=None) -> dict:
    """Check a kernel ``fn`` against ``ref`` (output poisoned first) and time it; where CUDA
    graph capture fails, :func:`evaluator_us` times ``evaluator`` (default ``fn``)."""
    import tvm

    out = tvm.runtime.tensor(np.full(out_shape, np.nan, "float16"), dev)
    args = [tvm.runtime.tensor(a, dev) for a in inputs] + [out]
    fn(*args)
    got = out.numpy().astype("float64")
    cell: dict = {}
    err = float(np.nanmax(np.abs(got - ref)) / max(1e-6, np.abs(ref).max()))
    cell["rel_err"] = err if np.isfinite(got).all() else float("nan")
    cell["ok"] = bool(np.isfinite(got).all() and err <= tol)
    try:
        cell["us"] = round(cuda_graph_us(lambda: fn(*args)), 3)
        cell["timing"] = "cuda graph"
    except Exception as err:  # noqa: BLE001 - fall back to TVM's own timer, say so
        cell["graph_error"] = f"{type(err).__name__}: {err}"[:200]
        cell["us"] = round(evaluator_us(evaluator or fn, args), 3)
        cell["timing"] = "time_evaluator"
    return cell


def other_rows(target) -> list[dict]:
    """Pooling and batch-1 dense layers under the current rules, against PyTorch."""
    import torch
    import torch.nn.functional as F
    import tvm
    from tvm import relax

    from mulayer.schedules import gpu_rules
    from mulayer.schedules.testing import prim_funcs, standard_pipeline

    rng = np.random.default_rng(1)
    rows = []

    def module(shape, dtype, body):
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType(shape, dtype))
        with bb.function("main", [x]):
            with bb.dataflow():
                out = bb.emit_output(bb.emit(body(x)))
            bb.emit_func_output(out)
        return bb.get()

    cases = []
    # Max pool 3x3/2 (ResNet stem), global average pools (MobileNetV2 in fp32, ResNet in fp16).
    xp = rng.standard_normal((1, 64, 112, 112)).astype("float16")
    cases.append(
        (
            "maxpool3x3s2_64x112x112",
            module(xp.shape, "float16", lambda v: relax.op.nn.max_pool2d(v, 3, 2, 1)),
            [xp],
            lambda t: F.max_pool2d(t[0], 3, 2, 1),
        )
    )
    for c, dtype in ((1280, "float32"), (512, "float16")):
        xg = rng.standard_normal((1, c, 7, 7)).astype(dtype)
        cases.append(
            (
                f"gap_{c}x7x7_{dtype}",
                module(xg.shape, dtype, lambda v: relax.op.mean(v, axis=[2, 3], keepdims=True)),
                [xg],
                lambda t: t[0].mean(dim=(2, 3), keepdim=True),
            )
        )
    for k, n, transposed in ((1280, 1000, False), (4096, 1000, True)):
        xd = rng.standard_normal((1, k)).astype("float16")
        wd = (rng.standard_normal((n, k) if transposed else (k, n)) * 0.05).astype("float16")
        bd = rng.standard_normal((n,)).astype("float16")

        def body(v, wd=wd, bd=bd, transposed=transposed):
            wc = relax.const(wd)
            rhs = relax.op.permute_dims(wc) if transposed else wc
            y = relax.op.matmul(v, rhs, out_dtype="float32")
            return relax.op.add(relax.op.astype(y, "float16"), relax.const(bd))

        wtorch = torch.from_numpy(wd if transposed else np.ascontiguousarray(wd.T)).cuda()
        btorch = torch.from_numpy(bd).cuda()
        cases.append(
            (
                f"dense_{k}x{n}{'_wT' if transposed else ''}",
                module(xd.shape, "float16", body),
                [xd],
                lambda t, w=wtorch, b=btorch: F.linear(t[0], w, b),
            )
        )
    dev = tvm.cuda(0)
    for name, mod, inputs, torch_fn in cases:
        print(name, flush=True)
        row = {"layer": name, "cells": {}}
        try:
            mod = standard_pipeline(mod)
            ex = tvm.compile(mod, target=target)
            vm = relax.VirtualMachine(ex, dev)
            got = vm["main"](*[tvm.runtime.tensor(a, dev) for a in inputs]).numpy()
            tin = [torch.from_numpy(a).cuda() for a in inputs]
            ref = torch_fn(tin).float().cpu().numpy()
            row["rel_err"] = float(np.abs(got - ref).max() / max(1e-6, np.abs(ref).max()))
            funcs = prim_funcs(mod)
            for fname, func in funcs.items():
                rule, _ = schedule_with(func, target, gpu_rules(target))
                row.setdefault("rules", {})[fname] = rule
            args = [tvm.runtime.tensor(a, dev) for a in inputs]
            ev = vm.time_evaluator("main", dev, number=200, repeat=7)
            row["cells"]["ours_vm"] = {"us": statistics.median(ev(*args).results) * 1e6}
            with torch.no_grad():
                row["cells"]["torch"] = {"us": torch_us(functools.partial(torch_fn, tin))}
        except Exception as err:  # noqa: BLE001
            row["error"] = f"{type(err).__name__}: {err}"[:300]
        print(f"  {row}", flush=True)
        rows.append(row)
    return rows


def end_to_end(repeat: int = 200) -> dict:
    """MobileNetV2 GPU-only with and without the depthwise rule, and PyTorch with a graph."""
    import onnx
    import torch

    import mulayer
    import mulayer.schedules.gpu as gpu_mod
    from mulayer.models.zoo import build_model

    sys.path.insert(0, str(SCRIPTS))
    import torch_peer

    major, minor = torch.cuda.get_device_capability(0)
    target = f"cuda -arch=sm_{major}{minor}, llvm"
    proto = build_model("mobilenetv2")
    x = np.random.default_rng(2).standard_normal((1, 3, 224, 224)).astype("float32")
    result = {"model": "mobilenetv2", "target": target}
    original = gpu_mod.default_gpu_rules
    outputs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, rules in (
            ("before", lambda t: [r for r in original(t) if type(r).__name__ != "DepthwiseConv2d"]),
            ("after", original),
        ):
            gpu_mod.default_gpu_rules = rules
            try:
                begin = time.perf_counter()
                compiled = mulayer.compile(proto, target)
                build_s = time.perf_counter() - begin
                path = compiled.export(Path(tmp) / f"{label}.mulayer")
                model = mulayer.load(path)
                outputs[label] = next(iter(model({"input": x}).values()))
                timing = model.benchmark({"input": x}, repeat=repeat, warmup=20)
                result[label] = {
                    "median_ms": timing.median_ms,
                    "min_ms": timing.min_ms,
                    "build_s": round(build_s, 1),
                }
            except Exception as err:  # noqa: BLE001
                result[label] = {"error": f"{type(err).__name__}: {err}"[:300]}
            finally:
                gpu_mod.default_gpu_rules = original
            print(label, result[label], flush=True)
        for channels_last in (False, True):
            key = "torch_cuda_graph" + ("_channels_last" if channels_last else "")
            try:
                module = torch_peer.prepare(
                    onnx.load_from_string(proto.SerializeToString()),
                    "cuda",
                    half=True,
                    channels_last=channels_last,
                )
                runner = torch_peer.cuda_graph_runner(module, x, channels_last=channels_last)
                for _ in range(20):
                    runner.step()
                samples = []
                for _ in range(repeat):
                    begin = time.perf_counter()
                    runner.step()
                    samples.append((time.perf_counter() - begin) * 1e3)
                result[key] = {"median_ms": statistics.median(samples), "min_ms": min(samples)}
                outputs[key] = runner.predict(x)
            except Exception as err:  # noqa: BLE001
                result[key] = {"error": f"{type(err).__name__}: {err}"[:300]}
            print(key, result[key], flush=True)
    if "before" in outputs and "after" in outputs:
        a, b = outputs["before"], outputs["after"]
        result["after_vs_before_rel_l2"] = float(np.linalg.norm(a - b) / np.linalg.norm(a))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time every tile of the sweep")
    parser.add_argument("--no-depthwise", action="store_true", help="skip the depthwise layers")
    parser.add_argument("--others", action="store_true", help="pooling and dense layers too")
    parser.add_argument("--e2e", action="store_true", help="MobileNetV2 end to end too")
    parser.add_argument("--conv", action="store_true", help="dense convs (tensor-core rule)")
    parser.add_argument("--jobs", type=int, default=8, help="build processes for --conv")
    parser.add_argument("--conv-dir", type=Path, help="where --conv kernels are (to be) built")
    parser.add_argument(
        "--build-only", action="store_true", help="--conv: build for sm_90 here, time nothing"
    )
    parser.add_argument("--layers", nargs="+", help="--conv: only layers whose name has one")
    parser.add_argument(
        "--layout",
        choices=("NCHW", "NHWC"),
        default="NCHW",
        help="--conv: the convs' data layout (NHWC: OHWI weights, as GPU builds run them with "
        "MULAYER_GPU_LAYOUT=NHWC)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-gpu-rules"))
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:  # --build-only on a machine without PyTorch
        torch = None

    args.out.mkdir(parents=True, exist_ok=True)
    LAYOUT[:] = [args.layout]
    target = gpu_target()
    doc = {
        "date": date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(0) if torch and torch.cuda.is_available() else None,
        "target": str(target),
        "command": " ".join(sys.argv),
    }
    path = args.out / "bench_gpu_rules.json"

    def save():
        path.write_text(json.dumps(doc, indent=1))

    for key, enabled, fn in (
        ("depthwise", not args.no_depthwise, lambda: depthwise_rows(target, args.sweep)),
        (
            "conv",
            args.conv,
            lambda: conv_rows(
                target, args.sweep, args.jobs, args.conv_dir, args.build_only, args.layers
            ),
        ),
        ("others", args.others, lambda: other_rows(target)),
        ("end_to_end", args.e2e, end_to_end),
    ):
        if not enabled:
            continue
        try:
            doc[key] = fn()
        except Exception:  # noqa: BLE001 - keep what the other parts measured
            doc[key] = {"error": traceback.format_exc()[-2000:]}
            print(doc[key]["error"], flush=True)
        save()
    summary(doc)
    return 0


def summary(doc: dict) -> None:
    for row in doc.get("depthwise", []) if isinstance(doc.get("depthwise"), list) else []:
        cells = row["cells"]
        cudnn = cells.get("cudnn", {}).get("us")
        best = min(
            ((k, v["us"]) for k, v in cells.items() if k not in PEERS and v.get("ok")),
            key=lambda kv: kv[1],
            default=(None, None),
        )
        d = cells.get("default", {}).get("us")
        dl = cells.get("dlight", {}).get("us")
        print(
            f"{row['layer']:26s} dlight {dl} default {d} ({row.get('default_tile')}) "
            f"best {best[0]} {best[1]} cudnn {cudnn}"
        )


if __name__ == "__main__":
    sys.exit(main())
