"""Checks of an ONNX model beyond ``onnx.checker``: what TVM's import and build would otherwise
trip over much later, with an unclear error or none (found by ``scripts/fuzz_onnx.py``).

Each raises ``MuLayerError`` naming the node, tensor or value at fault. The checks of the model
file run before TVM is involved (:func:`mulayer.frontend.onnx_import.load_onnx`); the last two look
at the imported Relax module (:func:`mulayer.frontend.onnx_import.import_onnx`).
"""

from __future__ import annotations

import math

import onnx

from ..errors import MuLayerError
from ..tensor_spec import TensorSpec


def check_names(proto: onnx.ModelProto) -> None:
    """Refuse names that are not valid UTF-8: a damaged file the parser accepts, whose names
    then read as ``bytes`` (or raise ``UnicodeDecodeError``, by protobuf backend) and fail
    wherever they are used."""
    graph = proto.graph
    try:
        names = [graph.name, *(opset.domain for opset in proto.opset_import)]
        for node in graph.node:
            names += [node.name, node.op_type, node.domain, *node.input, *node.output]
            names += [attr.name for attr in node.attribute]
        for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
            names.append(value.name)
        bad = next((name for name in names if not isinstance(name, str)), None)
    except UnicodeDecodeError as err:
        bad = err.object
    if bad is not None:
        raise MuLayerError(
            f"the ONNX model is invalid: the name {bad!r} is not valid UTF-8 (is the file damaged?)"
        )


_WINDOW_OPS = ("Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool")
# Smallest valid value of each window attribute; all must stay below _WINDOW_LIMIT (TVM's shape
# arithmetic wraps around at 2**31: a pad of -2**31 gave an output of a "valid" size).
_WINDOW_MINIMA = {"pads": 0, "strides": 1, "dilations": 1, "kernel_shape": 1}
_WINDOW_LIMIT = 1 << 16


def check_window_attributes(proto: onnx.ModelProto) -> None:
    """Refuse conv/pool nodes whose pads, strides, dilations or kernel sizes are out of range
    (the checker does not look at attribute values)."""
    for node in proto.graph.node:
        if node.op_type not in _WINDOW_OPS:
            continue
        for attr in node.attribute:
            low = _WINDOW_MINIMA.get(attr.name)
            if low is None:
                continue
            values = list(attr.ints)
            if any(not low <= v < _WINDOW_LIMIT for v in values):
                raise MuLayerError(
                    f"the ONNX model is invalid: node {node.name or node.op_type!r} "
                    f"({node.op_type}) has {attr.name} {values}; each must be in "
                    f"[{low}, {_WINDOW_LIMIT})"
                )


def check_graph_order(proto: onnx.ModelProto) -> None:
    """Every node must read only graph inputs, weights and outputs of earlier nodes (the checker
    says so too, but stops earlier on a missing output shape, which is let pass above)."""
    known = {value.name for value in proto.graph.input}
    known |= {init.name for init in proto.graph.initializer}
    known.add("")  # an omitted optional input
    for node in proto.graph.node:
        for name in node.input:
            if name not in known:
                raise MuLayerError(
                    f"the ONNX model is invalid: node {node.name or node.op_type!r} reads "
                    f"{name!r} before any node computes it (a cycle, nodes out of order, or a "
                    "missing input or weight)"
                )
        known.update(node.output)
    missing = [value.name for value in proto.graph.output if value.name not in known]
    if missing:
        raise MuLayerError(
            f"the ONNX model is invalid: graph output(s) {', '.join(map(repr, missing))} are "
            "computed by no node"
        )


# Initializers above this size are given to type inference as typed inputs without their data.
_INFERENCE_DATA_BYTES = 4096


