"""Issue 16: a two-device module fused per device, CUDA graphs around its GPU segments only,
crossings staged into planned buffers. Structure is checked on CUDA modules compiled here
(no GPU needed); numerics on the llvm + llvm stand-in (and ``gpu``-marked on a real GPU)."""

import collections
import re
import warnings

import numpy as np
import pytest
import tvm
from tvm import relax

import mulayer
from mulayer.compiler.build import legalize_and_fuse, to_fp16
from mulayer.frontend.onnx_import import import_onnx
from mulayer.passes.build_helpers import legalize_keeping_vdevices
from mulayer.passes.fuse_per_device import FusePerDevice
from mulayer.passes.pipeline import cooperative_passes, lower_two_device, vm_lowering
from mulayer.passes.stage_crossings import COPY_FUNC, PIN_WHOLE_PAGES

from .conftest import max_rel_error, onnxruntime_reference, outputs_from_threads
from .crossing_fakes import FakeDriver as _FakeDriver
from .crossing_fakes import MemoryDriver as _MemoryDriver
from .test_cooperative import FP16_TOLERANCE

CUDA = {"kind": "cuda", "arch": "sm_90"}
LLVM = {"kind": "llvm"}
_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


def _kernels(mod) -> list[str]:
    """The PrimFuncs ``main`` calls, in order, side suffixes (``_cuda``) removed."""
    names = []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and value.op.same_as(_CALL_TIR):
                names.append(value.args[0].name_hint.replace("_cuda", ""))
    return names


def _coop(mod, ratio: float):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no calibration: fp32 CPU parts
        return cooperative_passes(mulayer.Plan.uniform(ratio), CUDA, LLVM)(mod)


@pytest.mark.parametrize("net", ["tiny", "resnet18"])
def test_ratio_one_has_the_gpu_only_fused_kernels(net, tmp_path):
    from mulayer.models.zoo import save_model

    save_model(net, tmp_path / f"{net}.onnx")
    mod, _, _ = import_onnx(str(tmp_path / f"{net}.onnx"))
    target = tvm.target.Target(CUDA, host=LLVM)
    gpu_only = _kernels(legalize_and_fuse(to_fp16(mod), target))
    placed = relax.transform.RealizeVDevice()(_coop(mod, 1.0))
    fused = FusePerDevice()(legalize_keeping_vdevices(placed))
    assert _kernels(fused) == gpu_only
    assert any(name.startswith("fused_conv2d") for name in gpu_only)
    main = fused["main"]
    # Inputs and result on the GPU: nothing crosses.
    assert main.params[0].ty.vdevice.target.kind.name == "cuda"
    assert "to_vdevice" not in main.script()


def test_fused_kernels_keep_their_side(tiny_onnx):
    mod, _, _ = import_onnx(str(tiny_onnx))
    lowered = lower_two_device(_coop(mod, 0.5), tvm.target.Target(CUDA, host=LLVM))
    fused = 0
    for gvar, func in lowered.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc) and gvar.name_hint.startswith("fused_"):
            fused += 1
            kind = func.attrs["target"].kind.name
            assert kind == ("llvm" if "_llvm" in gvar.name_hint else "cuda"), gvar.name_hint
    assert fused >= 6
    # Crossings are staged copies into planned buffers; none is left to the VM's to_device.
    script = lowered["main"].script()
    assert COPY_FUNC in script and "R.to_vdevice" not in script


def _crossings(main: relax.Function) -> list[tuple[relax.Var, relax.Expr, int]]:
    """``(destination var, source, pin flag)`` of every staged crossing of ``main``."""
    found = []
    for block in main.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if (
                isinstance(value, relax.Call)
                and getattr(value.args[0], "global_symbol", "") == COPY_FUNC
            ):
                src, pin = value.args[1].fields
                found.append((binding.var, src, int(pin.value)))
    return found


