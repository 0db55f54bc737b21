"""Tensor intrinsics: fast loading of TVM's, and mulayer's own (VNNI, Arm dot product).

Importing ``tvm.s_tir.tensor_intrin`` parses ~500 TVMScript functions. Each parse calls
``inspect.stack()``, which resolves the module of every frame on the stack; with frozen import
frames and a large ``sys.modules`` that costs 30-60 s per process (measured: 32 s for the
package on this machine, 50 s inside pytest). The parser only reads the nearest frames, so
:func:`fast_tvmscript_parsing` makes ``inspect.stack`` resolve just those while parsing.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import threading
from dataclasses import dataclass

_LOCK = threading.Lock()
_LOADED = False

# The TVMScript parser reads the code context of the first three frames (is_defined_in_class).
_FULL_FRAMES = 3


@contextlib.contextmanager
def fast_tvmscript_parsing():
    """Within the block, ``inspect.stack()`` fills in code context for the nearest frames only.

    Deeper frames get their file name, line and function (what TVMScript's closure resolution
    reads) but no source lookup.
    """
    original = inspect.stack

    def stack(context: int = 1) -> list[inspect.FrameInfo]:
        frame = sys._getframe(1)
        frames: list[inspect.FrameInfo] = []
        while frame is not None:
            if len(frames) < _FULL_FRAMES:
                info = inspect.getframeinfo(frame, context)
                frames.append(inspect.FrameInfo(frame, *info, positions=info.positions))
            else:
                code = frame.f_code
                frames.append(
                    inspect.FrameInfo(
                        frame,
                        code.co_filename,
                        frame.f_lineno,
                        code.co_name,
                        None,
                        None,
                        positions=None,
                    )
                )
            frame = frame.f_back
        return frames

    inspect.stack = stack
    try:
        yield
    finally:
        inspect.stack = original


def load_tvm_tensor_intrinsics() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` (registers TVM's intrinsics) quickly, once."""
    global _LOADED
    if _LOADED:
        return
    with _LOCK:
        if "tvm.s_tir.tensor_intrin" not in sys.modules:
            with fast_tvmscript_parsing():
                import tvm.s_tir.tensor_intrin  # noqa: F401
        _LOADED = True


# ---------------------------------------------------------------------------------------------
# Integer dot-product intrinsics: C[lanes] (s32) += A[k] (u8, same for every lane) . B[lanes, k]
# C is a "local" buffer: the rules accumulate in register tiles (cache_write to "local").
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DotProductIntrin:
    """A registered tensor intrinsic ``C[i] += sum_k i32(A[k]) * i32(B[i, k])``.

    Attributes
    ----------
    name : str
        Name in TVM's TensorIntrin registry.
    lanes : int
        int32 accumulators per instruction (output channels / columns; pixels for
        :func:`pixel_dot_product_intrin`).
    k : int
        Reduction elements per lane (input channels / K).
    """

    name: str
    lanes: int
    k: int


# LLVM 22's vpdpbusd takes (<16 x i32>, <64 x i8>, <64 x i8>): TVM's registered
# ``dot_16x4_vnni`` passes <16 x i32> operands and fails to build, hence these versions.
_X86_VNNI = {
    16: ("mulayer_dot_16x4_u8s8s32_vnni", "llvm.x86.avx512.vpdpbusd.512"),
    8: ("mulayer_dot_8x4_u8s8s32_vnni", "llvm.x86.avx512.vpdpbusd.256"),
}
# Pixels in the lanes: 16 pixels x 4 input channels (64 contiguous bytes) dotted with one output
# channel's 4 weights (broadcast), for pointwise convs whose output rows are contiguous.
_X86_VNNI_PIXELS = ("mulayer_dot_16px_u8s8s32_vnni", "llvm.x86.avx512.vpdpbusd.512")
_ARM_USDOT = ("mulayer_dot_4x4_u8s8s32_usdot", "llvm.aarch64.neon.usdot.v4i32.v16i8")
_ARM_SDOT = ("mulayer_dot_4x4_u8s8s32_sdot", "llvm.aarch64.neon.sdot.v4i32.v16i8")
_REGISTERED: dict[str, DotProductIntrin] = {}


def _desc(lanes: int):
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return desc


def _x86_vnni_impl(lanes: int, llvm_name: str):
    from tvm.script import tirx as T

    i32xl = f"int32x{lanes}"
    i8xb = f"int8x{4 * lanes}"

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            a_bytes = T.reinterpret(T.broadcast(a_i32, lanes), dtype=i8xb)
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_name),
                C.vload([0], dtype=i32xl),
                a_bytes,
                B.vload([0, 0], dtype=i8xb),
                dtype=i32xl,
            )

    return impl


def _pixel_desc():
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((16, 4), "uint8", offset_factor=1),
        B: T.Buffer((4,), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:16, 0:4], B[0:4])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vi, vk], "int32") * T.cast(B[vk], "int32")

    return desc


