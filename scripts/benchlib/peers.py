"""The peers: onnxruntime (CPU fp32, static int8) and PyTorch (eager, CUDA graph, compiled)."""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from .machine import SCRIPTS
from .measure import INPUT_NAME, Context, add_row, quality_fields
from .timing import error_text, time_ms, timing_fields


@dataclass(frozen=True)
class Peer:
    """Another system on the same machine; ``processor`` is cpu or gpu."""

    key: str
    label: str
    processor: str
    graph: bool = False  # a whole-model launch (CUDA graph, compiled): the GPU goal's yardstick


PEERS: dict[str, Peer] = {
    p.key: p
    for p in (
        Peer("ort_fp32", "onnxruntime CPU fp32", "cpu"),
        Peer("ort_int8", "onnxruntime CPU int8 (static, QDQ)", "cpu"),
        Peer("torch_eager", "PyTorch eager fp16", "gpu"),
        Peer("torch_graph", "PyTorch CUDA graph fp16", "gpu", graph=True),
        Peer("torch_graph_cl", "PyTorch CUDA graph fp16, channels-last", "gpu", graph=True),
        Peer("torch_compile", "PyTorch torch.compile fp16", "gpu", graph=True),
    )
}
DEFAULT_PEERS = tuple(k for k in PEERS if k != "torch_compile")


def torch_device(choice: str) -> tuple[str | None, str]:
    """The PyTorch peers' device, or None and why not."""
    try:
        import torch
    except ImportError:
        return None, "torch is not installed"
    if choice == "cpu":
        return "cpu", ""
    if not torch.cuda.is_available():
        return None, "no CUDA for PyTorch (--torch-device cpu runs eager fp32 on the CPU)"
    torch.backends.cudnn.benchmark = True  # the strongest peer: cuDNN picks its algorithms
    return "cuda", ""


def measure_ort(ctx: Context, key: str, builds: dict[str, dict], threads: int) -> None:
    """Time onnxruntime fp32 (the reference session) or the static int8 model."""
    from mulayer.models.reference import onnxruntime_session

    def row(**fields) -> None:
        add_row(ctx, key, PEERS[key].label, "peer", f"{threads} intra-op threads", **fields)

    build = {"build_s": None}
    if key == "ort_int8":
        build = builds.get(f"quantize:{ctx.entry.name}", {"error": "not built (no calibration)"})
        if "error" in build:
            row(status="failed", note=f"failed: {build['error']}", build_s=None)
            return
    try:
        session = ctx.session if key == "ort_fp32" else onnxruntime_session(build["path"], threads)
        x = {INPUT_NAME: ctx.x}
        timing = time_ms(lambda: session.run(None, x), ctx.repeat, ctx.warmup)
        quality = quality_fields(ctx, lambda image: session.run(None, {INPUT_NAME: image})[0])
    except Exception as err:  # report and go on
        row(status="failed", note=f"failed: {error_text(err)}", build_s=build["build_s"])
        return
    row(build_s=build["build_s"], **timing_fields(timing), **quality)


def measure_torch(
    ctx: Context,
    keys: list[str],
    device: str | None,
    why_not: str,
    compile_mode: str,
    time_left: Callable[[], float],
) -> None:
    """The PyTorch peers, fp16 on CUDA; on a CPU ``device`` (local check) eager fp32 only."""
    if device is None or not keys:
        for key in keys:
            add_row(ctx, key, PEERS[key].label, "peer", "", status="n/a", note=f"n/a: {why_not}")
        return
    import onnx
    import torch

    sys.path.insert(0, str(SCRIPTS))
    import torch_peer

    half = device == "cuda"
    model = onnx.load(str(ctx.entry.path))
    modules: dict[bool, torch_peer.OnnxModule] = {}  # by channels-last: shared by the peers
    for key in keys:
        channels_last = key == "torch_graph_cl"
        cpu_eager = key == "torch_eager" and not half
        label = PEERS[key].label.replace("fp16", "CPU fp32") if cpu_eager else PEERS[key].label
        target = f"{device}, {'channels-last' if channels_last else 'NCHW'}"
        if key == "torch_compile":
            target = f"{device}, mode={compile_mode}"
        row = functools.partial(add_row, ctx, key, label, "peer", target)

        if key != "torch_eager" and not half:
            row(status="n/a", note="n/a: needs CUDA")
            continue
        if key == "torch_compile" and time_left() < 180:
            row(status="n/a", note="n/a: skipped, under 180 s of --budget-s left")
            continue
        try:
            begin = time.perf_counter()
            if channels_last not in modules:
                modules[channels_last] = torch_peer.prepare(model, device, half, channels_last)
            module = modules[channels_last]
            if key == "torch_eager":
                runner = torch_peer.eager_runner(module, ctx.x)
            elif key == "torch_compile":
                runner = torch_peer.compiled_runner(module, ctx.x, compile_mode)
            else:
                runner = torch_peer.cuda_graph_runner(module, ctx.x, channels_last)
            setup_s = time.perf_counter() - begin
            timing = time_ms(runner.step, ctx.repeat, ctx.warmup)
            quality = quality_fields(ctx, runner.predict)
            del runner  # frees a CUDA graph's memory pool
        except Exception as err:  # report and go on (torch.compile is optional)
            row(status="failed", note=f"failed: {error_text(err)}", build_s=None)
            continue
        row(build_s=setup_s, **timing_fields(timing), **quality)
    modules.clear()
    if half:
        torch.cuda.empty_cache()
