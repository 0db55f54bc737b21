"""Run a loaded artifact: validate inputs, place them, call the Relax VM, time it, trace it.

Runtime side only: imports the TVM runtime, never the compiler or onnx. The stock Relax VM runs
an artifact: GPU kernels are launched asynchronously (on CUDA, each run of them between CPU
parts replays one captured CUDA graph), so the CPU parts that follow them in program order run
while the GPU computes; tensors cross between the devices through
:mod:`mulayer.runtime.crossing` (planned buffers, host side page-locked once; the caller's
inputs are first copied into page-locked buffers of the model's own). The CPU parts' weights
are copied to the host once, at load (``vm["mulayer_cpu_weights"]()``), and passed to every
call after the inputs.

Concurrency: one ``LoadedModel`` may be called from several threads; calls are serialised by a
lock (the VM keeps per-call frames and a memory plan that must not interleave), so results equal
serial calls. For parallel throughput load one model per thread.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
import weakref
from dataclasses import dataclass

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine

from ..errors import MuLayerError
from ..tensor_spec import TensorSpec
from . import crossing

_STAGING_TRIES = 3  # calls that try to page-lock the input buffers before giving up

_DEVICE_MAKERS = {"cpu": tvm.cpu, "cuda": tvm.cuda, "opencl": tvm.opencl}


def make_device(kind: str):
    """A TVM device for ``kind``, or a ``MuLayerError`` if this machine has none."""
    if kind not in _DEVICE_MAKERS:
        raise MuLayerError(f"unknown device kind {kind!r}; known: {', '.join(_DEVICE_MAKERS)}")
    device = _DEVICE_MAKERS[kind](0)
    if not device.exist:
        raise MuLayerError(
            f"this artifact needs a {kind} device and none is present on this machine; "
            "compile it for the processors you have (e.g. --target llvm)"
        )
    return device


def check_input_dtype(name: str, got, expected: str, what: str = "input") -> None:
    """Refuse an array that needs more than a conversion within its kind of number.

    float64 -> float32 (and int32 -> int64) are converted; integers or booleans for a float
    input are refused: an image as uint8 or int64 pixels usually needs scaling first, and a
    silent cast would hide that. Complex and string arrays are refused too.
    """
    got, want = np.dtype(got), np.dtype(expected)
    same_kind = got.kind == want.kind or {got.kind, want.kind} <= {"i", "u"}
    if same_kind and np.can_cast(got, want, casting="same_kind"):
        return
    hint = ""
    if want.kind == "f" and got.kind in "iub":
        hint = (
            f" (integer arrays are not converted: convert and scale them first, e.g. "
            f"x.astype('{expected}') / 255 for 8-bit pixels, whatever the model expects)"
        )
    raise MuLayerError(f"{what} {name!r} has dtype {got}; the model expects {expected}{hint}")


@dataclass
class Timing:
    """Latency statistics of repeated runs, in milliseconds."""

    median_ms: float
    mean_ms: float
    min_ms: float
    p90_ms: float
    runs: int

    @classmethod
    def from_samples(cls, samples_ms: list[float]) -> Timing:
        ordered = sorted(samples_ms)
        p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
        return cls(
            median_ms=statistics.median(ordered),
            mean_ms=statistics.fmean(ordered),
            min_ms=ordered[0],
            p90_ms=p90,
            runs=len(ordered),
        )


class LoadedModel:
    """A compiled model ready to run: ``model(inputs) -> {output name: array}``."""

    def __init__(
        self,
        lib,
        metadata: dict,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        plan_json: str | None = None,
    ) -> None:
        self.metadata = metadata
        self.inputs = inputs
        self.outputs = outputs
        self.plan_json = plan_json
        self.devices = [make_device(kind) for kind in metadata["vm_devices"]]
        self.input_device = make_device(metadata.get("input_device", "cpu"))
        self._vm = VirtualMachine(lib, self.devices)
        self._main = self._vm["main"]
        self._lock = threading.Lock()
        weights = metadata.get("cpu_weights")
        self._weights = list(self._vm[weights["function"]]()) if weights else []
        stages = "cuda" in metadata["vm_devices"] and self.input_device.dlpack_device_type() == 1
        self._staging_tries = _STAGING_TRIES if stages and len(self.devices) > 1 else 0
        self._staging: list | None = None  # page-locked host tensors the inputs are copied into

    @property
    def mode(self) -> str:
        return self.metadata.get("mode", "cpu")

    # ------------------------------------------------------------------ inputs
    def check_inputs(self, inputs) -> list[np.ndarray]:
        """Match ``inputs`` (dict by name, list, or one array) to the model's input specs."""
        if isinstance(inputs, np.ndarray):
            inputs = [inputs]
        if isinstance(inputs, dict):
            missing = [spec.name for spec in self.inputs if spec.name not in inputs]
            extra = sorted(set(inputs) - {spec.name for spec in self.inputs})
            if missing or extra:
                raise MuLayerError(
                    f"inputs {sorted(inputs)} do not match the model's inputs "
                    f"{[spec.name for spec in self.inputs]}"
                )
            inputs = [inputs[spec.name] for spec in self.inputs]
        if len(inputs) != len(self.inputs):
            raise MuLayerError(
                f"the model takes {len(self.inputs)} input(s) "
                f"({', '.join(s.name for s in self.inputs)}), got {len(inputs)}"
            )
        arrays = []
        for spec, value in zip(self.inputs, inputs, strict=True):
            array = np.asarray(value)
            if tuple(array.shape) != spec.shape:
                raise MuLayerError(
                    f"input {spec.name!r} has shape {list(array.shape)}; the model expects "
                    f"{list(spec.shape)}"
                )
            if str(array.dtype) != spec.dtype:
                check_input_dtype(spec.name, array.dtype, spec.dtype)
                array = array.astype(spec.dtype)
            arrays.append(np.ascontiguousarray(array))
        return arrays

    def random_inputs(self, seed: int | None = None) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {
            spec.name: rng.standard_normal(spec.shape).astype(spec.dtype) for spec in self.inputs
        }

    # --------------------------------------------------------------------- run
    def _place(self, arrays: list[np.ndarray]) -> list:
        """The inputs as the VM takes them; call with the lock held.

        A cooperative CUDA model whose inputs start on the CPU copies them into page-locked
        host buffers of its own (taken at the first call, given back when the model is freed),
        so that their crossing to the GPU is a pinned copy; elsewhere, or where none can be
        locked (``MULAYER_PIN_CROSSINGS=0``, a driver that refuses: tried at
        ``_STAGING_TRIES`` calls, then never again), new host tensors.
        """
        if self._staging is None and self._staging_tries:
            self._staging_tries -= 1
            for device in self.devices:  # makes this thread's CUDA context current
                device.sync()
            self._staging = self._take_staging()
        if self._staging is None:
            return [tvm.runtime.tensor(array, self.input_device) for array in arrays]
        for tensor, array in zip(self._staging, arrays, strict=True):
            tensor.copyfrom(array)
        return self._staging

    def _take_staging(self) -> list | None:
        buffers = []
        for spec in self.inputs:
            nbytes = math.prod(spec.shape) * np.dtype(spec.dtype).itemsize
            buffer = crossing.take_page_locked(nbytes)
            if buffer is None:
                crossing.give_back_page_locked(buffers)
                return None
            buffers.append(buffer)
        weakref.finalize(self, crossing.give_back_page_locked, buffers)
        return [
            buffer._create_view(spec.shape, spec.dtype)
            for buffer, spec in zip(buffers, self.inputs, strict=True)
        ]

    def _placed(self, inputs) -> list:
        arrays = self.check_inputs(inputs or self.random_inputs(0))
        with self._lock:
            return self._place(arrays)

    def _call(self, device_inputs: list):
        """One VM call and a sync of every device; call with the lock held."""
        result = self._main(*device_inputs, *self._weights)
        for device in self.devices:
            device.sync()
        return result

    def _invoke(self, device_inputs: list):
        with self._lock:
            return self._call(device_inputs)

    def _to_numpy(self, result) -> dict[str, np.ndarray]:
        values = list(result) if not hasattr(result, "numpy") else [result]
        return {spec.name: value.numpy() for spec, value in zip(self.outputs, values, strict=True)}

    def run(self, inputs, check_finite: bool = False) -> dict[str, np.ndarray]:
        """Run once and return the outputs by name.

        NaN and Inf inputs are not scanned for by default (the scan is a pass over every
        input, on the hot path), and what the model computes from them is unspecified: TVM's
        max pooling and ReLU may turn a NaN into a finite value where onnxruntime propagates it.
        ``check_finite=True`` refuses them with a ``MuLayerError``, as ``mulayer run`` does.
        """
        arrays = self.check_inputs(inputs)
        if check_finite:
            for spec, array in zip(self.inputs, arrays, strict=True):
                if array.dtype.kind == "f" and not np.isfinite(array).all():
                    count = int(array.size - np.count_nonzero(np.isfinite(array)))
                    raise MuLayerError(
                        f"NaN or Inf values in input {spec.name!r} ({count} of {array.size}); "
                        "outputs computed from them are unspecified"
                    )
        with self._lock:  # the outputs are read before the next call may overwrite the inputs
            return self._to_numpy(self._call(self._place(arrays)))

    __call__ = run

    def benchmark(self, inputs=None, repeat: int = 50, warmup: int = 5) -> Timing:
        """Median latency of ``repeat`` runs after ``warmup`` runs.

        Inputs are placed once (a concurrent ``run`` may overwrite the staged ones: timings
        only); each timed run is the VM call plus a sync of every device.
        """
        if repeat < 1:
            raise MuLayerError(f"repeat must be at least 1, got {repeat}")
        device_inputs = self._placed(inputs)
        for _ in range(warmup):
            self._invoke(device_inputs)
        samples = []
        for _ in range(repeat):
            start = time.perf_counter()
            self._invoke(device_inputs)
            samples.append((time.perf_counter() - start) * 1e3)
        return Timing.from_samples(samples)

    def trace(self, inputs=None, warmup: int = 3):
        """Run once under the VM instrument; return ``(chrome_trace_dict, TraceSummary)``.

        See :mod:`mulayer.runtime.trace` for what is recorded and how GPU intervals are timed.
        A concurrent ``run`` may overwrite the staged inputs (the trace's timings stay valid).
        """
        from .trace import Recorder

        device_inputs = self._placed(inputs)
        for _ in range(warmup):
            self._invoke(device_inputs)
        gpu_kind = self.metadata["vm_devices"][0] if len(self.devices) > 1 else None
        recorder = Recorder(self.metadata.get("kernel_sites", []), gpu_kind)
        with self._lock:
            self._vm.set_instrument(recorder)
            try:
                recorder.start()
                self._main(*device_inputs, *self._weights)
                for device in self.devices:
                    device.sync()
                wall = recorder.finish()
            finally:
                self._vm.set_instrument(None)
        summary = recorder.summary(wall)
        info = {"mode": self.mode, "vm_devices": self.metadata["vm_devices"]}
        return recorder.chrome_trace(summary, info), summary
