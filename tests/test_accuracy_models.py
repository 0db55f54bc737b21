"""Int8/fp16 accuracy on the real pretrained nets and bundled photos (needs the models extra)."""

import pytest

pytest.importorskip("torch")

import mulayer  # noqa: E402
from mulayer.models.accuracy import agreement  # noqa: E402
from mulayer.models.reference import onnxruntime_session  # noqa: E402

pytestmark = [pytest.mark.models, pytest.mark.slow]


@pytest.fixture(scope="module")
def photos():
    from mulayer.models.pretrained import load_photos

    return load_photos()


@pytest.mark.parametrize("name", ["mobilenetv2_pretrained", "efficientnet_lite0"])
@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_int8_keeps_top1_and_top5(name, ratio, photos, tmp_path):
    from mulayer.models.pretrained import save_pretrained

    path = save_pretrained(name, tmp_path / f"{name}.onnx")
    compiled = mulayer.compile(
        str(path),
        target=f"mulayer -ratio={ratio}, llvm, llvm",
        calibration={"input": photos.calibration_batch()},  # disjoint from the test photos
    )
    precision = compiled.metadata()["precision"]
    assert sum("int8" in d["precision"] for d in precision.values()) > len(precision) // 2
    compiled.export(tmp_path / "m.mulayer")
    model = mulayer.load(tmp_path / "m.mulayer")
    reference = onnxruntime_session(path)
    result = agreement(
        lambda x: next(iter(model(x).values())),
        lambda x: reference.run(None, {"input": x})[0],
        photos.test,
    )
    assert result.top1_equal == result.photos
    assert result.top5_overlap >= 0.95


# Top-1 agreement with fp32 over the 200 views, measured 2026-12-06 (docs/results.md "CPU int8
# kernels, session 4"): MobileNetV2 186/200 (onnxruntime static int8: 173/200), EfficientNet-
# Lite0 192/200 (onnxruntime: 192/200). The floors guard against regressions; issue 14's goal
# (99%) is not met yet, by either system.
VIEW_AGREEMENT_FLOOR = {"mobilenetv2_pretrained": 0.90, "efficientnet_lite0": 0.94}


@pytest.mark.parametrize("name", ["mobilenetv2_pretrained", "efficientnet_lite0"])
def test_cpu_only_int8_top1_on_augmented_views(name, photos, tmp_path):
    """Four photos are a thin sample: 200 augmented views (crops, flips, scales) of them, none
    used for calibration; CPU-only int8 keeps fp32's top-1 on most of them."""
    from mulayer.models.pretrained import augmented_test_views, save_pretrained

    path = save_pretrained(name, tmp_path / f"{name}.onnx")
    compiled = mulayer.compile(
        str(path),
        target="mulayer -ratio=0, llvm, llvm",
        calibration={"input": photos.calibration_batch()},
    )
    model = mulayer.load(compiled.export(tmp_path / "m.mulayer"))
    reference = onnxruntime_session(path)
    views = augmented_test_views()
    result = agreement(
        lambda x: next(iter(model(x).values())),
        lambda x: reference.run(None, {"input": x})[0],
        views,
    )
    assert result.photos >= 200
    assert result.top1_equal >= VIEW_AGREEMENT_FLOOR[name] * result.photos, result.row()
