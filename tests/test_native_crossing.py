"""Issue 16: the crossing copy's common path in C (``crossing_copy.c``), run on a CUDA driver
made of host memory (no GPU here): the bytes, which path took the call, and the fallback."""

import numpy as np
import pytest
import tvm

from mulayer.runtime import crossing, native_crossing

from .crossing_fakes import CallbackDriver, MemoryDriver, tensor_on

pytestmark = pytest.mark.skipif(crossing.NATIVE is None, reason="no C compiler here")
PAGE = 4096
HOST, CUDA = 1, 2


@pytest.fixture
def native(monkeypatch):
    """The loaded native copy on a ``MemoryDriver`` (through C callbacks), with a fresh pinner
    that publishes its ranges to it; the real driver and ranges are put back afterwards."""
    real, real_plans = crossing.PINNER, crossing._PLANS
    driver = MemoryDriver()
    pinner = crossing._Pinner(crossing.NATIVE)
    monkeypatch.setattr(pinner, "_load", lambda: driver)
    monkeypatch.setattr(pinner, "enabled", True)
    monkeypatch.setattr(crossing, "PINNER", pinner)
    monkeypatch.setattr(crossing, "BOUNCE", crossing._Bounce())
    monkeypatch.setattr(crossing, "_PLANS", {})
    callbacks = CallbackDriver(driver)
    crossing.NATIVE.set_driver(callbacks)
    sync_copy = crossing.SYNC_LAST
    crossing.set_sync_copy(False)
    yield driver, callbacks
    crossing.NATIVE.set_driver(real.driver() if real.enabled else None)
    crossing.set_sync_copy(sync_copy)
    crossing.NATIVE.publish(real.ranges)  # drops the C plans: drop Python's too (republished)
    real_plans.clear()


def _pages(count: int, offset: int = 0) -> np.ndarray:
    """``count`` pages of fresh random bytes starting ``offset`` bytes into a page."""
    arena = np.zeros((count + 2) * PAGE, np.uint8)
    start = -arena.ctypes.data % PAGE + offset
    view = arena[start : start + count * PAGE]
    view[:] = np.random.default_rng().integers(0, 256, view.size, dtype=np.uint8)
    return view


def _counts_after(call) -> tuple[int, int]:
    before = crossing.NATIVE.counts()
    call()
    after = crossing.NATIVE.counts()
    return after[0] - before[0], after[1] - before[1]


def test_the_vm_calls_the_native_copy():
    registered = tvm.get_global_func(crossing.COPY_FUNC)
    assert registered.same_as(crossing.NATIVE.function)


def test_a_locked_buffer_is_copied_in_c_both_ways(native):
    driver, callbacks = native
    copy = tvm.get_global_func(crossing.COPY_FUNC)
    host, gpu = _pages(3), _pages(3)
    assert crossing.PINNER.pin_range(host.ctypes.data, host.size)
    expected = gpu.copy()
    assert _counts_after(lambda: copy(tensor_on(gpu, CUDA), 2, tensor_on(host, HOST))) == (1, 0)
    assert np.array_equal(host, expected)
    assert callbacks.calls == ["cuMemcpyDtoHAsync_v2", "cuStreamSynchronize"]
    assert driver.copies == [(host.ctypes.data, host.size)] and not driver.queue

    host[:] = np.random.default_rng().integers(0, 256, host.size, dtype=np.uint8)
    callbacks.calls.clear()
    assert _counts_after(lambda: copy(tensor_on(host, HOST), 2, tensor_on(gpu, CUDA))) == (1, 0)
    assert np.array_equal(gpu, host)
    assert callbacks.calls == ["cuMemcpyHtoDAsync_v2", "cuStreamSynchronize"]


def test_sync_copy_is_one_synchronous_call(native):
    _, callbacks = native
    crossing.set_sync_copy(True)
    host, gpu = _pages(2), _pages(2)
    assert crossing.PINNER.pin_range(host.ctypes.data, host.size)
    copy = tvm.get_global_func(crossing.COPY_FUNC)
    assert _counts_after(lambda: copy(tensor_on(gpu, CUDA), 2, tensor_on(host, HOST))) == (1, 0)
    assert np.array_equal(host, gpu)
    assert callbacks.calls == ["cuMemcpyDtoH_v2"]


def test_a_buffer_outside_the_locked_ranges_goes_to_python(native):
    """Not locked (the caller's tensor, pin 0): the Python copy takes it, every time."""
    copy = tvm.get_global_func(crossing.COPY_FUNC)
    callers, gpu = _pages(2), _pages(2)
    for _ in range(2):
        args = (tensor_on(gpu, CUDA), 0, tensor_on(callers, HOST))
        assert _counts_after(lambda a=args: copy(*a)) == (0, 1)
        assert np.array_equal(callers, gpu)


