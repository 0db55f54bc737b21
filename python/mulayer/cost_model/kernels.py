"""The kernel that runs a part: which schedule rule claims it and how that rule tiles it.

A part's latency depends less on the layer than on the kernel built for it: whether the int8 CPU
conv runs on AMX tiles, VNNI dot products or plain int32 vectors; whether the fp16 GPU conv gets
mulayer's tensor-core rule (64 output channels and more), dlight's SIMT matmul or the depthwise
rule; how many thread blocks that makes and how many waves they take on the SMs; how many
parallel tasks the CPU threads share. :func:`kernel_info` derives all of this from the layer, the
part's channel count and the machine (:class:`MachineTraits`) without building anything: it
mirrors the gating of the rules in :mod:`mulayer.schedules` (tried in the same order as
:func:`mulayer.schedules.apply.rules_for`) and calls their own tile choosers and constants, so a
change of a threshold there reaches the features. ``tests/test_cost_model.py`` checks the mirror
against :func:`mulayer.schedules.apply.claiming_rule` on built parts, and the evaluation script
reports how often it names the rule a profile recorded.

:func:`roofline_terms` turns a :class:`KernelInfo` into the two terms of an analytic estimate,
``max(flops / peak, bytes / bandwidth) + overhead``; the per-processor constants are fitted on
training data (:class:`mulayer.cost_model.predictors.RooflinePrior`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from types import SimpleNamespace

from mulayer.frontend.layers import Layer

from .part_shape import part_shape

# The rule names :func:`kernel_info` can return, per processor (one-hot features, in this order).
CPU_RULES = (
    "Conv2dInt8AMX",
    "Conv2dInt8DotProduct",
    "MatmulInt8DotProduct",
    "Conv2dChannelVector",
    "Conv2dWidthVector",
    "MatmulCPU",
    "CPUFallback",
)
GPU_RULES = (
    "Conv2dTensorCore",
    "DepthwiseConv2d",
    "Matmul",  # dlight's, tensorized or SIMT (the profile records WithTensorIntrinsics)
    "Reduction",
    "Fallback",
)
RULES = CPU_RULES + GPU_RULES
# Names a profile records for a rule (wrappers) -> the name used here. The int8 depthwise rule
# is the width-vector family (int32 vectors along the output width, one channel per task); the
# features keep that name, so profiles and trained models from before it stay valid.
RECORDED_ALIASES = {
    "WithTensorIntrinsics": "Matmul",
    "GEMV": "Reduction",
    "Conv2dInt8Depthwise": "Conv2dWidthVector",
    "PoolPlanes": "CPUFallback",  # pools: one task per channel plane (schedules/cpu_pool.py)
}
# Known SM counts (the fingerprint has the GPU's name, not its SM count).
_SM_COUNTS = {"H100": 132, "H200": 132, "A100": 108, "L4": 58, "A10": 72, "V100": 80, "T4": 40}
_DEFAULT_SMS = 80
_GPU_MAX_THREADS = 1024  # dlight's Fallback binds this many threads per block
_GPU_REDUCTION_THREADS = 256
# Output channels under which the tensor-core conv rule only runs with gpu_narrow_conv_rule.
NARROW_OUT_CHANNELS = 64


def _narrow_conv_rule() -> bool:
    from mulayer.schedules.gpu_conv2d import narrow_convs_enabled

    return narrow_convs_enabled()


@dataclass(frozen=True)
class MachineTraits:
    """What the schedule rules ask of the target, for the machine a profile was measured on."""

    cpu_cores: int = 4
    cpu_vector_bits: int = 256
    cpu_vector_registers: int = 16
    # Dot-product lane counts the int8 rules may use (16: AVX-512 VNNI; 8: its VL or AVX-VNNI).
    cpu_dot_lanes: tuple[int, ...] = ()
    cpu_amx: bool = False
    gpu_arch: int = -1  # sm_XY as XY; -1: no CUDA GPU
    gpu_sms: int = _DEFAULT_SMS
    # Whether GPU depthwise convs get DepthwiseConv2d (profiles measured before it ran dlight's).
    gpu_depthwise_rule: bool = True
    # Whether dense GPU convs with fewer than 64 output channels get the tensor-core rule
    # (by default only with MULAYER_GPU_NARROW_CONV=1; otherwise dlight's Matmul runs them).
    gpu_narrow_conv_rule: bool = field(default_factory=_narrow_conv_rule)
    # Whether int8 pointwise convs with whole vectors of 16 pixels get the pixel-lane VNNI
    # schedule rather than AMX (profiles measured before it ran AMX tiles for them).
    cpu_pixel_lanes: bool = True

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> MachineTraits:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        if "cpu_dot_lanes" in values:
            values["cpu_dot_lanes"] = tuple(values["cpu_dot_lanes"])
        return cls(**values)


def traits_for(target: dict | None, fingerprint: dict | None = None) -> MachineTraits:
    """:class:`MachineTraits` of a profile's ``target`` (``{"host": ..., "device": ...}``),
    asking the schedule rules' own target queries."""
    from tvm.target import Target

    from mulayer.schedules._util import has_cpu_feature, num_vector_registers, vector_bits
    from mulayer.schedules.cpu_amx import amx_usable

    target = target or {}
    fingerprint = fingerprint or {}
    host = Target(dict(target.get("host") or {"kind": "llvm"}))
    lanes = []
    if has_cpu_feature(host, "avx512vnni"):
        lanes = [16, 8] if has_cpu_feature(host, "avx512vl") else [16]
    elif has_cpu_feature(host, "avxvnni"):
        lanes = [8]
    elif has_cpu_feature(host, "dotprod") or has_cpu_feature(host, "i8mm"):
        lanes = [4]
    cores = int((target.get("host") or {}).get("num-cores") or fingerprint.get("cpu_cores") or 4)
    device = target.get("device") or {}
    arch = -1
    if device.get("kind") == "cuda":
        digits = str(device.get("arch", "")).replace("sm_", "")
        arch = int(digits) if digits.isdigit() else -1
    name = str(fingerprint.get("gpu_name") or "")
    sms = next((n for key, n in _SM_COUNTS.items() if key in name), _DEFAULT_SMS)
    return MachineTraits(
        cpu_cores=cores,
        cpu_vector_bits=vector_bits(host),
        cpu_vector_registers=num_vector_registers(host),
        cpu_dot_lanes=tuple(lanes),
        cpu_amx=bool(amx_usable(host)),
        gpu_arch=arch,
        gpu_sms=sms,
    )


