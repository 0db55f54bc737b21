"""The phone target (OpenCL for a Mali GPU, aarch64 host) is cross-compiled and exported."""

from __future__ import annotations

import shutil
import warnings
import zipfile

import pytest

import mulayer
from mulayer.cli.main import main
from mulayer.runtime.artifact import read_metadata

PHONE = "opencl -device=mali, llvm -mtriple=aarch64-linux-gnu"
CROSS = "aarch64-linux-gnu-g++"
EM_AARCH64 = 183  # ELF e_machine of aarch64


def _lib_so(artifact) -> bytes:
    with zipfile.ZipFile(artifact) as archive:
        return archive.read("lib.so")


def _check_aarch64_with_opencl(lib: bytes) -> None:
    assert lib[:4] == b"\x7fELF"
    assert lib[4] == 2 and lib[5] == 1  # 64-bit, little-endian
    assert int.from_bytes(lib[18:20], "little") == EM_AARCH64
    assert b"__kernel void" in lib  # the OpenCL kernels' source, compiled on the phone


@pytest.mark.skipif(
    shutil.which(CROSS) is None,
    reason=f"needs the cross compiler {CROSS} (Debian: apt-get install g++-aarch64-linux-gnu)",
)
@pytest.mark.parametrize("target", [PHONE, f"mulayer -ratio=0.5, {PHONE}"])
def test_phone_target_exports_an_aarch64_library_with_the_opencl_kernels(
    tiny_onnx, tmp_path, target
):
    out = tmp_path / "phone.mulayer"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no calibration for the cooperative build
        assert main(["compile", str(tiny_onnx), "--target", target, "-o", str(out)]) == 0
    _check_aarch64_with_opencl(_lib_so(out))
    metadata = read_metadata(out)[0]
    assert metadata["vm_devices"] == ["opencl", "cpu"]
    assert metadata["target"]["host"]["mtriple"] == "aarch64-linux-gnu"


def test_phone_export_without_a_cross_compiler_says_what_to_install(
    tiny_onnx, tmp_path, monkeypatch
):
    compiled = mulayer.compile(str(tiny_onnx), target=PHONE)
    monkeypatch.setenv("PATH", str(tmp_path))  # no aarch64-linux-gnu-g++ here
    with pytest.raises(mulayer.MuLayerError, match="apt-get install g\\+\\+-aarch64-linux-gnu"):
        compiled.export(tmp_path / "phone.mulayer")
    assert not (tmp_path / "phone.mulayer").exists()
