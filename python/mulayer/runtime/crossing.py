"""The copy a cooperative model's VM calls where a tensor crosses between the devices.

:class:`mulayer.passes.stage_crossings.StageCrossings` turns every crossing into
``R.call_dps_packed("mulayer.crossing.copy", (src, pin), dst)``: ``dst`` is a buffer of the memory
plan, allocated once per loaded model (a cached allocation with CUDA graphs; the VM's pooled
storage otherwise), so the same host buffers come back on every call. This module registers
that function:

- where ``pin`` is set (the pass sets it when the host side is a planned buffer, not the caller's
  input or a returned tensor) the host side of a GPU copy is page-locked (``cuMemHostRegister``
  through the CUDA driver) after the first copy through it, so every later copy runs at pinned
  speed (DMA straight from or to the buffer) although the tensor's device stays ``cpu`` for the
  CPU kernels. Memory freed while page-locked would leave its registration behind, and a later
  copy through that address fails, so nothing the caller owns is ever pinned;
- the copy is issued on the GPU's current stream, in order with the kernels, and the function
  returns once it is complete (the CPU reads the result next, or may reuse the source buffer);
- host to host (the llvm + llvm stand-in) is a ``memcpy``.

Page-locked ranges are never unregistered: the VM takes its buffers from TVM's global pooled
allocator, which keeps memory for the life of the process (``vm.builtin.memory_manager.clear``
would free it and leave stale registrations behind: do not call it while cooperative models
are loaded). Importing :mod:`mulayer.runtime` registers the function; ``register()`` is
idempotent.
"""

from __future__ import annotations

import ctypes
import threading

import tvm

COPY_FUNC = "mulayer.crossing.copy"  # also in mulayer.passes.stage_crossings
_PAGE = 4096
_HOST_TYPES = (1, 3)  # kDLCPU, kDLCUDAHost
_ALREADY_REGISTERED = 712  # CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED


class _Pinner:
    """Page-locks host buffers once (CUDA driver API); a no-op where there is no CUDA driver."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pinned: dict[int, int] = {}  # host pointer -> bytes from it page-locked
        self._driver = None
        self._tried = False
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
                self._driver = driver
            except OSError:
                self._driver = None
        return self._driver

    def pin(self, tensor) -> None:
        """Page-lock the pages of ``tensor`` not locked yet (call after a CUDA runtime call on
        this thread, so that the driver has a current context)."""
        ptr, size = tensor.data_ptr(), _nbytes(tensor)
        if self._pinned.get(ptr, 0) >= size:  # the common case: a buffer seen before
            return
        with self._lock:
            driver = self._load()
            if driver is None:
                self._pinned[ptr] = size
                return
            done = self._pinned.get(ptr, 0)
            start = (ptr + done) // _PAGE * _PAGE
            end = -(-(ptr + size) // _PAGE) * _PAGE
            # A page shared with a buffer pinned earlier is pinned already: skip it.
            err = 0
            while start < end:
                err = driver.cuMemHostRegister_v2(start, end - start, 0)
                if err != _ALREADY_REGISTERED:
                    break
                start += _PAGE
            if err == 0:  # else (no context yet, ...) try again on the next call
                self._pinned[ptr] = size
                self.pinned_bytes += end - start


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
    devices) and return when done; page-lock the host side for later calls if ``pin``.
    ``copy(src, dst)`` (artifacts built before the flag) never pins."""
    pin, dst = (
        (bool(pin_and_dst[0]), pin_and_dst[1]) if len(pin_and_dst) == 2 else (False, *pin_and_dst)
    )
    src_host = src.device.dlpack_device_type() in _HOST_TYPES
    dst_host = dst.device.dlpack_device_type() in _HOST_TYPES
    _copy_from_to(src, dst)
    if src_host and dst_host:
        return
    wait(dst.device if src_host else src.device)
    if pin:
        PINNER.pin(src if src_host else dst)  # for the next calls (the first copy is pageable)


def register() -> None:
    """Register :func:`copy` as ``mulayer.crossing.copy`` (idempotent)."""
    if tvm.get_global_func(COPY_FUNC, allow_missing=True) is None:
        tvm.register_global_func(COPY_FUNC, copy)


register()
