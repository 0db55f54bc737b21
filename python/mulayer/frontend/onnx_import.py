"""ONNX in, Relax out: load a model, resolve its input shapes, import it with params bound.

The result is the *canonical* form every later step expects: one ``main`` function, NCHW,
weights as constants, batch-norm folded into the preceding conv where possible (otherwise
decomposed into a per-channel multiply and add), constant sub-expressions folded (so a dense
layer reads ``matmul(x, W)`` with a constant ``W`` of shape ``[in, out]``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from pathlib import Path

import onnx

from ..errors import MuLayerError
from ..tensor_spec import TensorSpec
from . import model_checks

log = logging.getLogger(__name__)

_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.BOOL: "bool",
}


_SHAPE_ITEM = re.compile(r"^\s*([^:\s]+)\s*:\s*\[([^\]]*)\]\s*$")


def parse_input_shapes(text: str | None) -> dict[str, list[int]]:
    """Parse tvmc's ``--input-shapes`` grammar: ``"name:[1,3,224,224] other:[1,10]"``."""
    if not text:
        return {}
    items = re.findall(r"[^\s,\[\]]+\s*:\s*\[[^\]]*\]", text)
    leftover = re.sub(r"[^\s,\[\]]+\s*:\s*\[[^\]]*\]", "", text).strip(" ,;")
    if leftover or not items:
        raise MuLayerError(
            f'--input-shapes {text!r} is malformed; expected e.g. "input:[1,3,224,224]" '
            "(several separated by spaces)"
        )
    shapes: dict[str, list[int]] = {}
    for item in items:
        name, dims = _SHAPE_ITEM.match(item).groups()
        try:
            shape = [int(d) for d in dims.split(",") if d.strip()]
        except ValueError:
            raise MuLayerError(
                f"--input-shapes: dims of {name!r} must be integers, got [{dims}]"
            ) from None
        if not shape or any(d <= 0 for d in shape):
            raise MuLayerError(f"--input-shapes: dims of {name!r} must be positive, got [{dims}]")
        shapes[name] = shape
    return shapes


