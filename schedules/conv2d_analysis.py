"""Recognise a legalized NCHW conv2d inside a (possibly fused) PrimFunc.

``relax.transform.LegalizeOps`` lowers every NCHW/OIHW ``R.nn.conv2d`` through ``topi.nn.conv``:
a ``pad_temp`` stage (padding) followed by one reduction block named ``conv2d_nchw`` or
``group_conv2d_nchw`` with iter vars ``nn, ff, yy, xx`` (spatial) and ``rc, ry, rx``
(reduction)::

    out[n, f, y, x] += cast(pad[n, f // Fg * Cg + rc, y*sh + ry*dh, x*sw + rx*dw])
                     * cast(w[f, rc, ry, rx])

where ``Fg = F / groups`` and ``Cg = C / groups`` (the ``f // Fg * Cg`` term only when
``groups > 1``). FuseOps/FuseTIR may add elementwise epilogue blocks (bias, relu, requantize).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, sym, tirx
from tvm.s_tir.schedule import SBlockRV

from ._util import const_int, is_simple_multiply_add, iter_extents, iter_kinds, leaf_blocks

CONV2D_BLOCK_NAMES = ("conv2d_nchw", "group_conv2d_nchw")


@dataclass
class Conv2dInfo:
    """Shapes and buffers of one NCHW conv2d block.

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
        The OIHW weight buffer.
    weight_read : int
        Index of ``weight`` in the block's read regions.
    data_read : int
        Index of ``data`` in the block's read regions.
    stride : tuple[int, int]
        (sh, sw), read from the data access.
    in_dtype, w_dtype, out_dtype : str
        Element types.
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


def find_conv2d(sch: s_tir.Schedule) -> Conv2dInfo | None:
    """Return the single NCHW conv2d block of the scheduled function, or None."""
    found: list[Conv2dInfo] = []
    for block_rv in leaf_blocks(sch):
        block = sch.get(block_rv)
        if not block.name_hint.endswith(CONV2D_BLOCK_NAMES):
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
        w_idx = list(weight_load.indices)
        if len(w_idx) != 4 or not all(
            isinstance(i, tirx.Var) and i.same_as(v)
            for i, v in zip(w_idx, [ivars[1], ivars[4], ivars[5], ivars[6]], strict=True)
        ):
            # Weight loads must be w[f, rc, ry, rx] (OIHW).
            data_load, weight_load = weight_load, data_load
            w_idx = list(weight_load.indices)
            if len(w_idx) != 4 or not all(
                isinstance(i, tirx.Var) and i.same_as(v)
                for i, v in zip(w_idx, [ivars[1], ivars[4], ivars[5], ivars[6]], strict=True)
            ):
                return None
        d_idx = list(data_load.indices)
        if len(d_idx) != 4:
            return None
        c_in = const_int(data_load.source.shape[1])
        n, f, oh, ow, cg, kh, kw = extents
        if c_in is None or c_in % cg != 0:
            return None
        groups = c_in // cg
        if f % groups != 0:
            return None
        sh = _stride_of(d_idx[2], ivars[2])
        sw = _stride_of(d_idx[3], ivars[3])
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
