"""The copy a cooperative model's VM calls where a tensor crosses between the devices.

:class:`mulayer.passes.stage_crossings.StageCrossings` turns every crossing into
``R.call_dps_packed("mulayer.crossing.copy", (src, pin), dst)``: ``dst`` is a buffer of the memory
plan, allocated once per loaded model (a cached allocation with CUDA graphs; the VM's pooled
storage otherwise), so the same host buffers come back on every call. This module registers
that function:

- where ``pin`` is set (the pass sets it when the host side is a planned buffer, not the caller's
  input or a returned tensor) the host side of a GPU copy is page-locked (``cuMemHostRegister``
  through the CUDA driver), so its copies run at pinned speed (DMA straight from or to the
  buffer) although the tensor's device stays ``cpu`` for the CPU kernels. Only the pages lying
  wholly inside the buffer are locked: a page it shares with a neighbour (a small allocation
  next to it on the heap, a numpy array made later) stays pageable, so no copy of memory the
  model does not own (TVM's own copies of inputs and outputs) can start in a locked page and
  run past it, which the driver refuses (``cudaErrorInvalidValue``). Pin flag 2 says the
  buffer's storage is whole pages (``PageAlignHostStorage``): where the buffer starts on a page,
  the page of its last byte is locked too, and the copy is one DMA. Memory freed while
  page-locked would leave its registration behind, so nothing the caller owns is ever pinned;
- registrations never overlap: the memory plan's buffers alias (tensors of different sizes
  share storage), so a buffer whose pages meet earlier registrations is page-locked together
  with them as one range (theirs are released first). A copy whose bytes meet a registration
  without lying inside it runs in pieces, each inside one registration or outside all of them
  (a buffer's partial first and last pages, a caller's tensor next to a planned buffer);
- the copy is issued on the GPU's default stream, in order with the kernels, and the function
  returns once it is complete (the CPU reads the result next, or may reuse the source buffer).
  Each buffer's pieces are worked out once (cached until the registrations change) and issued
  straight to the CUDA driver (``cuMemcpy*Async`` per piece, one ``cuStreamSynchronize``; with
  ``MULAYER_CROSSING_SYNC_COPY=1`` the last piece is a synchronous ``cuMemcpy*`` instead, which
  returns when all of them are done): a crossing costs its DMA plus a few microseconds. A small
  pageable piece (a buffer's partial first or last page) would make the driver stage it and
  wait for it on its own, so it goes through a page-locked page of our own instead (``BOUNCE``:
  a ``memmove`` on the host before an upload, after a download's sync): every piece of a
  crossing is then an asynchronous DMA. Buffers of models built with ``PageAlignHostStorage``
  (pin flag 2) are one piece: they start on a page and own the page of their last byte.
  Where the driver call fails (no current context on this thread yet) the copy goes through TVM
  (``TVMTensorCopyFromTo``) instead;
- host to host (the llvm + llvm stand-in) is a ``memcpy``;
- the function the VM calls is C where a C compiler is at hand
  (:mod:`~mulayer.runtime.native_crossing`): a crossing whose host buffer lies inside one
  page-locked range, or whose pieces :func:`copy` has planned (in practice every crossing of a
  planned buffer after its first), is copied with no Python; it hands every other call to
  :func:`copy` below, which locks buffers and tells it the locked ranges and the plans.

Page-locked ranges are never unregistered except to merge them: the VM takes its buffers from
TVM's global pooled allocator, which keeps memory for the life of the process
(``vm.builtin.memory_manager.clear`` would free it and leave stale registrations behind: do not
call it while cooperative models are loaded). ``MULAYER_PIN_CROSSINGS=0`` turns page-locking off
(every crossing is a pageable copy); ``MULAYER_CROSSING_BOUNCE=0`` sends small pageable pieces
straight to the driver (pageable) instead of through the bounce pages. Importing
:mod:`mulayer.runtime` registers the function; ``register()`` is idempotent.
"""

from __future__ import annotations

import collections
import ctypes
import mmap
import os
import threading

import numpy as np
import tvm

from .native_crossing import NativeCopy
from .native_crossing import load as load_native

