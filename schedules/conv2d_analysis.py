"""Recognise a legalized NCHW (or, on request, NHWC) conv2d inside a (possibly fused) PrimFunc.

``relax.transform.LegalizeOps`` lowers every NCHW/OIHW ``R.nn.conv2d`` through ``topi.nn.conv``:
a ``pad_temp`` stage (padding) followed by one reduction block named ``conv2d_nchw`` or
``group_conv2d_nchw`` with iter vars ``nn, ff, yy, xx`` (spatial) and ``rc, ry, rx``
(reduction)::

    out[n, f, y, x] += cast(pad[n, f // Fg * Cg + rc, y*sh + ry*dh, x*sw + rx*dw])
                     * cast(w[f, rc, ry, rx])

where ``Fg = F / groups`` and ``Cg = C / groups`` (the ``f // Fg * Cg`` term only when
``groups > 1``). FuseOps/FuseTIR may add elementwise epilogue blocks (bias, relu, requantize).

An NHWC/OHWI conv (what :class:`~mulayer.passes.channels_last.ChannelsLastGPU` makes of a GPU
conv) legalizes to one ``conv2d_nhwc`` block with iter vars ``nn, yy, xx, ff`` and
``ry, rx, rc``, reading ``pad[n, y*sh + ry, x*sw + rx, rc]`` and ``w[f, ry, rx, rc]``; a
depthwise one (one output per channel) to ``group_conv2d_nhwc``, reading
``pad[n, y*sh + ry, x*sw + rx, f + rc]`` with ``rc`` of extent 1. Other grouped NHWC convs are
not recognised. Only rules that ask for it (``layouts=("NCHW", "NHWC")``) see such convs.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, sym, tirx
from tvm.s_tir.schedule import SBlockRV

from ._util import const_int, is_simple_multiply_add, iter_extents, iter_kinds, leaf_blocks

CONV2D_BLOCK_NAMES = ("conv2d_nchw", "group_conv2d_nchw")
NHWC_BLOCK_NAMES = ("conv2d_nhwc", "group_conv2d_nhwc")
# Positions of (n, f, oh, ow, rc, ry, rx) among the block's iter vars, per data layout.
_ITER_ORDER = {"NCHW": (0, 1, 2, 3, 4, 5, 6), "NHWC": (0, 3, 1, 2, 6, 4, 5)}
# Positions of (n, c, h, w) in the data buffer, and of (f, rc, ry, rx) in the weight buffer.
_DATA_AXES = {"NCHW": (0, 1, 2, 3), "NHWC": (0, 3, 1, 2)}
_WEIGHT_AXES = {"NCHW": (0, 1, 2, 3), "NHWC": (0, 3, 1, 2)}


@dataclass
class Conv2dInfo:
    """Shapes and buffers of one NCHW (or NHWC) conv2d block.

    Attributes
    ----------
    block : SBlockRV
        The reduction block.
    name : str
        Its name.
    n, f, oh, ow : int
        Output extents (batch, output channels, height, width).
    cg, kh, kw : int
        Reduction extents (input channels per group, kernel height, width).
    groups : int
        Number of groups (``groups == in_channels`` and ``cg == 1`` for depthwise).
    data : tirx.Buffer
        The buffer the block reads activations from (usually ``pad_temp``).
    weight : tirx.Buffer
        The weight buffer (OIHW; OHWI for NHWC convs).
    weight_read : int
        Index of ``weight`` in the block's read regions.
    data_read : int
        Index of ``data`` in the block's read regions.
    stride : tuple[int, int]
        (sh, sw), read from the data access.
    in_dtype, w_dtype, out_dtype : str
        Element types.
    layout : str
        ``"NCHW"`` (OIHW weights) or ``"NHWC"`` (OHWI weights).
    """

    block: SBlockRV
    name: str
    n: int
    f: int
    oh: int
    ow: int
    cg: int
    kh: int
    kw: int
    groups: int
    data: tirx.Buffer
    weight: tirx.Buffer
    weight_read: int
    data_read: int
    stride: tuple[int, int]
    in_dtype: str
    w_dtype: str
    out_dtype: str
    layout: str = "NCHW"

    @property
    def reduce_channel_loop(self) -> int:
        """Position of the input-channel loop (``rc``) among the block's seven loops."""
        return _ITER_ORDER[self.layout][4]

    @property
    def fg(self) -> int:
        """Output channels per group."""
        return self.f // self.groups

    @property
    def is_depthwise(self) -> bool:
        """One input channel per group (channel multiplier ``fg`` may exceed 1)."""
        return self.cg == 1 and self.groups > 1

    @property
    def flops(self) -> int:
        """Multiply-adds times two."""
        return 2 * self.n * self.f * self.oh * self.ow * self.cg * self.kh * self.kw


