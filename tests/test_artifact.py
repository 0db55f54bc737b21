"""Artifact v2: round trip, integrity checks, atomic writes."""

import json
import sys
import zipfile

import numpy as np
import pytest

import mulayer
from mulayer import MuLayerError
from mulayer.runtime.artifact import METADATA_NAME, read_metadata, write_artifact


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory, tiny_onnx):
    path = tmp_path_factory.mktemp("artifact") / "tiny.mulayer"
    mulayer.compile(str(tiny_onnx), target="llvm").export(path)
    return path


def test_round_trip(tiny_artifact):
    model = mulayer.load(tiny_artifact)
    assert model.mode == "cpu"
    assert [spec.name for spec in model.inputs] == ["input"]
    inputs = model.random_inputs(seed=1)
    first = model(inputs)
    again = mulayer.load(tiny_artifact)(inputs)
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    metadata, _ = read_metadata(tiny_artifact)
    assert metadata["schema_version"] == 2
    assert metadata["tvm_version"] and metadata["mulayer_version"] == mulayer.__version__
    assert metadata["inputs"][0]["shape"] == list(model.inputs[0].shape)


def _rewrite(src, dst, change):
    """Copy the artifact, letting ``change(name, data) -> data`` edit members."""
    with zipfile.ZipFile(src) as archive_in, zipfile.ZipFile(dst, "w") as archive_out:
        for info in archive_in.infolist():
            archive_out.writestr(info.filename, change(info.filename, archive_in.read(info)))
        archive_out.comment = archive_in.comment


def test_tampered_library_rejected(tiny_artifact, tmp_path):
    bad = tmp_path / "bad.mulayer"

    def flip(name, data):
        if name != "lib.so":
            return data
        data = bytearray(data)
        data[len(data) // 2] ^= 0xFF
        return bytes(data)

    _rewrite(tiny_artifact, bad, flip)
    with pytest.raises(MuLayerError, match="checksum mismatch for 'lib.so'"):
        mulayer.load(bad)


def test_tampered_metadata_rejected(tiny_artifact, tmp_path):
    bad = tmp_path / "bad.mulayer"

    def edit(name, data):
        if name != METADATA_NAME:
            return data
        meta = json.loads(data)
        meta["mode"] = "gpu"
        return json.dumps(meta).encode()

    _rewrite(tiny_artifact, bad, edit)
    with pytest.raises(MuLayerError, match="metadata checksum"):
        mulayer.load(bad)


def test_truncated_rejected(tiny_artifact, tmp_path):
    bad = tmp_path / "truncated.mulayer"
    data = tiny_artifact.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(MuLayerError, match="truncated|not a mulayer artifact"):
        mulayer.load(bad)


def test_not_an_artifact(tmp_path):
    bad = tmp_path / "x.mulayer"
    bad.write_text("hello")
    with pytest.raises(MuLayerError, match="not a mulayer artifact"):
        mulayer.load(bad)
    with pytest.raises(MuLayerError, match="does not exist"):
        mulayer.load(tmp_path / "missing.mulayer")


def _with_metadata(tmp_path, tiny_artifact, **changes):
    _, members = read_metadata(tiny_artifact)
    metadata, _ = read_metadata(tiny_artifact)
    lib = tmp_path / "lib.so"
    lib.write_bytes(members["lib.so"])
    path = tmp_path / "edited.mulayer"
    write_artifact(path, lib, {**metadata, **changes})
    return path


def test_other_tvm_version_rejected(tiny_artifact, tmp_path):
    path = _with_metadata(tmp_path, tiny_artifact, tvm_version="0.1.0")
    with pytest.raises(MuLayerError, match="built with TVM 0.1.0"):
        mulayer.load(path)


def test_other_schema_rejected(tiny_artifact, tmp_path, monkeypatch):
    import mulayer.runtime.artifact as artifact

    monkeypatch.setattr(artifact, "ARTIFACT_SCHEMA_VERSION", 99)
    path = _with_metadata(tmp_path, tiny_artifact)
    monkeypatch.undo()
    with pytest.raises(MuLayerError, match="schema version 99"):
        mulayer.load(path)


def test_export_to_directory_or_missing_folder(tiny_onnx, tmp_path):
    compiled = mulayer.compile(str(tiny_onnx), target="llvm")
    with pytest.raises(MuLayerError, match="is a directory"):
        compiled.export(tmp_path)
    with pytest.raises(MuLayerError, match="does not exist"):
        compiled.export(tmp_path / "no" / "such" / "x.mulayer")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_failed_write_leaves_nothing(tiny_artifact, tmp_path, monkeypatch):
    import mulayer.runtime.artifact as artifact

    _, members = read_metadata(tiny_artifact)
    lib = tmp_path / "lib.so"
    lib.write_bytes(members["lib.so"])

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(artifact.zipfile.ZipFile, "writestr", boom)
    target = tmp_path / "out.mulayer"
    with pytest.raises(OSError):
        write_artifact(target, lib, {"inputs": [], "outputs": []})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lib.so"]


# What a deployment may import of mulayer: the runtime folder and the vocabulary both sides share.
RUNTIME_MODULES = (
    "mulayer.runtime",
    "mulayer.errors",
    "mulayer.fileio",
    "mulayer.tensor_spec",
    "mulayer.plan",
    "mulayer.version",
)


def test_load_imports_no_compiler_modules(tiny_artifact):
    """A fresh interpreter loads and runs an artifact without importing the compile side."""
    import subprocess

    code = (
        "import sys, json, mulayer\n"
        f"model = mulayer.load({str(tiny_artifact)!r})\n"
        "model(model.random_inputs(seed=0))\n"
        "watched = ('mulayer', 'onnx', 'tvm.relax.frontend.onnx')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in watched or\n"
        "                        m.startswith(watched[-1]))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    imported = json.loads(result.stdout.splitlines()[-1])
    assert "mulayer.runtime.executor" in imported  # the check sees what ran
    compile_side = [
        m
        for m in imported
        if m != "mulayer" and not any(m == a or m.startswith(a + ".") for a in RUNTIME_MODULES)
    ]
    assert compile_side == [], f"loading and running an artifact imported {compile_side}"


def test_wrong_inputs_rejected(tiny_artifact):
    model = mulayer.load(tiny_artifact)
    shape = model.inputs[0].shape
    with pytest.raises(MuLayerError, match="expects"):
        model(np.zeros((1, *shape), "float32"))
    with pytest.raises(MuLayerError, match="dtype"):
        model(np.zeros(shape, "complex64"))
    with pytest.raises(MuLayerError, match="do not match"):
        model({"wrong": np.zeros(shape, "float32")})
