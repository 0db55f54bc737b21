"""Run a loaded artifact: validate inputs, place them, call the Relax VM, time it, trace it.

Runtime side only: imports the TVM runtime, never the compiler or onnx. The stock Relax VM runs
an artifact: GPU kernels are launched asynchronously, so the CPU parts that follow them in
program order run while the GPU computes; copies happen where PlaceDevices put them. The CPU
parts' weights are copied to the host once, at load (``vm["mulayer_cpu_weights"]()``), and
passed to every call after the inputs.

Concurrency: one ``LoadedModel`` may be called from several threads; calls are serialised by a
lock (the VM keeps per-call frames and a memory plan that must not interleave), so results equal
serial calls. For parallel throughput load one model per thread.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from dataclasses import dataclass

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine

from ..errors import MuLayerError
from ..tensor_spec import TensorSpec

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
                if not np.can_cast(array.dtype, spec.dtype, casting="same_kind"):
                    raise MuLayerError(
                        f"input {spec.name!r} has dtype {array.dtype}; the model expects "
                        f"{spec.dtype}"
                    )
                array = array.astype(spec.dtype)
            arrays.append(np.ascontiguousarray(array))
        return arrays

    def random_inputs(self, seed: int | None = None) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {
            spec.name: rng.standard_normal(spec.shape).astype(spec.dtype) for spec in self.inputs
        }

    # --------------------------------------------------------------------- run
    def _upload(self, arrays: list[np.ndarray]) -> list:
        return [tvm.runtime.tensor(array, self.input_device) for array in arrays]

    def _invoke(self, device_inputs: list):
        with self._lock:
            result = self._main(*device_inputs, *self._weights)
            for device in self.devices:
                device.sync()
        return result

    def _to_numpy(self, result) -> dict[str, np.ndarray]:
        values = list(result) if not hasattr(result, "numpy") else [result]
        return {spec.name: value.numpy() for spec, value in zip(self.outputs, values, strict=True)}

    def run(self, inputs) -> dict[str, np.ndarray]:
        """Run once and return the outputs by name."""
        return self._to_numpy(self._invoke(self._upload(self.check_inputs(inputs))))

    __call__ = run

    def benchmark(self, inputs=None, repeat: int = 50, warmup: int = 5) -> Timing:
        """Median latency of ``repeat`` runs after ``warmup`` runs.

        Inputs are uploaded once; each timed run is the VM call plus a sync of every device.
        """
        if repeat < 1:
            raise MuLayerError(f"repeat must be at least 1, got {repeat}")
        device_inputs = self._upload(self.check_inputs(inputs or self.random_inputs(0)))
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
        """
        from .trace import Recorder

        device_inputs = self._upload(self.check_inputs(inputs or self.random_inputs(0)))
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
