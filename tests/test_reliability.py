"""The bad-input table of docs/reliability.md: every row, run through the real command line.

Each row gives the command, the exit code and a part of the one-line message the user sees.
Every row must end in an ``error:`` line (or a ``warning:`` and success), never a traceback.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import mulayer
from mulayer.cli.main import main
from mulayer.compiler.isolation import FAULT_ENV
from mulayer.runtime.artifact import METADATA_NAME, read_metadata, write_artifact
from mulayer.runtime.fallback import CPU_LIB_NAME
from mulayer.runtime.loader import load_artifact

COOPERATIVE = "mulayer -ratio=0.5, llvm, llvm"
PLANNED = "mulayer, llvm, llvm"  # with --plan (the plan sets the ratio)
PHONE = "opencl -device=mali, llvm -mtriple=aarch64-linux-gnu"


# ------------------------------------------------------------------------------ models
def _model(nodes, inputs, inits, output=("y", None), opset=17):
    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        [helper.make_tensor_value_info(output[0], TensorProto.FLOAT, output[1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _x(shape=(1, 3, 8, 8), name="input"):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _weight(shape=(16, 3, 3, 3), name="w"):
    rng = np.random.default_rng(0)
    return numpy_helper.from_array(rng.standard_normal(shape).astype("float32"), name)


def small_model(op="Relu", domain="", input_shape=(1, 3, 8, 8), pads=(1, 1, 1, 1)):
    """Conv (16 channels) + activation + max pool: two splittable layers, builds in ~1 s."""
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=list(pads)),
        helper.make_node(op, ["c"], ["r"], name="act", domain=domain),
        helper.make_node("MaxPool", ["r"], ["y"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
    ]
    model = _model(nodes, [_x(input_shape)], [_weight()])
    if domain:
        model.opset_import.append(helper.make_opsetid(domain, 1))
    return model


def _save(model, path: Path) -> str:
    path.write_bytes(model.SerializeToString())
    return str(path)


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The valid model and artifacts the rows start from (built once)."""
    root = tmp_path_factory.mktemp("reliability")
    small = _save(small_model(), root / "small.onnx")
    artifact = root / "small.mulayer"
    mulayer.compile(small, target="llvm").export(artifact)
    return SimpleNamespace(root=root, small=small, artifact=str(artifact))


@pytest.fixture(scope="module")
def gpu_files(files):
    """A CUDA artifact with a CPU fallback library, and the same without it (compiling for
    CUDA needs no GPU; running does)."""
    from mulayer.cli.compile_cmd import build_artifact

    with_fallback = files.root / "gpu.mulayer"
    build_artifact(files.small, str(with_fallback), "cuda -arch=sm_90, llvm", fallback="cpu")
    metadata, members = read_metadata(with_fallback)
    lib = files.root / "lib.so"
    lib.write_bytes(members["lib.so"])
    plain = files.root / "gpu-plain.mulayer"
    write_artifact(plain, lib, {k: v for k, v in metadata.items() if k != "fallback"})
    return SimpleNamespace(with_fallback=str(with_fallback), plain=str(plain))


def _needs_gpu_absent():
    import tvm

    if tvm.cuda(0).exist:
        pytest.skip("a CUDA GPU is present: these rows are about machines without one")


# ----------------------------------------------------------------------- helpers for rows
def _npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def _edit_artifact(src: str, dst: Path, change) -> str:
    """Copy an artifact, letting ``change(name, data) -> data`` edit members (checksums kept,
    so the edit counts as tampering)."""
    with zipfile.ZipFile(src) as archive_in, zipfile.ZipFile(dst, "w") as archive_out:
        for info in archive_in.infolist():
            archive_out.writestr(info.filename, change(info.filename, archive_in.read(info)))
        archive_out.comment = archive_in.comment
    return str(dst)


def _flip_lib(name, data):
    if name != "lib.so":
        return data
    data = bytearray(data)
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


def _edit_metadata(name, data):
    if name != METADATA_NAME:
        return data
    return json.dumps({**json.loads(data), "mode": "gpu"}).encode()