@dataclass
class KernelInfo:
    """The main kernel of a part as its rule builds it (see the module docstring).

    ``tasks`` is the CPU's parallel loop extent, ``blocks`` / ``threads`` the GPU launch;
    ``tile_util`` the share of the tiled iteration space that is real work (padding to tiles,
    partial vectors); ``occupancy`` the share of the processor's threads (CPU) or of the last
    wave's SMs (GPU) that the parallel work keeps busy on average.
    """

    rule: str
    tensor_path: int = 0  # 1: AMX / tensor cores, 0 otherwise
    dot_path: int = 0  # 1: VNNI / Arm dot product
    vector: int = 1  # SIMD lanes (CPU) or outputs per thread (GPU depthwise)
    tile_m: int = 1  # pixels (GEMM rows) per tile / register block
    tile_n: int = 1  # output channels (GEMM columns) per tile
    tasks: int = 1  # CPU parallel tasks
    chunks_per_thread: float = 1.0  # CPU: tasks per thread, rounded up
    blocks: int = 1  # GPU thread blocks
    threads: int = 1  # GPU threads per block
    waves: float = 1.0  # GPU: blocks per wave of one block per SM, rounded up
    tile_util: float = 1.0
    occupancy: float = 1.0
    flops: float = 0.0  # useful work
    bytes: float = 0.0  # bytes moved to and from memory by the part's kernels

    @property
    def effective_flops(self) -> float:
        """Work including tile padding and idle threads or SMs."""
        return self.flops / max(self.tile_util * self.occupancy, 1e-3)


