"""The profiler: layer specs, parts built by the real passes, the data set and resumable runs
on the llvm + llvm stand-in, and timing through a loopback RPC tracker."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tvm
from tvm import relax

from mulayer.cli.main import main
from mulayer.frontend.layers import splittable_layers
from mulayer.frontend.onnx_import import import_onnx
from mulayer.models.zoo import build_model
from mulayer.profiler import (
    Dataset,
    LayerSpec,
    ProfileConfig,
    TimingConfig,
    channel_grid,
    describe_layers,
    layer_module,
    profile,
    read_rows,
)
from mulayer.profiler.builder import compile_parts
from mulayer.profiler.parts import part_function
from mulayer.target import parse_target

STAND_IN = "mulayer, llvm, llvm"
FAST = TimingConfig(repeat=2, min_repeat_ms=1.0)


@pytest.fixture(scope="module")
def tiny_layers():
    mod, _, _ = import_onnx(build_model("tiny"))
    return mod, describe_layers(mod["main"])


def _conv_spec(cin=16, cout=32, hw=8, groups=1, nonneg=True) -> LayerSpec:
    return LayerSpec(
        kind="conv2d",
        input_shape=[1, cin, hw, hw],
        output_shape=[1, cout, hw, hw],
        weight_shape=[cout, cin // groups, 3, 3],
        attrs={"strides": [1, 1], "padding": [1, 1, 1, 1], "dilation": [1, 1], "groups": groups},
        epilogue=[
            {
                "op": "relax.add",
                "const_shape": [1, cout, 1, 1],
                "const_dtype": "float32",
                "const_first": False,
            },
            {"op": "relax.nn.relu"},
        ],
        input_nonneg=nonneg,
    )


# ----------------------------------------------------------------------------- layer specs
def test_describe_layers_matches_the_layer_table(tiny_layers):
    mod, described = tiny_layers
    layers = splittable_layers(mod["main"])
    assert [layer.name for layer, _ in described] == [layer.name for layer in layers]
    for layer, spec in described:
        assert spec.kind == layer.kind
        assert tuple(spec.input_shape) == layer.input_shape
        assert tuple(spec.output_shape) == layer.output_shape
    first = described[0][1]
    # The stem conv reads the image (signed) and is followed by its bias add and ReLU.
    assert not first.input_nonneg
    assert [step["op"] for step in first.epilogue][:1] == ["relax.add"]
    # JSON round trip keeps the identity.
    again = LayerSpec.from_json(json.loads(json.dumps(first.to_json())))
    assert again.key == first.key


def test_identical_layers_share_a_key():
    a, b = _conv_spec(), _conv_spec(nonneg=False)
    b.epilogue = []
    assert a.key == b.key  # epilogue and input sign are not part of the identity
    assert _conv_spec(cout=16).key != a.key


def test_layer_module_rebuilds_the_op():
    spec = _conv_spec()
    mod = layer_module(spec)
    (layer,) = splittable_layers(mod["main"])
    assert layer.kind == "conv2d" and layer.output_shape == (1, 32, 8, 8)


def test_channel_grid():
    spec = _conv_spec(cout=64)
    assert channel_grid(spec, (0.25, 0.5, 0.75, 1.0), 8) == [8, 16, 32, 48, 64]
    assert channel_grid(_conv_spec(cout=8), (0.5, 1.0), 8) == [8]
    depthwise = _conv_spec(cin=24, cout=24, groups=24)
    assert channel_grid(depthwise, (0.5, 1.0), 8) == [8, 16, 24]


def test_sweep_covers_the_families_of_the_nets():
    """A held-out net meets no layer family for the first time: the sweep has depthwise convs
    (3x3 and 5x5, strided too), 1x1 convs, large inputs and channel counts off the alignment."""
    from mulayer.profiler.sweep import sweep_specs

    convs = [s for s in sweep_specs(60) if s.kind == "conv2d"]
    depthwise = [s for s in convs if s.attrs["groups"] == s.input_shape[1] > 1]
    assert {s.weight_shape[2] for s in depthwise} >= {3, 5}
    assert any(s.attrs["strides"][0] == 2 for s in depthwise)
    assert any(s.weight_shape[2] == 1 and s.attrs["groups"] == 1 for s in convs)
    assert max(s.input_shape[2] for s in convs) >= 224
    assert any(s.input_shape[1] % 8 or s.output_shape[1] % 8 for s in convs)
    # MobileNets' ReLU6 as the frontend writes it (maximum, minimum), ReLU, and bias only.
    epilogues = {tuple(step["op"] for step in s.epilogue) for s in convs}
    assert epilogues == {
        ("relax.add", "relax.nn.relu"),
        ("relax.add", "relax.maximum", "relax.minimum"),
        ("relax.add",),
    }


def test_sweep_is_deterministic_and_well_formed():
    from mulayer.profiler.models import resolve_models
    from mulayer.profiler.sweep import SWEEP_MODEL, sweep_specs

    specs = sweep_specs(24)
    assert [s.key for s in specs] == [s.key for s in sweep_specs(24)]
    assert len({s.key for s in specs}) == 24
    assert {"conv2d", "dense"} <= {s.kind for s in specs}
    for spec in specs:
        if spec.kind == "dense" and spec.input_shape[1] > 4096:
            continue  # big random weights: slow to rebuild, same code path
        (layer,) = splittable_layers(layer_module(spec)["main"])
        assert list(layer.output_shape) == spec.output_shape
        assert list(layer.epilogue) == [step["op"] for step in spec.epilogue]
    sources = resolve_models(["tiny"], sweep=24)
    assert [s.name for s in sources] == ["tiny", SWEEP_MODEL] and sources[1].synthetic


# ---------------------------------------------------------------------------------- parts
def _run(func: relax.Function, x: np.ndarray, target: str = "llvm") -> np.ndarray:
    ex, schedules = compile_parts({"part": func}, tvm.target.Target(target))
    assert schedules["part"]["kernels"] >= 1
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["part"](tvm.runtime.tensor(x)).numpy()


# ids avoid the bare word "gpu", which conftest reads as the `gpu` marker.
@pytest.mark.parametrize("processor", ["cpu", "gpu"], ids=["int8", "fp16"])
def test_part_computes_its_slice_of_the_layer(processor):
    spec = _conv_spec(cin=16, cout=32)
    rng = np.random.default_rng()
    x = rng.uniform(0.0, 6.0, size=spec.input_shape).astype("float32")
    ex, _ = compile_parts({"main": layer_module(spec)["main"]}, tvm.target.Target("llvm"))
    whole = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    func, precision = part_function(spec, processor, 8, lift_weights=False)
    got = _run(func, x)
    # The GPU part holds the first channels, the CPU part the last ones (join = [gpu, cpu]).
    expected = whole[:, :8] if processor == "gpu" else whole[:, -8:]
    assert got.shape == expected.shape
    assert precision == ("int8" if processor == "cpu" else "float16")
    rel = np.abs(got - expected).max() / np.abs(expected).max()
    assert rel < 0.05, rel


@pytest.mark.parametrize(
    "processor, channels, dtype",
    [("cpu", 16, "int8"), ("gpu", 16, "float16"), ("gpu", 32, "float16")],
    ids=["int8-half", "fp16-half", "fp16-whole"],
)
def test_part_weights_become_parameters(processor, channels, dtype):
    """The weights are parameters the part reads (no large constant is left), already in the
    part's precision: a whole-layer fp16 part does not cast its weights on every call."""
    from tvm.ir.expr import Constant

    func, _ = part_function(_conv_spec(), processor, channels)
    shapes = [tuple(int(d) for d in p.ty.shape.values) for p in func.params]
    dtypes = [str(p.ty.dtype) for p in func.params]
    assert shapes[0] == (1, 16, 8, 8) and dtypes[0] == "float32"
    assert shapes[1] == (channels, 16, 3, 3) and dtypes[1] == dtype
    used = {v.name for v in relax.analysis.free_vars(func.body)}
    assert used == {p.name for p in func.params}
    large = []

    def visit(expr):
        value = getattr(expr, "value", None) if isinstance(expr, Constant) else None
        if isinstance(value, tvm.runtime.Tensor) and int(np.prod(value.shape)) > 256:
            large.append(tuple(value.shape))

    relax.analysis.post_order_visit(func.body, visit)
    assert large == []