def check_types(proto: onnx.ModelProto) -> None:
    """Run ONNX type inference: it refuses, e.g., a Clip whose bounds' type is not its input's,
    which the checker lets pass and which the build would only trip over much later.

    Inference runs on a copy without the large weights (serialising a 500 MB model costs
    seconds); small initializers such as Reshape shapes keep their data.
    """
    from onnx import helper, shape_inference

    graph = proto.graph
    small = [init for init in graph.initializer if init.ByteSize() <= _INFERENCE_DATA_BYTES]
    kept = {init.name for init in small}
    declared = {value.name for value in graph.input}
    weights = [
        helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
        for init in graph.initializer
        if init.name not in kept and init.name not in declared
    ]
    light = helper.make_graph(
        list(graph.node),
        graph.name or "graph",
        [*graph.input, *weights],
        list(graph.output),
        small,
        value_info=list(graph.value_info),
    )
    copy = helper.make_model(light, opset_imports=list(proto.opset_import))
    copy.ir_version = proto.ir_version
    try:
        shape_inference.infer_shapes(copy, check_type=True)
    except Exception as err:  # onnx.shape_inference.InferenceError and friends
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MuLayerError(f"the ONNX model is invalid: {first}") from None


_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")
# Types stored one element per item of raw_data's itemsize or of a typed field (not packed 4-bit
# types, not complex pairs, not strings).
_COUNTED_TYPES = {
    getattr(onnx.TensorProto, name)
    for name in (
        "FLOAT", "FLOAT16", "BFLOAT16", "DOUBLE", "INT8", "UINT8", "INT16", "UINT16", "INT32",
        "UINT32", "INT64", "UINT64", "BOOL",
    )
}  # fmt: skip


def check_initializers(proto: onnx.ModelProto) -> None:
    """Refuse weights whose data does not hold exactly the elements their dims declare (the
    checker lets more data than declared pass; the import then fails on a numpy reshape)."""
    for init in proto.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL or init.data_type not in _COUNTED_TYPES:
            continue
        declared = math.prod(init.dims)
        if init.HasField("raw_data"):
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
            held = len(init.raw_data) / itemsize
        else:
            held = next((len(getattr(init, f)) for f in _TYPED_FIELDS if len(getattr(init, f))), 0)
        if held != declared:
            raise MuLayerError(
                f"the ONNX model is invalid: initializer {init.name!r} holds {held:g} values but "
                f"its dims {list(init.dims)} declare {declared}"
            )


def check_declared_outputs(proto: onnx.ModelProto, outputs: list[TensorSpec]) -> None:
    """Refuse a model whose declared output types or fixed dims differ from what it computes
    (the caller would otherwise get arrays other than the model promises)."""
    declared = list(proto.graph.output)
    if len(declared) != len(outputs):
        raise MuLayerError(
            f"the ONNX model declares {len(declared)} output(s) but computes {len(outputs)}"
        )
    for value, spec in zip(declared, outputs, strict=True):
        tensor_type = value.type.tensor_type
        try:
            dtype = str(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        except (KeyError, ValueError, TypeError):
            dtype = None
        if tensor_type.elem_type and dtype != spec.dtype:
            shown = dtype or tensor_type.elem_type
            raise MuLayerError(
                f"output {value.name!r} is declared as {shown} but the model computes {spec.dtype}"
            )
        if not tensor_type.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        if len(dims) != len(spec.shape) or any(
            d is not None and d != n for d, n in zip(dims, spec.shape, strict=False)
        ):
            shown = ["?" if d is None else d for d in dims]
            raise MuLayerError(
                f"output {value.name!r} is declared with shape {shown} but the model computes "
                f"{list(spec.shape)}"
            )


def check_no_empty_tensors(mod) -> None:
    """Refuse a model that computes a tensor with a zero-sized dim (e.g. an input smaller than a
    kernel): TVM's legalization raises on it, deep in the build."""
    from tvm import relax, tirx

    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            ty = binding.var.ty
            if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
                continue
            dims = [int(d) if isinstance(d, tirx.IntImm) else None for d in ty.shape.values]
            if any(d is not None and d < 1 for d in dims):
                op = getattr(getattr(binding.value, "op", None), "name", "")
                raise MuLayerError(
                    f"the model computes an empty tensor: {op or 'a node'} gives shape "
                    f"{['?' if d is None else d for d in dims]} (is an input smaller than a "
                    "kernel or a pooling window?)"
                )
