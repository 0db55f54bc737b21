"""Calibration for the CPU's int8 slices: activation ranges and a per-channel accuracy budget.

:func:`calibrate` runs the *canonical* fp32 module (see :mod:`mulayer.frontend.onnx_import`) on llvm
over a few sample inputs. For every splittable layer (named as in
:func:`mulayer.frontend.layers.splittable_layers`) it records

- the range of the layer's input activation and from it an asymmetric per-tensor uint8
  scale / zero point (what :class:`mulayer.passes.QuantizeCPU` quantizes the CPU part's input with).
  ``method="search"`` picks that range per tensor among the observed extremes and a few
  percentiles (:data:`SEARCH_PERCENTILES`): the one whose quantization error, carried through the
  conv/dense layers that read the tensor, is smallest relative to their result;
- the range of the layer's output after its channel-wise epilogue (bias add, per-channel multiply,
  relu, clip): what the join of the two parts sees;
- for conv2d and dense layers, per output channel, the energy of the fp32 result (``signal``) and
  of the error of the int8 result (``noise``), simulated in numpy with exactly the quantization
  QuantizeCPU applies (uint8 activations, int8 symmetric per-output-channel weights). Because the
  weights are quantized per channel and the activations per tensor, the error of a channel does
  not depend on how the layer is split, so the SQNR of *any* CPU slice is
  ``10 log10(sum signal / sum noise)`` over its channels: that is the accuracy guard.

The SQNR is measured on the conv/dense result before its epilogue (a bias adds signal but no
noise, so this is the conservative figure).

Stats are JSON with a schema version, written atomically. :func:`load_calibration_npz` reads the
``--calibration samples.npz`` file of the command line.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import MuLayerError
from ..fileio import atomic_write_text

log = logging.getLogger(__name__)

CALIBRATION_SCHEMA_VERSION = 1
METHODS = ("minmax", "percentile", "search")
# The candidate ranges of the "search" method: these percentiles, beside the observed extremes.
SEARCH_PERCENTILES = (99.999, 99.99, 99.9)
# Values kept per layer and sample for the percentile methods (a random subsample beyond that).
_PERCENTILE_KEEP = 1 << 16
# "search": multiply-adds per layer, sample and candidate; output positions are subsampled
# beyond it (never fewer than _SEARCH_MIN_POSITIONS).
_SEARCH_MACS = 1 << 20
_SEARCH_MIN_POSITIONS = 64
# Ops that are channel-wise epilogues of a layer: they follow it into its parts.
_EPILOGUE_BINARY = ("relax.add", "relax.multiply")
_EPILOGUE_UNARY = ("relax.nn.relu", "relax.clip")


# ------------------------------------------------------------------------- quantization math
def activation_qparams(lo: float, hi: float) -> tuple[float, int]:
    """Asymmetric uint8 ``(scale, zero_point)`` covering ``[lo, hi]`` (and 0, exactly)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / 255.0
    if not math.isfinite(scale) or scale <= 0.0:
        return 1.0, 0
    # Stored as float32 so the module's constant and every reference agree bit for bit.
    scale = float(np.float32(scale))
    zero_point = int(np.clip(round(-lo / scale), 0, 255))
    return scale, zero_point


