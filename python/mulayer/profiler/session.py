"""Where parts are timed: this machine, or a remote device reached through TVM's RPC tracker.

Both sessions give the devices of the two processors and load a built library; the timer does
the rest the same way (``time_evaluator`` runs on the device's side in both cases, so the RPC
round trip is not in the figures).
"""

from __future__ import annotations

from pathlib import Path

import tvm

from mulayer.errors import MuLayerError
from mulayer.target import TargetSpec


def _gpu_kind(spec: TargetSpec) -> str | None:
    if spec.device is None:
        return None
    return spec.device["kind"]


class LocalSession:
    """Time on this machine."""

    remote_key: str | None = None

    def __init__(self, spec: TargetSpec):
        self.spec = spec
        kind = _gpu_kind(spec)
        if kind not in (None, "llvm"):
            dev = tvm.device(kind, 0)
            if not dev.exist:
                raise MuLayerError(
                    f"the target's GPU side is {kind} but no {kind} device is present here; "
                    "profile on the machine that has it, or through --rpc-tracker/--rpc-key"
                )

    def device(self, processor: str) -> tvm.runtime.Device:
        kind = _gpu_kind(self.spec)
        if processor == "cpu" or kind in (None, "llvm"):
            return tvm.cpu(0)
        return tvm.device(kind, 0)

    def cpu(self) -> tvm.runtime.Device:
        return tvm.cpu(0)

    def load(self, path: str):
        if _gpu_kind(self.spec) == "cuda":
            # A library holding CUDA source (built where no CUDA runtime was) compiles on load.
            from tvm.support import nvcc  # noqa: F401
        return tvm.runtime.load_module(path)

    def close(self) -> None:
        pass


class RPCSession:
    """Time on a device registered with an RPC tracker under ``key``."""

    def __init__(self, spec: TargetSpec, tracker: str, key: str, timeout: float = 600.0):
        from tvm import rpc

        self.spec = spec
        self.remote_key = key
        host, _, port = tracker.rpartition(":")
        if not host or not port.isdigit():
            raise MuLayerError(f"--rpc-tracker {tracker!r} must look like HOST:PORT")
        try:
            client = rpc.connect_tracker(host, int(port))
            self.remote = client.request(key, priority=1, session_timeout=timeout, max_retry=2)
        except (RuntimeError, OSError, ValueError) as err:
            raise MuLayerError(
                f"could not get a device with key {key!r} from the RPC tracker {tracker}: {err}"
            ) from None

    def device(self, processor: str):
        kind = _gpu_kind(self.spec)
        if processor == "cpu" or kind in (None, "llvm"):
            return self.remote.cpu(0)
        return self.remote.device(kind, 0)

    def cpu(self):
        return self.remote.cpu(0)

    def load(self, path: str):
        self.remote.upload(path)
        return self.remote.load_module(Path(path).name)

    def close(self) -> None:
        self.remote = None
