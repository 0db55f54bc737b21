"""tvmc-style target strings → TVM JSON-dict targets."""

import pytest

from mulayer import MuLayerError
from mulayer.target import detect_cpu, parse_target

VALID = [
    ("llvm", "cpu", None, {"kind": "llvm"}),
    ("llvm -mcpu=znver4", "cpu", None, {"kind": "llvm", "mcpu": "znver4"}),
    ("cuda -arch=sm_90, llvm", "gpu", {"kind": "cuda", "arch": "sm_90"}, {"kind": "llvm"}),
    (
        "opencl -device=mali, llvm -mtriple=aarch64-linux-gnu",
        "gpu",
        {"kind": "opencl", "device": "mali"},
        {"kind": "llvm", "mtriple": "aarch64-linux-gnu"},
    ),
    (
        "mulayer -ratio=0.5, cuda -arch=sm_90, llvm",
        "cooperative",
        {"kind": "cuda", "arch": "sm_90"},
        {"kind": "llvm"},
    ),
    ("mulayer -ratio=0.25, llvm, llvm", "cooperative", {"kind": "llvm"}, {"kind": "llvm"}),
]


@pytest.mark.parametrize(("text", "mode", "device", "host"), VALID)
def test_valid_targets(text, mode, device, host):
    spec = parse_target(text)
    assert spec.mode == mode
    for key, value in host.items():
        assert spec.host[key] == value
    if device is None:
        assert spec.device is None
    else:
        for key, value in device.items():
            assert spec.device[key] == value
    # The JSON dicts are accepted by TVM itself.
    spec.host_target()
    if spec.device is not None:
        assert spec.device_target().kind.name == spec.device["kind"]


def test_mcpu_omitted_is_detected():
    spec = parse_target("llvm")
    assert spec.host["mcpu"] == detect_cpu()
    assert spec.host["mcpu"] != "native"
    assert spec.detected


def test_cross_target_is_not_detected():
    spec = parse_target("opencl -device=mali, llvm -mtriple=aarch64-linux-gnu")
    assert "mcpu" not in spec.host


def test_mulayer_options():
    spec = parse_target("mulayer -ratio=0.75 -align=16, llvm, llvm")
    assert spec.mulayer.ratio == 0.75
    assert spec.mulayer.align == 16
    spec = parse_target("mulayer, llvm, llvm", extra_mulayer={"ratio": "0.5"})
    assert spec.mulayer.ratio == 0.5


INVALID = [
    ("lvm", "unknown target kind 'lvm'"),
    ("", "malformed"),
    ("llvm,", "malformed"),
    ("llvm -mcpux=znver4", "unknown option -mcpux"),
    ("llvm -mcpu=notacpu", "not a CPU LLVM knows"),
    ("llvm mcpu=znver4", "must look like -key=value"),
    ("cuda -arch=90, llvm", "cuda -arch='90' is not valid"),
    ("opencl -device=nokia, llvm", "opencl -device='nokia'"),
    ("mulayer -ratio=1.5, llvm, llvm", "out of range"),
    ("mulayer -ratio=abc, llvm, llvm", "is not a number"),
    ("mulayer -split=diagonal, llvm, llvm", "-split='diagonal'"),
    ("mulayer -ratio=0.5, llvm", "needs a device and a host"),
    ("llvm, mulayer, llvm", "must come first"),
    ("llvm, llvm", "mulayer pseudo-target"),
    ("cuda -arch=sm_90, opencl", "must be llvm"),
    ("cuda -arch=sm_90, llvm, llvm", "at most two"),
]


@pytest.mark.parametrize(("text", "message"), INVALID)
def test_invalid_targets(text, message):
    with pytest.raises(MuLayerError) as info:
        parse_target(text)
    assert message in str(info.value)


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(MuLayerError) as info:
        parse_target("vulkan")
    for kind in ("llvm", "cuda", "opencl", "mulayer"):
        assert kind in str(info.value)


def test_extra_mulayer_options_need_pseudo_target():
    with pytest.raises(MuLayerError, match="need the mulayer pseudo-target"):
        parse_target("llvm", extra_mulayer={"ratio": "0.5"})
    with pytest.raises(MuLayerError, match="unknown --target-mulayer option"):
        parse_target("mulayer, llvm, llvm", extra_mulayer={"speed": "max"})


def test_mattr_keeps_its_feature_list():
    spec = parse_target(
        "mulayer -ratio=0.5, llvm -mcpu=znver4 -mattr=+avx2,-fma, llvm -mcpu=znver4"
    )
    assert spec.device["mattr"] == ["+avx2", "-fma"]
    assert "mattr" not in spec.host
    assert spec.device_target().attrs["mattr"] == ["+avx2", "-fma"]


@pytest.mark.parametrize(
    ("flags", "mcpu", "expected"),
    [
        ({"avx512_vnni", "amx_tile", "amx_int8"}, "rocketlake", ["+amx-tile", "+amx-int8"]),
        ({"avx512_vnni", "amx_tile", "amx_int8"}, "sapphirerapids", None),  # LLVM knows it
        ({"avx512_vnni"}, "rocketlake", None),  # the host has no AMX
    ],
)
def test_detected_host_gets_the_amx_its_cpu_model_hides(monkeypatch, flags, mcpu, expected):
    import mulayer.target as target

    monkeypatch.setattr(target, "host_cpu_flags", lambda: flags)
    monkeypatch.setattr(target, "detect_cpu", lambda: mcpu)
    spec = parse_target("llvm")
    assert spec.host["mcpu"] == mcpu
    assert spec.host.get("mattr") == expected
    assert ("-mattr=" in spec.detected[0]) == (expected is not None)
    # The user's -mattr replaces detected features (e.g. to build without AMX).
    assert parse_target("llvm -mattr=-amx-int8").host["mattr"] == ["-amx-int8"]
