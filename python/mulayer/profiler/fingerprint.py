"""Device fingerprints: which machine (and software) a profile row was measured on.

A fingerprint is a flat JSON object: CPU model and core count, the GPU side's device name and
driver (when it is a real GPU), the TVM and mulayer versions, the target kinds. Its
:func:`hardware_id` hashes only the hardware fields, so a shipped cost model can be matched
against the machine it runs on (:func:`matches`) while a version change only warns.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

HARDWARE_FIELDS = ("cpu_model", "cpu_cores", "gpu_kind", "gpu_name")


def cpu_model() -> str:
    """The ``model name`` of /proc/cpuinfo (else :func:`platform.processor`)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def _gpu_fields(device) -> dict:
    """Name and driver of a GPU device (empty for a CPU or a device that is not there)."""
    if device is None or device.dlpack_device_type() == 1:  # kDLCPU
        return {}
    fields = {}
    try:
        if not device.exist:
            return {}
        fields["gpu_name"] = str(device.device_name)
        fields["gpu_compute_version"] = str(device.compute_version)
        fields["gpu_driver"] = str(device.driver_version)
    except (RuntimeError, AttributeError, ValueError):  # attribute not supported by the runtime
        pass
    return fields


def fingerprint(target_spec, gpu_device=None, remote_key: str | None = None) -> dict:
    """The fingerprint of the machine that times parts for ``target_spec``.

    Parameters
    ----------
    target_spec : mulayer.target.TargetSpec
    gpu_device : tvm.runtime.Device, optional
        The device the GPU parts run on (queried for its name and driver).
    remote_key : str, optional
        The RPC key of a remote device: its CPU is then known only by that key.
    """
    import tvm

    from mulayer.version import __version__

    device_kind = target_spec.device["kind"] if target_spec.device is not None else None
    fp = {
        "cpu_model": f"rpc:{remote_key}" if remote_key else cpu_model(),
        "cpu_cores": None if remote_key else os.cpu_count(),
        "cpu_target": target_spec.host.get("mcpu") or target_spec.host.get("mtriple") or "llvm",
        # CPU parts' thread pool size (None: TVM's default, one per physical core).
        "tvm_num_threads": None if remote_key else os.environ.get("TVM_NUM_THREADS"),
        "gpu_kind": device_kind,
        "gpu_name": None,
        "tvm_version": tvm.__version__,
        "mulayer_version": __version__,
    }
    if device_kind == "llvm":
        fp["gpu_name"] = "llvm (stand-in on the CPU)"
    else:
        fp.update(_gpu_fields(gpu_device))
    return fp


def hardware_id(fp: dict) -> str:
    """A short hash of the hardware fields of ``fp``."""
    core = {k: fp.get(k) for k in HARDWARE_FIELDS}
    return hashlib.sha1(json.dumps(core, sort_keys=True).encode()).hexdigest()[:10]


def matches(a: dict, b: dict) -> bool:
    """Whether two fingerprints describe the same hardware."""
    return hardware_id(a) == hardware_id(b)


def differences(a: dict, b: dict) -> list[str]:
    """``field: a != b`` for every field that differs (hardware and versions)."""
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k)!r} != {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
