"""The Plan dataclass: validation, aligned splits, JSON round trip."""

import json

import pytest

from mulayer import LayerDecision, MuLayerError, Plan
from mulayer.plan import aligned_split


def test_round_trip(tmp_path):
    plan = Plan(
        default_ratio=0.5,
        align=16,
        layers={
            "conv2d.0": LayerDecision("split", "channel", 32, predicted_ms=0.1),
            "dense.0": LayerDecision("gpu"),
        },
    )
    path = tmp_path / "plan.json"
    plan.save(path)
    assert Plan.load(path) == plan
    assert json.loads(path.read_text())["schema_version"] == 1


@pytest.mark.parametrize("ratio", [-0.1, 1.01, float("nan"), "half"])
def test_out_of_range_ratio(ratio):
    with pytest.raises(MuLayerError, match="ratio"):
        Plan(default_ratio=ratio)


@pytest.mark.parametrize(
    ("decision", "message"),
    [
        ({"placement": "tpu"}, "placement 'tpu'"),
        ({"placement": "split", "axis": "width", "gpu_size": 8}, "axis 'width'"),
        ({"placement": "split"}, "gpu_size"),
        ({"placement": "split", "gpu_size": -8}, "gpu_size"),
    ],
)
def test_bad_layer_decisions(decision, message):
    raw = {"default_ratio": 0.5, "layers": {"conv2d.0": decision}}
    with pytest.raises(MuLayerError, match=message):
        Plan.from_json(json.dumps(raw))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"default_ratio": 0.5, "speed": 3}', "unknown field"),
        ('{"schema_version": 99}', "schema version 99"),
        ('{"layers": {"conv2d.0": {"where": "gpu"}}}', "malformed layer"),
    ],
)
def test_bad_plan_files(text, message):
    with pytest.raises(MuLayerError, match=message):
        Plan.from_json(text)


def test_check_layers_names_unknown():
    plan = Plan(layers={"conv2d.99": LayerDecision("gpu")})
    with pytest.raises(MuLayerError, match="conv2d.99"):
        plan.check_layers(["conv2d.0", "conv2d.1"])
    Plan(layers={"conv2d.1": LayerDecision("cpu")}).check_layers(["conv2d.0", "conv2d.1"])


@pytest.mark.parametrize(
    ("size", "ratio", "align", "expected"),
    [
        (64, 0.0, 8, 0),
        (64, 1.0, 8, 64),
        (64, 0.5, 8, 32),
        (64, 0.25, 8, 16),
        (100, 0.5, 8, 48),
        (12, 0.5, 8, 12),  # too small to split: the larger share takes it all
        (12, 0.4, 8, 0),
        (1000, 0.333, 16, 336),
    ],
)
def test_aligned_split(size, ratio, align, expected):
    gpu = aligned_split(size, ratio, align)
    assert gpu == expected
    assert 0 <= gpu <= size
    assert gpu in (0, size) or gpu % align == 0


def test_gpu_size_follows_decisions():
    plan = Plan(
        default_ratio=0.5,
        layers={
            "conv2d.0": LayerDecision("gpu"),
            "conv2d.1": LayerDecision("cpu"),
            "conv2d.2": LayerDecision("split", gpu_size=24),
        },
    )
    assert plan.gpu_size("conv2d.0", 64) == 64
    assert plan.gpu_size("conv2d.1", 64) == 0
    assert plan.gpu_size("conv2d.2", 64) == 24
    assert plan.gpu_size("conv2d.3", 64) == 32


def test_plans_without_prediction_fields_still_load():
    """Plans written before ``baselines_ms`` and ``notes`` existed load unchanged."""
    old = '{"align": 8, "default_ratio": 0.5, "layers": {"conv2d.0": {"placement": "gpu"}}}'
    plan = Plan.from_json(old)
    assert plan.baselines_ms == {} and plan.notes == [] and plan.predicted_ms is None
    assert plan.gpu_size("conv2d.0", 64) == 64