def test_only_planned_host_buffers_are_pinned(tiny_onnx):
    """The caller's input and the returned tensor are freed by their owners: never page-locked
    (memory freed while registered makes later copies through its address fail)."""
    mod, _, _ = import_onnx(str(tiny_onnx))
    main = lower_two_device(_coop(mod, 0.5), tvm.target.Target(CUDA, host=LLVM))["main"]
    crossings = _crossings(main)
    params = set(main.params)
    returned = main.body.body
    returned = set(returned.fields) if isinstance(returned, relax.Tuple) else {returned}
    owned = [pin for dst, src, pin in crossings if src in params or dst in returned]
    planned = [pin for dst, src, pin in crossings if src not in params and dst not in returned]
    assert owned and planned  # tiny at 0.5: its input and its output cross, and inner tensors
    assert set(owned) == {0} and set(planned) == {PIN_WHOLE_PAGES}


def test_cuda_graphs_capture_gpu_segments_only(tiny_onnx):
    mod, _, _ = import_onnx(str(tiny_onnx))
    lowered = lower_two_device(_coop(mod, 0.5), tvm.target.Target(CUDA, host=LLVM))
    with tvm.transform.PassContext(config={"relax.backend.use_cuda_graph": True}):
        out = vm_lowering()(lowered)
    captures = {
        gv.name_hint: func.script()
        for gv, func in out.functions_items()
        if isinstance(func, relax.Function) and "cuda_graph_capture" in gv.name_hint
    }
    assert len(captures) >= 3  # one per GPU segment between CPU parts
    kernel = re.compile(r"^\s*(\w+_(?:cuda|llvm))\(", re.M)
    for name, script in captures.items():
        kernels = kernel.findall(script)
        assert kernels, name
        assert all(k.endswith("_cuda") for k in kernels), (name, kernels)  # no CPU kernel
        assert COPY_FUNC not in script and "to_device" not in script
    main = out["main"].script()
    # CPU kernels and crossings run in main, between graph launches.
    assert re.search(r"^\s*fused_conv2d\w*_llvm\w*\(", main, re.M)
    assert main.count("vm.builtin.cuda_graph.run_or_capture") == len(captures)
    assert main.count(COPY_FUNC) >= 4