def test_part_of_a_grouped_conv_reads_its_input_slice():
    spec = _conv_spec(cin=128, cout=128, groups=128)
    func, _ = part_function(spec, "gpu", 32)
    weight = [p for p in func.params[1:] if len(p.ty.shape.values) == 4]
    assert [int(d) for d in weight[0].ty.shape.values] == [32, 1, 3, 3]
    text = func.script(show_meta=False)
    assert "R.strided_slice" in text and "groups=32" in text


def test_a_part_that_fails_to_build_costs_only_its_own_row(monkeypatch, tmp_path):
    from mulayer.profiler import builder

    real = builder.compile_parts

    def flaky(functions, target, prepack=False):
        out_channels = {int(f.ret_ty.shape.values[1]) for f in functions.values()}
        if 16 in out_channels:
            raise RuntimeError("simulated TVM failure")
        return real(functions, target, prepack)

    monkeypatch.setattr(builder, "compile_parts", flaky)
    spec = parse_target(STAND_IN)
    request = builder.BuildRequest(
        processor="cpu",
        parts=[{"id": f"k{k}", "spec": _conv_spec().to_json(), "channels": k} for k in (8, 16)],
        host=spec.host,
        device=spec.device,
        library=str(tmp_path / "chunk.so"),
    ).to_json()
    results = builder.build_chunk_safely(request)
    assert len(results) == 2
    assert "k8" in results[0]["infos"] and results[0]["library"]
    assert "simulated TVM failure" in results[1]["errors"]["k16"]