def _rewritten(src: str, dst: Path, **changes) -> str:
    """A well-formed artifact (valid checksums) whose metadata says something else."""
    import mulayer.runtime.artifact as artifact

    metadata, members = read_metadata(src)
    lib = dst.with_suffix(".so")
    lib.write_bytes(members["lib.so"])
    schema = changes.pop("schema_version", None)
    saved = artifact.ARTIFACT_SCHEMA_VERSION
    try:
        if schema is not None:
            artifact.ARTIFACT_SCHEMA_VERSION = schema
        write_artifact(dst, lib, {**metadata, **changes})
    finally:
        artifact.ARTIFACT_SCHEMA_VERSION = saved
    return str(dst)


def _plan(path: Path, **raw) -> str:
    path.write_text(json.dumps({"schema_version": 1, "default_ratio": 0.5, **raw}))
    return str(path)


# --------------------------------------------------------------------------------- rows
@dataclass
class Row:
    """One line of the table: ``argv(ctx)`` is the command (without ``mulayer``)."""

    id: str
    what: str
    argv: object
    code: int
    expect: str
    env: dict = field(default_factory=dict)
    gpu: bool = False  # needs the CUDA artifacts (and no GPU)


def _compile(model, *extra):
    return lambda c: ["compile", model(c), "-o", str(c.tmp / "out.mulayer"), *extra]


def _run(artifact, *extra):
    return lambda c: ["run", artifact(c), *extra]


