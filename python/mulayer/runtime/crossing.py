"""The copy a cooperative model's VM calls where a tensor crosses between the devices.

:class:`mulayer.passes.stage_crossings.StageCrossings` turns every crossing into
``R.call_dps_packed("mulayer.crossing.copy", (src, pin), dst)``: ``dst`` is a buffer of the memory
plan, allocated once per loaded model (a cached allocation with CUDA graphs; the VM's pooled
storage otherwise), so the same host buffers come back on every call. This module registers
that function:

- where ``pin`` is set (the pass sets it when the host side is a planned buffer, not the caller's
  input or a returned tensor) the host side of a GPU copy is page-locked (``cuMemHostRegister``
  through the CUDA driver), so its copies run at pinned speed (DMA straight from or to the
  buffer) although the tensor's device stays ``cpu`` for the CPU kernels. Memory freed while
  page-locked would leave its registration behind, so nothing the caller owns is ever pinned;
- registrations never overlap and a copy never straddles two of them: the driver refuses a copy
  that starts in a page-locked range and runs past its end (``cudaErrorInvalidValue``), and the
  memory plan's buffers alias (tensors of different sizes share storage) and share pages. So a
  buffer whose pages meet earlier registrations is page-locked together with them as one range
  (theirs are released first), and a copy through a caller's buffer that straddles one goes
  through a page-aligned staging buffer of its own;
- the copy is issued on the GPU's current stream, in order with the kernels, and the function
  returns once it is complete (the CPU reads the result next, or may reuse the source buffer);
- host to host (the llvm + llvm stand-in) is a ``memcpy``.

Page-locked ranges are never unregistered except to merge them: the VM takes its buffers from
TVM's global pooled allocator, which keeps memory for the life of the process
(``vm.builtin.memory_manager.clear`` would free it and leave stale registrations behind: do not
call it while cooperative models are loaded). ``MULAYER_PIN_CROSSINGS=0`` turns page-locking off
(every crossing is a pageable copy). Importing :mod:`mulayer.runtime` registers the function;
``register()`` is idempotent.
"""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np
import tvm

COPY_FUNC = "mulayer.crossing.copy"  # also in mulayer.passes.stage_crossings
_PAGE = 4096
_HOST_TYPES = (1, 3)  # kDLCPU, kDLCUDAHost
_ALREADY_REGISTERED = 712  # CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED


class _Pinner:
    """Page-locks host buffers as disjoint page ranges (CUDA driver API); a no-op without CUDA."""

    def __init__(self) -> None:
        self.lock = threading.RLock()  # held around every GPU crossing: no copy sees a merge
        self.ranges: list[tuple[int, int]] = []  # page-locked [start, end), disjoint, sorted
        self._driver = None
        self._tried = False
        self.enabled = os.environ.get("MULAYER_PIN_CROSSINGS", "1") != "0"
        self.pinned_bytes = 0

    def _load(self):
        if not self._tried:
            self._tried = True
            try:
                driver = ctypes.CDLL("libcuda.so.1")
                driver.cuMemHostRegister_v2.argtypes = [
                    ctypes.c_void_p,
                    ctypes.c_size_t,
                    ctypes.c_uint,
                ]
                driver.cuMemHostUnregister.argtypes = [ctypes.c_void_p]
                self._driver = driver
            except OSError:
                self._driver = None
        return self._driver

    def covers(self, ptr: int, size: int) -> bool:
        """Whether ``[ptr, ptr + size)`` lies inside one page-locked range."""
        return any(start <= ptr and ptr + size <= end for start, end in self.ranges)

    def straddles(self, ptr: int, size: int) -> bool:
        """Whether ``[ptr, ptr + size)`` meets a page-locked range without lying inside it
        (the driver refuses such a copy)."""
        meets = any(start < ptr + size and ptr < end for start, end in self.ranges)
        return meets and not self.covers(ptr, size)

    def pin(self, tensor) -> bool:
        """Page-lock ``tensor``'s pages, merged with the ranges they meet; True when locked.

        Call after a CUDA runtime call on this thread (the driver needs a current context);
        where the driver refuses, the ranges stay as they were and the next call tries again.
        """
        return self.pin_range(tensor.data_ptr(), _nbytes(tensor))

    def pin_range(self, ptr: int, size: int) -> bool:
        if self.covers(ptr, size):  # the common case: a buffer seen before
            return True
        with self.lock:
            driver = self._load() if self.enabled else None
            if driver is None:
                return False
            start, end = ptr // _PAGE * _PAGE, -(-(ptr + size) // _PAGE) * _PAGE
            met = [(s, e) for s, e in self.ranges if s < end and start < e]
            merged = (min([start, *(s for s, _ in met)]), max([end, *(e for _, e in met)]))
            for s, _ in met:
                driver.cuMemHostUnregister(s)
            if driver.cuMemHostRegister_v2(merged[0], merged[1] - merged[0], 0) != 0:
                for s, e in met:  # put the old ranges back (they were valid)
                    driver.cuMemHostRegister_v2(s, e - s, 0)
                return False
            self.ranges = sorted([r for r in self.ranges if r not in met] + [merged])
            self.pinned_bytes = sum(e - s for s, e in self.ranges)
            return True