def test_stand_in_split_every_element_and_threads(tiny_onnx, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = mulayer.compile(str(tiny_onnx), target="mulayer -ratio=0.5, llvm, llvm")
    compiled.export(tmp_path / "t.mulayer")
    model = mulayer.load(tmp_path / "t.mulayer")
    inputs = [model.random_inputs(seed=int(s)) for s in np.random.randint(1 << 30, size=8)]
    serial = [list(model(x).values())[0] for x in inputs]
    for x, out in zip(inputs, serial, strict=True):
        ref = onnxruntime_reference(tiny_onnx, x)[0]
        assert np.all(np.isfinite(out))
        assert max_rel_error(out, ref) < 2e-2  # fp16 GPU parts
    for got, want in zip(outputs_from_threads(model, inputs), serial, strict=True):
        assert np.array_equal(got, want)


@pytest.mark.gpu
def test_cuda_split_with_graphs_matches_and_replays(tiny_onnx, tmp_path):
    compiled = mulayer.compile(str(tiny_onnx), target="mulayer -ratio=0.5, cuda -arch=sm_90, llvm")
    assert compiled.metadata()["cuda_graph"]
    compiled.export(tmp_path / "c.mulayer")
    model = mulayer.load(tmp_path / "c.mulayer")
    for seed in (1, 2, 3):  # the first call captures, the others replay
        inputs = model.random_inputs(seed=seed)
        out = list(model(inputs).values())[0]
        ref = onnxruntime_reference(tiny_onnx, inputs)[0]
        assert np.all(np.isfinite(out))
        assert max_rel_error(out, ref) < 2e-2


def test_crossing_copy_and_wait_run_without_a_gpu():
    """The copy's helpers on the host (their GPU branch takes the same calls)."""
    from mulayer.runtime import crossing

    src = tvm.runtime.tensor(np.random.default_rng().standard_normal((3, 7)).astype("float32"))
    dst = tvm.runtime.empty((3, 7), "float32", tvm.cpu(0))
    tvm.get_global_func(COPY_FUNC)(src, 1, dst)
    assert np.array_equal(dst.numpy(), src.numpy())
    again = tvm.runtime.empty((3, 7), "float32", tvm.cpu(0))
    tvm.get_global_func(COPY_FUNC)(src, again)  # artifacts built before the pin flag
    assert np.array_equal(again.numpy(), src.numpy())
    crossing.wait(tvm.cpu(0))  # the stream handle is an int (None was refused on the GPU)
    crossing.PINNER.pin(dst)  # no CUDA driver here: a no-op; never an error


def test_crossing_copy_waits_on_the_gpu_and_pins_the_host_side(monkeypatch):
    """Control flow of a GPU crossing, with the TVM calls recorded (no GPU here)."""
    from mulayer.runtime import crossing

    class Fake:
        def __init__(self, kind: int, name: str, ptr: int = 1 << 20) -> None:
            self.name, self.ptr, self.shape, self.dtype = name, ptr, (4, 1024), "float32"
            self.device = type("D", (), {"dlpack_device_type": lambda _self: kind})()

        def data_ptr(self) -> int:
            return self.ptr

    calls = []
    monkeypatch.setattr(crossing, "_copy_from_to", lambda s, d: calls.append(("copy", s, d)))
    monkeypatch.setattr(crossing, "wait", lambda dev: calls.append(("wait", dev)))
    monkeypatch.setattr(
        crossing.PINNER, "pin_range", lambda ptr, size: calls.append(("pin", ptr, size))
    )
    gpu, host = Fake(2, "gpu"), Fake(1, "host")
    crossing.copy(gpu, 1, host)  # device to host
    crossing.copy(host, 1, gpu)  # host to device
    # Locked before the copy (so it runs pinned the first time) and after (a first copy makes
    # the thread's context current).
    assert [c[0] for c in calls] == ["pin", "copy", "wait", "pin"] * 2
    assert calls[2][1] is gpu.device and calls[6][1] is gpu.device  # the GPU's stream
    assert calls[0][1:] == calls[4][1:] == (host.ptr, 4 * 1024 * 4)  # the host side
    calls.clear()
    crossing.copy(host, 0, gpu)  # the caller's buffer: never page-locked
    crossing.copy(gpu, host)  # the flag missing (older artifacts): never page-locked
    assert [c[0] for c in calls] == ["copy", "wait", "copy", "wait"]
    # A host buffer that meets a page-locked range without lying inside it is copied in
    # pieces cut at the range's edges.
    monkeypatch.setattr(crossing.PINNER, "ranges", [(host.ptr + 4096, host.ptr + 8192)])
    pieced = []
    monkeypatch.setattr(crossing, "_copy_in_pieces", lambda *a: pieced.append(a))
    calls.clear()
    crossing.copy(host, 0, gpu)
    assert pieced == [(host, gpu, [(0, 4096), (4096, 4096), (8192, 8192)])]
    assert [c[0] for c in calls] == ["wait"]


def test_pinned_ranges_hold_only_whole_pages_of_the_buffers(monkeypatch):
    """Aliasing and page-sharing buffers: registrations are disjoint, page-aligned, merged where
    they meet, and hold only pages lying wholly inside the buffers (a page shared with memory
    the model does not own stays pageable); every copy is cut into pieces each inside one
    registration or outside all of them."""
    from mulayer.runtime.crossing import _PAGE, _Pinner

    pinner, driver = _Pinner(), _FakeDriver()
    monkeypatch.setattr(pinner, "_load", lambda: driver)
    monkeypatch.setattr(pinner, "enabled", True)
    rng = np.random.default_rng()
    base = 1 << 30
    buffers = []
    for _ in range(40):  # offsets and sizes of a memory plan: overlapping, page-sharing
        ptr = base + int(rng.integers(0, 64)) * 64 * int(rng.integers(1, 300))
        buffers.append((ptr, int(rng.integers(1, 5 * _PAGE))))
    for ptr, size in buffers:
        whole_pages = (ptr + size) // _PAGE > -(-ptr // _PAGE)
        assert pinner.pin_range(ptr, size) == whole_pages
    assert sorted(driver.locked.items()) == pinner.ranges  # the driver holds what we think
    for (s0, e0), (s1, _) in zip(pinner.ranges, pinner.ranges[1:], strict=False):
        assert e0 <= s1 and s0 % _PAGE == 0 and e0 % _PAGE == 0  # disjoint, page-aligned
    owned = np.zeros(max(p + n for p, n in buffers) - base, bool)
    for ptr, size in buffers:
        owned[ptr - base : ptr + size - base] = True
    for start, end in pinner.ranges:
        assert owned[start - base : end - base].all()  # nothing outside the buffers
    for ptr, size in buffers + [(base + 100, 20 * _PAGE), (pinner.ranges[-1][1] - 64, 4096)]:
        pieces = pinner.pieces(ptr, size)
        assert [o for o, _ in pieces] == [0] + list(np.cumsum([n for _, n in pieces[:-1]]))
        assert sum(n for _, n in pieces) == size
        for offset, n in pieces:
            inside = pinner.covers(ptr + offset, n)
            meets = any(s < ptr + offset + n and ptr + offset < e for s, e in pinner.ranges)
            assert inside or not meets
    # Where the driver refuses, the earlier ranges are put back as they were.
    last_start, last_end = pinner.ranges[-1]
    before = list(pinner.ranges)
    driver.refuse = True
    assert not pinner.pin_range(last_start - _PAGE, last_end - last_start + 2 * _PAGE)
    driver.refuse = False
    assert pinner.ranges == before
    monkeypatch.setattr(pinner, "enabled", False)
    assert not pinner.pin_range(last_end + 10 * _PAGE, 3 * _PAGE)  # MULAYER_PIN_CROSSINGS=0


def test_crossing_copy_in_pieces_keeps_every_element():
    from mulayer.runtime import crossing

    for dtype in ("float32", "float16", "uint8"):
        data = np.random.default_rng().standard_normal((3, 5, 7)) * 50
        src = tvm.runtime.tensor(data.astype(dtype))
        nbytes = src.numpy().nbytes
        dst = tvm.runtime.tensor(np.full((3, 5, 7), 7, dtype))
        cuts = sorted({0, nbytes, *np.random.default_rng().integers(1, nbytes, 3).tolist()})
        crossing._copy_in_pieces(
            src, dst, [(a, b - a) for a, b in zip(cuts, cuts[1:], strict=False)]
        )
        assert np.array_equal(dst.numpy(), src.numpy())


def test_crossing_copy_goes_straight_to_the_driver_and_caches_its_plan(monkeypatch):
    """With a CUDA driver, a crossing is one async copy per piece and one stream sync (no TVM
    copy, no second wait); its pieces are worked out once until the registrations change; a
    refusing driver (no current context) falls back to TVM's copy."""
    from mulayer.runtime import crossing

    class Fake:
        def __init__(self, kind: int, ptr: int) -> None:
            self.ptr, self.shape, self.dtype = ptr, (4, 2048), "float32"
            self.device = type("D", (), {"dlpack_device_type": lambda _self: kind})()

        def data_ptr(self) -> int:
            return self.ptr

    class Driver:
        def __init__(self) -> None:
            self.calls, self.status = [], 0

        def cuMemcpyDtoHAsync_v2(self, host, dev, size, stream):
            self.calls.append(("d2h", host, dev, size, stream))
            return self.status

        def cuMemcpyHtoDAsync_v2(self, dev, host, size, stream):
            self.calls.append(("h2d", host, dev, size, stream))
            return self.status

        def cuMemcpyDtoH_v2(self, host, dev, size):
            self.calls.append(("d2h sync", host, dev, size))
            return self.status

        def cuMemcpyHtoD_v2(self, dev, host, size):
            self.calls.append(("h2d sync", host, dev, size))
            return self.status

        def cuStreamSynchronize(self, stream):
            self.calls.append(("sync", stream))
            return 0

    driver, tvm_calls = Driver(), []
    monkeypatch.setattr(crossing.PINNER, "driver", lambda: driver)
    monkeypatch.setattr(crossing.PINNER, "native", None)  # the Python copy (no C compiler)
    monkeypatch.setattr(crossing.BOUNCE, "enabled", False)  # pieces straight to the driver
    monkeypatch.setattr(crossing, "SYNC_LAST", True)  # MULAYER_CROSSING_SYNC_COPY=1
    monkeypatch.setattr(crossing.PINNER, "ranges", [])
    monkeypatch.setattr(crossing, "_PLANS", {})
    monkeypatch.setattr(crossing, "_copy_from_to", lambda s, d: tvm_calls.append("copy"))
    monkeypatch.setattr(crossing, "wait", lambda dev: tvm_calls.append("wait"))
    host, gpu = Fake(1, 1 << 20), Fake(2, 1 << 40)
    nbytes = 4 * 2048 * 4
    crossing.copy(gpu, 0, host)
    crossing.copy(host, 0, gpu)
    # One piece: one synchronous copy each way (it returns when done: no stream sync).
    assert driver.calls == [
        ("d2h sync", host.ptr, gpu.ptr, nbytes),
        ("h2d sync", host.ptr, gpu.ptr, nbytes),
    ]
    assert tvm_calls == [] and list(crossing._PLANS) == [(host.ptr, nbytes, 0)]
    # A registration that cuts the buffer: new pieces, async copies, the last one synchronous.
    monkeypatch.setattr(crossing.PINNER, "ranges", [(host.ptr + 4096, host.ptr + 12288)])
    driver.calls.clear()
    crossing.copy(gpu, 0, host)
    offsets = [(c[1] - host.ptr, c[2] - gpu.ptr, c[3]) for c in driver.calls]
    assert offsets == [(0, 0, 4096), (4096, 4096, 8192), (12288, 12288, nbytes - 12288)]
    assert [c[0] for c in driver.calls] == ["d2h", "d2h", "d2h sync"]
    # The default (MULAYER_CROSSING_SYNC_COPY unset): all asynchronous, then one stream sync.
    monkeypatch.setattr(crossing, "SYNC_LAST", False)
    driver.calls.clear()
    crossing.copy(host, 0, gpu)
    assert [c[0] for c in driver.calls] == ["h2d", "h2d", "h2d", "sync"]
    # The driver refuses: TVM's copy and a wait instead.
    driver.status = 201  # CUDA_ERROR_INVALID_CONTEXT
    monkeypatch.setattr(crossing, "_copy_in_pieces", lambda *a: tvm_calls.append("pieces"))
    crossing.copy(gpu, 0, host)
    assert tvm_calls == ["pieces", "wait"]


class _HostArray:
    """A tensor's face on a numpy array; its device type (1 host, 2 GPU) decides a copy's
    direction (the _MemoryDriver's "GPU" is host memory too)."""

    def __init__(self, array: np.ndarray, kind: int) -> None:
        self.array, self.shape, self.dtype = array, array.shape, "uint8"
        self.device = type("D", (), {"dlpack_device_type": lambda _self: kind})()

    def data_ptr(self) -> int:
        return self.array.ctypes.data


def _use_driver(monkeypatch, crossing, driver):
    """Make ``crossing`` run on ``driver``: a fresh pinner and bounce pages, no cached plans."""
    pinner = crossing._Pinner()
    monkeypatch.setattr(pinner, "_load", lambda: driver)
    monkeypatch.setattr(pinner, "enabled", True)
    monkeypatch.setattr(crossing, "PINNER", pinner)
    monkeypatch.setattr(crossing, "BOUNCE", crossing._Bounce())
    monkeypatch.setattr(crossing.BOUNCE, "enabled", True)
    monkeypatch.setattr(crossing, "_PLANS", {})
    return pinner


def test_crossing_pieces_of_partial_pages_go_through_bounce_pages(monkeypatch):
    """A planned buffer that starts and ends inside pages: its whole pages are DMA'd in place,
    its partial first and last pages through the page-locked bounce pages, one sync per copy;
    every byte arrives, both ways."""
    from mulayer.runtime import crossing

    driver = _MemoryDriver()
    pinner = _use_driver(monkeypatch, crossing, driver)
    rng = np.random.default_rng()

    arena = np.zeros(16 * crossing._PAGE, np.uint8)
    first_page = -arena.ctypes.data % crossing._PAGE
    offset = first_page + 64 * int(rng.integers(1, 60))
    size = 5 * crossing._PAGE + int(rng.integers(1, crossing._PAGE))
    while (offset + size) % crossing._PAGE == 0:  # two partial pages: it must end mid-page
        size -= 1
    host = _HostArray(arena[offset : offset + size], 1)
    gpu = _HostArray(rng.integers(0, 256, size, dtype=np.uint8), 2)
    for _ in range(2):  # the second time from the cached plan
        driver.copies.clear()
        host.array[:] = 0
        crossing.copy(gpu, 1, host)
        assert np.array_equal(host.array, gpu.array)
        upload = rng.integers(0, 256, size, dtype=np.uint8)
        host.array[:] = upload
        crossing.copy(host, 1, gpu)
        assert np.array_equal(gpu.array, upload)
        assert not driver.queue
        slots = crossing.BOUNCE.slots()
        bounced = [c for c in driver.copies if c[0] in slots]
        in_place = [c for c in driver.copies if c[0] not in slots]
        assert len(bounced) == 4 and all(n < crossing._PAGE for _, n in bounced)  # 2 per copy
        assert all(pinner.covers(ptr, n) for ptr, n in in_place)  # never a pageable piece
    # Bouncing off (MULAYER_CROSSING_BOUNCE=0): the partial pages go to the driver pageable.
    monkeypatch.setattr(crossing.BOUNCE, "enabled", False)
    monkeypatch.setattr(crossing, "_PLANS", {})
    driver.copies.clear()
    crossing.copy(gpu, 1, host)
    assert np.array_equal(host.array, gpu.array)
    assert sum(not pinner.covers(ptr, n) for ptr, n in driver.copies) == 2
    # A buffer at the start of a whole-page storage (pin 2, PageAlignHostStorage): the page of
    # its last byte is locked too, and each copy is one DMA, no bounce.
    monkeypatch.setattr(crossing.BOUNCE, "enabled", True)
    start = first_page + 8 * crossing._PAGE  # past the first buffer
    paged = _HostArray(arena[start : start + size], 1)
    driver.copies.clear()
    crossing.copy(gpu, PIN_WHOLE_PAGES, paged)
    assert np.array_equal(paged.array, gpu.array)
    assert driver.copies == [(paged.data_ptr(), size)]
    assert pinner.covers(paged.data_ptr(), -(-size // crossing._PAGE) * crossing._PAGE)


def test_host_storages_are_whole_pages(tiny_onnx):
    """PageAlignHostStorage: every host storage of a two-device module is asked for in whole,
    page-aligned pages (dtype uint8x4096, size in pages); GPU storages are left as they are."""
    from mulayer.passes.page_align_host_storage import PAGE_DTYPE

    mod, _, _ = import_onnx(str(tiny_onnx))
    lowered = lower_two_device(_coop(mod, 0.5), tvm.target.Target(CUDA, host=LLVM))
    storages = re.findall(
        r"R\.vm\.alloc_storage\(R\.shape\(\[(\d+)\]\), (\d+), R\.dtype\(\"([\w]+)\"\)",
        vm_lowering()(lowered)["main"].script(),
    )
    kinds = [vd.target.kind.name for vd in lowered.global_infos["vdevice"]]
    host = [(int(n), dtype) for n, dev, dtype in storages if kinds[int(dev)] == "llvm"]
    gpu = [dtype for _, dev, dtype in storages if kinds[int(dev)] == "cuda"]
    assert host and gpu
    assert all(dtype == PAGE_DTYPE for _, dtype in host) and set(gpu) == {"uint8"}


def test_cpu_only_builds_use_whole_pages_too(tiny_onnx):
    """A CPU-only build's storages are asked for in whole pages as well (build_single's
    pipeline): buffers it leaves in TVM's pooled allocator, which a cooperative model in the
    same process may be handed back, then start on pages. A GPU build's are left alone."""
    from mulayer.compiler.build import cpu_build_pipeline
    from mulayer.passes.page_align_host_storage import PAGE_DTYPE

    mod, _, _ = import_onnx(str(tiny_onnx))
    storage = r"R\.vm\.alloc_storage\(R\.shape\(\[\d+\]\), \d+, R\.dtype\(\"(\w+)\"\)"
    target = tvm.target.Target(LLVM)
    with target:
        lowered = cpu_build_pipeline()(legalize_and_fuse(mod, target))
    dtypes = re.findall(storage, lowered["main"].script())
    assert dtypes and set(dtypes) == {PAGE_DTYPE}


_RUN_RECORDING_CROSSINGS = """
import json, sys
import numpy as np, tvm, mulayer
from mulayer.runtime import crossing
seen = []
def recording_copy(src, pin, dst):
    seen.append((src.data_ptr(), int(pin), dst.data_ptr()))
    crossing.copy(src, pin, dst)
tvm.register_global_func(crossing.COPY_FUNC, recording_copy, override=True)
model = mulayer.load(sys.argv[1])  # the VM resolves the copy function now
x = model.random_inputs(seed=int(sys.argv[2]))
out = list(model(x).values())[0]
np.save(sys.argv[3], out)
np.save(sys.argv[4], x["input"])
print(json.dumps(seen))
"""


def test_planned_host_buffers_start_on_pages(tiny_onnx, tmp_path):
    """In a fresh process (TVM's pooled allocator holds no buffer of an earlier model, which
    it may hand back at any alignment), every planned host buffer a crossing reads or writes
    starts on a page and is flagged pin 2; the caller's tensors are flagged 0; the split result
    still matches fp32 (llvm + llvm stand-in: both sides are host storages)."""
    import json
    import subprocess
    import sys

    from mulayer.runtime import crossing

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no calibration: fp32 CPU parts
        compiled = mulayer.compile(str(tiny_onnx), target="mulayer -ratio=0.5, llvm, llvm")
    compiled.export(tmp_path / "t.mulayer")
    seed = int(np.random.default_rng().integers(1 << 30))
    out_file, in_file = tmp_path / "out.npy", tmp_path / "in.npy"
    args = [str(tmp_path / "t.mulayer"), str(seed), str(out_file), str(in_file)]
    done = subprocess.run(
        [sys.executable, "-c", _RUN_RECORDING_CROSSINGS, *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    inputs = {"input": np.load(in_file)}
    ref = onnxruntime_reference(tiny_onnx, inputs)[0]
    assert max_rel_error(np.load(out_file), ref) < FP16_TOLERANCE
    planned = [(s, d) for s, pin, d in seen if pin == PIN_WHOLE_PAGES]
    assert planned and {pin for _, pin, _ in seen} == {0, PIN_WHOLE_PAGES}
    assert all(s % crossing._PAGE == 0 and d % crossing._PAGE == 0 for s, d in planned)


def test_views_of_the_callers_tensors_are_never_pinned():
    """A reshape of a parameter becomes a view of the caller's memory in the VM (reshape-pattern
    PrimFuncs are rewritten to views): StageCrossings counts it as the caller's, so a crossing
    of it is never page-locked; a computed tensor and its reshapes are planned buffers."""
    from mulayer.passes.stage_crossings import _with_views

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 3, 4), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            view = bb.emit(relax.op.reshape(x, (6, 4)))
            computed = bb.emit(relax.op.add(view, view))
            view_of_computed = bb.emit(relax.op.reshape(computed, (24,)))
            out = bb.emit_output(view_of_computed)
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps()(bb.get())
    main = mod["main"]
    reshaped, added, reshaped_again = [b.var for blk in main.body.blocks for b in blk.bindings][:3]
    shared = _with_views(mod, main, set(main.params))
    assert main.params[0] in shared and reshaped in shared  # the reshape of x: a view of it
    assert added not in shared and reshaped_again not in shared  # computed, and a view of it


def test_a_refused_lock_never_pins_the_callers_tensor(monkeypatch):
    """Where the driver refuses to lock (no current context yet), a copy is not settled and is
    retried; the retry locks only what the copy may lock: never a caller's tensor (pin 0)."""
    from mulayer.runtime import crossing

    class FirstCopyMakesContextCurrent(_MemoryDriver):
        def _enqueue(self, dst: int, src: int, host: int, size: int) -> int:
            self.refuse = False  # from now on the driver locks
            return super()._enqueue(dst, src, host, size)

    driver = FirstCopyMakesContextCurrent()
    driver.refuse = True
    _use_driver(monkeypatch, crossing, driver)

    data = np.random.default_rng().integers(0, 256, 5 * crossing._PAGE, dtype=np.uint8)
    host, gpu = _HostArray(data, 1), _HostArray(np.zeros_like(data), 2)
    crossing.copy(host, 0, gpu)  # refused at first: not settled, retried after the copy
    assert np.array_equal(gpu.array, data)
    crossing.copy(host, 0, gpu)  # the bounce pages lock now; the input never
    assert np.array_equal(gpu.array, data)
    slots = crossing.BOUNCE.slots()
    assert list(driver.locked.items()) == [(slots[0], slots[0] + len(slots) * crossing._PAGE)]


def test_inputs_are_staged_in_page_locked_buffers_of_the_model(tiny_onnx, tmp_path, monkeypatch):
    """A cooperative model copies the caller's inputs into page-locked, page-aligned buffers of
    its own (so their crossing is a pinned copy): fresh inputs on every call, results equal to
    the model without them, serially and from 8 threads; the buffers go back to a pool when the
    model is freed, and the next model takes them. On the llvm + llvm stand-in with a fake
    driver (a CUDA model stages by itself: see the ``gpu`` test below)."""
    import gc

    from mulayer.runtime import crossing

    driver = _FakeDriver()
    pinner = _use_driver(monkeypatch, crossing, driver)
    monkeypatch.setattr(crossing, "_SPARE_LOCKED", {})
    monkeypatch.setattr(crossing, "_GIVEN_BACK", collections.deque())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = mulayer.compile(str(tiny_onnx), target="mulayer -ratio=0.5, llvm, llvm")
    compiled.export(tmp_path / "t.mulayer")
    plain = mulayer.load(tmp_path / "t.mulayer")
    assert plain._staging_tries == 0  # no CUDA: nothing to stage for
    staged = mulayer.load(tmp_path / "t.mulayer")
    staged._staging_tries = 2
    inputs = [staged.random_inputs(seed=int(s)) for s in np.random.randint(1 << 30, size=8)]
    driver.refuse = True  # the first try is refused: fresh tensors, the next call tries again
    serial = [list(staged(inputs[0]).values())[0]]
    assert staged._staging is None and staged._staging_tries == 1
    driver.refuse = False
    serial += [list(staged(x).values())[0] for x in inputs[1:]]
    for x, got in zip(inputs, serial, strict=True):
        assert np.array_equal(got, list(plain(x).values())[0])
    buffers = staged._staging
    assert buffers is not None and len(buffers) == len(staged.inputs)
    for buffer in buffers:
        nbytes = int(np.prod(buffer.shape)) * np.dtype(str(buffer.dtype)).itemsize
        assert buffer.data_ptr() % crossing._PAGE == 0 and pinner.covers(buffer.data_ptr(), nbytes)
    for got, want in zip(outputs_from_threads(staged, inputs), serial, strict=True):
        assert np.array_equal(got, want)

    pointers = sorted(b.data_ptr() for b in buffers)
    del staged, buffers
    gc.collect()
    assert sorted(b.data_ptr() for b in crossing._GIVEN_BACK) == pointers
    again = mulayer.load(tmp_path / "t.mulayer")
    again._staging_tries = 1
    again(inputs[0])
    assert sorted(b.data_ptr() for b in again._staging) == pointers
    assert not any(crossing._SPARE_LOCKED.values()) and not crossing._GIVEN_BACK
    del again  # before the real pool is put back: these buffers were locked by the fake
    gc.collect()


@pytest.mark.gpu
def test_cuda_inputs_cross_in_c_from_page_locked_buffers(tiny_onnx, tmp_path):
    """On the GPU a split model stages its inputs in page-locked buffers by itself, and after
    the first call every crossing of a call (the inputs' included) is copied in C."""
    from mulayer.runtime import crossing

    compiled = mulayer.compile(str(tiny_onnx), target="mulayer -ratio=0.5, cuda -arch=sm_90, llvm")
    compiled.export(tmp_path / "c.mulayer")
    model = mulayer.load(tmp_path / "c.mulayer")
    first = model.random_inputs(seed=1)
    model(first)
    assert model._staging is not None
    if crossing.NATIVE is None:
        pytest.skip("no C compiler: every crossing runs in Python")
    for seed in (2, 3):
        inputs = model.random_inputs(seed=seed)
        before = crossing.NATIVE.counts()
        out = list(model(inputs).values())[0]
        after = crossing.NATIVE.counts()
        assert after[1] == before[1] and after[0] > before[0]  # none handed to Python
        assert max_rel_error(out, onnxruntime_reference(tiny_onnx, inputs)[0]) < 2e-2