ROWS = [
    # ---- the model file
    Row("model-missing", "model file missing", _compile(lambda c: str(c.tmp / "none.onnx")),
        2, "model file '{tmp}/none.onnx' does not exist"),
    Row("model-empty", "empty model file",
        _compile(lambda c: _save_bytes(c.tmp / "empty.onnx", b"")), 2, "is empty"),
    Row("model-truncated", "truncated ONNX file",
        _compile(lambda c: _save_bytes(c.tmp / "cut.onnx", Path(c.small).read_bytes()[:300])),
        2, "error: "),
    Row("model-not-onnx", "not an ONNX file (text)",
        _compile(lambda c: _save_bytes(c.tmp / "x.onnx", b"hello\n" * 20)),
        2, "is not an ONNX model (it could not be parsed"),
    Row("model-bad-utf8", "damaged file: a name that is not UTF-8",
        _compile(lambda c: _save_bytes(c.tmp / "m.onnx", _bad_utf8_name())),
        2, "the ONNX model is invalid: the name b'g\\xb3g' is not valid UTF-8"),
    Row("model-directory", "model path is a directory", _compile(lambda c: str(c.tmp)),
        2, "is a directory, not an ONNX file"),
    Row("unsupported-op", "ONNX with an unsupported op",
        _compile(lambda c: _save(small_model(op="MadeUpOp"), c.tmp / "m.onnx")),
        2, "unsupported op 'MadeUpOp' at node 'act'"),
    Row("custom-domain", "op from a custom domain",
        _compile(lambda c: _save(small_model(op="Gelu", domain="com.example"), c.tmp / "m.onnx")),
        2, "unsupported op com.example::Gelu at node 'act'"),
    Row("dynamic-dims", "dynamic input dims and no --input-shapes",
        _compile(lambda c: _save(small_model(input_shape=("N", 3, 8, 8)), c.tmp / "m.onnx")),
        2, "has dynamic dims (N); give static ones with --input-shapes"),
    Row("input-shapes-rank", "--input-shapes of the wrong rank",
        _compile(lambda c: _save(small_model(input_shape=("N", 3, 8, 8)), c.tmp / "m.onnx"),
                 "--input-shapes", "input:[1,3,8]"), 2, "rank 3 but the model's input has rank 4"),
    Row("cycle", "graph with a cycle", _compile(lambda c: _save(_cycle(), c.tmp / "m.onnx")),
        2, "node 'conv' reads 'y' before any node computes it (a cycle, nodes out of order"),
    Row("type-mismatch", "op input of the wrong element type (Clip bound int8)",
        _compile(lambda c: _save(_clip_int8(), c.tmp / "m.onnx")),
        2, "min has inconsistent type tensor(int8)"),
    Row("weights-size", "initializer data not matching its dims",
        _compile(lambda c: _save(_short_weight(), c.tmp / "m.onnx")),
        2, "initializer 'w' holds 432 values but its dims [16, 3, 3, 4] declare 576"),
    Row("input-too-small", "input smaller than the kernel",
        _compile(lambda c: _save(small_model(input_shape=(1, 3, 2, 2), pads=(0, 0, 0, 0)),
                                 c.tmp / "m.onnx")),
        2, "the model computes an empty tensor: relax.nn.conv2d gives shape [1, 16, 0, 0]"),
    # ---- inputs at run time
    Row("input-rank", "input of the wrong rank",
        _run(lambda c: c.artifact, "--inputs",
             lambda c: _npz(c.tmp / "x.npz", input=np.zeros((3, 8, 8), "float32"))),
        2, "input 'input' has shape [3, 8, 8]; the model expects [1, 3, 8, 8]"),
    Row("input-dtype", "input of the wrong dtype (complex64)",
        _run(lambda c: c.artifact, "--inputs",
             lambda c: _npz(c.tmp / "x.npz", input=np.zeros((1, 3, 8, 8), "complex64"))),
        2, "input 'input' has dtype complex64; the model expects float32"),
    Row("input-names", "inputs named differently from the model's",
        _run(lambda c: c.artifact, "--inputs",
             lambda c: _npz(c.tmp / "x.npz", image=np.zeros((1, 3, 8, 8), "float32"))),
        2, "inputs ['image'] do not match the model's inputs ['input']"),
    Row("input-nan", "NaN in the inputs",
        _run(lambda c: c.artifact, "--inputs",
             lambda c: _npz(c.tmp / "x.npz", input=_with(np.nan))),
        2, "NaN or Inf values in input(s) 'input' (1 of 192); fix the inputs, or pass "
           "--allow-nonfinite"),
    Row("input-inf-allowed", "Inf in the inputs with --allow-nonfinite",
        _run(lambda c: c.artifact, "--repeat", "1", "--allow-nonfinite", "--inputs",
             lambda c: _npz(c.tmp / "x.npz", input=_with(np.inf))),
        0, "warning: NaN or Inf values in output(s) 'y'"),
    Row("inputs-not-npz", "inputs file that is not .npz",
        _run(lambda c: c.artifact, "--inputs", lambda c: _save_bytes(c.tmp / "x.npz", b"hi")),
        2, "is not a .npz archive; write one with numpy.savez"),
    # ---- plans
    Row("plan-unknown-layer", "plan naming a layer the model does not have",
        _compile(lambda c: c.small, "--target", PLANNED, "--plan",
                 lambda c: _plan(c.tmp / "p.json", layers={"conv2d.7": {"placement": "gpu"}})),
        2, "plan does not match the model: unknown layer(s) conv2d.7; the model's splittable "
           "layers are conv2d.0, max_pool2d.0"),
    Row("plan-gpu-size", "plan splitting more channels than the layer has",
        _compile(lambda c: c.small, "--target", PLANNED, "--plan",
                 lambda c: _plan(c.tmp / "p.json", layers={
                     "conv2d.0": {"placement": "split", "gpu_size": 64}})),
        2, "plan layer 'conv2d.0': gpu_size 64 is more than the layer's 16 output channels"),
    Row("plan-ratio", "plan with an out-of-range ratio",
        _compile(lambda c: c.small, "--target", COOPERATIVE, "--plan",
                 lambda c: _plan(c.tmp / "p.json", default_ratio=1.5)),
        2, "plan ratio 1.5 is out of range: use a number in [0, 1]"),
    Row("plan-not-json", "plan file that is not JSON",
        _compile(lambda c: c.small, "--target", COOPERATIVE, "--plan",
                 lambda c: _save_bytes(c.tmp / "p.json", b"{ratio: 1")),
        2, "plan is not valid JSON"),
    Row("plan-single-target", "plan with a single-processor target",
        _compile(lambda c: c.small, "--plan", lambda c: _plan(c.tmp / "p.json")),
        2, "--plan needs a cooperative target"),
    Row("target-ratio", "target -ratio out of range",
        _compile(lambda c: c.small, "--target", "mulayer -ratio=1.5, llvm, llvm"),
        2, "mulayer -ratio='1.5' is out of range: use a number in [0, 1]"),
    # ---- targets and devices
    Row("target-kind-typo", "target with a typo in the kind",
        _compile(lambda c: c.small, "--target", "lvm"), 2, "unknown target kind 'lvm'"),
    Row("target-option-typo", "target with a typo in an option",
        _compile(lambda c: c.small, "--target", "llvm -mcpuu=znver4"), 2, "mcpuu"),
    Row("gpu-missing", "GPU artifact on a machine without the GPU",
        _run(lambda c: c.gpu.with_fallback, "--random"), 2,
        "this artifact needs a cuda device and none is present on this machine", gpu=True),
    Row("gpu-missing-fallback", "the same with --fallback cpu",
        _run(lambda c: c.gpu.with_fallback, "--random", "--repeat", "1", "--fallback", "cpu"),
        0, "warning: no cuda device on this machine: running the artifact's CPU fallback "
           "library", gpu=True),
    Row("gpu-missing-no-fallback-lib", "--fallback cpu, artifact built without one",
        _run(lambda c: c.gpu.plain, "--random", "--fallback", "cpu"),
        2, "carries no CPU fallback library: recompile it with `mulayer compile --fallback cpu`",
        gpu=True),
    # ---- artifacts
    Row("artifact-missing", "artifact missing", _run(lambda c: str(c.tmp / "no.mulayer"),
                                                     "--random"), 2, "does not exist"),
    Row("artifact-truncated", "truncated artifact",
        _run(lambda c: _save_bytes(c.tmp / "a.mulayer", Path(c.artifact).read_bytes()[:5000]),
             "--random"), 2, "is a truncated or damaged mulayer artifact"),
    Row("artifact-tampered-lib", "artifact whose library was changed",
        _run(lambda c: _edit_artifact(c.artifact, c.tmp / "a.mulayer", _flip_lib), "--random"),
        2, "is corrupt: checksum mismatch for 'lib.so'"),
    Row("artifact-tampered-metadata", "artifact whose metadata was changed",
        _run(lambda c: _edit_artifact(c.artifact, c.tmp / "a.mulayer", _edit_metadata),
             "--random"), 2, "is corrupt: metadata checksum mismatch"),
    Row("artifact-schema", "artifact from another schema version",
        _run(lambda c: _rewritten(c.artifact, c.tmp / "a.mulayer", schema_version=99),
             "--random"), 2, "has schema version 99; this mulayer reads 1, 2: recompile"),
    Row("artifact-tvm-version", "artifact from another TVM version",
        _run(lambda c: _rewritten(c.artifact, c.tmp / "a.mulayer", tvm_version="0.1.0"),
             "--random"), 2, "was built with TVM 0.1.0, but this runtime is TVM"),
    Row("artifact-is-onnx", "an ONNX file given as the artifact", _run(lambda c: c.small,
                                                                      "--random"),
        2, "is not a mulayer artifact or is truncated"),
    # ---- output paths
    Row("output-directory", "output path is a directory",
        lambda c: ["compile", c.small, "-o", str(c.tmp)], 2, "is a directory; give a file name"),
    Row("output-folder-missing", "output folder does not exist",
        lambda c: ["compile", c.small, "-o", str(c.tmp / "no" / "m.mulayer")],
        2, "does not exist"),
    Row("output-not-writable", "output folder not writable",
        lambda c: ["compile", c.small, "-o", "/proc/self/m.mulayer"],
        2, "output folder '/proc/self' is not writable"),
    Row("run-output-directory", "run --output is a directory",
        _run(lambda c: c.artifact, "--random", "--output", lambda c: str(c.tmp)),
        2, "is a directory"),
    # ---- calibration
    Row("calibration-shape", "calibration data of the wrong shape",
        _compile(lambda c: c.small, "--target", COOPERATIVE, "--calibration",
                 lambda c: _npz(c.tmp / "cal.npz", input=np.zeros((4, 3, 5, 5), "float32"))),
        2, "input 'input' has shape [4, 3, 5, 5], expected [N, 1, 3, 8, 8] or [N, 3, 8, 8]"),
    Row("calibration-missing", "calibration file missing",
        _compile(lambda c: c.small, "--target", COOPERATIVE, "--calibration",
                 lambda c: str(c.tmp / "none.npz")), 2, "does not exist"),
    Row("calibration-single-target", "calibration with a float-only target",
        _compile(lambda c: c.small, "--calibration",
                 lambda c: _npz(c.tmp / "cal.npz", input=np.zeros((4, 3, 8, 8), "float32"))),
        2, "--calibration is used by the int8 CPU parts of a cooperative target"),
    # ---- the build itself
    Row("build-crash", "TVM crashes while building",
        _compile(lambda c: c.small), 1,
        "error: the build crashed (SIGSEGV) while scheduling PrimFunc 'fused_conv2d",
        env={FAULT_ENV: "segv@schedule:*conv2d*"}),
    Row("repeat-zero", "run --repeat 0", _run(lambda c: c.artifact, "--random", "--repeat", "0"),
        2, "--repeat must be at least 1, got 0"),
]  # fmt: skip