def _nbytes(tensor) -> int:
    count = 1
    for dim in tensor.shape:
        count *= int(dim)
    return count * tvm.runtime.DataType(str(tensor.dtype)).itemsize


PINNER = _Pinner()
_copy_from_to = tvm.get_global_func("runtime.TVMTensorCopyFromTo")
_stream_sync = tvm.get_global_func("runtime.Device_StreamSync")


def wait(device) -> None:
    """Block until the work queued on ``device``'s default stream (the copy included) is done."""
    _stream_sync(device, 0)  # stream handle 0: the default stream, which TVM launches on


def copy(src, *pin_and_dst) -> None:
    """``copy(src, pin, dst)``: copy ``src`` into ``dst`` (same shape and dtype, any two
    devices) and return when done; page-lock the host side first if ``pin``.
    ``copy(src, dst)`` (artifacts built before the flag) never pins."""
    pin, dst = (
        (bool(pin_and_dst[0]), pin_and_dst[1]) if len(pin_and_dst) == 2 else (False, *pin_and_dst)
    )
    src_host = src.device.dlpack_device_type() in _HOST_TYPES
    dst_host = dst.device.dlpack_device_type() in _HOST_TYPES
    if src_host and dst_host:
        _copy_from_to(src, dst)
        return
    host, gpu = (src, dst) if src_host else (dst, src)
    ptr, size = host.data_ptr(), _nbytes(host)
    with PINNER.lock:
        if pin:  # before the copy: an unlocked buffer may straddle a neighbour's range
            PINNER.pin_range(ptr, size)
        if PINNER.straddles(ptr, size):
            _copy_through_staging(src, dst, src_host, gpu.device)
        else:
            _copy_from_to(src, dst)
            wait(gpu.device)
        if pin:  # a first copy on this thread made the context current: lock it for next time
            PINNER.pin_range(ptr, size)


def _copy_through_staging(src, dst, src_host: bool, gpu_device) -> None:
    """The copy through a page-aligned host buffer whose pages no registration meets."""
    host = src if src_host else dst
    size = _nbytes(host)
    raw = np.empty(size + 2 * _PAGE, dtype=np.uint8)
    skip = -raw.ctypes.data % _PAGE
    pages = -(-size // _PAGE) * _PAGE
    flat = raw[skip : skip + pages][:size].view(np.dtype(str(host.dtype)))
    staging = tvm.runtime.from_dlpack(flat.reshape([int(d) for d in host.shape]))
    if src_host:
        _copy_from_to(src, staging)
        _copy_from_to(staging, dst)
        wait(gpu_device)
    else:
        _copy_from_to(src, staging)
        wait(gpu_device)
        _copy_from_to(staging, dst)


def register() -> None:
    """Register :func:`copy` as ``mulayer.crossing.copy`` (idempotent)."""
    if tvm.get_global_func(COPY_FUNC, allow_missing=True) is None:
        tvm.register_global_func(COPY_FUNC, copy)


register()
