"""Timeline of one inference: which kernel and copy ran where and when (Chrome/Perfetto trace).

Runtime side only. The Relax VM calls an instrument before and after every call instruction;
:class:`Recorder` stamps the host clock around each kernel and copy and, on a CUDA GPU, records
a CUDA event on the default stream (the stream TVM launches on) before and after each GPU kernel
and copy, so GPU intervals are the device's own times, not launch times. Tracks: CPU kernels,
GPU kernels (device events), GPU launches (host), copies host→device and device→host. A
captured CUDA graph shows as one GPU interval ("cuda graph").

GPU intervals span from an event recorded before the launch to one after it: when the GPU
waits for the host (the tracer's callbacks, CPU parts), that wait is inside the interval, so
per-kernel GPU times are upper bounds; a CUDA-graph replay has no such gaps.

Kernel calls are matched, in program order, to the call sites the compiler recorded
(``metadata["kernel_sites"]``: symbol, part binding such as ``conv2d_3_cpu``, side), so the
intervals carry layer-part names. Without GPU events (no ``cuda-bindings`` or PyTorch, or no
GPU) GPU-side intervals are host launch intervals and the trace says so.

The instrument costs a few µs per call (Python callback): the traced run is slower than an
untimed one; use :meth:`mulayer.runtime.executor.LoadedModel.benchmark` for latency.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

TRACKS = {
    "cpu": (1, "CPU kernels"),
    "gpu": (2, "GPU kernels (device events)"),
    "launch": (3, "GPU launches (host)"),
    "h2d": (4, "copy host→device"),
    "d2h": (5, "copy device→host"),
}
_COPY = "vm.builtin.to_device"
_CROSSING = "mulayer.crossing.copy"  # (src, dst): the staged copies of mulayer.runtime.crossing
_GRAPH = "vm.builtin.cuda_graph.run_or_capture"  # one launch of a captured CUDA graph
_CPU_DEVICE_TYPE = 1


class _CudaEvents:
    """CUDA events on the default stream through ``cuda-bindings`` (or PyTorch)."""

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart

            self._rt = cudart
            self._torch = None
        except ImportError:
            import torch

            if not torch.cuda.is_available():
                raise ImportError("no CUDA device for torch") from None
            self._rt = None
            self._torch = torch

    def record(self):
        if self._torch is not None:
            event = self._torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        _err, event = self._rt.cudaEventCreate()
        self._rt.cudaEventRecord(event, 0)
        return event

    def elapsed_ms(self, start, end) -> float:
        if self._torch is not None:
            return start.elapsed_time(end)
        self._rt.cudaEventSynchronize(end)
        _err, ms = self._rt.cudaEventElapsedTime(start, end)
        return float(ms)

    def destroy(self, events) -> None:
        if self._rt is not None:
            for event in events:
                self._rt.cudaEventDestroy(event)


def cuda_events():
    """A CUDA event helper, or ``None`` where none can be made."""
    try:
        return _CudaEvents()
    except Exception:  # noqa: BLE001 - any failure means "no device events"
        return None


@dataclass
class Interval:
    track: str
    name: str
    start_us: float
    end_us: float
    args: dict = field(default_factory=dict)

    @property
    def dur_us(self) -> float:
        return max(0.0, self.end_us - self.start_us)


@dataclass
class TraceSummary:
    """Figures read off one traced inference (µs)."""

    wall_us: float
    kernel_us: dict[str, float]
    kernel_count: dict[str, int]
    host_launch_us: float
    copy_us: dict[str, float]
    cpu_overlapped_fraction: float
    busy_us: float
    device_events: bool

    def to_json(self) -> dict:
        return {
            "wall_us": round(self.wall_us, 2),
            "kernel_us": {k: round(v, 2) for k, v in self.kernel_us.items()},
            "kernel_count": self.kernel_count,
            "host_launch_us": round(self.host_launch_us, 2),
            "copy_us": {k: round(v, 2) for k, v in self.copy_us.items()},
            "cpu_overlapped_fraction": round(self.cpu_overlapped_fraction, 4),
            "busy_us": round(self.busy_us, 2),
            "device_events": self.device_events,
        }


class Recorder:
    """A VM instrument that records one inference; see the module docstring.

    Parameters
    ----------
    sites : list of ``[symbol, part, side]`` from the artifact metadata (may be empty)
    gpu_kind : the GPU device kind of the artifact (``"cuda"``, ``"opencl"``) or ``None``
    """

    def __init__(self, sites: list, gpu_kind: str | None) -> None:
        self.sites = sites
        self.events = cuda_events() if gpu_kind == "cuda" else None
        self.intervals: list[Interval] = []
        self._open: dict | None = None
        self._site = 0
        self._t0 = 0.0
        self._e0 = None
        self._pending: list[tuple[Interval, object, object]] = []

    # VM instrument: (func, symbol, before_run, ret_value, *args) -> 0 (= go on)
    def __call__(self, _func, symbol, before_run, _ret, *args) -> int:
        symbol = str(symbol)
        is_copy = symbol in (_COPY, _CROSSING)
        if symbol.startswith("vm.builtin.") and symbol not in (_COPY, _GRAPH):
            return 0
        now = (time.perf_counter() - self._t0) * 1e6
        if before_run:
            side, name = self._classify(symbol, args, is_copy)
            event = self.events.record() if self.events and side != "cpu" else None
            self._open = {"side": side, "name": name, "start": now, "event": event}
            return 0
        opened, self._open = self._open, None
        if opened is None:
            return 0
        side, name = opened["side"], opened["name"]
        if side == "cpu":
            self.intervals.append(Interval("cpu", name, opened["start"], now))
            return 0
        host_track = "launch" if side == "gpu" else side
        self.intervals.append(Interval(host_track, name, opened["start"], now, {"host": True}))
        if self.events is not None:
            end_event = self.events.record()
            device_track = "gpu" if side == "gpu" else side
            pending = Interval(device_track, name, 0.0, 0.0, {"device_events": True})
            self._pending.append((pending, opened["event"], end_event))
        return 0

    def _classify(self, symbol: str, args, is_copy: bool) -> tuple[str, str]:
        if is_copy and symbol == _CROSSING:
            dst_type = int(args[-1].device.dlpack_device_type()) if args else _CPU_DEVICE_TYPE
            return ("d2h" if dst_type == _CPU_DEVICE_TYPE else "h2d"), "copy"
        if is_copy:
            dst_type = int(args[1]) if len(args) > 1 else _CPU_DEVICE_TYPE
            return ("d2h" if dst_type == _CPU_DEVICE_TYPE else "h2d"), "copy"
        if symbol == _GRAPH:
            return "gpu", "cuda graph"
        # Sites the VM did not call as kernels (a reshape became a view) are skipped.
        for index in range(self._site, len(self.sites)):
            if self.sites[index][0] == symbol:
                self._site = index + 1
                return self.sites[index][2], self.sites[index][1]
        out = args[-1] if args else None
        device = getattr(out, "device", None)
        on_cpu = device is None or int(device.dlpack_device_type()) == _CPU_DEVICE_TYPE
        return ("cpu" if on_cpu else "gpu"), symbol

    def start(self) -> None:
        self.intervals, self._pending, self._site = [], [], 0
        if self.events is not None:
            self._e0 = self.events.record()
            self.events.elapsed_ms(self._e0, self._e0)  # wait until the GPU reached it
        self._t0 = time.perf_counter()

    def finish(self) -> float:
        """Resolve device events (after the caller synced); return the wall time in µs."""
        wall = (time.perf_counter() - self._t0) * 1e6
        if self.events is not None:
            used = [self._e0]
            for interval, start, end in self._pending:
                interval.start_us = self.events.elapsed_ms(self._e0, start) * 1e3
                interval.end_us = self.events.elapsed_ms(self._e0, end) * 1e3
                self.intervals.append(interval)
                used += [start, end]
            self.events.destroy(used)
        return wall

    def summary(self, wall_us: float) -> TraceSummary:
        device = self.events is not None
        gpu_track = "gpu" if device else "launch"
        kernel = {
            "cpu": sum(i.dur_us for i in self.intervals if i.track == "cpu"),
            "gpu": sum(i.dur_us for i in self.intervals if i.track == gpu_track),
        }
        copies = {
            d: sum(
                i.dur_us
                for i in self.intervals
                if i.track == d and i.args.get("device_events", not device)
            )
            for d in ("h2d", "d2h")
        }
        gpu_busy = _union(
            [
                (i.start_us, i.end_us)
                for i in self.intervals
                if i.track == gpu_track
                or (i.track in ("h2d", "d2h") and i.args.get("device_events", not device))
            ]
        )
        cpu = [(i.start_us, i.end_us) for i in self.intervals if i.track == "cpu"]
        overlapped = sum(_overlap(span, gpu_busy) for span in cpu)
        busy = _union(cpu + gpu_busy)
        return TraceSummary(
            wall_us=wall_us,
            kernel_us=kernel,
            kernel_count={
                "cpu": sum(1 for i in self.intervals if i.track == "cpu"),
                "gpu": sum(1 for i in self.intervals if i.track == gpu_track),
            },
            host_launch_us=sum(i.dur_us for i in self.intervals if i.track == "launch"),
            copy_us=copies,
            cpu_overlapped_fraction=overlapped / kernel["cpu"] if kernel["cpu"] else 0.0,
            busy_us=sum(b - a for a, b in busy),
            device_events=device,
        )

    def chrome_trace(self, summary: TraceSummary, metadata: dict) -> dict:
        events = [
            {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "mulayer inference"}}
        ]
        for tid, label in TRACKS.values():
            events.append(
                {"ph": "M", "name": "thread_name", "pid": 1, "tid": tid, "args": {"name": label}}
            )
        for interval in sorted(self.intervals, key=lambda i: i.start_us):
            events.append(
                {
                    "ph": "X",
                    "name": interval.name,
                    "pid": 1,
                    "tid": TRACKS[interval.track][0],
                    "ts": round(interval.start_us, 3),
                    "dur": round(interval.dur_us, 3),
                    "args": interval.args,
                }
            )
        return {
            "traceEvents": events,
            "displayTimeUnit": "ms",
            "otherData": {"summary": summary.to_json(), **metadata},
        }


def write_trace(path, trace: dict) -> None:
    from pathlib import Path

    from ..fileio import atomic_write_text

    atomic_write_text(Path(path), json.dumps(trace))


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _overlap(span: tuple[float, float], union: list[tuple[float, float]]) -> float:
    start, end = span
    return sum(max(0.0, min(end, b) - max(start, a)) for a, b in union)
