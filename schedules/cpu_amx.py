"""u8 x s8 -> s32 conv2d on Intel AMX (``tdpbusd``): Sapphire/Emerald/Granite Rapids.

One ``tdpbusd`` multiplies an ``M x K`` tile of u8 activations by a ``K x 16`` tile of s8
weights into an ``M x 16`` int32 accumulator tile (``M <= 16`` output pixels of one row,
16 output channels, ``K <= 64`` input channels). Compared with :mod:`.cpu_int8` (VNNI):

- the padding stage writes the input as ``NC/kt HW kt`` (``kt`` input channels contiguous per
  pixel: a tile row), and the weight is packed to ``O/16, I/kt, KH, KW, kt/4, 16, 4`` (a tile
  of ``kt/4`` rows of 64 bytes), precomputed for constants like the other CPU rules;
- the accumulator stays in tile register ``tmm0`` over the whole reduction (``I/kt x KH x KW``
  steps of two tile loads and one ``tdpbusd``), then one tile store writes it to a local
  buffer on which the requantize epilogue runs vectorised;
- each parallel task starts with one ``ldtilecfg`` (:func:`configure_tiles_per_task`; the
  shapes are the same for every tile of the kernel) and each output tile with ``tilezero``;
  tiles are not released after the kernel (the next ``ldtilecfg`` resets them).

The schedule's layouts and tiling are checked bit-exact with plain-loop tiles on any CPU
(``amx_intrinsics(..., emulate=True)``), and with real tiles in
``tests/test_schedules_cpu_int8.py`` where the OS exposes AMX (the GPU machine's Xeon, and the
development VM, whose CPU LLVM names ``rocketlake``: :func:`mulayer.target.detect_hidden_features`).

Scope: stride 1 or 2 (a strided tile is loaded with a row stride of ``stride x kt`` bytes),
``groups == 1``, ``C % 4 == 0``, at least :data:`MIN_INPUT_CHANNELS` input channels,
``F % 16 == 0`` (other convs fall through to the VNNI rule), but not the pointwise convs that
:mod:`.cpu_int8_pointwise` takes (pixels in the VNNI lanes): on the H100 machine's Xeon a
64 -> 256, 56x56 pointwise conv ran in 252 µs on AMX tiles and 175 µs on the channel-lane VNNI
rule (docs/results.md kernel table), whose write-back the pixel-lane schedule removes; on the
development VM, with this session's tiles, ResNet-50 ran 5-10% slower with its pointwise convs
on tiles. Batch-1 dense layers have one row, which AMX would waste: they stay on VNNI.

Running AMX code needs the process to hold Linux's AMX permission
(``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``; tile instructions trap with SIGILL
otherwise): each AMX kernel asks for it first (:func:`request_permission_first`), so artifacts
run in any process; :func:`request_amx_permission` does the same from Python.
:func:`amx_usable` decides whether a target gets AMX code.
"""

from __future__ import annotations

import ctypes
import functools
import platform
from dataclasses import dataclass
from pathlib import Path

from tvm import s_tir, tirx
from tvm.target import Target

from ._intrin import _LOCK, fast_tvmscript_parsing
from ._util import has_cpu_feature, is_cpu_target, largest_divisor, logger, new_schedule
from .base import CPUScheduleRule, finish_cpu_schedule
from .conv2d_analysis import Conv2dInfo, find_conv2d
from .cpu_int8_pointwise import fits_pixel_lanes
from .cpu_tiling import (
    blocked_accumulator,
    pack_in_destination_order,
    pack_input_channels,
    pack_weight,
    parallel_conv_tiles,
)

# Tile registers: accumulator, A (activations), B (weights).
TMM_C, TMM_A, TMM_B = 0, 1, 2
LANES = 16  # int32 columns of a tile (64 bytes)
MAX_ROWS = 16
MAX_K = 64  # bytes of a tile row
STRIDES = (1, 2)  # conv strides the tiles take (a tile row per stride-th input pixel)
# Fewer input channels fill a tile row too little: an RGB stem (4 channels after padding) ran
# 2x slower on tiles than on VNNI (development machine, docs/results.md).
MIN_INPUT_CHANNELS = 16
_SYS_ARCH_PRCTL = 158
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