# Issue 17 (a new user's report): the phone target, plans, damaged files, inputs, options.
ROWS += [
    Row("phone-no-cross-compiler", "phone target, no aarch64 cross compiler on PATH",
        _compile(lambda c: c.small, "--target", PHONE), 2,
        "exporting for aarch64-linux-gnu needs the cross compiler 'aarch64-linux-gnu-g++' on "
        "PATH (Debian: apt-get install g++-aarch64-linux-gnu)", env={"PATH": "/nonexistent"}),
    Row("plan-with-ratio", "--plan and a target -ratio (the ratio would be ignored)",
        _compile(lambda c: c.small, "--target", COOPERATIVE, "--plan",
                 lambda c: _plan(c.tmp / "p.json")),
        2, "--plan sets every layer's split, so -ratio=0.5 would be ignored: drop -ratio"),
    Row("plan-no-default-ratio", "plan file without default_ratio",
        _compile(lambda c: c.small, "--target", PLANNED, "--plan",
                 lambda c: _save_bytes(c.tmp / "p.json", b'{"layers": {}}')),
        2, "plan has no default_ratio: give the share of output channels on the GPU for the "
           "layers it does not name"),
    Row("plan-gpu-size-align", "plan gpu_size not a multiple of align",
        _compile(lambda c: c.small, "--target", PLANNED, "--plan",
                 lambda c: _plan(c.tmp / "p.json", layers={
                     "conv2d.0": {"placement": "split", "gpu_size": 13}})),
        2, "plan layer 'conv2d.0': gpu_size 13 is not a multiple of the plan's align 8"),
    Row("plan-layer-field", "plan layer entry with an unknown field",
        _compile(lambda c: c.small, "--target", PLANNED, "--plan",
                 lambda c: _plan(c.tmp / "p.json", layers={"conv2d.0": {"placment": "gpu"}})),
        2, "plan has a malformed layer entry 'conv2d.0': unknown field(s) placment; valid: "
           "placement, axis, gpu_size, predicted_ms"),
    Row("plan-wrong-type", "plan value of the wrong type (gpu_size as a string)",
        _compile(lambda c: c.small, "--target", PLANNED, "--plan",
                 lambda c: _plan(c.tmp / "p.json", layers={
                     "conv2d.0": {"placement": "split", "gpu_size": "8"}})),
        2, "plan layer 'conv2d.0': gpu_size '8' must be an integer"),
    Row("target-ratio-not-number", "target -ratio that is not a number",
        _compile(lambda c: c.small, "--target", "mulayer -ratio=abc, llvm, llvm"),
        2, "mulayer -ratio='abc' is not a number: use a number in [0, 1]"),
    Row("target-verify", "target -verify with an unknown mode",
        _compile(lambda c: c.small, "--target", "mulayer -split=auto -verify=maybe, llvm, llvm"),
        2, "mulayer -verify='maybe' is not valid; use auto, measure, off"),
    Row("verify-measure-no-gpu", "-verify=measure for a GPU this machine lacks",
        _compile(lambda c: c.small, "--target",
                 "mulayer -split=auto -verify=measure, cuda -arch=sm_90, llvm"),
        2, "mulayer -verify=measure times the plan on this machine, but no cuda device on this "
           "machine", gpu=True),
    Row("artifact-damaged-member", "artifact with bytes overwritten inside a member",
        _run(lambda c: _damage_member(c.artifact, c.tmp / "a.mulayer", "lib.so"), "--random"),
        2, "is damaged: its member 'lib.so' cannot be read"),
    Row("inspect-truncated-artifact", "inspect on a truncated artifact",
        lambda c: ["inspect", _save_bytes(c.tmp / "a.mulayer",
                                          Path(c.artifact).read_bytes()[:5000])],
        2, "is a truncated or damaged mulayer artifact"),
    Row("calibration-names", "calibration arrays named differently from the model's inputs",
        _compile(lambda c: c.small, "--target", COOPERATIVE, "--calibration",
                 lambda c: _npz(c.tmp / "cal.npz", x=np.zeros((4, 3, 8, 8), "float32"))),
        2, "input names ['x'] do not match the model's inputs ['input'] (unknown: x) "
           "(missing: input)"),
    Row("calibration-int64", "calibration data of an integer dtype",
        _compile(lambda c: c.small, "--target", COOPERATIVE, "--calibration",
                 lambda c: _npz(c.tmp / "cal.npz", input=np.ones((4, 3, 8, 8), "int64"))),
        2, "input 'input' has dtype int64, expected float32"),
    Row("calibration-nan", "calibration data holding NaN",
        _compile(lambda c: c.small, "--target", COOPERATIVE, "--calibration",
                 lambda c: _npz(c.tmp / "cal.npz", input=np.full((2, 3, 8, 8), np.nan, "f4"))),
        2, "input 'input' holds NaN or Inf values (384 of 384); calibration ranges need "
           "finite samples"),
    Row("input-int64", "inputs of an integer dtype",
        _run(lambda c: c.artifact, "--inputs",
             lambda c: _npz(c.tmp / "x.npz", input=np.ones((1, 3, 8, 8), "int64"))),
        2, "input 'input' has dtype int64; the model expects float32 (integer arrays are not "
           "converted"),
    Row("input-all-nan-allowed", "all-NaN inputs with --allow-nonfinite",
        _run(lambda c: c.artifact, "--repeat", "1", "--allow-nonfinite", "--inputs",
             lambda c: _npz(c.tmp / "x.npz", input=np.full((1, 3, 8, 8), np.nan, "float32"))),
        0, "warning: running NaN or Inf values in input(s) 'input' (192 of 192): what the model "
           "computes from them is unspecified"),
]  # fmt: skip


