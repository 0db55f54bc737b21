"""Stand-ins for the CUDA driver and for CUDA tensors, for crossing tests without a GPU."""

import ctypes

import numpy as np


class FakeDriver:
    """cuMemHostRegister/Unregister on a page table: refuses to lock a page twice, as CUDA does."""

    def __init__(self) -> None:
        self.locked: dict[int, int] = {}  # range start -> end
        self.refuse = False

    def cuMemHostRegister_v2(self, start: int, size: int, _flags: int) -> int:
        if self.refuse:
            return 2  # CUDA_ERROR_OUT_OF_MEMORY
        if any(s < start + size and start < e for s, e in self.locked.items()):
            return 712  # CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED
        self.locked[start] = start + size
        return 0

    def cuMemHostUnregister(self, start: int) -> int:
        return 0 if self.locked.pop(start, None) is not None else 713


class MemoryDriver(FakeDriver):
    """A CUDA driver on host memory: "device" pointers are host addresses too; async copies run
    at the stream sync (so a bounce page read before the sync holds stale bytes), and a copy
    whose host bytes meet a registration without lying inside it is refused, as CUDA does."""

    def __init__(self) -> None:
        super().__init__()
        self.queue: list[tuple[int, int, int]] = []
        self.copies: list[tuple[int, int]] = []  # host side of every async copy

    def _inside_or_outside(self, host: int, size: int) -> bool:
        meets = [(s, e) for s, e in self.locked.items() if s < host + size and host < e]
        return not meets or any(s <= host and host + size <= e for s, e in meets)

    def _enqueue(self, dst: int, src: int, host: int, size: int) -> int:
        if not self._inside_or_outside(host, size):
            return 1  # CUDA_ERROR_INVALID_VALUE
        self.copies.append((host, size))
        self.queue.append((dst, src, size))
        return 0

    def cuMemcpyDtoHAsync_v2(self, host, dev, size, _stream):
        return self._enqueue(host, dev, host, size)

    def cuMemcpyHtoDAsync_v2(self, dev, host, size, _stream):
        return self._enqueue(dev, host, host, size)

    def cuStreamSynchronize(self, _stream):
        for dst, src, size in self.queue:
            ctypes.memmove(dst, src, size)
        self.queue.clear()
        return 0

    def _synchronous(self, dst: int, src: int, host: int, size: int) -> int:
        status = self._enqueue(dst, src, host, size)  # after the queued copies, then waits
        return status or self.cuStreamSynchronize(None)

    def cuMemcpyDtoH_v2(self, host, dev, size):
        return self._synchronous(host, dev, host, size)

    def cuMemcpyHtoD_v2(self, dev, host, size):
        return self._synchronous(dev, host, host, size)


class _Device(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _Device),
        ("ndim", ctypes.c_int32),
        ("dtype", _DataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _ManagedTensor(ctypes.Structure):
    _fields_ = [
        ("dl_tensor", _DLTensor),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
    ]


_KEEP: list = []  # the DLPack structs and arrays behind the tensors handed out (never freed)


def tensor_on(array: np.ndarray, device_type: int):
    """An FFI tensor over ``array``'s bytes (uint8, 1-D) that says it lives on ``device_type``
    (2: CUDA): a CUDA tensor a ``MemoryDriver`` can copy, with no GPU."""
    import tvm_ffi

    assert array.dtype == np.uint8 and array.ndim == 1 and array.flags.c_contiguous
    shape = (ctypes.c_int64 * 1)(array.size)
    dl_tensor = _DLTensor(array.ctypes.data, _Device(device_type, 0), 1, _DataType(1, 8, 1), shape)
    managed = _ManagedTensor(dl_tensor, None, None)
    _KEEP.append((managed, shape, array))
    new_capsule = ctypes.pythonapi.PyCapsule_New
    new_capsule.restype = ctypes.py_object
    new_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    return tvm_ffi.from_dlpack(new_capsule(ctypes.addressof(managed), b"dltensor", None))


_STATUS = ctypes.c_int
_ASYNC = ctypes.CFUNCTYPE(
    _STATUS, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p
)
_SYNC_COPY = ctypes.CFUNCTYPE(_STATUS, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t)
_STREAM_SYNC = ctypes.CFUNCTYPE(_STATUS, ctypes.c_void_p)
_REGISTER = ctypes.CFUNCTYPE(_STATUS, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_uint)
_UNREGISTER = ctypes.CFUNCTYPE(_STATUS, ctypes.c_uint64)


class CallbackDriver:
    """A driver's entry points as C function pointers (what the native copy calls) that run
    ``driver``'s methods and record the copies' and syncs' names in ``calls``."""

    def __init__(self, driver) -> None:
        self.calls: list[str] = []

        def recorded(name: str, kind):
            def call(*args):
                if not name.startswith("cuMemHost"):
                    self.calls.append(name)
                return getattr(driver, name)(*args)  # looked up per call: tests may swap it

            return kind(call)

        self.cuMemcpyDtoHAsync_v2 = recorded("cuMemcpyDtoHAsync_v2", _ASYNC)
        self.cuMemcpyHtoDAsync_v2 = recorded("cuMemcpyHtoDAsync_v2", _ASYNC)
        self.cuMemcpyDtoH_v2 = recorded("cuMemcpyDtoH_v2", _SYNC_COPY)
        self.cuMemcpyHtoD_v2 = recorded("cuMemcpyHtoD_v2", _SYNC_COPY)
        self.cuStreamSynchronize = recorded("cuStreamSynchronize", _STREAM_SYNC)
        self.cuMemHostRegister_v2 = recorded("cuMemHostRegister_v2", _REGISTER)
        self.cuMemHostUnregister = recorded("cuMemHostUnregister", _UNREGISTER)
