"""The cost model: features, training, the partitioner API, archives and their schema check,
default selection by fingerprint, transfers, the held-out evaluation and its script."""

from __future__ import annotations

import dataclasses
import json
import runpy
import sys
import warnings
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from mulayer.cost_model import (
    FEATURE_NAMES,
    CostModel,
    CostModelConfig,
    PartSample,
    ProfileData,
    XGBoostConfig,
    load_cost_model,
    load_cost_model_file,
    part_features,
    profile_data,
    save_cost_model,
    train_cost_model,
)
from mulayer.cost_model.defaults import data_dir, resolve_path
from mulayer.cost_model.evaluate import holdout_eval
from mulayer.cost_model.part_shape import part_shape
from mulayer.cost_model.transfer import fit_line
from mulayer.errors import MuLayerError
from mulayer.frontend.layers import Layer
from mulayer.profiler.fingerprint import fingerprint
from mulayer.target import parse_target

ROOT = Path(__file__).resolve().parents[1]
RELU = ("relax.add", "relax.nn.relu")
RELU6 = ("relax.add", "relax.maximum", "relax.minimum")
FAST_XGB = XGBoostConfig(n_estimators=60, max_depth=4, learning_rate=0.2)


def conv(cin, cout, hw, k=3, stride=1, groups=1, name="conv2d.0") -> Layer:
    out_hw = hw // stride
    out = (1, cout, out_hw, out_hw)
    return Layer(
        name=name,
        kind="conv2d",
        var="lv",
        input_shape=(1, cin, hw, hw),
        output_shape=out,
        weight_shape=(cout, cin // groups, k, k),
        groups=groups,
        strides=(stride, stride),
        flops=2 * int(np.prod(out)) * (cin // groups) * k * k,
        bytes_in=4 * cin * hw * hw,
        bytes_out=4 * int(np.prod(out)),
    )


def pool(c, hw, k=2, kind="max_pool2d") -> Layer:
    out = (1, c, hw // k, hw // k)
    return Layer(
        "max_pool2d.0",
        kind,
        "lv",
        (1, c, hw, hw),
        out,
        None,
        1,
        (k, k),
        int(np.prod(out)) * k * k,
        4 * c * hw * hw,
        4 * int(np.prod(out)),
    )


def dense(n_in, n_out) -> Layer:
    return Layer(
        "dense.0",
        "dense",
        "lv",
        (1, n_in),
        (1, n_out),
        (n_in, n_out),
        1,
        (),
        2 * n_in * n_out,
        4 * n_in,
        4 * n_out,
    )


def law(layer: Layer, k: int, processor: str) -> float:
    """A made-up machine: launch cost + compute + memory, the CPU 8x slower than the GPU."""
    p = part_shape(layer, k)
    scale = 8.0 if processor == "cpu" else 1.0
    scale *= 1.3 if "relax.minimum" in layer.epilogue else 1.0  # an unfused ReLU6
    return scale * (3.0 + p.flops / 2e4 + (p.bytes_in + p.bytes_out) / 4e3)


def synthetic_data(seed: int = 0) -> ProfileData:
    """Three 'models' of conv layers (plus pools and a dense), timed by :func:`law`."""
    rng = np.random.default_rng(seed)
    models: dict[str, set[str]] = {}
    parts = []
    for m in range(3):
        keys = set()
        layers = [
            conv(
                int(rng.choice([16, 32, 64, 128])),
                int(rng.choice([32, 64, 128, 256])),
                int(rng.choice([7, 14, 28, 56])),
                k=int(rng.choice([1, 3])),
                stride=int(rng.choice([1, 2])),
            )
            for _ in range(12)
        ]
        layers = [replace(c, epilogue=RELU6 if i % 2 else RELU) for i, c in enumerate(layers)]
        layers += [pool(64 * (m + 1), 28), dense(256 * (m + 1), 100)]
        for i, layer in enumerate(layers):
            key = f"m{m}-l{i}"
            keys.add(key)
            for processor in ("cpu", "gpu"):
                for share in (0.25, 0.5, 1.0):
                    k = max(1, int(layer.out_channels * share))
                    t = law(layer, k, processor) * rng.uniform(0.98, 1.02)
                    parts.append(PartSample(key, processor, layer, k, t))
        models[f"model{m}"] = keys
    fp = {"cpu_model": "test cpu", "cpu_cores": 4, "gpu_kind": "llvm", "gpu_name": "test"}
    transfers = [
        {"direction": d, "memory": "pageable", "nbytes": n, "latency_us": 10.0 + n / 1e4}
        for d in ("h2d", "d2h")
        for n in (4096, 65536, 1 << 20, 1 << 24)
    ]
    target = {"host": {"kind": "llvm"}, "device": {"kind": "llvm"}}
    return ProfileData("test", fp, target, parts, transfers, [{"latency_us": 4.5}], models)


@pytest.fixture(scope="module")
def trained() -> CostModel:
    return train_cost_model(synthetic_data(), CostModelConfig(xgboost=FAST_XGB))


# ------------------------------------------------------------------------------ features
def test_features_of_a_conv_part():
    layer = conv(64, 128, 28, k=3, stride=2)
    values = dict(zip(FEATURE_NAMES, part_features(layer, 32, "gpu"), strict=True))
    assert len(part_features(layer, 32, "gpu")) == len(FEATURE_NAMES)
    assert values["is_conv2d"] == 1.0 and values["is_dense"] == 0.0
    assert values["channels"] == 32 and values["channel_share"] == 0.25
    assert values["kernel_h"] == 3 and values["stride"] == 2
    assert values["channels_mod16"] == 1.0 and values["in_channels_per_group_mod4"] == 1.0
    assert values["log2_flops"] == pytest.approx(np.log2(layer.flops / 4))
    # An ungrouped conv part reads the whole input; its output is its share.
    assert values["log2_bytes_in"] == pytest.approx(np.log2(layer.bytes_in))
    assert values["log2_bytes_out"] == pytest.approx(np.log2(layer.bytes_out / 4))


def test_features_of_depthwise_pool_and_dense_parts():
    dw_part = part_features(conv(96, 96, 14, groups=96), 24, "cpu")
    dw = dict(zip(FEATURE_NAMES, dw_part, strict=True))
    assert dw["is_depthwise"] == 1.0 and dw["groups_in_part"] == 24
    assert dw["log2_bytes_in"] == pytest.approx(np.log2(4 * 24 * 14 * 14))  # its input slice
    mp = dict(zip(FEATURE_NAMES, part_features(pool(64, 56, k=3), 64, "cpu"), strict=True))
    assert mp["is_max_pool2d"] == 1.0 and mp["kernel_h"] == 3
    fc = dict(zip(FEATURE_NAMES, part_features(dense(512, 1000), 1000, "gpu"), strict=True))
    assert fc["is_dense"] == 1.0 and fc["channel_share"] == 1.0 and fc["in_channels"] == 512


def test_features_see_the_epilogue_and_input_sign_that_were_timed():
    from mulayer.cost_model.data import layer_from_json

    relu6 = RELU6
    layer = replace(conv(32, 64, 28), epilogue=relu6, input_nonneg=False)
    values = dict(zip(FEATURE_NAMES, part_features(layer, 32, "cpu"), strict=True))
    assert values["epilogue_ops"] == 3 and values["epilogue_clamps"] == 1
    assert values["input_signed"] == 1.0
    relu = replace(layer, epilogue=("relax.add", "relax.nn.relu"), input_nonneg=True)
    values = dict(zip(FEATURE_NAMES, part_features(relu, 32, "cpu"), strict=True))
    assert values["epilogue_clamps"] == 0 and values["input_signed"] == 0.0
    # A profile row's layer entry takes the epilogue of the spec its part was timed with.
    spec = {"epilogue": [{"op": op} for op in relu6], "input_nonneg": True}
    read = layer_from_json(relu.to_json(), spec)
    assert read.epilogue == relu6 and read.input_nonneg
    assert layer_from_json(json.loads(json.dumps(relu.to_json()))) == relu  # tuples back


# ------------------------------------------------------------------------- partitioner API
def test_cost_model_api(trained):
    layer = conv(64, 128, 28)
    cpu = trained.layer_time_us(layer, "cpu", 64)
    gpu = trained.layer_time_us(layer, "gpu", 64)
    assert cpu == pytest.approx(law(layer, 64, "cpu"), rel=0.25)
    assert gpu == pytest.approx(law(layer, 64, "gpu"), rel=0.25)
    assert trained.layer_time_us(layer, "cpu", 0) == 0.0
    assert trained.layer_times_us(layer, "gpu", [0, 64]) == [0.0, pytest.approx(gpu)]
    with pytest.raises(MuLayerError, match="npu"):
        trained.layer_time_us(layer, "npu", 8)
    # The stand-in shares memory: copies are free; the sync was measured.
    assert trained.shared_memory
    assert trained.transfer_time_us(1 << 20, "h2d") == 0.0
    assert trained.sync_time_us() == pytest.approx(4.5)
    with pytest.raises(MuLayerError, match="direction"):
        trained.transfer_time_us(10, "sideways")


def test_transfers_fit_a_line():
    n = np.array([4096, 65536, 1 << 20, 1 << 24], dtype=float)
    a, b = fit_line(n, 12.0 + n / 2e4)
    assert a == pytest.approx(12.0, rel=1e-6) and b == pytest.approx(1 / 2e4, rel=1e-6)
    model = train_cost_model(synthetic_data(), CostModelConfig(xgboost=FAST_XGB))
    model.shared_memory = False
    assert model.transfer_time_us(1 << 22, "d2h") == pytest.approx(10 + (1 << 22) / 1e4)
    assert model.transfer_time_us(0, "h2d") == 0.0


# -------------------------------------------------------------------------------- archive
@pytest.mark.parametrize("predictor", ["xgboost", "flops_linear", "neurosurgeon"])
def test_save_load_round_trip(predictor, tmp_path):
    model = train_cost_model(
        synthetic_data(), CostModelConfig(predictor=predictor, xgboost=FAST_XGB)
    )
    path = tmp_path / "model.zip"
    save_cost_model(model, path)
    loaded = load_cost_model_file(path)
    rng = np.random.default_rng()
    for _ in range(5):
        layer = conv(int(rng.integers(8, 200)), 64, int(rng.integers(7, 60)))
        k = int(rng.integers(1, 65))
        for processor in ("cpu", "gpu"):
            assert loaded.layer_time_us(layer, processor, k) == pytest.approx(
                model.layer_time_us(layer, processor, k), rel=1e-5
            )
    assert loaded.transfer.to_json() == model.transfer.to_json()
    assert loaded.training["models"] == ["model0", "model1", "model2"]
    assert loaded.training["fingerprint"]["cpu_model"] == "test cpu"
    assert loaded.config.predictor == predictor


def _rewrite_manifest(path: Path, change) -> None:
    with zipfile.ZipFile(path) as zf:
        files = {name: zf.read(name) for name in zf.namelist()}
    manifest = json.loads(files["manifest.json"])
    change(manifest)
    files["manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)


def test_load_refuses_a_feature_schema_mismatch(trained, tmp_path):
    path = tmp_path / "model.zip"
    save_cost_model(trained, path)

    def rename(manifest):
        manifest["feature_schema"]["names"][0] = "is_conv3d"

    _rewrite_manifest(path, rename)
    with pytest.raises(MuLayerError, match="feature schema .*unknown is_conv3d"):
        load_cost_model_file(path)

    def bump(manifest):
        manifest["feature_schema"]["version"] = 99
        manifest["feature_schema"]["names"][0] = "is_conv2d"

    _rewrite_manifest(path, bump)
    with pytest.raises(MuLayerError, match="version 99"):
        load_cost_model_file(path)


def test_load_refuses_other_files(tmp_path, trained):
    with pytest.raises(MuLayerError, match="does not exist"):
        load_cost_model_file(tmp_path / "none.zip")
    junk = tmp_path / "junk.zip"
    junk.write_text("not a zip")
    with pytest.raises(MuLayerError, match="not a mulayer cost model"):
        load_cost_model_file(junk)
    path = tmp_path / "old.zip"
    save_cost_model(trained, path)
    _rewrite_manifest(path, lambda m: m.update(version=0))
    with pytest.raises(MuLayerError, match="archive version 0"):
        load_cost_model_file(path)


def test_default_model_is_chosen_by_fingerprint(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("MULAYER_DATA_DIR", str(tmp_path))
    spec = parse_target("mulayer, llvm, llvm")
    # Trained elsewhere: loaded, with a warning naming the difference.
    save_cost_model(trained, tmp_path / "cost-model-elsewhere.zip")
    with pytest.warns(UserWarning, match="other hardware.*cpu_model"):
        model = load_cost_model(target=spec)
    assert model.shared_memory
    # Trained here: loaded silently.
    trained.training["fingerprint"] = fingerprint(spec)
    save_cost_model(trained, tmp_path / "cost-model-here.zip")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_cost_model(target=spec)
    assert model.layer_time_us(conv(16, 16, 8), "gpu", 16) > 0
    # No model for the target's GPU kind.
    with pytest.raises(MuLayerError, match="no shipped cost model for a cuda target"):
        load_cost_model(target=parse_target("mulayer, cuda -arch=sm_90, llvm"))


def test_shipped_model_by_name(trained, tmp_path, monkeypatch):
    spec = parse_target("mulayer, llvm, llvm")
    # The package's own folder: `-cost-model=llvm-standin` is the shipped zip.
    assert resolve_path("llvm-standin") == data_dir() / "cost-model-llvm-standin.zip"
    assert resolve_path("llvm-standin").is_file()
    with pytest.raises(MuLayerError, match=r"'nonesuch' is neither a file nor.*llvm-standin"):
        load_cost_model("nonesuch", target=spec)
    # MULAYER_DATA_DIR overrides where names are looked up; paths stay paths.
    monkeypatch.setenv("MULAYER_DATA_DIR", str(tmp_path))
    trained.training["fingerprint"] = fingerprint(spec)
    save_cost_model(trained, tmp_path / "cost-model-mine.zip")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_cost_model("mine", target=spec).shared_memory
    assert resolve_path(tmp_path / "cost-model-mine.zip") == tmp_path / "cost-model-mine.zip"
    assert resolve_path("other.zip") == Path("other.zip")


def test_shipped_stand_in_model_loads():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # another CPU than the one it was measured on
        model = load_cost_model(target="mulayer, llvm, llvm")
    layer = conv(64, 64, 56)
    assert model.shared_memory
    times = [model.layer_time_us(layer, p, 32) for p in ("cpu", "gpu")]
    assert all(t > 0 and np.isfinite(t) for t in times)


# ----------------------------------------------------------------------------- evaluation
def test_holdout_eval_ranks_xgboost_first():
    report = holdout_eval(synthetic_data(), xgboost=FAST_XGB)
    metrics = report.metrics()
    assert set(metrics) == {"xgboost", "flops_linear", "neurosurgeon"}
    assert set(metrics["xgboost"]) == {"cpu", "gpu", "all"}
    assert set(report.folds) == {"model0", "model1", "model2"}
    n = metrics["xgboost"]["all"]["n"]
    assert n == len(synthetic_data().parts)  # every part is predicted once, held out
    # FLOPs alone miss the memory term; the per-kind regressions miss the kernels' tiling.
    within = {name: m["all"]["within"] for name, m in metrics.items()}
    assert metrics["xgboost"]["all"]["mape"] < metrics["flops_linear"]["all"]["mape"]
    assert within["xgboost"] > max(within["flops_linear"], within["neurosurgeon"])


def test_synthetic_layers_train_but_are_never_held_out():
    data = synthetic_data()
    data.synthetic = data.models.pop("model2")  # as the profiler's sweep
    report = holdout_eval(data, ("flops_linear",))
    assert set(report.folds) == {"model0", "model1"}
    # Each fold trains on the other model and the synthetic layers.
    assert report.folds["model0"]["train_layers"] == len(data.models["model1"] | data.synthetic)


def test_predictions_are_memoised_and_batched(trained):
    layer = conv(32, 64, 14)
    one = [trained.layer_time_us(layer, "cpu", k) for k in (8, 16, 64)]
    assert trained.layer_times_us(layer, "cpu", [8, 16, 64, 0]) == [*one, 0.0]
    renamed = conv(32, 64, 14, name="conv2d.7")  # same shape, another layer: same answer
    assert trained.layer_time_us(renamed, "cpu", 16) == one[1]
    assert trained.layer_time_us(layer, "cpu", 500) == one[2]  # clipped to the layer's 64
    # Another epilogue is another part: not answered from the first one's memo.
    relu, relu6 = replace(layer, epilogue=RELU), replace(layer, epilogue=RELU6)
    assert trained.layer_time_us(relu, "cpu", 16) < trained.layer_time_us(relu6, "cpu", 16)
    for other in (relu, relu6, replace(layer, input_nonneg=not layer.input_nonneg)):
        fresh = float(trained.predictors["cpu"].predict([(other, 16)])[0])
        assert trained.layer_time_us(other, "cpu", 16) == fresh


def test_profile_data_selects_one_profile():
    rows = [
        {"row": "sync", "profile_id": "a", "fingerprint": {}, "target": {}, "latency_us": 1},
        {"row": "sync", "profile_id": "b", "fingerprint": {}, "target": {}, "latency_us": 2},
    ]
    with pytest.raises(MuLayerError, match="mixes 2 profiles"):
        profile_data(rows)
    assert profile_data(rows, "b").syncs[0]["latency_us"] == 2
    with pytest.raises(MuLayerError, match="no measured rows"):
        profile_data([])


def test_later_runs_are_put_on_the_earliest_runs_scale():
    """A later run whose anchors (parts of the earliest run timed again) took 2x on the CPU and
    0.8x on the GPU has its parts scaled by 1/2 and 1/0.8; a run without anchors is left
    unscaled and named; rows without a run id are the earliest run."""
    rng = np.random.default_rng()
    head = {"profile_id": "p", "fingerprint": {}, "target": {}}
    layer = dataclasses.asdict(dense(64, 32))

    def row(kind, run, processor, index, us):
        key_part = f"k{index}/{processor}/32"
        extra = {"run": run} if run else {}
        return {
            "row": kind,
            "key": f"k{index}",
            "key_part": key_part,
            "processor": processor,
            "channels": 32,
            "layer": layer,
            "latency_us": us,
            **head,
            **extra,
        }

    first = {(p, i): float(rng.uniform(5, 500)) for p in ("cpu", "gpu") for i in range(6)}
    slower = {"cpu": 2.0, "gpu": 0.8}
    rows = [row("part", "", p, i, us) for (p, i), us in first.items()]
    rows += [row("anchor", "B", p, i, first[p, i] * slower[p]) for p, i in first if i < 3]
    rows += [row("part", "B", p, 10 + i, 100.0) for p in ("cpu", "gpu") for i in range(2)]
    rows += [row("part", "C", "cpu", 20, 100.0)]
    data = profile_data(rows)
    assert data.run_scales == {"B": pytest.approx({"cpu": 0.5, "gpu": 1.25})}
    assert data.unanchored_runs == ["C"]
    got = {(p.key, p.processor): p.latency_us for p in data.parts}
    assert got["k10", "cpu"] == pytest.approx(50.0) and got["k11", "gpu"] == pytest.approx(125.0)
    assert got["k20", "cpu"] == pytest.approx(100.0)
    assert got["k0", "cpu"] == pytest.approx(first["cpu", 0])  # the earliest run as measured
    assert data.summary()["run_scales"] == data.run_scales


def test_eval_script_json_on_shipped_data(capsys, monkeypatch):
    profile = ROOT / "data" / "profile-llvm-standin.jsonl"
    script = ROOT / "scripts" / "eval_cost_model.py"
    monkeypatch.setattr(sys, "argv", [str(script), str(profile), "--json"])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(script), run_name="__main__")
    assert info.value.code == 0
    out = json.loads(capsys.readouterr().out)
    predictors = {"xgboost", "flops_linear", "neurosurgeon"}
    extras = {"measurement", "crossing", "kernel_rules", "xgboost_breakdown", "config", "runs"}
    assert set(out) == predictors | extras
    assert out["runs"] == {"scales": {}, "unanchored": []}  # one run, made before run ids
    assert 0.0 < out["measurement"]["all"]["within"] <= 1.0
    # The features' mirror of the schedule rules names the rules the CPU side recorded (the
    # stand-in's "GPU" runs CPU rules, which the GPU mirror does not describe).
    assert out["kernel_rules"]["cpu"]["n"] > 0
    assert out["kernel_rules"]["cpu"]["agree"] == 1.0, out["kernel_rules"]["mismatches"]
    for name in ("xgboost", "flops_linear", "neurosurgeon"):
        for processor in ("cpu", "gpu"):
            assert 0.0 <= out[name][processor]["within"] <= 1.0
            assert out[name][processor]["n"] > 0


# Rule changes made after data/profile-h100.jsonl was measured: (recorded, derived now).
# Stride-2 int8 convs moved from VNNI to AMX tiles in session 6; the re-profile (issue 18)
# records them as such.
CHANGED_SINCE_PROFILE = {("Conv2dInt8DotProduct", "Conv2dInt8AMX")}


def test_kernel_rules_match_the_h100_profile():
    from mulayer.cost_model.evaluate import rule_agreement
    from mulayer.cost_model.kernels import kernel_info
    from mulayer.profiler import read_many

    data = profile_data(read_many([ROOT / "data" / "profile-h100.jsonl"]))
    agreement = rule_agreement(data)
    for processor in ("cpu", "gpu"):
        assert agreement[processor]["n"] > 0
        unexplained = {
            k: n
            for k, n in agreement["mismatches"].items()
            if not any(f"recorded {a}, derived {b}" in k for a, b in CHANGED_SINCE_PROFILE)
        }
        assert not unexplained, unexplained
    # ... and the changed ones are exactly the stride-2 convs, nothing else.
    traits = data.traits()
    for part in data.parts:
        if part.processor == "cpu" and part.rule == "Conv2dInt8DotProduct":
            derived = kernel_info(part.layer, part.channels, "cpu", traits).rule
            if derived == "Conv2dInt8AMX":
                assert tuple(part.layer.strides) == (2, 2), part.layer


# ------------------------------------------------------------------------ kernel features
H100_TARGET = {
    "host": {"kind": "llvm", "mcpu": "emeraldrapids", "num-cores": 16},
    "device": {"kind": "cuda", "arch": "sm_90"},
}


def _spec(cin, cout, hw, k=3, stride=1, groups=1):
    from mulayer.profiler.layer_spec import LayerSpec

    pad = k // 2
    out = (hw + 2 * pad - k) // stride + 1
    return LayerSpec(
        kind="conv2d",
        input_shape=[1, cin, hw, hw],
        output_shape=[1, cout, out, out],
        weight_shape=[cout, cin // groups, k, k],
        attrs={"strides": [stride] * 2, "padding": [pad] * 4, "dilation": [1, 1], "groups": groups},
        epilogue=[{"op": "relax.nn.relu"}],
        input_nonneg=True,
    )


@pytest.mark.parametrize(
    "processor, spec_args, channels",
    [
        ("cpu", (64, 64, 14), 32),  # AMX (16 | F, stride 1)
        ("cpu", (64, 64, 14, 3, 2), 32),  # stride 2: AMX too (strided tile loads)
        ("cpu", (3, 24, 20, 3, 2), 24),  # C = 3: int32 channel vectors
        ("cpu", (32, 32, 14, 3, 1, 32), 16),  # depthwise: int8 depthwise rule (width vectors)
        ("gpu", (32, 96, 14), 64),  # tensor-core rule
        ("gpu", (32, 96, 14), 24),  # F < 64: dlight, or a narrow J tile with the switch on
        ("gpu", (48, 48, 14, 3, 1, 48), 24),  # depthwise rule
    ],
)
@pytest.mark.parametrize("narrow", ["0", "1"], ids=["narrow_off", "narrow_on"])
def test_kernel_info_names_the_rule_the_build_uses(
    processor, spec_args, channels, narrow, monkeypatch
):
    """The features' mirror of the rules' gating agrees with the rules run on the built part
    (MULAYER_GPU_NARROW_CONV on and off)."""
    import tvm

    monkeypatch.setenv("MULAYER_GPU_NARROW_CONV", narrow)

    from mulayer.cost_model.kernels import kernel_info, normalize_rule, traits_for
    from mulayer.frontend.layers import splittable_layers
    from mulayer.profiler.builder import schedule_parts
    from mulayer.profiler.layer_spec import layer_module
    from mulayer.profiler.parts import part_function

    spec = _spec(*spec_args)
    (layer,) = splittable_layers(layer_module(spec)["main"])
    func, _ = part_function(spec, processor, channels)
    host = tvm.target.Target(H100_TARGET["host"])
    target = host if processor == "cpu" else tvm.target.Target(H100_TARGET["device"], host)
    _, schedules = schedule_parts({"part": func}, target)
    info = kernel_info(layer, channels, processor, traits_for(H100_TARGET))
    assert info.rule == normalize_rule(schedules["part"]["rule"])


def test_kernel_info_parameters():
    from mulayer.cost_model.kernels import MachineTraits, kernel_info

    traits = MachineTraits(
        cpu_cores=16,
        cpu_vector_bits=512,
        cpu_vector_registers=32,
        cpu_dot_lanes=(16, 8),
        cpu_amx=True,
        gpu_arch=90,
        gpu_sms=132,
    )
    layer = conv(64, 128, 28)
    gpu = kernel_info(layer, 128, "gpu", traits)
    assert gpu.rule == "Conv2dTensorCore" and gpu.tensor_path == 1
    # 784 pixels in 32-row tiles x 128 channels in 64-column tiles, K (576) split in two
    # (50 blocks would leave most SMs idle): 100 blocks, one partial wave.
    assert gpu.blocks == 100 and gpu.waves == 1 and gpu.occupancy == pytest.approx(100 / 132)
    assert 0 < gpu.tile_util < 1 and gpu.effective_flops > gpu.flops
    cpu = kernel_info(layer, 128, "cpu", traits)
    assert cpu.rule == "Conv2dInt8AMX" and cpu.chunks_per_thread == np.ceil(cpu.tasks / 16)
    # Without AMX or VNNI the same conv falls to the int32 vector rule.
    plain = MachineTraits(cpu_cores=4, cpu_vector_bits=256, cpu_vector_registers=16)
    assert kernel_info(layer, 128, "cpu", plain).rule == "Conv2dChannelVector"
    assert kernel_info(layer, 128, "gpu", plain).rule == "Matmul"  # no tensor cores
    # More channels, more bytes and work; kernel features are part of the schema.
    assert kernel_info(layer, 64, "gpu", traits).bytes < gpu.bytes
    assert "rule_Conv2dTensorCore" in FEATURE_NAMES and "gpu_waves" in FEATURE_NAMES


def test_roofline_prior_recovers_its_constants():
    from mulayer.cost_model.predictors import RooflinePrior

    rng = np.random.default_rng(1)
    flops = 10 ** rng.uniform(5, 10, 200)
    nbytes = 10 ** rng.uniform(4, 8, 200)
    rules = np.array(["a"] * 200)
    y = (5.0 + np.maximum(flops / 2e5, nbytes / 1e4)) * rng.uniform(0.97, 1.03, 200)
    prior = RooflinePrior().fit(flops, nbytes, rules, y)
    err = np.abs(prior.predict(flops, nbytes, rules) - y) / y
    assert np.mean(err) < 0.05
    assert prior.params["a"]["form"] == "max"
    assert np.exp(prior.params["a"]["log"][0]) == pytest.approx(5.0, rel=0.3)


@pytest.mark.parametrize("prior", ["margin", "feature", "none"])
def test_xgboost_prior_uses_train_save_and_predict(prior, tmp_path):
    from dataclasses import replace

    config = CostModelConfig(xgboost=replace(FAST_XGB, prior=prior))
    model = train_cost_model(synthetic_data(3), config)
    layer = conv(64, 128, 28)
    path = save_cost_model(model, tmp_path / "m.zip")
    loaded = load_cost_model_file(path)
    for processor in ("cpu", "gpu"):
        t = model.layer_time_us(layer, processor, 64)
        assert t == pytest.approx(law(layer, 64, processor), rel=0.3)
        assert loaded.layer_time_us(layer, processor, 64) == pytest.approx(t, rel=1e-5)
    with pytest.raises(MuLayerError, match="prior 'bogus'"):
        train_cost_model(
            synthetic_data(3), CostModelConfig(xgboost=replace(FAST_XGB, prior="bogus"))
        )


def test_evaluation_extras_on_synthetic_data():
    from mulayer.cost_model.evaluate import repeatability, rule_agreement, transfer_eval

    data = synthetic_data(4)
    rng = np.random.default_rng(0)
    for p in data.parts:
        p.samples_us = tuple(p.latency_us * rng.uniform(0.9, 1.1, 5))
    noise = repeatability(data)
    assert 0 < noise["all"]["spread_median"] <= 0.2 + 1e-9 and noise["all"]["repeats"] == 5
    assert 0 <= noise["all"]["parts_within"] <= noise["all"]["within"] <= 1
    crossing = transfer_eval(data)
    assert crossing["h2d"]["mape"] < 1.0 and crossing["sync"]["median_us"] == 4.5
    # Parts that record no rule are skipped; a recorded rule is compared.
    assert rule_agreement(data)["cpu"]["n"] == 0
    for p in data.parts:
        p.rule = "Bogus"
    assert rule_agreement(data)["gpu"]["agree"] == 0.0
    report = holdout_eval(data, ("xgboost",), xgboost=FAST_XGB)
    groups = report.by_group("xgboost")
    for group in ("rule", "latency", "epilogue"):
        assert sum(m["n"] for m in groups[group].values()) == len(report.predictions)
    for key, metrics in groups["epilogue"].items():
        processor, kind = key.split("/")
        ratios = [
            p.predicted_us / p.measured_us
            for p in report.predictions
            if (p.processor, p.epilogue) == (processor, kind)
        ]
        assert metrics["median_ratio"] == pytest.approx(float(np.median(ratios)))


def test_crossings_are_priced_with_pinned_lines_where_the_profile_has_them():
    """transfer_memory "auto" (the default): the profile's pinned rows (the crossing function on
    page-locked buffers, what the executor pays) where it has them, else the pageable ones."""
    from mulayer.cost_model.transfer import chosen_memory, fit_transfers

    rng = np.random.default_rng()
    sizes = [4096 << i for i in range(10)]
    lines = {"pageable": (9.0 + rng.random(), 1e-4), "pinned": (5.0 + rng.random(), 2e-5)}
    rows = [
        {"direction": d, "memory": m, "nbytes": n, "latency_us": a + b * n}
        for m, (a, b) in lines.items()
        for d in ("h2d", "d2h")
        for n in sizes
    ]
    assert chosen_memory(rows, "auto") == "pinned"
    assert chosen_memory([r for r in rows if r["memory"] == "pageable"], "auto") == "pageable"
    assert chosen_memory(rows, "pageable") == "pageable"
    model = fit_transfers(rows, [], chosen_memory(rows, "auto"))
    assert model.memory == "pinned"
    assert np.allclose(model.lines["h2d"], lines["pinned"], rtol=1e-6)
