#!/usr/bin/env python3
"""Fuzz the ONNX frontend and the compiler with mutated models; every case must end in success
or ``MuLayerError``, never another exception, a hang or a crash.

Hypothesis draws each case: a valid seed model (small nets built with mulayer's zoo builder and
the onnx helper API, plus the zoo's ``tiny``) and one or two mutations of it: input/output
shapes and ranks, node attributes (changed, dropped, added, wrong type), element types of inputs
and initializers, initializer shapes and data (truncated), dropped initializers and nodes,
cycles, rewired edges, renamed ops, opset versions, and byte-level damage to the file. Hypothesis
runs generation only (no shrinking): a failing case is saved for ``--replay`` instead.

Cases run in worker processes (``--workers``), each case written to a file and imported with
``mulayer.frontend.onnx_import.import_onnx``; every ``--compile-every``-th case is also compiled
with ``mulayer.compile`` (alternately for ``llvm`` and ``mulayer -ratio=0.5, llvm, llvm``) and, when
that succeeds, run once on random inputs and compared with onnxruntime where onnxruntime accepts the
model (a difference beyond the target's tolerance is a "wrong" case: silently wrong numbers). A
worker that dies is a crash, one that runs past ``--timeout`` (``--compile-timeout``) a hang: the
case fails, the worker is replaced and the run goes on.

Examples
--------
    python scripts/fuzz_onnx.py                          # 10,000 cases, 2 workers
    python scripts/fuzz_onnx.py --cases 500 --json fuzz.json
    python scripts/fuzz_onnx.py --replay fuzz-failures/case-00042.onnx --compile llvm

Exit code 0 when no case failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

COMPILE_TARGETS = ("llvm", "mulayer -ratio=0.5, llvm, llvm")
OUTCOMES = ("ok", "error", "exception", "wrong", "crash", "hang")  # the last four fail the run
FAILURES = ("exception", "wrong", "crash", "hang")
MAX_RUN_ELEMENTS = 1 << 20  # compiled cases with larger inputs are built but not run
# Largest error against onnxruntime, relative to the largest output value: fp32 on llvm; the
# cooperative build computes its "GPU" half in fp16.
RTOL = {"llvm": 1e-3, "mulayer -ratio=0.5, llvm, llvm": 2e-2}
RESTART_EVERY = 1000  # cases per worker before a fresh one (bounds any slow leak)


# ------------------------------------------------------------------------------ seed models
def _seed_conv_relu() -> onnx.ModelProto:
    from mulayer.models.zoo import GraphBuilder

    b = GraphBuilder((1, 3, 8, 8), 0)
    return b.finish(b.relu(b.conv("input", "conv", 4, 3), "relu"), "conv_relu")


def _seed_conv_bn_pool_gemm() -> onnx.ModelProto:
    from mulayer.models.zoo import GraphBuilder

    b = GraphBuilder((1, 3, 8, 8), 1)
    x = b.relu(b.conv_bn("input", "conv", "bn", 8, 3), "relu")
    x = b.flatten(b.maxpool(x, "pool", 2, 2), "flatten")
    return b.finish(b.gemm(x, "fc", 5), "conv_bn_pool_gemm")


def _seed_residual_concat() -> onnx.ModelProto:
    from mulayer.models.zoo import GraphBuilder

    b = GraphBuilder((1, 4, 8, 8), 2)
    a = b.relu(b.conv("input", "a", 4, 3), "a.relu")
    x = b.add("input", b.conv(a, "b", 4, 1), "add")
    x = b.concat([x, b.conv(x, "c", 4, 3, groups=2)], "cat")
    x = b.flatten(b.global_avgpool(b.avgpool(x, "pool", 2, 2), "gap"), "flatten")
    return b.finish(b.gemm(x, "fc", 3), "residual_concat")


def _seed_depthwise() -> onnx.ModelProto:
    from mulayer.models.zoo import GraphBuilder

    b = GraphBuilder((1, 8, 6, 6), 3)
    x = b.relu6(b.conv("input", "dw", 8, 3, groups=8), "dw.relu6")
    return b.finish(b.relu(b.conv(x, "pw", 8, 1, stride=2), "pw.relu"), "depthwise")


def _seed_misc() -> onnx.ModelProto:
    """Transpose, Reshape, MatMul, Softmax, Mul, Sigmoid: ops with axis/perm attributes."""
    rng = np.random.default_rng(4)
    inits = [
        numpy_helper.from_array(np.array([1, 36, 4], "int64"), "shape"),
        numpy_helper.from_array(rng.standard_normal((4, 6)).astype("float32"), "w"),
        numpy_helper.from_array(rng.standard_normal((6,)).astype("float32"), "scale"),
    ]
    nodes = [
        helper.make_node("Transpose", ["input"], ["t"], name="transpose", perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["t", "shape"], ["r"], name="reshape"),
        helper.make_node("MatMul", ["r", "w"], ["m"], name="matmul"),
        helper.make_node("Softmax", ["m"], ["s"], name="softmax", axis=-1),
        helper.make_node("Mul", ["s", "scale"], ["p"], name="mul"),
        helper.make_node("Sigmoid", ["p"], ["logits"], name="sigmoid"),
    ]
    graph = helper.make_graph(
        nodes,
        "misc",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 36, 6])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _seed_tiny() -> onnx.ModelProto:
    from mulayer.models.zoo import build_model

    return build_model("tiny")


SEED_BUILDERS = {
    "conv_relu": _seed_conv_relu,
    "conv_bn_pool_gemm": _seed_conv_bn_pool_gemm,
    "residual_concat": _seed_residual_concat,
    "depthwise": _seed_depthwise,
    "misc": _seed_misc,
    "tiny": _seed_tiny,  # 25 nodes: its import takes ~1 s, so it is drawn less often
}
SEED_WEIGHTS = {"tiny": 1}  # others: 3


# -------------------------------------------------------------------------------- mutations
ATTRIBUTE_NAMES = (
    "kernel_shape", "pads", "strides", "dilations", "group", "axis", "perm", "alpha", "beta",
    "transA", "transB", "epsilon", "auto_pad", "ceil_mode", "count_include_pad", "keepdims",
    "min", "max", "bogus_attribute",
)  # fmt: skip
ELEM_TYPES = (
    TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT8,
    TensorProto.UINT8, TensorProto.INT32, TensorProto.INT64, TensorProto.BOOL, TensorProto.STRING,
    TensorProto.COMPLEX64, TensorProto.BFLOAT16, TensorProto.UNDEFINED, 99,
)  # fmt: skip
OP_TYPES = (
    "Relu", "Sigmoid", "Conv", "MatMul", "Gemm", "Add", "MaxPool", "Concat", "Flatten",
    "Softmax", "Identity", "Reshape", "Transpose", "BatchNormalization", "MadeUpOp",
)  # fmt: skip
DIM_VALUES = (0, -1, 1, 2, 3, 5, 8, 64, 1 << 20)
OPSETS = (1, 7, 11, 13, 17, 18, 21, 99)


def _st():
    from hypothesis import strategies

    return strategies


def _ints(data, lo: int, hi: int) -> int:
    return data.draw(_st().integers(lo, hi))


def _pick(data, items):
    return data.draw(_st().sampled_from(list(items)))


def _attr_value(data, name: str):
    st = _st()
    kind = _pick(data, ("ints", "int", "float", "string", "tensor"))
    small = st.one_of(st.integers(-2, 9), st.sampled_from([0, 1 << 31, -(1 << 31), 1 << 62]))
    if kind == "ints":
        values = data.draw(st.lists(small, max_size=6))
        return helper.make_attribute(name, values, attr_type=onnx.AttributeProto.INTS)
    if kind == "int":
        return helper.make_attribute(name, data.draw(small))
    if kind == "float":
        value = data.draw(st.one_of(st.floats(allow_nan=True), st.sampled_from([0.0, -1.0])))
        return helper.make_attribute(name, value)
    if kind == "string":
        return helper.make_attribute(name, _pick(data, ("SAME_UPPER", "VALID", "NOTSET", "x")))
    return helper.make_attribute(name, numpy_helper.from_array(np.zeros(2, "float32")))


def _tensor_names(model: onnx.ModelProto) -> list[str]:
    names = [v.name for v in model.graph.input] + [i.name for i in model.graph.initializer]
    return names + [o for node in model.graph.node for o in node.output]


def mutate_input_shape(model, data) -> str:
    value = _pick(data, list(model.graph.input) + list(model.graph.output))
    dims = value.type.tensor_type.shape.dim
    action = _pick(data, ("spatial", "set", "symbolic", "add", "drop", "clear"))
    if action == "spatial" and len(dims) == 4:  # another image size: often still valid
        for dim in dims[2:]:
            dim.dim_value = _ints(data, 1, 12)
        if data.draw(_st().booleans()):  # as a re-export would: no stale intermediate shapes
            del model.graph.value_info[:]
            for output in model.graph.output:
                output.type.tensor_type.ClearField("shape")
    elif action == "clear":
        value.type.tensor_type.ClearField("shape")
    elif action == "add":
        dims.add().dim_value = _pick(data, DIM_VALUES)
    elif dims and action == "drop":
        del dims[_ints(data, 0, len(dims) - 1)]
    elif dims:
        dim = dims[_ints(data, 0, len(dims) - 1)]
        if action == "symbolic":
            dim.dim_param = _pick(data, ("N", "batch", ""))
        else:
            dim.dim_value = _pick(data, DIM_VALUES)
    return f"shape {action} {value.name}"


def mutate_attribute(model, data) -> str:
    if not model.graph.node:
        return "attribute (no node)"
    node = _pick(data, model.graph.node)
    action = _pick(data, ("set", "drop", "add"))
    names = [a.name for a in node.attribute]
    if action == "drop" and names:
        index = _ints(data, 0, len(names) - 1)
        del node.attribute[index]
        return f"attribute drop {node.name}.{names[index]}"
    name = _pick(data, names) if action == "set" and names else _pick(data, ATTRIBUTE_NAMES)
    old = next((a for a in node.attribute if a.name == name), None)
    mild = old is not None and old.type == onnx.AttributeProto.INTS and data.draw(_st().booleans())
    if mild:  # same length, small values: often still a valid model, so the build runs
        values = data.draw(
            _st().lists(_st().integers(0, 3), min_size=len(old.ints), max_size=len(old.ints))
        )
        new = helper.make_attribute(name, values, attr_type=onnx.AttributeProto.INTS)
    else:
        new = _attr_value(data, name)
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend([*kept, new])
    return f"attribute {'mild ' if mild else ''}set {node.name}.{name}"


def mutate_elem_type(model, data) -> str:
    target = _pick(data, ("input", "output", "initializer"))
    elem = _pick(data, ELEM_TYPES)
    if target == "initializer" and model.graph.initializer:
        init = _pick(data, model.graph.initializer)
        if data.draw(_st().booleans()):  # convert the data: a valid tensor of another type
            array = numpy_helper.to_array(init)
            dtype = _pick(data, ("float16", "float64", "int8", "int32", "int64", "bool"))
            init.CopyFrom(numpy_helper.from_array(array.astype(dtype), init.name))
            return f"initializer {init.name} converted to {dtype}"
        init.data_type = elem  # the bytes stay: they no longer match the type
        return f"initializer {init.name} retyped to {elem}"
    values = model.graph.input if target == "input" else model.graph.output
    value = _pick(data, values)
    value.type.tensor_type.elem_type = elem
    return f"{target} {value.name} elem_type {elem}"


def mutate_initializer(model, data) -> str:
    if not model.graph.initializer:
        return "initializer (none)"
    index = _ints(data, 0, len(model.graph.initializer) - 1)
    init = model.graph.initializer[index]
    action = _pick(data, ("drop", "truncate", "reshape", "dims"))
    if action == "drop":
        del model.graph.initializer[index]
    elif action == "truncate":
        array = numpy_helper.to_array(init)
        raw = array.tobytes()
        init.ClearField("float_data")
        init.ClearField("int64_data")
        init.raw_data = raw[: _ints(data, 0, max(0, len(raw) - 1))]
    elif action == "reshape":  # same data, another valid shape
        array = numpy_helper.to_array(init)
        shape = _pick(data, ((array.size,), (1, array.size), (array.size, 1)))
        init.CopyFrom(numpy_helper.from_array(array.reshape(shape), init.name))
    else:  # dims that do not match the data
        del init.dims[:]
        init.dims.extend(data.draw(_st().lists(_st().sampled_from(DIM_VALUES), max_size=4)))
    return f"initializer {action} {init.name}"


def mutate_graph(model, data) -> str:
    nodes = model.graph.node
    if not nodes:
        return "graph (no node)"
    action = _pick(data, ("cycle", "rewire", "drop_node", "duplicate", "op_type", "drop_input"))
    i = _ints(data, 0, len(nodes) - 1)
    node = nodes[i]
    if action == "cycle":  # read an output of this node or a later one: no topological order
        later = nodes[_ints(data, i, len(nodes) - 1)]
        if node.input:
            node.input[_ints(data, 0, len(node.input) - 1)] = later.output[0]
    elif action == "rewire" and node.input:
        names = _tensor_names(model) + ["", "nowhere"]
        node.input[_ints(data, 0, len(node.input) - 1)] = _pick(data, names)
    elif action == "drop_node":
        del nodes[i]
    elif action == "duplicate":  # two producers of one name
        nodes.append(onnx.NodeProto())
        nodes[-1].CopyFrom(node)
        nodes[-1].name = f"{node.name}.copy"
    elif action == "op_type":
        node.op_type = _pick(data, OP_TYPES)
    elif action == "drop_input" and node.input:
        del node.input[_ints(data, 0, len(node.input) - 1)]
    return f"graph {action} {node.name}"


def mutate_model(model, data) -> str:
    action = _pick(data, ("opset", "ir_version", "no_outputs", "no_inputs", "domain"))
    if action == "opset":
        model.opset_import[0].version = _pick(data, OPSETS)
    elif action == "ir_version":
        model.ir_version = _pick(data, (0, 3, 7, 10, 99))
    elif action == "no_outputs":
        del model.graph.output[:]
    elif action == "no_inputs":
        del model.graph.input[:]
    elif model.graph.node:
        _pick(data, model.graph.node).domain = _pick(data, ("com.example", "ai.onnx.ml"))
    return f"model {action}"


MUTATORS = {
    "shape": mutate_input_shape,
    "attribute": mutate_attribute,
    "elem_type": mutate_elem_type,
    "initializer": mutate_initializer,
    "graph": mutate_graph,
    "model": mutate_model,
}


def _mutate(model: onnx.ModelProto, data) -> str:
    kind = _pick(data, MUTATORS)
    try:
        return MUTATORS[kind](model, data)
    except Exception as err:  # an earlier mutation left nothing this one can work on
        return f"{kind} skipped ({type(err).__name__})"


def damage_bytes(blob: bytes, data) -> tuple[bytes, str]:
    """Byte-level damage of the serialized file (truncation, flipped bytes, empty)."""
    action = _pick(data, ("none",) * 27 + ("truncate", "flip", "empty"))
    if action == "truncate":
        return blob[: _ints(data, 0, len(blob) - 1)], "bytes truncated"
    if action == "flip":
        out = bytearray(blob)
        for _ in range(_ints(data, 1, 8)):
            out[_ints(data, 0, len(out) - 1)] ^= _ints(data, 1, 255)
        return bytes(out), "bytes flipped"
    if action == "empty":
        return b"", "bytes empty"
    return blob, ""


# ---------------------------------------------------------------------------------- workers
def run_case(path: str, target: str | None) -> tuple[str, str]:
    """Import (and with ``target``, compile and run) one model file: ``(outcome, message)``."""
    import warnings

    from mulayer import MuLayerError
    from mulayer.compiler.driver import compile_model
    from mulayer.frontend.onnx_import import import_onnx

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if target is None:
                import_onnx(path)
                return "ok", ""
            compiled = compile_model(path, target)
            wrong = compare_with_onnxruntime(compiled, path, RTOL[target])
    except MuLayerError as err:
        return "error", str(err)
    except Exception as err:  # the failures this fuzzer looks for
        return "exception", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"
    return ("wrong", wrong) if wrong else ("ok", "")


def compare_with_onnxruntime(compiled, path: str, rtol: float) -> str:
    """Run a compiled case once; "" if it matches onnxruntime (or onnxruntime refuses the model,
    so there is nothing to compare with), else what differs."""
    from mulayer.models.reference import max_rel_error, onnxruntime_outputs
    from mulayer.runtime.executor import LoadedModel

    if sum(int(np.prod(spec.shape)) for spec in compiled.inputs) > MAX_RUN_ELEMENTS:
        return ""
    model = LoadedModel(compiled.executable, compiled.metadata(), compiled.inputs, compiled.outputs)
    inputs = model.random_inputs(0)
    try:
        expected = onnxruntime_outputs(path, inputs)
    except Exception:  # onnxruntime refuses the model: nothing to compare with
        return ""
    got = list(model(inputs).values())
    if [g.shape for g in got] != [np.shape(e) for e in expected]:
        return (
            f"output shapes {[g.shape for g in got]}, onnxruntime {[np.shape(e) for e in expected]}"
        )
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        both_finite = np.isfinite(g) == np.isfinite(e)
        if not both_finite.all():
            return f"output {i}: NaN/Inf where onnxruntime has none (or the reverse)"
        finite = np.isfinite(e)
        if finite.any() and max_rel_error(g[finite], e[finite]) > rtol:
            return f"output {i}: max relative error {max_rel_error(g[finite], e[finite]):.3g}"
    return ""


def _worker_main(conn, runner=run_case) -> None:
    """Serve cases from ``conn`` until it closes: receive (bytes, target), send the outcome of
    ``runner(path, target)``."""
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    # TVM prints warnings and IR dumps on bad models: keep the run's output readable.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    import mulayer.frontend.onnx_import  # noqa: F401 - pay the import before the first case's clock

    conn.send("ready")
    with tempfile.TemporaryDirectory(prefix="fuzz-worker-") as tmp:
        path = os.path.join(tmp, "case.onnx")
        while True:
            try:
                blob, target = conn.recv()
            except EOFError:
                return
            with open(path, "wb") as handle:
                handle.write(blob)
            start = time.perf_counter()
            outcome, message = runner(path, target)
            conn.send((outcome, message, time.perf_counter() - start))


class Worker:
    """One worker process; replaced after a crash, a hang or ``RESTART_EVERY`` cases.

    ``runner`` must be importable in a fresh interpreter (the workers are spawned).
    """

    def __init__(self, context, runner=run_case) -> None:
        self.context = context
        self.runner = runner
        self.process = None
        self.conn = None
        self.served = 0

    def start(self) -> None:
        parent, child = self.context.Pipe()
        self.process = self.context.Process(
            target=_worker_main, args=(child, self.runner), daemon=True
        )
        self.process.start()
        child.close()
        self.conn = parent
        if not self.conn.poll(300) or self.conn.recv() != "ready":
            raise RuntimeError("a fuzz worker did not start within 300 s")
        self.served = 0

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.join()
            self.conn.close()
            self.process = None

    def run(self, blob: bytes, target: str | None, timeout: float) -> tuple[str, str, float]:
        if self.process is None or self.served >= RESTART_EVERY:
            self.stop()
            self.start()
        self.served += 1
        start = time.perf_counter()
        self.conn.send((blob, target))
        try:
            ready = self.conn.poll(timeout)
            result = self.conn.recv() if ready else None
        except (EOFError, ConnectionResetError):
            ready, result = True, None
        if result is not None:
            return result
        self.process.join(1)
        code = self.process.exitcode
        self.stop()
        seconds = time.perf_counter() - start
        if not ready:
            return "hang", f"no result within {timeout:g} s", seconds
        return "crash", f"the worker died (exit code {code})", seconds


# -------------------------------------------------------------------------------- the run
@dataclass
class Case:
    index: int
    seed: str
    mutations: list[str]
    blob: bytes
    target: str | None


@dataclass
class Report:
    cases: int = 0
    outcomes: Counter = field(default_factory=Counter)
    compiled: Counter = field(default_factory=Counter)  # outcome of the compiled cases
    errors: Counter = field(default_factory=Counter)  # MuLayerError messages, normalised
    failures: list[dict] = field(default_factory=list)
    case_seconds: float = 0.0
    wall_seconds: float = 0.0

    def to_json(self) -> dict:
        return {
            "cases": self.cases,
            "outcomes": {name: self.outcomes[name] for name in OUTCOMES},
            "compiled": {name: self.compiled[name] for name in OUTCOMES},
            "failed": sum(self.outcomes[name] for name in FAILURES),
            "wall_seconds": round(self.wall_seconds, 1),
            "case_seconds": round(self.case_seconds, 1),
            "top_errors": self.errors.most_common(15),
            "failures": self.failures,
        }


def _error_key(message: str) -> str:
    """A MuLayerError message without its variable parts, to count kinds of errors."""
    import re

    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", message.splitlines()[0])
    return re.sub(r"-?\d+", "N", text)[:110]


def _seed_models() -> dict[str, bytes]:
    return {name: build().SerializeToString() for name, build in SEED_BUILDERS.items()}


def generate(cases: int, seed: int, compile_every: int, emit) -> None:
    """Draw ``cases`` cases with Hypothesis and pass each to ``emit(Case)``."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis import strategies as st

    seeds = _seed_models()
    weighted = [name for name in seeds for _ in range(SEED_WEIGHTS.get(name, 3))]
    counter = iter(range(cases))

    @hypothesis_seed(seed)
    @settings(
        max_examples=cases,
        phases=[Phase.generate],
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def one_case(data) -> None:
        name = data.draw(st.sampled_from(weighted))
        model = onnx.load_from_string(seeds[name])
        mutations = [_mutate(model, data) for _ in range(_ints(data, 1, 2))]
        blob, damage = damage_bytes(model.SerializeToString(), data)
        if damage:
            mutations.append(damage)
        # Hypothesis may call this more often than max_examples (its own retries): the draws
        # above must not depend on the count, so the extra calls are dropped only here.
        index = next(counter, None)
        if index is None:
            return
        target = None
        if compile_every and index % compile_every == 0:
            target = COMPILE_TARGETS[(index // compile_every) % len(COMPILE_TARGETS)]
        emit(Case(index, name, mutations, blob, target))

    one_case()


def fuzz(args: argparse.Namespace) -> Report:
    report = Report()
    lock = threading.Lock()
    work: queue.Queue = queue.Queue(maxsize=4 * args.workers)
    context = mp.get_context("spawn")
    failures_dir = Path(args.failures_dir)
    errors_log = open(args.errors_log, "w") if args.errors_log else None  # noqa: SIM115
    start = time.perf_counter()

    def record(case: Case, outcome: str, message: str, seconds: float) -> None:
        with lock:
            report.cases += 1
            report.outcomes[outcome] += 1
            report.case_seconds += seconds
            if case.target is not None:
                report.compiled[outcome] += 1
            if outcome == "error":
                report.errors[_error_key(message)] += 1
                if errors_log is not None:
                    errors_log.write(json.dumps({"case": case.index, "message": message}) + "\n")
            if outcome in FAILURES:
                failures_dir.mkdir(parents=True, exist_ok=True)
                path = failures_dir / f"case-{case.index:05d}.onnx"
                path.write_bytes(case.blob)
                entry = {
                    "case": case.index,
                    "outcome": outcome,
                    "seed": case.seed,
                    "mutations": case.mutations,
                    "target": case.target,
                    "file": str(path),
                    "message": message,
                }
                path.with_suffix(".json").write_text(json.dumps(entry, indent=1))
                report.failures.append({**entry, "message": message.splitlines()[0][:300]})
                print(f"FAIL case {case.index}: {outcome}: {message.splitlines()[0][:200]}")
            if args.progress and report.cases % args.progress == 0:
                elapsed = time.perf_counter() - start
                counts = " ".join(f"{k}={report.outcomes[k]}" for k in OUTCOMES)
                print(f"{report.cases}/{args.cases} cases, {elapsed:.0f} s: {counts}", flush=True)

    def serve() -> None:
        worker = Worker(context)
        try:
            while (case := work.get()) is not None:
                timeout = args.timeout if case.target is None else args.compile_timeout
                try:
                    result = worker.run(case.blob, case.target, timeout)
                except Exception as err:  # a worker that cannot start: fail the case, go on
                    worker.stop()
                    result = ("crash", f"worker error: {err}", 0.0)
                record(case, *result)
        finally:
            worker.stop()

    threads = [threading.Thread(target=serve, daemon=True) for _ in range(args.workers)]
    for thread in threads:
        thread.start()
    try:
        generate(args.cases, args.seed, args.compile_every, work.put)
    finally:
        for _ in threads:
            work.put(None)
        for thread in threads:
            thread.join()
        if errors_log is not None:
            errors_log.close()
    report.wall_seconds = time.perf_counter() - start
    return report


def replay(path: str, target: str | None) -> int:
    """Run one saved case in this process, with the full traceback of a failure."""
    outcome, message = run_case(path, target)
    print(f"{outcome}: {message}" if message else outcome)
    return 0 if outcome in ("ok", "error") else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python scripts/fuzz_onnx.py --cases 500 --json fuzz.json",
    )
    parser.add_argument("--cases", type=int, default=10_000, help="cases to run (10000)")
    parser.add_argument("--seed", type=int, default=0, help="Hypothesis seed (0)")
    parser.add_argument(
        "--compile-every", type=int, default=5, help="also compile every K-th case (5; 0: none)"
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds per import case (60)")
    parser.add_argument(
        "--compile-timeout", type=float, default=300, help="seconds per compiled case (300)"
    )
    parser.add_argument(
        "--failures-dir", default="fuzz-failures", help="where failing cases are saved"
    )
    parser.add_argument("--json", help="write the report as JSON to this file")
    parser.add_argument("--errors-log", help="write every MuLayerError message (JSON lines) here")
    parser.add_argument("--progress", type=int, default=500, help="print counts every N cases")
    parser.add_argument("--replay", metavar="FILE.onnx", help="run one saved case in-process")
    parser.add_argument("--compile", metavar="TARGET", help="with --replay: compile for TARGET too")
    args = parser.parse_args(argv)
    if args.cases < 1 or args.workers < 1 or args.compile_every < 0:
        parser.error("--cases and --workers must be positive, --compile-every 0 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replay:
        return replay(args.replay, args.compile)
    report = fuzz(args)
    result = report.to_json()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    counts = ", ".join(f"{name} {result['outcomes'][name]}" for name in OUTCOMES)
    compiled = ", ".join(f"{name} {result['compiled'][name]}" for name in OUTCOMES)
    print(
        f"{result['cases']} cases in {result['wall_seconds']:.0f} s ({args.workers} workers): "
        f"{counts}; compiled cases: {compiled}"
    )
    print(f"failed: {result['failed']}")
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