def _stride_of(index: tirx.Expr, spatial: tirx.Var) -> int | None:
    """Coefficient of ``spatial`` in an affine index such as ``y*2 + ry``."""
    coeffs = sym.detect_linear_equation(index, [spatial])
    if len(coeffs) != 2:
        return None
    return const_int(coeffs[0])


def _block_layout(name: str, layouts: tuple[str, ...]) -> str | None:
    if "NCHW" in layouts and name.endswith(CONV2D_BLOCK_NAMES):
        return "NCHW"
    if "NHWC" in layouts and name.endswith(NHWC_BLOCK_NAMES):
        return "NHWC"
    return None


def _is_weight_load(load, ivars: list, layout: str) -> bool:
    """``load`` reads ``w[f, rc, ry, rx]`` (OIHW) or ``w[f, ry, rx, rc]`` (OHWI)."""
    idx = list(load.indices)
    if len(idx) != 4:
        return False
    order = _ITER_ORDER[layout]
    f, rc, ry, rx = (ivars[order[p]] for p in (1, 4, 5, 6))
    want = [f, rc, ry, rx]
    want = [want[_WEIGHT_AXES[layout].index(axis)] for axis in range(4)]
    return all(isinstance(i, tirx.Var) and i.same_as(v) for i, v in zip(idx, want, strict=True))


def find_conv2d(sch: s_tir.Schedule, layouts: tuple[str, ...] = ("NCHW",)) -> Conv2dInfo | None:
    """Return the single conv2d block of the scheduled function, or None.

    ``layouts``: the data layouts the caller handles (NCHW by default; rules that handle NHWC
    convs pass ``("NCHW", "NHWC")``).
    """
    found: list[Conv2dInfo] = []
    for block_rv in leaf_blocks(sch):
        block = sch.get(block_rv)
        layout = _block_layout(block.name_hint, layouts)
        if layout is None:
            continue
        if iter_kinds(block) != "SSSSRRR":
            return None
        extents = iter_extents(block)
        if any(e is None for e in extents):
            return None
        loads = is_simple_multiply_add(block)
        if loads is None:
            return None
        data_load, weight_load = loads
        ivars = [iv.var for iv in block.iter_vars]
        if not _is_weight_load(weight_load, ivars, layout):
            data_load, weight_load = weight_load, data_load
            if not _is_weight_load(weight_load, ivars, layout):
                return None
        d_idx = list(data_load.indices)
        if len(d_idx) != 4:
            return None
        _, c_axis, h_axis, w_axis = _DATA_AXES[layout]
        c_in = const_int(data_load.source.shape[c_axis])
        order = _ITER_ORDER[layout]
        n, f, oh, ow, cg, kh, kw = (extents[p] for p in order)
        if c_in is None or c_in % cg != 0:
            return None
        groups = c_in // cg
        if f % groups != 0:
            return None
        if layout == "NHWC" and groups != 1 and (cg != 1 or f != groups):
            # NHWC: dense convs, and depthwise ones with one output per channel.
            return None
        sh = _stride_of(d_idx[h_axis], ivars[order[2]])
        sw = _stride_of(d_idx[w_axis], ivars[order[3]])
        if sh is None or sw is None:
            return None
        reads = [r.source for r in block.reads]
        try:
            weight_read = next(i for i, b in enumerate(reads) if b.same_as(weight_load.source))
            data_read = next(i for i, b in enumerate(reads) if b.same_as(data_load.source))
        except StopIteration:
            return None
        found.append(
            Conv2dInfo(
                block=block_rv,
                name=block.name_hint,
                n=n,
                f=f,
                oh=oh,
                ow=ow,
                cg=cg,
                kh=kh,
                kw=kw,
                groups=groups,
                data=data_load.source,
                weight=weight_load.source,
                weight_read=weight_read,
                data_read=data_read,
                stride=(sh, sw),
                in_dtype=str(data_load.source.dtype),
                w_dtype=str(weight_load.source.dtype),
                out_dtype=str(block.writes[0].source.dtype),
                layout=layout,
            )
        )
    if len(found) != 1 or not _epilogue_is_chain(sch, found[0].block):
        return None
    return found[0]


def _epilogue_is_chain(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    """True when every block after the conv has at most one consumer (bias, relu, clip, ...).

    An epilogue that reads one intermediate twice (SiLU: ``c * sigmoid(c)``) cannot be inlined
    into the conv's tiles; the rules leave such functions to the fallback rule.
    """
    consumers = list(sch.get_consumers(block))
    while consumers:
        if len(consumers) > 1:
            return False
        consumers = list(sch.get_consumers(consumers[0]))
    return True


def data_producer(sch: s_tir.Schedule, info: Conv2dInfo) -> SBlockRV | None:
    """The spatial block (``pad_temp``) that writes the conv's data buffer, if any."""
    for producer in sch.get_producers(info.block):
        block = sch.get(producer)
        if any(w.source.same_as(info.data) for w in block.writes) and "R" not in iter_kinds(block):
            return producer
    return None
