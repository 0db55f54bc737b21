"""Calibration: ranges from the canonical module, the stats file, the samples file."""

from __future__ import annotations

import numpy as np
import pytest
from tvm import relax
from tvm.script import relax as R

from mulayer import MuLayerError
from mulayer.compiler.calibration import (
    CalibrationStats,
    activation_qparams,
    calibrate,
    load_calibration_npz,
    quantize_activation,
)
from mulayer.tensor_spec import TensorSpec

SHAPE = (1, 3, 8, 8)


def _module(rng: np.random.Generator):
    """conv2d.0 (+bias, relu) -> max_pool2d.0 -> conv2d.1 (no epilogue)."""
    w0 = rng.standard_normal((8, 3, 3, 3)).astype("float32") * 0.3
    b0 = rng.standard_normal((1, 8, 1, 1)).astype("float32") * 0.1
    w1 = rng.standard_normal((4, 8, 1, 1)).astype("float32") * 0.3
    bb = relax.BlockBuilder()
    x = relax.Var("data", relax.TensorType(SHAPE, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(R.nn.conv2d(x, R.const(w0), padding=1))
            y = bb.emit(R.nn.relu(bb.emit(R.add(y, R.const(b0)))))
            p = bb.emit(R.nn.max_pool2d(y, pool_size=2, strides=2))
            out = bb.emit_output(R.nn.conv2d(p, R.const(w1)))
        bb.emit_func_output(out)
    return bb.get(), (w0, b0, w1)


def _reference(x, w0, b0, w1):
    from mulayer.compiler.calibration import conv2d_nchw

    y = np.maximum(conv2d_nchw(x, w0, (1, 1), (1, 1, 1, 1), (1, 1), 1) + b0, 0)
    p = y.reshape(1, 8, 4, 2, 4, 2).max(axis=(3, 5))
    return x, y, p, conv2d_nchw(p, w1, (1, 1), (0, 0, 0, 0), (1, 1), 1)


def test_calibrate_ranges_match_numpy():
    rng = np.random.default_rng(0)
    mod, weights = _module(rng)
    samples = rng.standard_normal((3, *SHAPE)).astype("float32")
    stats = calibrate(mod, samples)
    assert set(stats.layers) == {"conv2d.0", "max_pool2d.0", "conv2d.1"}
    assert stats.num_samples == 3
    refs = [_reference(s, *weights) for s in samples]
    x, y, p, z = (np.stack([r[i] for r in refs]) for i in range(4))
    c0, c1 = stats["conv2d.0"], stats["conv2d.1"]
    np.testing.assert_allclose([c0.input_min, c0.input_max], [x.min(), x.max()], rtol=1e-6)
    # conv2d.0's output is taken after its epilogue (bias, relu): what the join sees.
    np.testing.assert_allclose([c0.output_min, c0.output_max], [0.0, y.max()], rtol=1e-4)
    np.testing.assert_allclose([c1.input_min, c1.input_max], [0.0, p.max()], rtol=1e-4)
    np.testing.assert_allclose([c1.output_min, c1.output_max], [z.min(), z.max()], rtol=1e-4)
    assert c1.input_zero_point == 0  # post-ReLU input: the zero point is 0
    assert 0 < c0.input_zero_point < 255
    assert stats["max_pool2d.0"].sqnr_db() is None
    assert c0.sqnr_db() > 30.0 and c1.sqnr_db() > 30.0
    # The SQNR of a slice uses only its channels.
    assert c0.sqnr_db(4, 8) != c0.sqnr_db(0, 4)


def test_percentile_clips_the_tail():
    rng = np.random.default_rng(1)
    mod, _ = _module(rng)
    samples = rng.standard_normal((2, *SHAPE)).astype("float32")
    samples[0, 0, 0, 0, 0] = 50.0
    minmax = calibrate(mod, samples)
    pct = calibrate(mod, samples, method="percentile", percentile=99.0)
    assert minmax["conv2d.0"].input_max == pytest.approx(50.0)
    assert pct["conv2d.0"].input_max < 5.0


def test_search_picks_the_range_with_the_least_layer_error():
    """The "search" method's pick for each layer equals a brute-force numpy search over the
    same candidate ranges (min/max and SEARCH_PERCENTILES) of the layer's input-only error."""
    from mulayer.compiler.calibration import SEARCH_PERCENTILES, conv2d_nchw

    rng = np.random.default_rng(5)
    mod, weights = _module(rng)
    samples = rng.standard_normal((4, *SHAPE)).astype("float32")
    samples[1, 0, 1, 2, 3], samples[2, 0, 2, 5, 1] = 9.0, -7.0  # a tail to clip, or not
    stats = calibrate(mod, samples, method="search")
    refs = [_reference(s, *weights) for s in samples]
    attrs = {
        "conv2d.0": (0, weights[0], ((1, 1), (1, 1, 1, 1), (1, 1), 1)),
        "conv2d.1": (2, weights[2], ((1, 1), (0, 0, 0, 0), (1, 1), 1)),
    }
    for name, (slot, w, conv) in attrs.items():
        xs = [r[slot] for r in refs]
        values = np.concatenate([x.ravel() for x in xs])
        ranges = {"min/max": (values.min(), values.max())}
        for p in SEARCH_PERCENTILES:
            ranges[f"p{p:g}"] = (np.percentile(values, 100 - p), np.percentile(values, p))
        error = {}
        for label, (lo, hi) in ranges.items():
            scale, zp = activation_qparams(lo, hi)
            total = 0.0
            for x in xs:
                xq = (quantize_activation(x, scale, zp).astype(np.float32) - zp) * scale
                ref = conv2d_nchw(x, w, *conv).astype(np.float64)
                got = conv2d_nchw(xq, w, *conv).astype(np.float64)
                total += ((got - ref) ** 2).sum() / (ref**2).sum()
            error[label] = total
        best = min(error, key=error.get)
        assert stats[name].input_range == best, (name, error)
        assert stats[name].input_scale == pytest.approx(activation_qparams(*ranges[best])[0])
    assert stats.method == "search" and stats["conv2d.0"].sqnr_db() > 25.0


def test_receptive_fields_give_the_conv_at_sampled_positions():
    from mulayer.compiler.calibration import _conv_out_hw, _patches, conv2d_nchw

    rng = np.random.default_rng()
    cases = [(8, 16, 1, 3, 1, 1, 1, 9), (8, 8, 8, 3, 2, 1, 1, 10), (4, 6, 2, 3, 2, 2, 2, 11)]
    for c, o, groups, k, stride, pad, dil, hw in cases:
        x = rng.standard_normal((3, c, hw, hw)).astype("float32")
        w = rng.standard_normal((o, c // groups, k, k)).astype("float32")
        attrs = {
            "strides": [stride] * 2,
            "padding": [pad] * 4,
            "dilation": [dil] * 2,
            "groups": groups,
        }
        full = conv2d_nchw(x, w, **attrs)
        assert full.shape[2:] == _conv_out_hw(x.shape, w.shape, **attrs)
        positions = rng.choice(full.shape[2] * full.shape[3], 7, replace=False)
        cols = _patches(x, w.shape, positions=positions, **attrs)  # [n, g, k, p]
        got = (w.reshape(groups, o // groups, -1)[None] @ cols).reshape(3, o, -1)
        np.testing.assert_allclose(
            got, full.reshape(3, o, -1)[:, :, positions], rtol=1e-5, atol=1e-5
        )


def test_qparams_cover_zero_exactly():
    scale, zp = activation_qparams(-1.0, 3.0)
    assert zp == 64 and scale == pytest.approx(4.0 / 255, rel=1e-6)
    assert quantize_activation(np.zeros(3, "float32"), scale, zp).tolist() == [zp] * 3
    assert activation_qparams(0.0, 0.0) == (1.0, 0)


def test_stats_json_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    mod, _ = _module(rng)
    stats = calibrate(mod, [{"data": rng.standard_normal(SHAPE).astype("float32")}])
    path = tmp_path / "calib.json"
    stats.save(path)
    loaded = CalibrationStats.load(path)
    assert loaded == stats
    path.write_text(path.read_text().replace('"schema_version": 1', '"schema_version": 99'))
    with pytest.raises(MuLayerError, match="schema version 99"):
        CalibrationStats.load(path)
    with pytest.raises(MuLayerError, match="does not exist"):
        CalibrationStats.load(tmp_path / "missing.json")


def test_calibrate_rejects_bad_samples():
    mod, _ = _module(np.random.default_rng(3))
    with pytest.raises(MuLayerError, match=r"shape \[2, 3, 9, 9\], expected \[N, 1, 3, 8, 8\]"):
        calibrate(mod, np.zeros((2, 3, 9, 9), "float32"))
    with pytest.raises(MuLayerError, match="expected \\['data'\\]"):
        calibrate(mod, [{"image": np.zeros(SHAPE, "float32")}])
    with pytest.raises(MuLayerError, match="method 'mean'"):
        calibrate(mod, np.zeros((1, *SHAPE), "float32"), method="mean")


SPECS = [TensorSpec("data", SHAPE, "float32")]


def test_npz_accepts_arrays_named_after_the_inputs_only(tmp_path):
    arr = np.random.default_rng(4).standard_normal((5, 3, 8, 8)).astype("float32")
    np.savez(tmp_path / "named.npz", data=arr)
    np.savez(tmp_path / "batched.npz", data=arr[:, None])  # [N, 1, 3, 8, 8]
    for name in ("named.npz", "batched.npz"):
        loaded = load_calibration_npz(tmp_path / name, SPECS)
        assert list(loaded) == ["data"] and loaded["data"].shape == (5, *SHAPE)
        np.testing.assert_array_equal(loaded["data"][:, 0], arr)
    # A single array under another name is refused, as `mulayer run --inputs` refuses it.
    np.savez(tmp_path / "single.npz", arr[:, None])  # under the name arr_0
    with pytest.raises(MuLayerError, match=r"\['arr_0'\] do not match the model's inputs"):
        load_calibration_npz(tmp_path / "single.npz", SPECS)


def test_npz_errors(tmp_path):
    with pytest.raises(MuLayerError, match="does not exist"):
        load_calibration_npz(tmp_path / "nope.npz", SPECS)
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(MuLayerError, match="not a readable .npz"):
        load_calibration_npz(tmp_path / "junk.npz", SPECS)
    np.savez(tmp_path / "shape.npz", data=np.zeros((2, 3, 7, 7), "float32"))
    with pytest.raises(MuLayerError, match=r"'data' has shape \[2, 3, 7, 7\]"):
        load_calibration_npz(tmp_path / "shape.npz", SPECS)
    np.savez(tmp_path / "dtype.npz", data=np.zeros((2, 3, 8, 8), "int64"))
    with pytest.raises(MuLayerError, match="dtype int64, expected float32"):
        load_calibration_npz(tmp_path / "dtype.npz", SPECS)
    np.savez(tmp_path / "names.npz", a=np.zeros((2, 3, 8, 8)), b=np.zeros((2, 3, 8, 8)))
    with pytest.raises(MuLayerError, match=r"unknown: a, b.*missing: data"):
        load_calibration_npz(tmp_path / "names.npz", SPECS)
    np.savez(tmp_path / "empty.npz", data=np.zeros((0, 3, 8, 8), "float32"))
    with pytest.raises(MuLayerError, match="no samples"):
        load_calibration_npz(tmp_path / "empty.npz", SPECS)