COPY_FUNC = "mulayer.crossing.copy"  # also in mulayer.passes.stage_crossings
PIN_WHOLE_PAGES = 2  # the pin flag of a buffer whose storage is whole pages (stage_crossings)
_PAGE = 4096
_HOST_TYPES = (1, 3)  # kDLCPU, kDLCUDAHost
_ALREADY_REGISTERED = 712  # CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED


_HOST, _DEVICE, _BYTES = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t
_STREAM = ctypes.c_void_p
# The CUDA driver calls a crossing makes, with their argument types. The synchronous copies (on
# the legacy default stream, after the work before them) serve MULAYER_CROSSING_SYNC_COPY=1.
_DRIVER_SIGNATURES = {
    "cuMemHostRegister_v2": [_HOST, _BYTES, ctypes.c_uint],
    "cuMemHostUnregister": [_HOST],
    "cuMemcpyDtoHAsync_v2": [_HOST, _DEVICE, _BYTES, _STREAM],
    "cuMemcpyHtoDAsync_v2": [_DEVICE, _HOST, _BYTES, _STREAM],
    "cuMemcpyDtoH_v2": [_HOST, _DEVICE, _BYTES],
    "cuMemcpyHtoD_v2": [_DEVICE, _HOST, _BYTES],
    "cuStreamSynchronize": [_STREAM],
}