@pytest.mark.parametrize("to_host", [True, False])
def test_a_ragged_buffer_is_planned_by_python_then_copied_in_c(native, to_host):
    """A buffer that starts and ends inside pages (a storage the pooled allocator handed back
    unaligned): the first copy is Python's, which locks its whole pages and publishes its plan
    (partial pages through bounce pages); later copies run that plan in C. Every byte arrives,
    both ways."""
    driver, callbacks = native
    copy = tvm.get_global_func(crossing.COPY_FUNC)
    ragged = _pages(4, offset=64)[: 3 * PAGE]
    gpu = _pages(3)
    for expected_counts in ((0, 1), (1, 0)):
        source, target = (gpu, ragged) if to_host else (ragged, gpu)
        source[:] = np.random.default_rng().integers(0, 256, source.size, dtype=np.uint8)
        driver.copies.clear()
        callbacks.calls.clear()
        args = (tensor_on(gpu, CUDA), 1, tensor_on(ragged, HOST))
        if not to_host:
            args = args[::-1]
        assert _counts_after(lambda a=args: copy(*a)) == expected_counts
        assert np.array_equal(target, source)
    # In C: the locked middle in place, the partial first and last pages through bounce pages.
    first_page = -(-ragged.ctypes.data // PAGE) * PAGE
    bounce = set(crossing.BOUNCE.slots())
    hosts = [host for host, _ in driver.copies]
    assert len(hosts) == 3 and hosts[1] == first_page and {hosts[0], hosts[2]} <= bounce
    assert callbacks.calls[-1] == "cuStreamSynchronize"


def test_a_refused_copy_is_done_again_by_python(native):
    """The driver refuses the C side's copy (no current context on this thread): the Python
    copy runs it, and the bytes arrive."""
    driver, _ = native
    refusals = []
    original = driver.cuMemcpyDtoHAsync_v2

    def refuse_once(*args):
        if not refusals:
            refusals.append(args)
            return 201  # CUDA_ERROR_INVALID_CONTEXT
        return original(*args)

    driver.cuMemcpyDtoHAsync_v2 = refuse_once
    host, gpu = _pages(2), _pages(2)
    assert crossing.PINNER.pin_range(host.ctypes.data, host.size)
    copy = tvm.get_global_func(crossing.COPY_FUNC)
    assert _counts_after(lambda: copy(tensor_on(gpu, CUDA), 2, tensor_on(host, HOST))) == (0, 1)
    assert len(refusals) == 1 and np.array_equal(host, gpu)


def test_a_merge_republishes_the_ranges(native):
    """Two aliasing buffers (the memory plan shares storage) locked one after the other are
    merged into one range, in C too: a copy of their union is copied in C."""
    copy = tvm.get_global_func(crossing.COPY_FUNC)
    both, gpu = _pages(4), _pages(4)
    first, second = both[: 3 * PAGE], both[PAGE:]
    assert crossing.PINNER.pin_range(first.ctypes.data, first.size)
    assert crossing.PINNER.pin_range(second.ctypes.data, second.size)
    assert _counts_after(lambda: copy(tensor_on(gpu, CUDA), 2, tensor_on(both, HOST))) == (1, 0)
    assert np.array_equal(both, gpu)


def test_a_failed_build_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(native_crossing.shutil, "which", lambda _name: None)
    with pytest.raises(RuntimeError, match="no C compiler"):
        native_crossing.build(tmp_path)
    assert not list(tmp_path.iterdir())


def test_the_build_is_cached_and_written_whole(tmp_path):
    first = native_crossing.build(tmp_path)
    assert native_crossing.build(tmp_path) == first
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind


def test_a_cached_library_that_does_not_load_is_built_again(tmp_path):
    cached = native_crossing.build(tmp_path)
    cached.write_bytes(b"not a shared library")
    loaded = native_crossing.open_cached(tmp_path)
    assert loaded.path == cached and loaded.counts() == (0, 0)
    assert cached.read_bytes()[:4] == b"\x7fELF"


def test_threads_share_the_bounce_pages_safely(native):
    """Threads copying their own ragged buffers at once, first through Python, then in C: the
    bounce pages are shared, so both paths run their steps in C under one lock; every byte
    arrives. (The fake driver is Python, so it runs under that lock: with tvm-ffi calls that
    keep the GIL, TVM_FFI_RELEASE_GIL_BY_DEFAULT=0, this test can hang; the real driver can't.)"""
    from concurrent.futures import ThreadPoolExecutor

    copy = tvm.get_global_func(crossing.COPY_FUNC)

    def worker(seed: int) -> bool:
        rng = np.random.default_rng(seed)
        ragged, gpu = _pages(4, offset=64 * (1 + seed))[: 3 * PAGE - 8], _pages(3)[: 3 * PAGE - 8]
        fine = True
        for round_ in range(12):
            to_host = round_ % 2 == 0
            source = gpu if to_host else ragged
            source[:] = rng.integers(0, 256, source.size, dtype=np.uint8)
            args = (tensor_on(gpu, CUDA), 2, tensor_on(ragged, HOST))
            copy(*(args if to_host else args[::-1]))
            fine &= bool(np.array_equal(ragged, gpu))
        return fine

    before = crossing.NATIVE.counts()
    with ThreadPoolExecutor(6) as pool:
        assert all(pool.map(worker, range(6)))
    after = crossing.NATIVE.counts()
    assert after[0] > before[0] and after[1] > before[1]  # both paths ran


def test_turning_bounce_off_drops_the_plans_in_c(native, monkeypatch):
    """``set_bounce(False)`` (the benchmarks' A/B): a ragged buffer planned in C goes back to
    Python, whose pageable pieces stay there; every byte still arrives."""
    monkeypatch.setattr(crossing.BOUNCE, "enabled", True)
    copy = tvm.get_global_func(crossing.COPY_FUNC)
    ragged, gpu = _pages(4, offset=64)[: 3 * PAGE], _pages(3)
    args = (tensor_on(gpu, CUDA), 2, tensor_on(ragged, HOST))
    copy(*args)  # Python: locks and plans
    assert _counts_after(lambda: copy(*args)) == (1, 0)
    crossing.set_bounce(False)
    for _ in range(2):
        gpu[:] = np.random.default_rng().integers(0, 256, gpu.size, dtype=np.uint8)
        assert _counts_after(lambda: copy(*args)) == (0, 1)
        assert np.array_equal(ragged, gpu)
    crossing.set_bounce(True)
    copy(*args)
    assert _counts_after(lambda: copy(*args)) == (1, 0)


def test_a_small_buffer_inside_one_page_is_bounced_in_c(native):
    """A tensor smaller than a page that shares its pages (a 4000-byte output): never locked,
    its one piece goes through a bounce page, from the second call on in C."""
    copy = tvm.get_global_func(crossing.COPY_FUNC)
    small, gpu = _pages(1, offset=64)[:4000], _pages(1)[:4000]
    args = (tensor_on(gpu, CUDA), 2, tensor_on(small, HOST))
    assert _counts_after(lambda: copy(*args)) == (0, 1)
    assert np.array_equal(small, gpu)
    gpu[:] = np.random.default_rng().integers(0, 256, gpu.size, dtype=np.uint8)
    assert _counts_after(lambda: copy(*args)) == (1, 0)
    assert np.array_equal(small, gpu)


def test_a_refused_merge_in_c_puts_the_old_ranges_back(native):
    """Merging goes through C (no copy runs meanwhile); where the driver refuses the merged
    range, the ranges it released are locked again and nothing changes, in C either."""
    driver, _ = native
    copy = tvm.get_global_func(crossing.COPY_FUNC)
    both, gpu = _pages(4), _pages(4)
    first = both[: 3 * PAGE]
    assert crossing.PINNER.pin_range(first.ctypes.data, first.size)
    locked_before, ranges_before = dict(driver.locked), list(crossing.PINNER.ranges)
    register = driver.cuMemHostRegister_v2

    def refuse_the_merged_range(start: int, size: int, flags: int) -> int:
        return 2 if size == 4 * PAGE else register(start, size, flags)  # CUDA_ERROR_OUT_OF_MEMORY

    driver.cuMemHostRegister_v2 = refuse_the_merged_range
    assert not crossing.PINNER.pin_range(both[PAGE:].ctypes.data, 3 * PAGE)
    assert crossing.PINNER.ranges == ranges_before
    assert driver.locked == locked_before
    args = (tensor_on(gpu[: 3 * PAGE], CUDA), 2, tensor_on(first, HOST))
    assert _counts_after(lambda: copy(*args)) == (1, 0)  # still locked, still in C


def test_an_error_in_the_fallback_reaches_the_caller():
    with pytest.raises(Exception, match="dlpack_device_type|device"):
        tvm.get_global_func(crossing.COPY_FUNC)(1, 2, 3)