# ------------------------------------------------------------------------------- data set
def test_dataset_drops_a_half_written_line(tmp_path):
    path = tmp_path / "p.jsonl"
    with Dataset(path) as data:
        data.append({"row": "sync", "latency_us": 1.0})
    with open(path, "a") as f:
        f.write('{"row": "part", "lat')  # a run killed mid-write
    with pytest.warns(UserWarning, match="dropped 1"):
        data = Dataset(path)
    assert len(data.rows) == 1
    assert path.read_text().endswith("}\n")
    assert len(read_rows(path)) == 1


# ------------------------------------------------------------------------------- profiling
def _config(out, **kw) -> ProfileConfig:
    base = dict(
        target=STAND_IN,
        models=["tiny"],
        output=out,
        slices=(1.0,),
        max_layers=2,
        timing=FAST,
        transfer_sizes=(4096, 65536),
        progress=False,
    )
    return ProfileConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def stand_in_profile(tmp_path_factory):
    """A small profile of tiny on llvm + llvm, and its first run's summary."""
    out = tmp_path_factory.mktemp("profile") / "profile.jsonl"
    return out, profile(_config(out))


def _copy(src, tmp_path):
    dst = tmp_path / src.name
    dst.write_bytes(src.read_bytes())
    return dst


def test_profile_stand_in(stand_in_profile):
    out, summary = stand_in_profile
    assert summary.complete and summary.parts_failed == 0
    rows = read_rows(out)
    parts = [r for r in rows if r["row"] == "part"]
    assert len(parts) == summary.parts_measured == summary.parts_total > 0
    assert {r["processor"] for r in parts} == {"cpu", "gpu"}
    for row in parts:
        assert row["latency_us"] > 0 and len(row["samples_us"]) == FAST.repeat
        # The repeats' spread is recorded with their median (the noise ceiling of the model).
        samples = row["samples_us"]
        assert row["spread"] == pytest.approx(max(samples) / min(samples), rel=1e-3)
        assert min(samples) <= row["latency_us"] <= max(samples)
        assert row["fingerprint"]["gpu_kind"] == "llvm"
        assert row["fingerprint"]["tvm_version"] == tvm.__version__
        assert row["schedule"]["rule"] and row["schedule"]["target"] == "llvm"
        # Fused as a build makes it: the epilogue and input quantization are no kernels of
        # their own (unfused, an int8 conv part ran 8-12).
        assert row["schedule"]["kernels"] <= 3
    # A part row's layer carries the epilogue and input sign of the spec that was timed.
    specs = {r["key"]: r["spec"] for r in rows if r["row"] == "shape"}
    for row in parts:
        spec = specs[row["key"]]
        assert row["layer"]["epilogue"] == [step["op"] for step in spec["epilogue"]]
        assert row["layer"]["input_nonneg"] == spec["input_nonneg"]
    assert any(r["layer"]["epilogue"] for r in parts)
    conv = [r for r in parts if r["layer"]["kind"] == "conv2d"]
    assert {r["precision"] for r in conv} == {"int8", "float16"}
    transfers = [r for r in rows if r["row"] == "transfer"]
    assert {(r["direction"], r["nbytes"]) for r in transfers} == {
        (d, n) for d in ("h2d", "d2h") for n in (4096, 65536)
    }
    assert len([r for r in rows if r["row"] == "sync"]) == 1
    assert [m["model"] for m in rows if m["row"] == "model"] == ["tiny"]


def test_profile_resumes_without_repeating(stand_in_profile, tmp_path):
    out = _copy(stand_in_profile[0], tmp_path)
    before = len(read_rows(out))
    again = profile(_config(out))
    assert again.parts_measured == 0 and again.complete
    assert len(read_rows(out)) == before