# ---------------------------------------------------------------------------------------------
# Whether to use AMX, and the permission to run it
# ---------------------------------------------------------------------------------------------
@functools.cache
def host_exposes_amx() -> bool:
    """True when this machine's OS reports AMX-INT8 (``amx_int8`` in /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(
        line.startswith("flags") and "amx_int8" in line.split() for line in text.splitlines()
    )


@functools.cache
def _host_cpu() -> str:
    from tvm.target.codegen import llvm_get_system_cpu

    return str(llvm_get_system_cpu())


def amx_usable(target: Target) -> bool:
    """Whether ``target`` gets AMX code.

    The target must have ``amx-int8`` and ``amx-tile`` (``mcpu`` sapphirerapids and later, or
    ``-mattr=+amx-int8,+amx-tile``). An explicit ``+amx-int8`` always wins; otherwise a target
    for this very CPU (same ``mcpu`` as the host) needs the OS to expose AMX here: a VM may
    report an AMX CPU model and hide AMX, and AMX code then dies with SIGILL.
    """
    if not (has_cpu_feature(target, "amx-int8") and has_cpu_feature(target, "amx-tile")):
        return False
    mattr = [str(a) for a in (target.attrs.get("mattr") or [])]
    if "+amx-int8" in mattr:
        return True
    if str(target.attrs.get("mcpu", "")) == _host_cpu():
        return host_exposes_amx()
    return True  # cross-compiling for another AMX CPU


def request_amx_permission() -> bool:
    """Ask Linux for AMX tile data in this process (needed once before AMX code runs).

    Returns True when granted (or not needed); False where the OS refuses or is not Linux x86-64.
    """
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    status = libc.syscall(
        ctypes.c_long(_SYS_ARCH_PRCTL),
        ctypes.c_long(_ARCH_REQ_XCOMP_PERM),
        ctypes.c_long(_XFEATURE_XTILEDATA),
    )
    return status == 0


# ---------------------------------------------------------------------------------------------
# Tensor intrinsics (tile numbers fixed: C in tmm0 across the reduction)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AMXIntrinsics:
    """Names of the registered init / update / store intrinsics of one tile shape."""

    rows: int  # M: output pixels per tile
    k: int  # input channels per tile row
    init: str
    update: str
    store: str


def _tile_config_words(rows: int, k: int) -> list[int]:
    """The 64-byte ``ldtilecfg`` operand as 16 little-endian int32 words.

    Byte 0: palette 1; bytes 16+2i: bytes per row of tmm i; bytes 48+i: rows of tmm i.
    """
    words = [0] * 16
    words[0] = 1
    words[4] = (4 * LANES) | (k << 16)  # tmm0: 16 int32, tmm1: k bytes
    words[5] = 4 * LANES  # tmm2: 16 x 4 bytes
    words[12] = rows | (rows << 8) | ((k // 4) << 16)  # rows of tmm0, tmm1, tmm2
    return words


def _intrin_funcs(rows: int, k: int, stride: int):
    from tvm.script import tirx as T

    kq = k // 4
    span = (rows - 1) * stride + 1  # input pixels a tile row's output pixels read

    @T.prim_func(s_tir=True)
    def init_desc(C: T.Buffer((rows, LANES), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:rows, 0:LANES])
            for m, n in T.grid(rows, LANES):
                with T.sblock("init"):
                    vn, vm = T.axis.remap("SS", [n, m])  # the conv's iter order: f, x
                    C[vm, vn] = T.int32(0)

    @T.prim_func(s_tir=True)
    def init_impl(C: T.Buffer((rows, LANES), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:rows, 0:LANES])
            # The tile shapes were configured once per task (configure_tiles_per_task).
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilezero", T.int8(TMM_C)))

    @T.prim_func(s_tir=True)
    def update_desc(
        A: T.Buffer((span, k), "uint8", offset_factor=1),
        B: T.Buffer((kq, LANES, 4), "int8", offset_factor=1),
        C: T.Buffer((rows, LANES), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:rows, 0:LANES], A[0:span, 0:k], B[0:kq, 0:LANES, 0:4])
            T.writes(C[0:rows, 0:LANES])
            for m, n, kk in T.grid(rows, LANES, k):
                with T.sblock("update"):
                    vn, vm, vk = T.axis.remap("SSR", [n, m, kk])
                    C[vm, vn] = C[vm, vn] + T.cast(A[vm * stride, vk], "int32") * T.cast(
                        B[vk // 4, vn, vk % 4], "int32"
                    )

    @T.prim_func(s_tir=True)
    def update_impl(
        A: T.Buffer((span, k), "uint8", offset_factor=1),
        B: T.Buffer((kq, LANES, 4), "int8", offset_factor=1),
        C: T.Buffer((rows, LANES), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:rows, 0:LANES], A[0:span, 0:k], B[0:kq, 0:LANES, 0:4])
            T.writes(C[0:rows, 0:LANES])
            # Tile rows are every stride-th pixel: a row stride of stride * k bytes.
            T.evaluate(
                T.call_llvm_intrin(
                    "void",
                    "llvm.x86.tileloadd64",
                    T.int8(TMM_A),
                    A.access_ptr("r"),
                    T.int64(k * stride),
                )
            )
            T.evaluate(
                T.call_llvm_intrin(
                    "void",
                    "llvm.x86.tileloadd64",
                    T.int8(TMM_B),
                    B.access_ptr("r"),
                    T.int64(4 * LANES),
                )
            )
            T.evaluate(
                T.call_llvm_intrin(
                    "void", "llvm.x86.tdpbusd", T.int8(TMM_C), T.int8(TMM_A), T.int8(TMM_B)
                )
            )

    @T.prim_func(s_tir=True)
    def store_desc(
        C: T.Buffer((rows, LANES), "int32", offset_factor=1, scope="local"),
        D: T.Buffer((rows, LANES), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:rows, 0:LANES])
            T.writes(D[0:rows, 0:LANES])
            for m, n in T.grid(rows, LANES):
                with T.sblock("store"):
                    vm, vn = T.axis.remap("SS", [m, n])
                    D[vm, vn] = C[vm, vn]

    @T.prim_func(s_tir=True)
    def store_impl(
        C: T.Buffer((rows, LANES), "int32", offset_factor=1, scope="local"),
        D: T.Buffer((rows, LANES), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:rows, 0:LANES])
            T.writes(D[0:rows, 0:LANES])
            T.evaluate(
                T.call_llvm_intrin(
                    "void",
                    "llvm.x86.tilestored64",
                    T.int8(TMM_C),
                    D.access_ptr("w"),
                    T.int64(4 * LANES),
                )
            )

    return {
        "init": (init_desc, init_impl),
        "update": (update_desc, update_impl),
        "store": (store_desc, store_impl),
    }


_REGISTERED: dict[tuple[int, int, int, bool], AMXIntrinsics] = {}


def amx_intrinsics(rows: int, k: int, stride: int = 1, emulate: bool = False) -> AMXIntrinsics:
    """Register (once) and return the intrinsics of an ``rows x k`` activation tile whose rows
    are every ``stride``-th pixel of the input row.

    ``emulate=True`` registers the descriptions as implementations (plain loops): the same
    schedule then runs on any CPU, which tests its layouts and tiling without AMX hardware.
    """
    assert 1 <= rows <= MAX_ROWS and k % 4 == 0 and 4 <= k <= MAX_K and stride in STRIDES
    key = (rows, k, stride, emulate)
    with _LOCK:
        if key not in _REGISTERED:
            with fast_tvmscript_parsing():
                funcs = _intrin_funcs(rows, k, stride)
            names = {}
            for part, (desc, impl) in funcs.items():
                suffix = "_emulated" if emulate else ""
                names[part] = f"mulayer_amx_u8s8s32_m{rows}_k{k}_s{stride}_{part}{suffix}"
                s_tir.TensorIntrin.register(
                    names[part], desc, desc if emulate else impl, override=True
                )
            _REGISTERED[key] = AMXIntrinsics(rows, k, **names)
        return _REGISTERED[key]


# ---------------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------------
def fits_amx(info: Conv2dInfo) -> bool:
    """Whether the AMX schedule handles this conv (see module doc for the scope)."""
    return (
        info.in_dtype == "uint8"
        and info.w_dtype == "int8"
        and info.out_dtype == "int32"
        and info.groups == 1
        and info.stride in ((s, s) for s in STRIDES)
        and info.cg % 4 == 0
        and info.cg >= MIN_INPUT_CHANNELS
        and info.f % LANES == 0
        and not fits_pixel_lanes(info, row_padding=False)
    )


class Conv2dInt8AMX(CPUScheduleRule):
    """u8 x s8 -> s32 NCHW conv2d on AMX tiles (see module doc)."""

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        if not is_cpu_target(target) or not amx_usable(target):
            return None
        sch = new_schedule(func)
        info = find_conv2d(sch)
        if info is None or not fits_amx(info):
            return None
        return schedule_conv2d_amx(sch, info, target, amx_intrinsics(*tile_shape(info)))


def tile_shape(info: Conv2dInfo) -> tuple[int, int, int]:
    """(pixels, input channels, stride) of the activation tile: up to 16 of a row x up to 64."""
    rows = largest_divisor(info.ow, MAX_ROWS)
    return rows, largest_divisor(info.cg, MAX_K, multiple_of=4), info.stride[1]


def schedule_conv2d_amx(
    sch: s_tir.Schedule,
    info: Conv2dInfo,
    target: Target,
    intrin: AMXIntrinsics,
    emulated: bool = False,
) -> s_tir.Schedule:
    """Tensorize the conv with AMX tiles of ``intrin.rows`` pixels x 16 channels.

    Returns a schedule of the result whose function first asks Linux for AMX permission.
    """
    conv = info.block
    rows, kt = intrin.rows, intrin.k

    # Step 1. Weights to O/16, I/kt, KH, KW, kt/4, 16, 4 (precomputable); input to NC/kt HW kt.
    pack_weight(sch, info, LANES, 4, i_tile=kt)
    pad = pack_input_channels(sch, info, kt)

    # Step 2. int32 accumulators (pixel, channel) in a local tile; epilogue fused after it.
    acc_out = blocked_accumulator(sch, info, LANES)

    # Step 3. Tile: parallel rows (or channel tiles) | xo | rc/kt, ry, rx | xi, fi, rci.
    n, f, y, x, rc, ry, rx = sch.get_loops(conv)
    fo, fi = sch.split(f, [None, LANES])
    rco, rci = sch.split(rc, [None, kt])
    xo, xi = sch.split(x, [None, rows])
    weight_bytes = info.f * info.cg * info.kh * info.kw
    outer, rows_outer = parallel_conv_tiles(
        sch, weight_bytes, acc_out, n, y, fo, xo, [rco, ry, rx], [xi, fi, rci]
    )
    if rows_outer:  # pack just the rows a task reads (see cpu_conv2d)
        sch.compute_at(pad, outer, preserve_unit_loops=True)
    else:  # one shared pack at the root, each task writing whole pixels
        pack_in_destination_order(sch, pad, kt)
    # The tile store: tmm0 -> a local copy that the epilogue reads.
    acc_buffer = sch.get(conv).writes[0].source
    reads = [r.source for r in sch.get(acc_out).reads]
    store = sch.cache_read(
        acc_out, next(i for i, b in enumerate(reads) if b.same_as(acc_buffer)), "local"
    )
    init = sch.decompose_reduction(conv, rco)
    scheduled = {info.name, sch.get(init).name_hint, sch.get(acc_out).name_hint}
    scheduled.add(sch.get(store).name_hint)

    # Step 4. Tensorize: tilezero, loads + tdpbusd, tilestored (ldtilecfg: once per task).
    sch.tensorize(sch.get_loops(init)[-2], intrin.init)
    sch.tensorize(xi, intrin.update)
    sch.tensorize(sch.get_loops(store)[-2], intrin.store)
    sch.vectorize(sch.get_loops(acc_out)[-1])

    # Step 5. Leftovers (weight pack, padding) parallel.
    finish_cpu_schedule(sch, target, skip=scheduled)
    logger.debug("conv2d %s: AMX %dx16x%d", info.name, rows, kt)
    func = sch.mod["main"]
    if not emulated:
        func = configure_tiles_per_task(func, _tile_config_words(rows, kt))
    return new_schedule(request_permission_first(func))


def configure_tiles_per_task(func: tirx.PrimFunc, words: list[int]) -> tirx.PrimFunc:
    """``func`` with one ``ldtilecfg`` at the start of each parallel task that uses tiles.

    The tile configuration is per thread and the same for every output tile of a kernel, so
    one load per task replaces one per output tile (perf: 14% of a 14x14 pointwise kernel's
    samples fell right after the per-tile ``ldtilecfg``). Without a parallel loop around the
    tiles, the configuration goes first in the function.
    """
    config = tirx.decl_buffer((16,), "int32", name="amx_tile_config", scope="local")
    stores = [
        tirx.BufferStore(config, tirx.const(word, "int32"), [tirx.const(i, "int32")])
        for i, word in enumerate(words)
    ]
    load = tirx.Evaluate(
        tirx.call_llvm_intrin("void", "llvm.x86.ldtilecfg", config.access_ptr("r"))
    )
    configure = s_tir.SBlockRealize(
        [],
        True,
        s_tir.SBlock(
            [], [], [], "amx_configure_tiles", tirx.SeqStmt([*stores, load]), alloc_buffers=[config]
        ),
    )

    def uses_tiles(stmt) -> bool:
        return "llvm.x86.tilezero" in str(stmt)

    def rewrite(stmt):
        if isinstance(stmt, tirx.For):
            if stmt.kind == tirx.ForKind.PARALLEL and uses_tiles(stmt.body):
                body, done = tirx.SeqStmt([configure, stmt.body]), True
            else:
                body, done = rewrite(stmt.body)
            if not done:
                return stmt, False
            loop = tirx.For(
                stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body, None, stmt.annotations
            )
            return loop, True
        if isinstance(stmt, tirx.SeqStmt):
            parts = [rewrite(part) for part in stmt.seq]
            if not any(done for _, done in parts):
                return stmt, False
            return tirx.SeqStmt([new for new, _ in parts]), True
        return stmt, False

    def configured(body):
        body, done = rewrite(body)
        return body if done else tirx.SeqStmt([configure, body])

    return _with_root_body(func, configured)


def _with_root_body(func: tirx.PrimFunc, make_body) -> tirx.PrimFunc:
    """``func`` whose root block's body is ``make_body(old body)``."""
    realize = func.body
    root = realize.block
    new_root = s_tir.SBlock(
        root.iter_vars,
        root.reads,
        root.writes,
        root.name_hint,
        make_body(root.body),
        root.init,
        root.alloc_buffers,
        root.match_buffers,
        root.annotations,
    )
    return func.with_body(s_tir.SBlockRealize(realize.iter_values, realize.predicate, new_root))


def request_permission_first(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with ``syscall(arch_prctl, ARCH_REQ_XCOMP_PERM, XTILEDATA)`` as its first step.

    Tile instructions trap (SIGILL) in a Linux process that has not asked for AMX permission.
    Asking in the kernel itself makes it safe to run in any process (a plain TVM runtime too);
    once granted, the call returns at once (well under a microsecond a kernel call).
    """
    request = tirx.Evaluate(
        tirx.call_extern(
            "int64",
            "syscall",
            tirx.const(_SYS_ARCH_PRCTL, "int64"),
            tirx.const(_ARCH_REQ_XCOMP_PERM, "int64"),
            tirx.const(_XFEATURE_XTILEDATA, "int64"),
        )
    )
    # In a block of its own: passes over scheduled functions (SplitLayoutRewritePreproc) expect
    # every statement under the root to hold a block.
    request_block = s_tir.SBlockRealize(
        [], True, s_tir.SBlock([], [], [], "amx_request_permission", request)
    )
    return _with_root_body(func, lambda body: tirx.SeqStmt([request_block, body]))