def load_onnx(model: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    """Read and check an ONNX model, turning every failure into a clear ``MuLayerError``."""
    if isinstance(model, onnx.ModelProto):
        proto = model
    else:
        path = Path(model)
        if not path.exists():
            raise MuLayerError(f"model file {str(path)!r} does not exist")
        if path.is_dir():
            raise MuLayerError(f"model path {str(path)!r} is a directory, not an ONNX file")
        if path.stat().st_size == 0:
            raise MuLayerError(f"model file {str(path)!r} is empty")
        try:
            proto = onnx.load(str(path))
        except Exception as err:  # protobuf raises DecodeError, RuntimeError, ...
            raise MuLayerError(
                f"{str(path)!r} is not an ONNX model (it could not be parsed: {type(err).__name__})"
            ) from None
    model_checks.check_names(proto)
    if not proto.graph.node:
        raise MuLayerError("the ONNX model has no nodes (is it an ONNX file?)")
    try:
        onnx.checker.check_model(proto)
    except Exception as err:  # onnx.checker.ValidationError and friends
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        # Outputs without a declared shape are common in hand-written graphs and harmless.
        if "Field 'shape' of 'type' is required" not in first:
            raise MuLayerError(f"the ONNX model is invalid: {first}") from None
    model_checks.check_graph_order(proto)
    model_checks.check_window_attributes(proto)
    model_checks.check_initializers(proto)
    model_checks.check_types(proto)
    return proto


def _check_supported_ops(proto: onnx.ModelProto) -> None:
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    supported = set(_get_convert_map()) | {"Constant", "If"}
    for node in proto.graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise MuLayerError(
                f"unsupported op {node.domain}::{node.op_type} at node {node.name!r}: only the "
                "default ONNX domain is supported"
            )
        if node.op_type not in supported:
            raise MuLayerError(
                f"unsupported op {node.op_type!r} at node {node.name or '(unnamed)'!r}; "
                "TVM's ONNX frontend converts the standard ONNX ops (e.g. Conv, Gemm, Relu, "
                "MaxPool, Concat, Add)"
            )


def graph_inputs(
    proto: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None
) -> list[TensorSpec]:
    """The model's real inputs (initializers excluded) with every dim resolved."""
    input_shapes = dict(input_shapes or {})
    initializers = {init.name for init in proto.graph.initializer}
    specs = []
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = _ONNX_DTYPES.get(tensor_type.elem_type)
        if dtype is None:
            raise MuLayerError(
                f"input {value.name!r} has an unsupported element type {tensor_type.elem_type}; "
                f"supported: {', '.join(sorted(set(_ONNX_DTYPES.values())))}"
            )
        given = input_shapes.pop(value.name, None)
        dims = tensor_type.shape.dim
        if given is not None:
            if len(given) != len(dims):
                raise MuLayerError(
                    f"--input-shapes gives {value.name!r} rank {len(given)} but the model's "
                    f"input has rank {len(dims)}"
                )
            for i, (want, dim) in enumerate(zip(given, dims, strict=True)):
                if dim.HasField("dim_value") and dim.dim_value > 0 and dim.dim_value != want:
                    raise MuLayerError(
                        f"--input-shapes gives {value.name!r} dim {i} = {want} but the model "
                        f"fixes it to {dim.dim_value}"
                    )
            shape = tuple(given)
        else:
            set_dims = [d.dim_value for d in dims if d.HasField("dim_value")]
            invalid = [str(d) for d in set_dims if d < 1]
            if invalid:
                raise MuLayerError(
                    f"input {value.name!r} has non-positive dims ({', '.join(invalid)}); a model "
                    "input needs sizes of at least 1"
                )
            unresolved = [(dim.dim_param or "?") for dim in dims if not dim.HasField("dim_value")]
            if unresolved:
                # An example with the fixed dims kept and the dynamic ones set to 1.
                fixed = [str(d.dim_value) if d.HasField("dim_value") else "1" for d in dims]
                example = ",".join(fixed)
                raise MuLayerError(
                    f"input {value.name!r} has dynamic dims ({', '.join(unresolved)}); give "
                    f'static ones with --input-shapes, e.g. "{value.name}:[{example}]"'
                )
            shape = tuple(dim.dim_value for dim in dims)
        specs.append(TensorSpec(value.name, shape, dtype))
    if input_shapes:
        names = ", ".join(spec.name for spec in specs)
        raise MuLayerError(
            f"--input-shapes names unknown input(s) {', '.join(input_shapes)}; "
            f"the model's inputs are {names}"
        )
    if not specs:
        raise MuLayerError("the ONNX model has no inputs")
    return specs


def check_onnx(
    model: str | Path | onnx.ModelProto, input_shapes: dict[str, list[int]] | str | None = None
) -> tuple[onnx.ModelProto, list[TensorSpec]]:
    """The checks of :func:`import_onnx` that run no TVM code: the file, the ONNX checker, the
    ops, the input shapes. Returns ``(model proto, input specs)``."""
    if isinstance(input_shapes, str):
        input_shapes = parse_input_shapes(input_shapes)
    proto = load_onnx(model)
    _check_supported_ops(proto)
    return proto, graph_inputs(proto, input_shapes)


def import_onnx(
    model: str | Path | onnx.ModelProto, input_shapes: dict[str, list[int]] | str | None = None
):
    """Load ``model`` and return ``(canonical Relax IRModule, input specs, output specs)``."""
    proto, inputs = check_onnx(model, input_shapes)
    from tvm.relax.frontend.onnx import from_onnx

    from ..errors import register_with_tvm

    register_with_tvm()  # every build starts here; its passes may raise MuLayerError

    printed = io.StringIO()  # TVM's frontend prints the failing operator's inputs (IR dumps)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
            warnings.simplefilter("ignore")
            mod = from_onnx(
                proto,
                shape_dict={spec.name: list(spec.shape) for spec in inputs},
                dtype_dict={spec.name: spec.dtype for spec in inputs},
                keep_params_in_input=False,
            )
    except MuLayerError:
        raise
    except Exception as err:  # the frontend raises many types; they all mean "bad model"
        first = _tvm_message(err)
        op = re.search(r"Error converting operator (\S+),", printed.getvalue())
        at = f" (at a {op.group(1)} node)" if op else ""
        raise MuLayerError(f"TVM's ONNX frontend could not import the model{at}: {first}") from None
    model_checks.check_no_empty_tensors(mod)
    try:
        mod = canonicalize(mod)
    except RuntimeError as err:  # TVM errors derive from RuntimeError
        raise MuLayerError(f"the imported model could not be normalised: {err}") from None
    names = [value.name for value in proto.graph.output]
    outputs = output_specs(mod, names)
    model_checks.check_declared_outputs(proto, outputs)
    return mod, inputs, outputs


def _tvm_message(err: Exception) -> str:
    """The last line of a TVM error without its IR noise (op reprs, metadata notes)."""
    text = str(err).strip()
    if not text:
        return type(err).__name__
    line = text.splitlines()[-1]
    line = line.replace("# Metadata omitted. Use show_meta=True in script() method to show it.", "")
    return re.sub(r'ir\.Op\(.*?name="([^"]+)".*?support_level=\d+\)', r"\1", line).strip()


def canonicalize(mod):
    """Fold batch-norm and constants; see the module docstring."""
    from mulayer.passes.canonicalize import canonical_form

    return canonical_form()(mod)


def output_specs(mod, names: list[str] | None = None) -> list[TensorSpec]:
    """Output shapes and dtypes of ``main``, named by ``names`` (else numbered)."""
    from tvm import relax

    ret = mod["main"].body.ty
    fields = ret.fields if isinstance(ret, relax.TupleType) else [ret]
    specs = []
    for i, field in enumerate(fields):
        shape = tuple(int(d) for d in field.shape.values)
        name = names[i] if names and len(names) == len(fields) else f"output{i}"
        specs.append(TensorSpec(name, shape, str(field.dtype)))
    return specs