def test_prediction_fields_round_trip():
    plan = Plan(
        layers={"conv2d.0": LayerDecision("split", gpu_size=16, predicted_ms=0.25)},
        predicted_ms=1.5,
        baselines_ms={"gpu": 2.0, "cpu": 3.0},
        notes=["auto plan: cooperative"],
    )
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert json.loads(plan.to_json())["schema_version"] == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"notes": "one"}', "notes"),
        ('{"baselines_ms": {"gpu": "fast"}}', "baselines_ms"),
        ('{"layers": ["conv2d.0"]}', "layers must map"),
    ],
)
def test_bad_prediction_fields(text, message):
    with pytest.raises(MuLayerError, match=message):
        Plan.from_json(text)


def test_sole_processor():
    sizes = {"conv2d.0": 64, "dense.0": 10}
    assert Plan.uniform(1.0).sole_processor(sizes) == "gpu"
    assert Plan.uniform(0.0).sole_processor(sizes) == "cpu"
    assert Plan.uniform(0.5).sole_processor(sizes) is None
    mixed = Plan(layers={"conv2d.0": LayerDecision("gpu"), "dense.0": LayerDecision("cpu")})
    assert mixed.sole_processor(sizes) is None


# ------------------------------------------------------------- issue 17: plan files checked
def test_the_plan_format_is_documented_in_help_and_readme():
    from pathlib import Path

    doc = Plan.__doc__
    for word in ("default_ratio", "align", "layers", "placement", "gpu_size", '"split"'):
        assert word in doc, word
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### Plan files") :]
    assert '"default_ratio"' in section and '"gpu_size"' in section


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"layers": {}}, "plan has no default_ratio"),
        ({"default_ratio": True}, "default_ratio is True; it must be a number"),
        ({"default_ratio": "0.5"}, "default_ratio is '0.5'; it must be a number"),
        ({"default_ratio": 0.5, "align": "8"}, "align is '8'; it must be a positive integer"),
        ({"default_ratio": 0.5, "layers": {"conv2d.0": "gpu"}}, "'gpu' is not an object"),
        (
            {"default_ratio": 0.5, "layers": {"conv2d.0": {"placment": "gpu"}}},
            "unknown field\\(s\\) placment; valid: placement, axis, gpu_size, predicted_ms",
        ),
        (
            {"default_ratio": 0.5, "layers": {"conv2d.0": {"placement": "split", "gpu_size": 8.0}}},
            "gpu_size 8.0 must be an integer",
        ),
        (
            {"default_ratio": 0.5, "layers": {"d": {"placement": "gpu", "predicted_ms": "1"}}},
            "predicted_ms '1' must be a number",
        ),
    ],
)
def test_plan_files_are_checked_on_load(raw, message):
    with pytest.raises(MuLayerError, match=message):
        Plan.from_json(json.dumps(raw))


def test_gpu_size_must_be_a_multiple_of_align():
    plan = Plan(align=8, layers={"conv2d.0": LayerDecision("split", gpu_size=13)})
    with pytest.raises(MuLayerError, match="gpu_size 13 is not a multiple of the plan's align 8"):
        plan.gpu_size("conv2d.0", 32)
    assert Plan(layers={"c": LayerDecision("split", gpu_size=16)}).gpu_size("c", 32) == 16
    assert Plan(layers={"c": LayerDecision("split", gpu_size=10)}).gpu_size("c", 10) == 10


def test_layers_the_plan_does_not_name_follow_its_default_ratio(tiny_onnx, tmp_path, capsys):
    from mulayer.cli.main import main
    from mulayer.runtime.artifact import read_metadata

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"default_ratio": 0, "layers": {"conv2d.1": {"placement": "gpu"}}}))
    out = tmp_path / "m.mulayer"
    argv = ["compile", str(tiny_onnx), "--target", "mulayer, llvm, llvm", "--plan", str(plan)]
    assert main([*argv, "-o", str(out)]) == 0
    placements = {k: v["placement"] for k, v in read_metadata(out)[0]["precision"].items()}
    assert placements.pop("conv2d.1") == "gpu"
    assert set(placements.values()) == {"cpu"}
    # A target -ratio is not silently ignored (nor shown by inspect): it is refused.
    argv[3] = "mulayer -ratio=0.25, llvm, llvm"
    assert main([*argv, "-o", str(tmp_path / "r.mulayer")]) == 2
    assert "-ratio=0.25 would be ignored" in capsys.readouterr().err
    import mulayer

    with pytest.raises(MuLayerError, match="would be ignored"):
        mulayer.compile(str(tiny_onnx), target="mulayer -ratio=0.25, llvm, llvm", plan=plan)