def test_a_resumed_run_times_parts_of_the_earliest_run_again(stand_in_profile, tmp_path):
    """A run that resumes with parts to time first times ``anchors`` parts per processor that
    the earliest run measured, as anchor rows under its own run id, the same ones each time."""
    out = _copy(stand_in_profile[0], tmp_path)
    first = [r for r in read_rows(out) if r["row"] == "part"]
    first_run = {r["run"] for r in first}
    assert len(first_run) == 1 and stand_in_profile[1].run in first_run
    summary = profile(_config(out, max_layers=3, anchors=2))
    assert summary.parts_measured > 0 and summary.run not in first_run
    anchors = [r for r in read_rows(out) if r["row"] == "anchor"]
    assert len(anchors) == summary.anchors_measured == 4  # 2 per processor
    assert {r["run"] for r in anchors} == {summary.run}
    assert {r["anchor_of"] for r in anchors} == first_run
    by_key = {r["key_part"]: r for r in first}
    for anchor in anchors:
        assert anchor["key_part"] in by_key and anchor["latency_us"] > 0
        assert anchor["processor"] == by_key[anchor["key_part"]]["processor"]
    again = profile(_config(out, max_layers=4, anchors=2))
    picked = [
        r["key_part"] for r in read_rows(out) if r["row"] == "anchor" and r["run"] == again.run
    ]
    assert sorted(picked) == sorted(r["key_part"] for r in anchors)  # the same parts again


def test_profile_stops_at_the_deadline(stand_in_profile, tmp_path):
    out = _copy(stand_in_profile[0], tmp_path)
    summary = profile(_config(out, max_layers=4, max_seconds=0.0))
    assert summary.parts_measured == 0 and summary.parts_left > 0
    assert not summary.complete


def test_profile_cli_json_and_errors(stand_in_profile, tmp_path, capsys):
    out = _copy(stand_in_profile[0], tmp_path)
    args = ["profile", "--target", STAND_IN, "--models", "tiny", "-o", str(out)]
    fast = [
        "--max-layers",
        "3",
        "--processors",
        "cpu",
        "--slices",
        "1",
        "--repeat",
        "1",
        "--min-repeat-ms",
        "1",
        "--jobs",
        "1",
    ]
    assert main([*args, *fast, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["complete"] and summary["parts_measured"] >= 1
    assert main([*args, "--processors", "npu"]) == 2
    assert "--processors" in capsys.readouterr().err
    assert main([*args, "--rpc-key", "phone"]) == 2
    assert "--rpc-tracker" in capsys.readouterr().err
    assert main(["profile", "--target", STAND_IN, "--models", "nope", "-o", str(out)]) == 2
    assert "zoo model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["profile", "--help"])
    assert "example:" in capsys.readouterr().out


def test_profile_rejects_a_missing_gpu(tmp_path):
    from mulayer.errors import MuLayerError

    if tvm.cuda(0).exist:
        pytest.skip("a CUDA GPU is present")
    spec = parse_target("mulayer, cuda -arch=sm_90, llvm")
    cfg = ProfileConfig(target=spec, models=["tiny"], output=tmp_path / "p.jsonl")
    with pytest.raises(MuLayerError, match="no cuda device"):
        profile(cfg)


@pytest.mark.slow
def test_profile_through_a_loopback_rpc_tracker(stand_in_profile, tmp_path):
    pytest.importorskip("tornado")  # TVM's tracker
    pytest.importorskip("cloudpickle")  # TVM's popen workers
    pytest.importorskip("psutil")
    from tvm.rpc.server import Server
    from tvm.rpc.tracker import Tracker

    tracker = Tracker(host="127.0.0.1", port=9190, port_end=9290, silent=True)
    server = Server(
        host="127.0.0.1",
        port=9300,
        port_end=9400,
        tracker_addr=(tracker.host, tracker.port),
        key="loopback",
        silent=True,
    )
    try:
        out = _copy(stand_in_profile[0], tmp_path)  # its model rows: tiny is not read again
        cfg = _config(
            out,
            max_layers=1,
            processors=("cpu",),
            rpc_tracker=f"127.0.0.1:{tracker.port}",
            rpc_key="loopback",
        )
        summary = profile(cfg)
    finally:
        server.terminate()
        tracker.terminate()
    assert summary.complete and summary.parts_failed == 0 and summary.parts_measured >= 1
    rows = read_rows(out)
    remote = [r for r in rows if r["row"] == "part" and r["profile_id"] == summary.profile_id]
    assert len(remote) == summary.parts_measured
    assert all(r["latency_us"] > 0 for r in remote)
    assert remote[0]["fingerprint"]["cpu_model"] == "rpc:loopback"
    # A remote device is timed by its kernels only: no copy timings of its own.
    assert not [r for r in rows if r["row"] == "transfer" and r["profile_id"] == summary.profile_id]


def test_whole_gpu_part_stays_nchw_with_channels_last_on(monkeypatch):
    """A profiled part is one layer alone: with MULAYER_GPU_LAYOUT=NHWC it would carry a whole
    chain's layout changes (input, output and per-call weight transposes); it stays NCHW."""
    monkeypatch.setenv("MULAYER_GPU_LAYOUT", "NHWC")
    func, _ = part_function(_conv_spec(), "gpu", 32)
    text = func.script(show_meta=False)
    assert "permute_dims" not in text and 'data_layout="NHWC"' not in text
