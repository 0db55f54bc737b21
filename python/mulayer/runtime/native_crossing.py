"""The crossing copy's common path in C: ``crossing_copy.c``, built once per machine and cached.

A crossing called through Python costs the VM's call into the interpreter plus the copy
function's own Python, about 5.5 µs per copy on the GPU machine (docs/results.md, session 12):
as much as the DMA of a small tensor.
:func:`load` compiles ``crossing_copy.c`` with the system C compiler (``$CC``, else ``cc``)
against tvm-ffi's C API, caches the library under ``$MULAYER_CACHE_DIR`` (default
``~/.cache/mulayer``; written under a temporary name, then renamed) and loads it. Its function
handles the common crossing (a CUDA tensor and a host buffer lying inside one page-locked range,
or one whose plan of pieces the Python copy published: DMAs and a stream sync, no Python) and
hands every other call to the Python copy (:func:`mulayer.runtime.crossing.copy`), which locks
buffers and publishes the locked ranges and the plans here. Without a C compiler, or with
``MULAYER_NATIVE_CROSSING=0``, :func:`load` returns ``None`` and crossings run in Python.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

SOURCE = Path(__file__).with_name("crossing_copy.c")
# The driver entry points the C side calls, in mulayer_crossing_set_driver's order.
DRIVER_FUNCTIONS = (
    "cuMemcpyDtoHAsync_v2",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoH_v2",
    "cuMemcpyHtoD_v2",
    "cuStreamSynchronize",
    "cuMemHostRegister_v2",
    "cuMemHostUnregister",
)


def cache_dir() -> Path:
    """Where built libraries are kept: ``$MULAYER_CACHE_DIR``, else ``~/.cache/mulayer``."""
    configured = os.environ.get("MULAYER_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "mulayer"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def build(directory: Path | None = None) -> Path:
    """The library built from :data:`SOURCE` (reused where a cached one matches the source, the
    tvm-ffi library, the compiler, its command line and the machine). Raises ``RuntimeError``
    where it cannot be built."""
    import tvm_ffi
    from tvm_ffi import libinfo

    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler (set $CC)")
    library = Path(libinfo.find_libtvm_ffi())
    flags = [
        "-O2",
        "-shared",
        "-fPIC",
        "-std=gnu11",
        f"-I{libinfo.find_include_path()}",
        f"-I{libinfo.find_dlpack_include_path()}",
        str(SOURCE),
        f"-L{library.parent}",
        "-ltvm_ffi",
        f"-Wl,-rpath,{library.parent}",
        "-lpthread",
    ]
    identity = [SOURCE.read_bytes(), tvm_ffi.__version__.encode(), platform.machine().encode()]
    identity += [part.encode() for part in (compiler, *flags)]
    key = hashlib.sha256(b"\0".join(identity)).hexdigest()[:16]
    directory = directory or cache_dir()
    target = directory / f"crossing_copy-{key}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".crossing_copy-", suffix=".so", dir=directory)
    os.close(handle)
    command = [compiler, *flags, "-o", temporary]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr.strip()}")
        os.chmod(temporary, 0o755)  # mkstemp's 0600 would keep other users of the cache out
        os.replace(temporary, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    return target


class NativeCopy:
    """The loaded library: its FFI function (what the VM calls) and its settings."""

    def __init__(self, path: Path) -> None:
        import tvm_ffi

        self.path = path
        self.module = tvm_ffi.load_module(str(path))
        self.function = self.module.get_function("copy")
        self._lib = ctypes.CDLL(str(path))  # the same loaded library (dlopen by path)
        pointer, u64, count = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64
        self._lib.mulayer_crossing_set_driver.argtypes = [pointer] * len(DRIVER_FUNCTIONS)
        self._lib.mulayer_crossing_set_driver.restype = None
        self._lib.mulayer_crossing_set_sync_copy.argtypes = [ctypes.c_int]
        self._lib.mulayer_crossing_set_sync_copy.restype = None
        self._lib.mulayer_crossing_set_ranges.argtypes = [pointer, count]
        self._lib.mulayer_crossing_set_plan.argtypes = [u64, u64, pointer, count]
        self._lib.mulayer_crossing_merge.argtypes = [pointer, count, u64, u64, pointer, count]
        self._lib.mulayer_crossing_run.argtypes = [u64, u64, u64, pointer, count, ctypes.c_int]
        self._lib.mulayer_crossing_set_fallback.argtypes = [pointer]
        self._lib.mulayer_crossing_counts.argtypes = [pointer]
        self._lib.mulayer_crossing_counts.restype = None
        self._driver = None  # kept alive: the C side holds its entry points
        self._fallback = None

    def set_driver(self, driver: object | None) -> None:
        """Point the C side at the driver's entry points :data:`DRIVER_FUNCTIONS` (attributes
        of ``driver``: the ctypes library, or CFUNCTYPE callbacks); ``None``: no driver (every
        call falls back)."""
        pointers = [
            ctypes.cast(getattr(driver, name), ctypes.c_void_p) if driver else None
            for name in DRIVER_FUNCTIONS
        ]
        self._lib.mulayer_crossing_set_driver(*pointers)
        self._driver = driver

    def set_sync_copy(self, on: bool) -> None:
        """One synchronous copy per crossing instead of an asynchronous copy and a stream sync."""
        self._lib.mulayer_crossing_set_sync_copy(int(on))

    def set_fallback(self, function: Callable) -> None:
        """The Python function every call the C side does not handle goes to."""
        import tvm_ffi

        self._fallback = tvm_ffi.convert(function)
        if self._lib.mulayer_crossing_set_fallback(self._fallback.__chandle__()) != 0:
            raise RuntimeError("mulayer_crossing_set_fallback failed")

    def publish(self, ranges: list[tuple[int, int]]) -> None:
        """The page-locked ranges (disjoint, sorted); the plans are dropped."""
        if self._lib.mulayer_crossing_set_ranges(_flat(ranges), len(ranges)) != 0:
            raise MemoryError("mulayer_crossing_set_ranges")

    def merge(
        self, met: list[tuple[int, int]], merged: tuple[int, int], ranges: list[tuple[int, int]]
    ) -> int:
        """Page-lock ``merged`` (start, end) in place of the ranges it meets (``met``, released
        first, locked again where the driver refuses), with no copy running meanwhile; then the
        ranges are ``ranges``. The driver's status (0: locked; -3: no driver set)."""
        start, end = merged
        status = self._lib.mulayer_crossing_merge(
            _flat(met), len(met), start, end - start, _flat(ranges), len(ranges)
        )
        if status == -1:
            raise MemoryError("mulayer_crossing_merge")
        return status

    def set_plan(self, ptr: int, size: int, steps: list[tuple[int, int, int]]) -> bool:
        """The steps ``(offset, size, bounce page or 0)`` of the copy of the host buffer
        ``[ptr, ptr + size)``, each a DMA inside a page-locked range or through a bounce page
        (dropped when the ranges change). False where there are too many steps (the Python copy
        keeps the buffer)."""
        status = self._lib.mulayer_crossing_set_plan(ptr, size, _flat(steps), len(steps))
        if status == -1:
            raise MemoryError("mulayer_crossing_set_plan")
        return status == 0

    def run(self, host: int, gpu: int, size: int, steps: list, to_host: bool) -> bool:
        """Run the Python copy's steps as the C copy runs its own (under its lock, no Python
        meanwhile); False where the driver refused, is not set, or there are too many steps."""
        flat = _flat(steps)
        return self._lib.mulayer_crossing_run(host, gpu, size, flat, len(steps), to_host) == 1

    def counts(self) -> tuple[int, int]:
        """(calls copied in C, calls handed to the fallback) since the library was loaded."""
        out = (ctypes.c_uint64 * 2)()
        self._lib.mulayer_crossing_counts(out)
        return int(out[0]), int(out[1])