class _Pinner:
    """Page-locks host buffers as disjoint page ranges (CUDA driver API); a no-op without CUDA."""

    def __init__(self, native: NativeCopy | None = None) -> None:
        self.lock = threading.RLock()  # held around every GPU crossing: no copy sees a merge
        self.native = native  # told of every change to the ranges (it copies inside them)
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
                for name, argtypes in _DRIVER_SIGNATURES.items():
                    getattr(driver, name).argtypes = argtypes
                self._driver = driver
            except OSError:
                self._driver = None
        return self._driver

    def driver(self):
        """The CUDA driver library (``None`` without CUDA)."""
        return self._load()

    def covers(self, ptr: int, size: int) -> bool:
        """Whether ``[ptr, ptr + size)`` lies inside one page-locked range."""
        return any(start <= ptr and ptr + size <= end for start, end in self.ranges)

    def pin(self, tensor) -> bool:
        """Page-lock the pages lying wholly inside ``tensor`` (see :meth:`pin_range`).

        Call after a CUDA runtime call on this thread (the driver needs a current context);
        where the driver refuses, the ranges stay as they were and the next call tries again.
        """
        return self.pin_range(tensor.data_ptr(), _nbytes(tensor))

    def pin_range(self, ptr: int, size: int) -> bool:
        """Page-lock the pages lying wholly inside ``[ptr, ptr + size)`` (merged with the ranges
        they meet); True when locked, False where there are none or the driver refuses."""
        start, end = -(-ptr // _PAGE) * _PAGE, (ptr + size) // _PAGE * _PAGE
        if end <= start:
            return False
        if self.covers(start, end - start):  # the common case: a buffer seen before
            return True
        with self.lock:
            driver = self._load() if self.enabled else None
            if driver is None:
                return False
            return self._merge(driver, start, end)

    def _merge(self, driver, start: int, end: int) -> bool:
        """Lock ``[start, end)`` as one range with the ranges it meets (theirs released first;
        through the C copy where there is one, so that none of its copies runs meanwhile)."""
        met = [(s, e) for s, e in self.ranges if s < end and start < e]
        merged = (min([start, *(s for s, _ in met)]), max([end, *(e for _, e in met)]))
        ranges = sorted([r for r in self.ranges if r not in met] + [merged])
        if self.native is not None:
            if self.native.merge(met, merged, ranges) != 0:
                return False
        else:
            for s, _ in met:
                driver.cuMemHostUnregister(s)
            if driver.cuMemHostRegister_v2(merged[0], merged[1] - merged[0], 0) != 0:
                for s, e in met:  # put the old ranges back (they were valid)
                    driver.cuMemHostRegister_v2(s, e - s, 0)
                return False
        self.ranges = ranges
        self.pinned_bytes = sum(e - s for s, e in self.ranges)
        return True

    def pieces(self, ptr: int, size: int) -> list[tuple[int, int]]:
        """``[ptr, ptr + size)`` cut at the edges of the ranges it meets, as ``(offset, size)``
        pieces each inside one page-locked range or outside all of them."""
        cuts = {0, size}
        for start, end in self.ranges:
            for edge in (start, end):
                if ptr < edge < ptr + size:
                    cuts.add(edge - ptr)
        edges = sorted(cuts)
        return [(a, b - a) for a, b in zip(edges, edges[1:], strict=False)]


_ITEMSIZE: dict[str, int] = {}


def _nbytes(tensor) -> int:
    count = 1
    for dim in tensor.shape:
        count *= int(dim)
    dtype = str(tensor.dtype)
    if dtype not in _ITEMSIZE:
        _ITEMSIZE[dtype] = tvm.runtime.DataType(dtype).itemsize
    return count * _ITEMSIZE[dtype]


NATIVE = load_native()  # the copy's common path in C (None: every crossing runs in Python)
PINNER = _Pinner(NATIVE)
_copy_from_to = tvm.get_global_func("runtime.TVMTensorCopyFromTo")
_stream_sync = tvm.get_global_func("runtime.Device_StreamSync")


def wait(device) -> None:
    """Block until the work queued on ``device``'s default stream (the copy included) is done."""
    _stream_sync(device, 0)  # stream handle 0: the default stream, which TVM launches on


class _Bounce:
    """``SLOTS`` page-locked pages of our own (anonymous memory, page-aligned, never freed) that
    a crossing's small pageable pieces go through, one piece per page."""

    SLOTS = 4

    def __init__(self) -> None:
        self.enabled = os.environ.get("MULAYER_CROSSING_BOUNCE", "1") != "0"
        self._memory = None
        self._base = 0

    def slots(self) -> list[int] | None:
        """The pages' addresses; ``None`` where they cannot be page-locked (yet: the driver
        needs a current context) or bouncing is off."""
        if not (self.enabled and PINNER.enabled) or PINNER.driver() is None:
            return None
        if self._memory is None:  # mapped once, kept whether or not the lock takes
            self._memory = mmap.mmap(-1, self.SLOTS * _PAGE)
        if not self._base:
            base = ctypes.addressof(ctypes.c_char.from_buffer(self._memory))
            if not PINNER.pin_range(base, self.SLOTS * _PAGE):
                return None
            self._base = base
        return [self._base + i * _PAGE for i in range(self.SLOTS)]


BOUNCE = _Bounce()
# Off by default until measured on a GPU (scripts/bench_crossing.py times both ways).
SYNC_LAST = os.environ.get("MULAYER_CROSSING_SYNC_COPY", "0") == "1"


def set_sync_copy(on: bool) -> None:
    """``MULAYER_CROSSING_SYNC_COPY`` at run time: a crossing's last piece (its only one, in
    C) a synchronous copy instead of an asynchronous one and a stream sync."""
    global SYNC_LAST
    SYNC_LAST = on
    if NATIVE:
        NATIVE.set_sync_copy(on)


# A crossing's steps: (offset, size, bounce page or 0 for a DMA straight from/to the buffer).
Steps = list[tuple[int, int, int]]
# (host pointer, size, pin) -> (the registrations it was worked out against, its steps).
_PLANS: dict[tuple[int, int, int], tuple[list, Steps]] = {}


def _lock_size(ptr: int, size: int, pin: int) -> int:
    """How many bytes from ``ptr`` a crossing may page-lock: through the end of the last page
    for a page-aligned buffer of a whole-page storage (``pin`` 2), else the buffer."""
    whole = pin == PIN_WHOLE_PAGES and ptr % _PAGE == 0
    return -(-size // _PAGE) * _PAGE if whole else size


def _plan(ptr: int, size: int, pin: int) -> tuple[Steps, bool]:
    """The steps of a host buffer's copy (page-locking it first if ``pin``), and whether they
    are settled: cached until the registrations change. A lock the driver refused (no current
    context on this thread yet) is not settled: the next call tries again. ``pin`` 2
    (``PIN_WHOLE_PAGES``) on a page-aligned buffer locks through the end of its last page: its
    storage is whole pages, so the buffer is one locked range and one DMA."""
    key = (ptr, size, pin)
    hit = _PLANS.get(key)
    if hit is not None and hit[0] is PINNER.ranges:
        return hit[1], True
    lock_size = _lock_size(ptr, size, pin)
    locked = PINNER.pin_range(ptr, lock_size) if pin else False
    slots = BOUNCE.slots()
    steps = []
    for offset, piece in PINNER.pieces(ptr, size):
        bounce = piece <= _PAGE and slots and not PINNER.covers(ptr + offset, piece)
        steps.append((offset, piece, slots.pop(0) if bounce else 0))
    whole_pages = (ptr + lock_size) // _PAGE > -(-ptr // _PAGE)
    lock_settled = bool(locked) or not pin or not whole_pages or not PINNER.enabled
    bounce_settled = (
        slots is not None or not BOUNCE.enabled or not PINNER.enabled or PINNER.driver() is None
    )
    settled = lock_settled and bounce_settled
    if settled:
        _PLANS[key] = (PINNER.ranges, steps)
        _publish_plan(ptr, size, steps)
    return steps, settled


def _publish_plan(ptr: int, size: int, steps: Steps) -> None:
    """Hand a settled plan to the C copy where every step is a DMA it may issue: inside a
    page-locked range or through a bounce page (a pageable piece stays with Python)."""
    native = PINNER.native
    in_dma = all(page or PINNER.covers(ptr + offset, piece) for offset, piece, page in steps)
    found_in_c = len(steps) == 1 and not steps[0][2]  # one locked piece: C finds it itself
    if native is not None and in_dma and not found_in_c:
        native.set_plan(ptr, size, steps)


def set_bounce(on: bool) -> None:
    """``MULAYER_CROSSING_BOUNCE`` at run time; every plan is worked out again (in C too)."""
    with PINNER.lock:
        BOUNCE.enabled = on
        _PLANS.clear()
        if PINNER.native is not None:
            PINNER.native.publish(PINNER.ranges)  # the same ranges, no plans


def _driver_copy(host_ptr: int, gpu_ptr: int, steps: Steps, to_host: bool) -> bool:
    """Issue the steps on the default stream through the CUDA driver and return once they are
    done: all pieces asynchronous, then ``cuStreamSynchronize``; with ``SYNC_LAST``
    (``MULAYER_CROSSING_SYNC_COPY=1``; meant to be cheaper, not yet measured on a GPU, so off
    by default) the last piece is a synchronous copy instead, which runs after the others and
    returns when all are complete. Bounce pages are filled before an upload and emptied after a
    download. False (nothing to rely on) where the driver is missing or refuses."""
    driver = PINNER.driver()
    if driver is None:
        return False
    if PINNER.native is not None:  # the bounce pages are shared with the C copy: run them there
        size = sum(piece for _, piece, _ in steps)
        return PINNER.native.run(host_ptr, gpu_ptr, size, steps, to_host)
    last = len(steps) - 1 if SYNC_LAST else -1
    for index, (offset, size, page) in enumerate(steps):
        host = page or host_ptr + offset
        if to_host:
            if index == last:
                status = driver.cuMemcpyDtoH_v2(host, gpu_ptr + offset, size)
            else:
                status = driver.cuMemcpyDtoHAsync_v2(host, gpu_ptr + offset, size, None)
        else:
            if page:
                ctypes.memmove(page, host_ptr + offset, size)
            if index == last:
                status = driver.cuMemcpyHtoD_v2(gpu_ptr + offset, host, size)
            else:
                status = driver.cuMemcpyHtoDAsync_v2(gpu_ptr + offset, host, size, None)
        if status != 0:
            return False
    if last < 0 and driver.cuStreamSynchronize(None) != 0:
        return False
    if to_host:
        for offset, size, page in steps:
            if page:
                ctypes.memmove(host_ptr + offset, page, size)
    return True


def copy(src, *pin_and_dst) -> None:
    """``copy(src, pin, dst)``: copy ``src`` into ``dst`` (same shape and dtype, any two
    devices) and return when done; page-lock the host side first if ``pin``.
    ``copy(src, dst)`` (artifacts built before the flag) never pins."""
    pin, dst = (int(pin_and_dst[0]), pin_and_dst[1]) if len(pin_and_dst) == 2 else (0, *pin_and_dst)
    src_host = src.device.dlpack_device_type() in _HOST_TYPES
    dst_host = dst.device.dlpack_device_type() in _HOST_TYPES
    if src_host and dst_host:
        _copy_from_to(src, dst)
        return
    host, gpu = (src, dst) if src_host else (dst, src)
    ptr, size = host.data_ptr(), _nbytes(host)
    with PINNER.lock:
        steps, settled = _plan(ptr, size, pin)
        if not _driver_copy(ptr, gpu.data_ptr(), steps, to_host=dst_host):
            if len(steps) == 1:
                _copy_from_to(src, dst)
            else:
                _copy_in_pieces(src, dst, [(offset, piece) for offset, piece, _ in steps])
            wait(gpu.device)
        if not settled and pin:  # a first copy made the context current: lock it now
            PINNER.pin_range(ptr, _lock_size(ptr, size, pin))


def _copy_in_pieces(src, dst, pieces: list[tuple[int, int]]) -> None:
    """Copy ``src`` into ``dst`` as byte ranges ``(offset, size)`` (views of both, in order)."""
    for offset, size in pieces:
        _copy_from_to(
            src._create_view((size,), "uint8", relative_byte_offset=offset),
            dst._create_view((size,), "uint8", relative_byte_offset=offset),
        )


_LOCKED_HOST: list = []  # page-locked host memory is never freed (see the module docstring)


def page_locked_host(nbytes: int):
    """A uint8 host tensor of ``nbytes`` on fresh pages (anonymous memory: it starts on a page,
    at byte offset 0, so kernels take its views too), every page page-locked, as a crossing's
    planned buffer is (pin flag 2); or ``None`` where it cannot be locked (no CUDA driver or no
    current context: make a CUDA runtime call on this thread first; or
    ``MULAYER_PIN_CROSSINGS=0``). It is never freed. For staging buffers, references and the
    profiler: a buffer that does not start on a page keeps its first page pageable, and a copy
    that starts there is a pageable copy."""
    size = max(1, -(-nbytes // _PAGE)) * _PAGE
    pages = np.frombuffer(mmap.mmap(-1, size), dtype=np.uint8)
    _LOCKED_HOST.append(pages)  # kept before the lock: locked memory is never unmapped
    if not PINNER.pin_range(pages.ctypes.data, size):
        _LOCKED_HOST.pop()  # refused cleanly: nothing locked
        return None
    return tvm.runtime.from_dlpack(pages)._create_view((nbytes,), "uint8")


_SPARE_LOCKED: dict[int, list] = {}  # page-locked tensors given back, by their size in pages
_GIVEN_BACK: collections.deque = collections.deque()  # given back, not yet sorted by size
_SPARE_LOCK = threading.Lock()


def take_page_locked(nbytes: int):
    """A page-locked host buffer as :func:`page_locked_host` makes (its size rounded up to whole
    pages), reusing one given back with :func:`give_back_page_locked`; ``None`` where none can be
    locked. For a loaded model's own staging buffers: hand them back when the model goes."""
    pages = max(1, -(-nbytes // _PAGE))
    with _SPARE_LOCK:
        while _GIVEN_BACK:
            buffer = _GIVEN_BACK.popleft()
            _SPARE_LOCKED.setdefault(_nbytes(buffer) // _PAGE, []).append(buffer)
        spare = _SPARE_LOCKED.get(pages)
        if spare:
            return spare.pop()
    return page_locked_host(pages * _PAGE)


def give_back_page_locked(buffers: list) -> None:
    """Return buffers from :func:`take_page_locked` (they stay locked, for the next taker).
    Takes no lock: it runs from finalizers, which the garbage collector may call anywhere."""
    _GIVEN_BACK.extend(buffers)


def register() -> None:
    """Register ``mulayer.crossing.copy`` (idempotent): the C copy with :func:`copy` as its
    fallback where it was built, else :func:`copy`."""
    if tvm.get_global_func(COPY_FUNC, allow_missing=True) is not None:
        return
    if NATIVE is None:
        tvm.register_global_func(COPY_FUNC, copy)
        return
    driver = PINNER.driver() if PINNER.enabled else None
    NATIVE.set_driver(driver)
    NATIVE.set_sync_copy(SYNC_LAST)
    NATIVE.set_fallback(copy)
    tvm.register_global_func(COPY_FUNC, NATIVE.function)


register()