def _damage_member(src: str, dst: Path, member: str) -> str:
    """Copy an artifact and overwrite two bytes inside ``member``'s compressed data."""
    data = bytearray(Path(src).read_bytes())
    with zipfile.ZipFile(src) as archive:
        info = archive.getinfo(member)
    header = info.header_offset  # local header: 30 bytes, then the name and the extra field
    name_len = int.from_bytes(data[header + 26 : header + 28], "little")
    extra_len = int.from_bytes(data[header + 28 : header + 30], "little")
    start = header + 30 + name_len + extra_len
    middle = start + info.compress_size // 2
    data[middle : middle + 2] = bytes(b ^ 0x5A for b in data[middle : middle + 2])
    dst.write_bytes(bytes(data))
    return str(dst)


def _save_bytes(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _with(value) -> np.ndarray:
    x = np.random.default_rng().standard_normal((1, 3, 8, 8)).astype("float32")
    x[0, 1, 2, 3] = value
    return x


def _bad_utf8_name() -> bytes:
    model = small_model()
    model.graph.name = "gXg"
    return model.SerializeToString().replace(b"gXg", b"g\xb3g")


def _cycle():
    model = small_model()
    model.graph.node[0].input[0] = "y"  # the conv reads the pool's output
    return model


def _clip_int8():
    model = small_model(op="Clip")
    model.graph.node[1].input.extend(["lo"])
    model.graph.initializer.append(numpy_helper.from_array(np.array(0, "int8"), "lo"))
    return model


def _short_weight():
    model = small_model()
    del model.graph.initializer[0].dims[:]
    model.graph.initializer[0].dims.extend([16, 3, 3, 4])  # 576 declared, 432 held
    return model


def run_row(row: Row, ctx) -> tuple[list[str], int, str, str]:
    """Run a row's command in this process: ``(argv, exit code, stdout, stderr)``."""
    argv = [str(a(ctx)) if callable(a) else str(a) for a in row.argv(ctx)]
    ctx.capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:  # pytest would hide them from stderr
        warnings.simplefilter("always")
        code = main(argv)
    out, err = ctx.capsys.readouterr()
    shown = "".join(
        f"warning: {w.message}\n" for w in caught if w.category is not DeprecationWarning
    )
    return argv, code, out, shown + err


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input_row(row, files, request, tmp_path, monkeypatch, capsys):
    for name, value in row.env.items():
        monkeypatch.setenv(name, value)
    gpu = None
    if row.gpu:
        _needs_gpu_absent()
        gpu = request.getfixturevalue("gpu_files")
    ctx = SimpleNamespace(**vars(files), gpu=gpu, tmp=tmp_path, capsys=capsys)
    argv, code, out, err = run_row(row, ctx)
    assert code == row.code, err
    assert row.expect.format(tmp=tmp_path) in err
    assert "Traceback" not in err + out
    if code:  # one `error:` line, the last thing printed
        assert err.strip().splitlines()[-1].startswith("error: ")
    if argv[0] == "compile":
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith((".", "out."))]
        assert leftovers == []  # nothing partial left behind