def _largest_divisor(n: int, limit: int, multiple_of: int = 1) -> int:
    from mulayer.schedules._util import largest_divisor

    return largest_divisor(max(1, int(n)), max(1, int(limit)), multiple_of)


def _ceil(a: float, b: float) -> int:
    return int(-(-int(a) // max(1, int(b))))


@dataclass
class _Shape:
    kind: str
    f: int  # output channels of the part
    groups: int  # groups in the part
    cg: int  # input channels per group
    fg: int  # output channels per group
    oh: int
    ow: int
    kh: int
    kw: int
    stride: int
    in_elems: float
    out_elems: float
    w_elems: float
    flops: float
    depthwise: bool


def _shape(layer: Layer, channels: int) -> _Shape:
    p = part_shape(layer, channels)
    in_per_channel = p.in_height * p.in_width
    if p.kind == "conv2d":
        groups = max(1, round(p.groups * p.share)) if p.groups > 1 else 1
        cg = max(1, p.in_channels // p.groups)
        in_elems = (groups * cg if p.groups > 1 else p.in_channels) * in_per_channel
    elif p.kind == "dense":
        groups, cg = 1, p.in_channels
        in_elems = float(p.in_channels)
    else:
        groups, cg = channels, 1
        in_elems = channels * in_per_channel
    return _Shape(
        kind=p.kind,
        f=channels,
        groups=groups,
        cg=cg,
        fg=max(1, channels // groups),
        oh=p.out_height,
        ow=p.out_width,
        kh=p.kernel_h,
        kw=p.kernel_w,
        stride=p.stride,
        in_elems=float(in_elems),
        out_elems=p.out_elems,
        w_elems=p.weight_elems,
        flops=p.flops,
        depthwise=p.depthwise,
    )


# -------------------------------------------------------------------------------------- CPU
def _dot_lanes(traits: MachineTraits, divide: int) -> int:
    return next((lanes for lanes in traits.cpu_dot_lanes if divide % lanes == 0), 0)


def _pixel_lane_shape(s: _Shape) -> bool:
    """The shapes of ``fits_pixel_lanes(info, row_padding=False)`` (schedules.cpu_int8_pointwise):
    the pointwise convs that AMX targets leave to the pixel-lane schedule."""
    from mulayer.schedules.cpu_int8_pointwise import PADDED_BELOW_WIDTH

    return (
        s.kh == s.kw == 1
        and s.stride == 1
        and s.groups == 1
        and s.cg % 4 == 0
        and ((s.oh * s.ow) % 16 == 0 or s.ow < PADDED_BELOW_WIDTH)
    )


def is_pixel_lane_pointwise(layer: Layer, channels: int) -> bool:
    """Whether ``channels`` output channels of ``layer`` have the pixel-lane pointwise shape."""
    s = _shape(layer, channels)
    return s.kind == "conv2d" and _pixel_lane_shape(s)


def _cpu_conv(s: _Shape, traits: MachineTraits) -> KernelInfo:
    from mulayer.schedules.cpu_amx import LANES, MAX_K, MAX_ROWS, MIN_INPUT_CHANNELS, STRIDES
    from mulayer.schedules.cpu_tiling import WEIGHT_CACHE_BYTES

    regs = traits.cpu_vector_registers
    int32_lanes = max(1, traits.cpu_vector_bits // 32)
    weight_bytes = s.f * s.cg * s.kh * s.kw
    rows_outer = weight_bytes <= WEIGHT_CACHE_BYTES

    def tiled(rule, lanes, tile_m, **kw) -> KernelInfo:
        tasks = s.oh if rows_outer else _ceil(s.f, lanes) * s.oh
        return KernelInfo(rule, vector=lanes, tile_m=tile_m, tile_n=lanes, tasks=tasks, **kw)

    # Pointwise convs with whole vectors of 16 pixels: VNNI with pixels in the lanes
    # (schedules/cpu_int8_pointwise.py), on AMX machines too.
    pixel_lanes = traits.cpu_pixel_lanes and 16 in traits.cpu_dot_lanes and _pixel_lane_shape(s)
    # Step 1. AMX tiles (ungrouped, stride 1 or 2, 4 | C >= 16, 16 | F).
    if (
        traits.cpu_amx
        and not pixel_lanes
        and s.groups == 1
        and s.stride in STRIDES
        and s.cg % 4 == 0
        and s.cg >= MIN_INPUT_CHANNELS
        and s.f % LANES == 0
    ):
        rows = _largest_divisor(s.ow, MAX_ROWS)
        kt = _largest_divisor(s.cg, MAX_K, 4) or 4
        util = (rows / MAX_ROWS) * (kt / MAX_K)
        return tiled("Conv2dInt8AMX", LANES, rows, tensor_path=1, tile_util=util)
    # Step 2. VNNI / Arm dot product (4 | C/g, lanes | F/g).
    lanes = _dot_lanes(traits, s.fg)
    if lanes and s.cg % 4 == 0:
        xi = _largest_divisor(s.ow, regs - 4)
        return tiled("Conv2dInt8DotProduct", lanes, xi, dot_path=1, tile_util=xi / (regs - 4))
    # Step 3. int32 vectors over output channels (whole vectors per group).
    if s.fg % int32_lanes == 0:
        vo = int32_lanes
    elif int32_lanes >= 8 and s.fg % (int32_lanes // 2) == 0:
        vo = int32_lanes // 2
    else:
        vo = 0
    if vo:
        budget = regs - 6
        xi = _largest_divisor(s.ow, budget)
        yi = _largest_divisor(s.oh, max(1, budget // xi))
        if yi * xi < 12 and s.fg % (2 * vo) == 0:
            vo *= 2
            budget //= 2
            xi = _largest_divisor(s.ow, budget)
            yi = _largest_divisor(s.oh, max(1, budget // xi))
        info = tiled("Conv2dChannelVector", vo, yi * xi, tile_util=yi * xi / budget)
        info.tasks = _ceil(s.oh, yi) if rows_outer else _ceil(s.f, vo) * _ceil(s.oh, yi)
        return info
    # Step 4. Vectors along the output width (depthwise, odd channel counts).
    xi = _largest_divisor(s.ow, 4 * int32_lanes)
    fi = _largest_divisor(s.fg, max(1, (regs - 8) // _ceil(xi, int32_lanes)))
    yi = _largest_divisor(s.oh, 8)
    util = xi / (_ceil(xi, int32_lanes) * int32_lanes)
    tasks = _ceil(s.f, fi) * _ceil(s.oh, yi)
    return KernelInfo(
        "Conv2dWidthVector", vector=int32_lanes, tile_m=xi, tile_n=fi, tasks=tasks, tile_util=util
    )


def _cpu_dense(s: _Shape, traits: MachineTraits) -> KernelInfo:
    lanes = _dot_lanes(traits, s.f)
    if lanes and s.cg % 4 == 0:
        nv = _largest_divisor(s.f // lanes, 4)
        return KernelInfo(
            "MatmulInt8DotProduct", dot_path=1, vector=lanes, tile_n=nv * lanes,
            tasks=_ceil(s.f, nv * lanes),
        )  # fmt: skip
    int32_lanes = max(1, traits.cpu_vector_bits // 32)
    vo = (
        _largest_divisor(s.f, 3 * int32_lanes, int32_lanes)
        or _largest_divisor(s.f, 3 * int32_lanes, max(1, int32_lanes // 2))
        or _largest_divisor(s.f, 3 * int32_lanes)
    )
    util = vo / (_ceil(vo, int32_lanes) * int32_lanes)
    return KernelInfo(
        "MatmulCPU", vector=int32_lanes, tile_n=vo, tasks=_ceil(s.f, vo), tile_util=util
    )


def _cpu_pool(s: _Shape, traits: MachineTraits) -> KernelInfo:
    lanes = max(1, traits.cpu_vector_bits // 32)
    inner = s.ow if s.kind != "global_avg_pool2d" else 1
    tasks = s.f * (s.oh if s.kind != "global_avg_pool2d" else 1)
    util = inner / (_ceil(inner, lanes) * lanes) if inner > 1 else 1.0 / lanes
    return KernelInfo("CPUFallback", vector=lanes, tile_m=inner, tasks=tasks, tile_util=util)


# -------------------------------------------------------------------------------------- GPU
def _gpu_conv(s: _Shape, traits: MachineTraits) -> KernelInfo:
    from mulayer.schedules.gpu_conv2d import MIN_EXTENT, choose_tile
    from mulayer.schedules.gpu_depthwise import choose_tile as depthwise_tile

    gemm_i, gemm_k = s.oh * s.ow, s.cg * s.kh * s.kw
    tensor_cores = traits.gpu_arch >= 70
    # Step 1. mulayer's implicit-GEMM tensor-core rule (ungrouped), split-K included.
    narrow_ok = s.f >= NARROW_OUT_CHANNELS or traits.gpu_narrow_conv_rule
    if tensor_cores and s.groups == 1 and min(gemm_i, gemm_k) >= MIN_EXTENT and narrow_ok:
        # NCHW: profiled parts keep it whatever MULAYER_GPU_LAYOUT says (profiler/parts.py).
        shape = dict(n=1, oh=s.oh, ow=s.ow, f=s.f, cg=s.cg, kh=s.kh, kw=s.kw, layout="NCHW")
        tile = choose_tile(SimpleNamespace(**shape))
        info = _gemm_launch(
            "Conv2dTensorCore", gemm_i, s.f, _ceil(gemm_k, tile.split_k), tile.tile_i,
            tile.tile_j, tile.tile_k, tile.threads, traits, tensor_path=1,
        )  # fmt: skip
        info.blocks *= tile.split_k
        return _waves(info, traits)
    # Step 2. The depthwise rule.
    if s.depthwise and traits.gpu_depthwise_rule:
        tile = depthwise_tile(SimpleNamespace(kw=s.kw, ow=s.ow, stride=(s.stride, s.stride)))
        work = s.f * s.oh * _ceil(s.ow, tile.vec)
        info = KernelInfo(
            "DepthwiseConv2d", vector=tile.vec, tile_m=tile.vec, threads=tile.threads,
            blocks=_ceil(work, tile.threads),
        )  # fmt: skip
        info.tile_util = work / (info.blocks * tile.threads)
        return _waves(info, traits)
    # Step 3. dlight's Matmul: tensorized when I, J and K all exceed 64, else SIMT 32x64 tiles.
    if s.groups == 1:
        if tensor_cores and min(gemm_i, s.f, gemm_k) > 64:
            return _gemm_launch(
                "Matmul", gemm_i, s.f, gemm_k, 128, 128, 64, 512, traits, tensor_path=1
            )
        return _gemm_launch("Matmul", gemm_i, s.f, gemm_k, 32, 64, 16, 128, traits)
    # Step 4. Grouped and (before the depthwise rule) depthwise convs: dlight's Fallback.
    return _elementwise("Fallback", s.out_elems, traits)


def _gemm_launch(rule, i, j, k, ti, tj, tk, threads, traits, tensor_path=0) -> KernelInfo:
    blocks = _ceil(i, ti) * _ceil(j, tj)
    padded = (_ceil(i, ti) * ti) * (_ceil(j, tj) * tj) * (_ceil(k, tk) * tk)
    info = KernelInfo(
        rule, tensor_path=tensor_path, tile_m=ti, tile_n=tj, blocks=blocks, threads=threads,
        tile_util=(i * j * k) / max(padded, 1),
    )  # fmt: skip
    return _waves(info, traits)


def _elementwise(rule: str, outputs: float, traits: MachineTraits, threads=_GPU_MAX_THREADS):
    threads = int(min(threads, max(32, _ceil(outputs, 32) * 32)))
    blocks = _ceil(outputs, threads)
    info = KernelInfo(rule, blocks=blocks, threads=threads)
    info.tile_util = outputs / (blocks * threads)
    return _waves(info, traits)


def _waves(info: KernelInfo, traits: MachineTraits) -> KernelInfo:
    sms = max(1, traits.gpu_sms)
    info.waves = float(_ceil(info.blocks, sms))
    info.occupancy = info.blocks / (info.waves * sms)
    return info


def _gpu_other(s: _Shape, traits: MachineTraits) -> KernelInfo:
    if s.kind == "dense":  # a GEMV: one block of threads reduces each output's row
        info = KernelInfo("Reduction", blocks=s.f, threads=_GPU_REDUCTION_THREADS)
        info.tile_util = min(1.0, s.cg / _GPU_REDUCTION_THREADS)
        return _waves(info, traits)
    if s.kind == "global_avg_pool2d":
        area = s.in_elems / max(1, s.f)
        info = KernelInfo("Reduction", blocks=s.f, threads=_GPU_REDUCTION_THREADS)
        info.tile_util = min(1.0, area / _GPU_REDUCTION_THREADS)
        return _waves(info, traits)
    return _elementwise("Fallback", s.out_elems, traits)


# ---------------------------------------------------------------------------------- entry
def kernel_info(layer: Layer, channels: int, processor: str, traits: MachineTraits) -> KernelInfo:
    """The kernel that runs ``channels`` output channels of ``layer`` on ``processor``."""
    s = _shape(layer, channels)
    if processor == "cpu":
        if s.kind == "conv2d":
            info = _cpu_conv(s, traits)
        elif s.kind == "dense":
            info = _cpu_dense(s, traits)
        else:
            info = _cpu_pool(s, traits)
        cores = max(1, traits.cpu_cores)
        info.chunks_per_thread = float(_ceil(info.tasks, cores))
        info.occupancy = info.tasks / (info.chunks_per_thread * cores)
        # int8 conv/dense: quantize the float32 input, read it, weights, float32 output
        element = 1 if s.kind in ("conv2d", "dense") else 4
    else:
        info = _gpu_conv(s, traits) if s.kind == "conv2d" else _gpu_other(s, traits)
        element = 2  # fp16: cast the float32 input, read it, weights, float32 output
    info.flops = max(s.flops, s.out_elems)
    cast = s.in_elems * (4 + element) if element < 4 else 0.0
    info.bytes = cast + s.in_elems * element + s.w_elems * element + s.out_elems * 4
    return info


def roofline_terms(info: KernelInfo) -> tuple[float, float]:
    """``(effective FLOPs, bytes)``: the compute and memory terms of the analytic prior."""
    return info.effective_flops, info.bytes


def normalize_rule(name: str) -> str:
    """A rule name as a profile records it, mapped to :data:`RULES`' spelling."""
    return RECORDED_ALIASES.get(name, name)


def rule_log_features(info: KernelInfo) -> list[float]:
    """Numeric kernel features (see :data:`KERNEL_FEATURE_NAMES`)."""
    return [
        *(float(info.rule == r) for r in RULES),
        float(info.tensor_path),
        float(info.dot_path),
        float(info.vector),
        float(info.tile_m),
        float(info.tile_n),
        math.log2(max(info.tasks, 1)),
        info.chunks_per_thread,
        math.log2(max(info.blocks, 1)),
        float(info.threads),
        info.waves,
        info.tile_util,
        info.occupancy,
        math.log2(max(info.bytes, 1.0)),
        math.log2(max(info.effective_flops, 1.0)),
    ]


KERNEL_FEATURE_NAMES: tuple[str, ...] = (
    *(f"rule_{r}" for r in RULES),
    "tensor_path",
    "dot_path",
    "vector_width",
    "tile_m",
    "tile_n",
    "log2_cpu_tasks",
    "cpu_chunks_per_thread",
    "log2_gpu_blocks",
    "gpu_threads",
    "gpu_waves",
    "tile_util",
    "occupancy",
    "log2_bytes_moved",
    "log2_effective_flops",
)