def _x86_vnni_pixels_impl():
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((16, 4), "uint8", offset_factor=1),
        B: T.Buffer((4,), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:16, 0:4], B[0:4])
            T.writes(C[0:16])
            w_i32 = T.reinterpret(B.vload([0], "int8x4"), dtype="int32")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(_X86_VNNI_PIXELS[1]),
                C.vload([0], dtype="int32x16"),
                T.reinterpret(A.vload([0, 0], "uint8x64"), dtype="int8x64"),
                T.reinterpret(T.broadcast(w_i32, 16), dtype="int8x64"),
                dtype="int32x16",
            )

    return impl


def _arm_usdot_impl():
    from tvm.script import tirx as T

    llvm_name = _ARM_USDOT[1]

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((4, 4), "int8", offset_factor=1),
        C: T.Buffer((4,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            a_bytes = T.reinterpret(T.broadcast(a_i32, 4), dtype="uint8x16")
            C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_name),
                C.vload([0], dtype="int32x4"),
                a_bytes,
                B.vload([0, 0], dtype="int8x16"),
                dtype="int32x4",
            )

    return impl


def _arm_sdot_impl():
    """u8 x s8 with signed-only ``sdot``: a*b = (a-128)*b + 64*b + 64*b, all exact in s8."""
    from tvm.script import tirx as T

    llvm_name = _ARM_SDOT[1]

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((4, 4), "int8", offset_factor=1),
        C: T.Buffer((4,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            # XOR 0x80 per byte turns u8 a into the s8 value a - 128.
            a_shift = T.reinterpret(
                T.bitwise_xor(T.broadcast(a_i32, 4), T.broadcast(T.int32(-2139062144), 4)),
                dtype="int8x16",
            )
            b = B.vload([0, 0], dtype="int8x16")
            sixty_four = T.broadcast(T.int8(64), 16)
            step = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_name),
                C.vload([0], dtype="int32x4"),
                a_shift,
                b,
                dtype="int32x4",
            )
            step = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_name), step, sixty_four, b, dtype="int32x4"
            )
            C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_name), step, sixty_four, b, dtype="int32x4"
            )

    return impl


def _register(name: str, lanes: int, make_impl, make_desc=None) -> DotProductIntrin:
    with _LOCK:
        if name not in _REGISTERED:
            from tvm import s_tir

            with fast_tvmscript_parsing():
                desc = make_desc() if make_desc is not None else _desc(lanes)
                impl = make_impl()
            s_tir.TensorIntrin.register(name, desc, impl, override=True)
            _REGISTERED[name] = DotProductIntrin(name, lanes, 4)
        return _REGISTERED[name]


def dot_product_intrin(
    target, a_dtype: str, b_dtype: str, lanes_divide: int | None = None
) -> DotProductIntrin | None:
    """The u8 x s8 -> s32 dot-product intrinsic for ``target``, registering it on first use.

    x86: AVX-512 VNNI (16 lanes; 8 lanes with AVX512VL when ``lanes_divide`` — the output
    channel count — is a multiple of 8 but not 16) or AVX-VNNI (8 lanes). AArch64: ``usdot``
    with ``+i8mm``, else ``sdot`` with ``+dotprod`` (3 instructions, still exact), 4 lanes.
    None elsewhere, for signed activations (``vpdpbusd`` multiplies unsigned by signed), and
    when no variant's lane count divides ``lanes_divide``.
    """
    from ._util import has_cpu_feature, is_aarch64

    def fits(lanes: int) -> bool:
        return lanes_divide is None or lanes_divide % lanes == 0

    if a_dtype != "uint8" or b_dtype != "int8":
        return None
    if is_aarch64(target):
        if not fits(4):
            return None
        if has_cpu_feature(target, "i8mm"):
            return _register(_ARM_USDOT[0], 4, _arm_usdot_impl)
        if has_cpu_feature(target, "dotprod"):
            return _register(_ARM_SDOT[0], 4, _arm_sdot_impl)
        return None
    candidates = []
    if has_cpu_feature(target, "avx512vnni"):
        candidates.append(16)
        if has_cpu_feature(target, "avx512vl"):
            candidates.append(8)
    elif has_cpu_feature(target, "avxvnni"):
        candidates.append(8)
    for lanes in candidates:
        if fits(lanes):
            name, llvm_name = _X86_VNNI[lanes]
            return _register(name, lanes, lambda n=llvm_name, lanes=lanes: _x86_vnni_impl(lanes, n))
    return None


def pixel_dot_product_intrin(target, a_dtype: str, b_dtype: str) -> DotProductIntrin | None:
    """The pixels-in-lanes u8 x s8 -> s32 intrinsic for ``target`` (AVX-512 VNNI only), or None.

    ``C[i] += sum_k A[i, k] * B[k]``: ``lanes`` (16) pixels of one output channel, each the dot
    product of 4 input channels of that pixel (``A``: 64 contiguous bytes of an ``NC/4 HW 4``
    input) with the channel's 4 weights (``B``, broadcast to every lane).
    """
    from ._util import has_cpu_feature, is_aarch64

    if a_dtype != "uint8" or b_dtype != "int8" or is_aarch64(target):
        return None
    if not has_cpu_feature(target, "avx512vnni"):
        return None
    return _register(_X86_VNNI_PIXELS[0], 16, _x86_vnni_pixels_impl, _pixel_desc)