def test_fallback_output_matches_the_cpu_build(files, gpu_files, tmp_path, capsys):
    """The CPU fallback of a CUDA artifact computes what the llvm artifact computes."""
    _needs_gpu_absent()
    x = np.random.default_rng().standard_normal((1, 3, 8, 8)).astype("float32")
    inputs = _npz(tmp_path / "x.npz", input=x)
    outputs = []
    for artifact, extra in ((files.artifact, []), (gpu_files.with_fallback, ["--fallback", "cpu"])):
        out = tmp_path / f"y{len(outputs)}.npz"
        argv = ["run", artifact, "--inputs", inputs, "--output", str(out), "--repeat", "1"]
        assert main([*argv, *extra]) == 0
        with np.load(out) as data:
            outputs.append(data["y"])
    np.testing.assert_array_equal(outputs[0], outputs[1])
    model = load_artifact(gpu_files.with_fallback, fallback="cpu")
    assert model.mode == "cpu" and model.metadata["fallback_used"] == "cpu"
    assert CPU_LIB_NAME in read_metadata(gpu_files.with_fallback)[1]


def test_table_in_the_docs_lists_every_row():
    doc = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"
    text = doc.read_text()
    missing = [row.id for row in ROWS if f"`{row.id}`" not in text]
    assert missing == [], f"rows missing from docs/reliability.md: {missing}"


def test_compile_with_fallback_records_it(files, tmp_path):
    """A CPU-only target needs no fallback: the flag warns and the artifact has none."""
    out = tmp_path / "m.mulayer"
    with pytest.warns(UserWarning, match="has no effect"):
        assert main(["compile", files.small, "-o", str(out), "--fallback", "cpu"]) == 0
    assert "fallback" not in read_metadata(out)[0]


@pytest.mark.gpu
def test_fallback_is_not_used_where_the_gpu_is(files, tmp_path):
    """With the GPU present, --fallback cpu changes nothing: the CUDA library runs."""
    from mulayer.cli.compile_cmd import build_artifact
    from mulayer.models.reference import max_rel_error, onnxruntime_outputs

    artifact = tmp_path / "gpu.mulayer"
    build_artifact(files.small, str(artifact), "cuda, llvm", fallback="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "running the CPU fallback" warning
        model = load_artifact(artifact, fallback="cpu")
    assert model.mode == "gpu" and "fallback_used" not in model.metadata
    x = np.random.default_rng().standard_normal((1, 3, 8, 8)).astype("float32")
    expected = onnxruntime_outputs(files.small, {"input": x})[0]
    assert max_rel_error(model({"input": x})["y"], expected) < 2e-2