def quantize_activation(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """``clip(round(x / s) + zp, 0, 255)`` as uint8, the same arithmetic as the module's."""
    q = np.rint(x.astype(np.float32) / np.float32(scale)) + np.float32(zero_point)
    return np.clip(q, 0, 255).astype(np.uint8)


def quantize_weight(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel (``axis``): ``(int8 weight, float64 scales)``.

    ``scale[c] = max|w_c| / 127``; an all-zero channel gets scale 1.
    """
    w = weight.astype(np.float64)
    reduce_axes = tuple(a for a in range(w.ndim) if a != axis % w.ndim)
    amax = np.abs(w).max(axis=reduce_axes)
    scale = np.where(amax > 0, amax / 127.0, 1.0)
    shape = [1] * w.ndim
    shape[axis % w.ndim] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def sqnr_db(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)``; ``inf`` for an exact result."""
    if noise <= 0.0:
        return math.inf
    if signal <= 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


# ------------------------------------------------------------------------------- the stats
@dataclass
class LayerStats:
    """Calibration figures of one splittable layer."""

    name: str
    kind: str
    input_min: float
    input_max: float
    input_scale: float
    input_zero_point: int
    output_min: float
    output_max: float
    # Per output channel: sum over samples of (fp32 result)^2 and of (int8 result - fp32)^2,
    # each sample scaled by 1 / (its total fp32 energy in this layer) so samples weigh the same.
    signal: list[float] | None = None
    noise: list[float] | None = None
    # Which range the input's scale covers: "min/max", "p99.99", ... ("" in older stats).
    input_range: str = ""

    def sqnr_db(self, start: int = 0, stop: int | None = None) -> float | None:
        """SQNR (dB) of the int8 result over output channels ``[start, stop)``; ``None`` when
        the layer has no int8 simulation (pooling)."""
        if self.signal is None or self.noise is None:
            return None
        return sqnr_db(sum(self.signal[start:stop]), sum(self.noise[start:stop]))


@dataclass
class CalibrationStats:
    """Calibration of one model; see the module docstring."""

    layers: dict[str, LayerStats] = field(default_factory=dict)
    method: str = "minmax"
    percentile: float = 99.99
    num_samples: int = 0
    schema_version: int = CALIBRATION_SCHEMA_VERSION

    def __getitem__(self, name: str) -> LayerStats:
        return self.layers[name]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True, allow_nan=True)

    @classmethod
    def from_json(cls, text: str) -> CalibrationStats:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise MuLayerError(f"calibration stats are not valid JSON: {err}") from None
        if not isinstance(raw, dict):
            raise MuLayerError("calibration stats must be a JSON object")
        version = raw.get("schema_version")
        if version != CALIBRATION_SCHEMA_VERSION:
            raise MuLayerError(
                f"calibration schema version {version!r} is not supported "
                f"(this mulayer reads version {CALIBRATION_SCHEMA_VERSION})"
            )
        try:
            layers = {name: LayerStats(**entry) for name, entry in raw["layers"].items()}
            return cls(**{**raw, "layers": layers})
        except (TypeError, KeyError, AttributeError) as err:
            raise MuLayerError(f"calibration stats have a malformed entry: {err}") from None

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> CalibrationStats:
        path = Path(path)
        if not path.is_file():
            raise MuLayerError(f"calibration stats file {str(path)!r} does not exist")
        return cls.from_json(path.read_text())


# ------------------------------------------------------------------------------ the samples
def _input_specs(func) -> list[tuple[str, tuple[int, ...], str]]:
    specs = []
    for param in func.params:
        ty = param.ty
        specs.append((param.name, tuple(int(d) for d in ty.shape.values), str(ty.dtype)))
    return specs


def _split_samples(
    name: str, array: np.ndarray, shape: tuple[int, ...], dtype: str, what: str
) -> list[np.ndarray]:
    """One input's samples: ``array`` has a leading sample axis (``[N, *shape]``); with a batch
    of 1, ``[N, *shape[1:]]`` is accepted too."""
    array = np.asarray(array)
    if array.dtype.kind not in "fiub" or (np.dtype(dtype).kind == "f") != (array.dtype.kind == "f"):
        raise MuLayerError(
            f"{what}: input {name!r} has dtype {array.dtype}, expected {dtype} (the model's)"
        )
    if array.shape[1:] == shape:
        samples = list(array)
    elif shape and shape[0] == 1 and array.shape[1:] == shape[1:]:
        samples = [s[None] for s in array]
    else:
        alt = f" or [N, {', '.join(map(str, shape[1:]))}]" if shape and shape[0] == 1 else ""
        raise MuLayerError(
            f"{what}: input {name!r} has shape {list(array.shape)}, expected "
            f"[N, {', '.join(map(str, shape))}]{alt} (N = number of samples)"
        )
    if not samples:
        raise MuLayerError(f"{what}: input {name!r} holds no samples (N = 0)")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        count = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise MuLayerError(
            f"{what}: input {name!r} holds NaN or Inf values ({count} of {array.size}); "
            "calibration ranges need finite samples"
        )
    return [s.astype(dtype) for s in samples]


def _normalize_samples(
    samples, specs: list[tuple[str, tuple[int, ...], str]], what: str
) -> list[dict[str, np.ndarray]]:
    names = [name for name, _, _ in specs]
    if isinstance(samples, np.ndarray):
        if len(specs) != 1:
            raise MuLayerError(
                f"{what}: a single array was given but the model has {len(specs)} inputs "
                f"({', '.join(names)}); give one array per input name"
            )
        name, shape, dtype = specs[0]
        return [{name: s} for s in _split_samples(name, samples, shape, dtype, what)]
    if isinstance(samples, dict):  # one array per input, leading axis = sample
        unknown = sorted(set(samples) - set(names))
        missing = [n for n in names if n not in samples]
        if unknown or missing:
            raise MuLayerError(
                f"{what}: input names {sorted(samples)} do not match the model's inputs "
                f"{names}"
                + (f" (unknown: {', '.join(unknown)})" if unknown else "")
                + (f" (missing: {', '.join(missing)})" if missing else "")
            )
        per_input = {n: _split_samples(n, samples[n], s, d, what) for n, s, d in specs}
        counts = {n: len(v) for n, v in per_input.items()}
        if len(set(counts.values())) != 1:
            raise MuLayerError(f"{what}: inputs hold different numbers of samples: {counts}")
        return [{n: per_input[n][i] for n in names} for i in range(len(per_input[names[0]]))]
    result = []
    for i, sample in enumerate(samples):
        if not isinstance(sample, dict):
            sample = {names[0]: sample} if len(names) == 1 else sample
        if not isinstance(sample, dict) or sorted(sample) != sorted(names):
            got = sorted(sample) if isinstance(sample, dict) else type(sample).__name__
            raise MuLayerError(f"{what}: sample {i} has inputs {got}, expected {names}")
        one = {}
        for name, shape, dtype in specs:
            one[name] = _split_samples(name, np.asarray(sample[name])[None], shape, dtype, what)[0]
        result.append(one)
    if not result:
        raise MuLayerError(f"{what}: no calibration samples were given")
    return result


def load_calibration_npz(path: str | Path, input_specs) -> dict[str, np.ndarray]:
    """Read ``--calibration samples.npz``: one array per input name, leading axis = sample.

    The array names must be the model's input names, as for ``mulayer run --inputs``.
    ``input_specs`` are :class:`mulayer.tensor_spec.TensorSpec` (or ``(name, shape, dtype)``).
    Returns ``{input name: [N, *shape] array}``, checked against the specs.
    """
    path = Path(path)
    what = f"calibration file {str(path)!r}"
    if not path.is_file():
        raise MuLayerError(f"{what} does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (ValueError, OSError, EOFError) as err:
        raise MuLayerError(f"{what} is not a readable .npz archive ({err})") from None
    specs = [
        (s.name, tuple(s.shape), s.dtype) if hasattr(s, "name") else (s[0], tuple(s[1]), s[2])
        for s in input_specs
    ]
    names = [name for name, _, _ in specs]
    samples = _normalize_samples(arrays, specs, what)
    return {name: np.stack([s[name] for s in samples]) for name in names}


# ------------------------------------------------------------------- finding the tensors
def is_per_channel_const(expr, out_shape: tuple[int, ...]) -> bool:
    """Whether ``expr`` is a constant that varies at most along axis 1 of ``out_shape``."""
    from tvm.ir.expr import Constant

    if not isinstance(expr, Constant):
        return False
    shape = tuple(expr.value.shape)
    if len(shape) > len(out_shape):
        return False
    aligned = (1,) * (len(out_shape) - len(shape)) + shape
    return all(d == 1 or (i == 1 and d == out_shape[1]) for i, d in enumerate(aligned))


def epilogue_data(call, out_shape: tuple[int, ...]):
    """The data operand of ``call`` if it is a channel-wise epilogue op (bias add, per-channel
    multiply, relu, clip) of a tensor shaped ``out_shape``, else ``None``."""
    from tvm import relax

    if not isinstance(call, relax.Call):
        return None
    op = getattr(call.op, "name", None)
    if op in _EPILOGUE_UNARY:
        return call.args[0]
    if op in _EPILOGUE_BINARY:
        a, b = call.args
        if is_per_channel_const(b, out_shape):
            return a
        if is_per_channel_const(a, out_shape):
            return b
    return None


def _count_uses(expr, counts: dict) -> None:
    from tvm import relax

    if isinstance(expr, relax.Var):
        counts[expr] = counts.get(expr, 0) + 1
    elif isinstance(expr, relax.Call):
        for arg in expr.args:
            _count_uses(arg, counts)
    elif isinstance(expr, relax.Tuple):
        for item in expr.fields:
            _count_uses(item, counts)
    elif isinstance(expr, relax.TupleGetItem):
        _count_uses(expr.tuple_value, counts)


def _layer_tensors(func, layers) -> dict[str, tuple]:
    """``{layer: (call, input expr, output var after the epilogue)}`` of ``func``'s layers.

    A layer's epilogue is the run of channel-wise ops that each read the previous result as
    its only use (what SplitChannels moves into the parts).
    """
    from tvm import relax

    from mulayer.frontend.layers import splittable_bindings

    wanted = {layer.name for layer in layers}
    by_var = {
        binding.var: layer for layer, binding in splittable_bindings(func) if layer.name in wanted
    }
    bindings = [
        b for block in func.body.blocks for b in block.bindings if isinstance(b, relax.VarBinding)
    ]
    counts: dict = {}
    for binding in bindings:
        _count_uses(binding.value, counts)
    _count_uses(func.body.body, counts)
    found: dict[str, list] = {}
    tails: dict = {}  # var holding a layer's result so far -> layer
    for binding in bindings:
        var, value = binding.var, binding.value
        layer = by_var.get(var)
        if layer is not None and layer.name not in found:
            found[layer.name] = [value, value.args[0], var]
            tails[var] = layer
            continue
        if not isinstance(value, relax.Call):
            continue
        for arg in value.args:
            owner = tails.get(arg) if isinstance(arg, relax.Var) else None
            if owner is None or counts.get(arg, 0) != 1:
                continue
            data = epilogue_data(value, owner.output_shape)
            if data is not None and data.same_as(arg):
                del tails[arg]
                tails[var] = owner
                found[owner.name][2] = var
                break
    return {name: tuple(v) for name, v in found.items()}


# ------------------------------------------------------------------- numpy reference ops
def conv2d_nchw(x: np.ndarray, w: np.ndarray, strides, padding, dilation, groups: int):
    """A float32 NCHW/OIHW conv2d (im2col through einsum), for the int8 simulation."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    pt, pl, pb, pr = padding
    sh, sw = strides
    dh, dw = dilation
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    win = np.lib.stride_tricks.sliding_window_view(xp, (eh, ew), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]  # [n, c, oh, ow, kh, kw]
    oh, ow = win.shape[2], win.shape[3]
    win = win.reshape(n, groups, cg, oh, ow, kh, kw)
    wg = w.reshape(groups, o // groups, cg, kh, kw)
    out = np.einsum("ngchwij,gocij->ngohw", win, wg, optimize=True)
    return out.reshape(n, o, oh, ow)


def _conv_attrs(call) -> dict:
    attrs = call.attrs
    padding = [int(p) for p in attrs.padding]
    if len(padding) == 2:
        padding = padding * 2
    elif len(padding) == 1:
        padding = padding * 4
    return {
        "strides": [int(s) for s in attrs.strides],
        "padding": padding,
        "dilation": [int(d) for d in attrs.dilation],
        "groups": int(attrs.groups),
    }


def _layer_result(kind: str, call, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    if kind == "conv2d":
        return conv2d_nchw(x, w, **_conv_attrs(call))
    return x @ w


# ------------------------------------------------------------------------ range observers
class _Range:
    def __init__(self, method: str, percentile: float, rng: np.random.Generator):
        self.method, self.percentile, self.rng = method, percentile, rng
        self.lo, self.hi = math.inf, -math.inf
        self.kept: list[np.ndarray] = []
        self.chosen: tuple[str, float, float] | None = None  # set by the "search" method

    def add(self, x: np.ndarray) -> None:
        flat = x.ravel().astype(np.float32)
        self.lo = min(self.lo, float(flat.min()))
        self.hi = max(self.hi, float(flat.max()))
        if self.method != "minmax":
            if flat.size > _PERCENTILE_KEEP:
                flat = self.rng.choice(flat, _PERCENTILE_KEEP, replace=False)
            self.kept.append(flat)

    def _percentiles(self, ps) -> list[tuple[float, float]]:
        """``(lo, hi)`` per percentile ``p`` of the kept values (one sort for all)."""
        qs = np.percentile(np.concatenate(self.kept), [q for p in ps for q in (100.0 - p, p)])
        return [(float(qs[2 * i]), float(qs[2 * i + 1])) for i in range(len(ps))]

    def candidates(self) -> list[tuple[str, float, float]]:
        """``(label, lo, hi)`` ranges the "search" method chooses among (distinct ones)."""
        found = [("min/max", self.lo, self.hi)]
        if self.kept:
            for p, (lo, hi) in zip(
                SEARCH_PERCENTILES, self._percentiles(SEARCH_PERCENTILES), strict=True
            ):
                if all(activation_qparams(lo, hi) != activation_qparams(a, b) for _, a, b in found):
                    found.append((f"p{p:g}", lo, hi))
        return found

    def bounds(self) -> tuple[str, float, float]:
        """``(label, lo, hi)``: the range the input's scale covers."""
        if self.chosen is not None:
            return self.chosen
        if self.method == "minmax" or not self.kept:
            return "min/max", self.lo, self.hi
        p = self.percentile if self.method == "percentile" else SEARCH_PERCENTILES[1]
        return (f"p{p:g}", *self._percentiles([p])[0])


def _conv_out_hw(x_shape, w_shape, strides, padding, dilation, groups: int) -> tuple[int, int]:
    """The output height and width of an NCHW/OIHW conv2d."""
    extent = [(k - 1) * d + 1 for k, d in zip(w_shape[2:], dilation, strict=True)]
    return tuple(
        (x_shape[2 + i] + padding[i] + padding[i + 2] - extent[i]) // strides[i] + 1
        for i in range(2)
    )


def _patches(x: np.ndarray, w_shape, strides, padding, dilation, groups: int, positions):
    """The receptive fields of a conv's flat output ``positions`` in ``x`` (NCHW), zero padded:
    ``[n, groups, c / groups * kh * kw, len(positions)]``."""
    n, c = x.shape[:2]
    _, cg, kh, kw = w_shape
    pt, pl, pb, pr = padding
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    oh, ow = _conv_out_hw(x.shape, w_shape, strides, padding, dilation, groups)
    rows, cols = np.unravel_index(positions, (oh, ow))
    rows, cols = rows * strides[0], cols * strides[1]
    taps = [
        xp[:, :, rows + i * dilation[0], cols + j * dilation[1]]
        for i in range(kh)
        for j in range(kw)
    ]  # each [n, c, p]
    patches = np.stack(taps, axis=2)  # [n, c, kh * kw, p]
    return patches.reshape(n, groups, cg * kh * kw, len(positions))


class _RangeSearch:
    """The "search" method: per observed tensor, the candidate range with the least relative
    error in the conv/dense results that read it (input quantization only: the weight error
    does not depend on the range). A conv is evaluated on its receptive fields at a random
    subset of its output positions when it is large (:data:`_SEARCH_MACS`)."""

    def __init__(self, observers, readers: dict, rng: np.random.Generator):
        self.observers = observers  # {id: _Range} of the tensors conv/dense layers read
        self.readers = readers  # {id: [(kind, call, weight)]}
        self.candidates = {key: obs.candidates() for key, obs in observers.items()}
        self.qparams = {
            key: [activation_qparams(lo, hi) for _, lo, hi in c]
            for key, c in self.candidates.items()
        }
        self.error = {key: np.zeros(len(c)) for key, c in self.candidates.items()}
        self.rng = rng

    def _operands(self, kind: str, call, w: np.ndarray, x: np.ndarray):
        """``(inputs [g, k, p], weights [g, o/g, k])``: the layer's result is their product."""
        if kind != "conv2d":
            return x.reshape(1, -1, 1), w.T[None]
        attrs = _conv_attrs(call)
        oh, ow = _conv_out_hw(x.shape, w.shape, **attrs)
        count = max(_SEARCH_MIN_POSITIONS, _SEARCH_MACS // int(np.prod(w.shape)))
        positions = (
            np.arange(oh * ow)
            if count >= oh * ow
            else self.rng.choice(oh * ow, count, replace=False)
        )
        cols = _patches(x, w.shape, positions=positions, **attrs)[0]
        return cols, w.reshape(attrs["groups"], w.shape[0] // attrs["groups"], -1)

    def add(self, key, x: np.ndarray) -> None:
        """Score every candidate range of tensor ``key`` on one sample's value ``x``."""
        x = x.astype(np.float32)
        for kind, call, w in self.readers[key]:
            cols, wg = self._operands(kind, call, w, x)
            energy = float(np.square(wg @ cols, dtype=np.float64).sum())
            for index, (scale, zp) in enumerate(self.qparams[key]):
                # Padding quantizes to the zero point: exact, as in the module.
                q = quantize_activation(cols, scale, zp).astype(np.float32)
                err = (q - np.float32(zp)) * np.float32(scale) - cols
                # A linear layer's error is the layer applied to its input's error.
                out = wg @ err
                # Each reader and sample weighs the same: the error relative to its result.
                self.error[key][index] += float(np.square(out, dtype=np.float64).sum()) / max(
                    energy, 1e-30
                )

    def choose(self) -> None:
        for key, observer in self.observers.items():
            observer.chosen = self.candidates[key][int(np.argmin(self.error[key]))]


# ------------------------------------------------------------------------------ calibrate
def _instrumented(mod, tensors: dict[str, tuple]):
    """``main`` returning its own result followed by every layer's input and output tensor."""
    import tvm
    from tvm import relax

    mod = relax.transform.ToNonDataflow()(mod)
    func = mod["main"]
    by_name = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            by_name[binding.var.name] = binding.var
    params = {p.name: p for p in func.params}
    extra, order = [], []
    for name, (_, inp, out) in tensors.items():
        if not isinstance(inp, relax.Var):
            continue
        inp_var = by_name.get(inp.name)
        if inp_var is None:
            inp_var = params[inp.name]
        out_var = by_name[out.name]
        extra += [inp_var, out_var]
        order.append(name)
    body = relax.SeqExpr(func.body.blocks, relax.Tuple([func.body.body, *extra]))
    body = relax.BlockBuilder().normalize(body)
    new = relax.Function(func.params, body, attrs=func.attrs)
    return tvm.IRModule({"main": new}), order


def calibrate(
    mod,
    samples: list[dict[str, np.ndarray]] | dict[str, np.ndarray] | np.ndarray,
    method: str = "minmax",
    percentile: float = 99.99,
    seed: int = 0,
    build=None,
) -> CalibrationStats:
    """Calibrate the int8 CPU slices of the canonical module ``mod`` on ``samples``.

    Parameters
    ----------
    mod : tvm.IRModule
        The canonical fp32 module (:func:`mulayer.frontend.onnx_import.import_onnx`), before
        SplitChannels.
    samples : list of dicts, dict or array
        ``[{input name: array}, ...]``; or ``{input name: [N, *shape]}``; or, for a single-input
        model, one ``[N, *shape]`` array (``[N, *shape[1:]]`` when the batch is 1).
    method : "minmax", "percentile" or "search"
        How the input range of each layer is chosen: the observed extremes; the
        ``100 - percentile`` and ``percentile`` percentiles (clips a long tail); or, per
        tensor, whichever of the extremes and :data:`SEARCH_PERCENTILES` gives the layers that
        read it the least quantization error on the samples (one more pass over them).
    percentile : float
        Used by the "percentile" method.
    seed : int
        Seeds the subsampling of the percentile and search methods.
    build : callable, optional
        Builds the instrumented fp32 module (run three times per sample) into an executable;
        :func:`mulayer.compiler.build.build_for_this_cpu` (scheduled, all cores) is what
        ``mulayer.calibrate`` and ``mulayer.compile`` pass. Default: ``tvm.compile`` for
        plain ``llvm`` (unscheduled, one core; fine for small modules).

    Returns
    -------
    CalibrationStats
    """
    import tvm
    from tvm import relax

    from ..frontend.layers import splittable_layers

    if method not in METHODS:
        raise MuLayerError(f"calibration method {method!r} is not one of {', '.join(METHODS)}")
    if not 50.0 < float(percentile) <= 100.0:
        raise MuLayerError(f"calibration percentile {percentile!r} must be in (50, 100]")
    func = mod["main"]
    batches = _normalize_samples(samples, _input_specs(func), "calibration samples")
    layers = splittable_layers(func)
    kinds = {layer.name: layer.kind for layer in layers}
    tensors = _layer_tensors(func, layers)
    inst, order = _instrumented(mod, tensors)

    start = time.perf_counter()
    exe = build(inst) if build is not None else tvm.compile(inst, target="llvm")
    vm = relax.VirtualMachine(exe, tvm.cpu())
    log.info("calibration module compiled in %.1f s", time.perf_counter() - start)

    def run(sample: dict[str, np.ndarray]) -> list[np.ndarray]:
        args = [tvm.runtime.tensor(sample[p.name]) for p in func.params]
        result = vm["main"](*args)
        return [result[i].numpy() for i in range(1, len(result))]

    # Pass 1: ranges. Pass 2 (below) needs the input scales, so it runs the samples again
    # rather than holding every activation of every sample in memory.
    rng = np.random.default_rng(seed)
    # Layers that read one tensor share its range: the tensor is quantized once, for all.
    observers: dict = {}
    for name in order:
        observers.setdefault(tensors[name][1], _Range(method, percentile, rng))
    in_ranges = {name: observers[tensors[name][1]] for name in order}
    out_ranges = {name: _Range(method, percentile, rng) for name in order}
    for sample in batches:
        outs = run(sample)
        fed: set[int] = set()
        for i, name in enumerate(order):
            if id(in_ranges[name]) not in fed:
                fed.add(id(in_ranges[name]))
                in_ranges[name].add(outs[2 * i])
            out_ranges[name].add(outs[2 * i + 1])

    quant = [n for n in order if kinds[n] in ("conv2d", "dense")]
    weights = {name: tensors[name][0].args[1].value.numpy().astype(np.float32) for name in quant}
    if method == "search":
        _search_ranges(run, batches, order, in_ranges, kinds, tensors, weights, rng)

    stats = CalibrationStats(method=method, percentile=float(percentile), num_samples=len(batches))
    for name in order:
        label, lo, hi = in_ranges[name].bounds()
        _, out_lo, out_hi = out_ranges[name].bounds()
        scale, zp = activation_qparams(lo, hi)
        stats.layers[name] = LayerStats(
            name=name,
            kind=kinds[name],
            input_min=lo,
            input_max=hi,
            input_scale=scale,
            input_zero_point=zp,
            output_min=out_lo,
            output_max=out_hi,
            input_range=label,
        )

    # Last pass: per-channel signal and int8 error of every conv/dense layer.
    for name in quant:
        w = weights[name]
        axis = 0 if kinds[name] == "conv2d" else 1
        wq, ws = quantize_weight(w, axis)
        shape = [1] * w.ndim
        shape[axis] = -1
        weights[name] = (w, (wq * ws.reshape(shape)).astype(np.float32))
        stats.layers[name].signal = [0.0] * w.shape[axis]
        stats.layers[name].noise = [0.0] * w.shape[axis]
    if quant:
        for sample in batches:
            outs = run(sample)
            for i, name in enumerate(order):
                if name not in weights:
                    continue
                entry = stats.layers[name]
                x = outs[2 * i].astype(np.float32)
                scale, zp = entry.input_scale, entry.input_zero_point
                xq = (quantize_activation(x, scale, zp).astype(np.float32) - zp) * np.float32(scale)
                w, wdq = weights[name]
                ref = _layer_result(kinds[name], tensors[name][0], x, w).astype(np.float64)
                got = _layer_result(kinds[name], tensors[name][0], xq, wdq).astype(np.float64)
                reduce = (0, 2, 3) if ref.ndim == 4 else tuple(a for a in range(ref.ndim) if a != 1)
                # Each sample weighs the same: one loud sample must not hide the others' error.
                weight = 1.0 / max(float((ref**2).sum()), 1e-30)
                sig = (ref**2).sum(axis=reduce) * weight
                err = ((got - ref) ** 2).sum(axis=reduce) * weight
                entry.signal = [a + float(b) for a, b in zip(entry.signal, sig, strict=True)]
                entry.noise = [a + float(b) for a, b in zip(entry.noise, err, strict=True)]
    log.info("calibrated %d layers on %d samples", len(order), len(batches))
    return stats


def _search_ranges(run, batches, order, in_ranges, kinds, tensors, weights, rng) -> None:
    """The "search" method's extra pass: score each tensor's candidate ranges on the samples
    and keep the best (see :class:`_RangeSearch`)."""
    observers, readers, slot = {}, {}, {}
    for i, name in enumerate(order):
        key = id(in_ranges[name])
        slot.setdefault(key, i)
        if name in weights:  # tensors only pooling reads keep the default range
            observers[key] = in_ranges[name]
            readers.setdefault(key, []).append((kinds[name], tensors[name][0], weights[name]))
    search = _RangeSearch(observers, readers, rng)
    for sample in batches:
        outs = run(sample)
        for key in readers:
            search.add(key, outs[2 * slot[key]])
    search.choose()