def _flat(rows: list[tuple[int, ...]]):
    """``rows`` of integers as one C array of uint64, row after row."""
    return (ctypes.c_uint64 * sum(map(len, rows)))(*[v for row in rows for v in row])


def open_cached(directory: Path | None = None) -> NativeCopy:
    """The library from the cache (built first where missing), built again once where the
    cached file does not load (cut short, or from another system sharing the cache)."""
    path = build(directory)
    try:
        return NativeCopy(path)
    except (OSError, RuntimeError):
        path.unlink(missing_ok=True)
        return NativeCopy(build(directory))


_LOADED: list[NativeCopy | None] = []
_LOAD_LOCK = threading.Lock()


def load() -> NativeCopy | None:
    """The native copy (built on first use), or ``None`` where it is turned off
    (``MULAYER_NATIVE_CROSSING=0``) or cannot be built (a warning says why)."""
    with _LOAD_LOCK:
        if not _LOADED:
            _LOADED.append(_load())
        return _LOADED[0]


def _load() -> NativeCopy | None:
    if os.environ.get("MULAYER_NATIVE_CROSSING", "1") == "0":
        return None
    try:
        return open_cached()
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        warnings.warn(
            f"mulayer: crossings run in Python (the C copy could not be built: {error}); "
            "set MULAYER_NATIVE_CROSSING=0 to skip trying",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
