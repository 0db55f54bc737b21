"""The partitioner: layer graph, plan simulator, split search and ``-split=auto``.

Synthetic estimators (:class:`AnalyticEstimator`) give cases whose optimum is known; the simulator
is checked against what SplitChannels + PlaceDevices really emit; auto plans are built and run on
the llvm + llvm stand-in and compared with onnxruntime.
"""

from __future__ import annotations

import functools
import json
import random
import warnings

import numpy as np
import pytest
from tvm import relax

import mulayer
import mulayer.partitioner as partitioner_pkg
from mulayer import LayerDecision, MuLayerError, Plan
from mulayer.cli.main import main
from mulayer.models.zoo import INPUT_NAME, GraphBuilder
from mulayer.partitioner import (
    AnalyticEstimator,
    CachedEstimator,
    PartitionerConfig,
    layer_graph,
    partition,
    simulate,
)
from mulayer.partitioner.graph import INPUT
from mulayer.partitioner.search import split_points

from .conftest import max_rel_error, onnxruntime_reference
from .relax_nets import canonical, odd, tiny

FP16_TOLERANCE = 2e-2  # as in test_cooperative: fp16 GPU parts, fp32 CPU parts (no calibration)
BENCHMARK_MODELS = ("resnet18", "resnet50", "mobilenetv2", "googlenet", "squeezenet1_1", "vgg16")

# Equal processors, free copies, no sync or launch cost: the ideal split is half of everything.
EQUAL = AnalyticEstimator(
    gpu_launch_us=0.0, cpu_launch_us=0.0, sync_us=0.0, copy_latency_us=0.0, shared_memory=True
)


# ------------------------------------------------------------------------------- synthetic nets
@functools.cache
def chain_net():
    """Four 64-channel 3x3 convs in a chain, then a classifier."""
    b = GraphBuilder((1, 16, 32, 32), seed=0)
    x = INPUT_NAME
    for i in range(4):
        x = b.relu(b.conv(x, f"c{i}", 64, 3), f"c{i}.relu")
    x = b.flatten(b.global_avgpool(x, "gap"), "flatten")
    return canonical(b.finish(b.gemm(x, "fc", 10), "chain"))


@functools.cache
def two_branch_net():
    """A small stem, two identical branches of two 3x3 convs, their concat, a classifier."""
    b = GraphBuilder((1, 16, 32, 32), seed=0)
    stem = b.relu(b.conv(INPUT_NAME, "stem", 16, 1), "stem.relu")
    branches = []
    for name in ("a", "b"):
        x = b.relu(b.conv(stem, f"{name}0", 64, 3), f"{name}0.relu")
        branches.append(b.relu(b.conv(x, f"{name}1", 64, 3), f"{name}1.relu"))
    x = b.flatten(b.global_avgpool(b.concat(branches, "cat"), "gap"), "flatten")
    return canonical(b.finish(b.gemm(x, "fc", 10), "two_branch"))


def _convs(graph):
    return [layer for layer in graph.layers if layer.kind == "conv2d"]


# ---------------------------------------------------------------------------------- the graph
def test_layer_graph_of_tiny():
    graph = layer_graph(tiny())
    names = [layer.name for layer in graph.layers]
    assert names[:3] == ["conv2d.0", "conv2d.1", "max_pool2d.0"]
    assert graph.preds("conv2d.0") == [INPUT]
    assert graph.preds("conv2d.1") == ["conv2d.0"]
    # The residual add reads the max pool and conv2d.3: both reach conv2d.4 through add + relu.
    assert sorted(graph.preds("conv2d.4")) == ["conv2d.3", "max_pool2d.0"]
    assert sorted(graph.preds("avg_pool2d.0")) == ["conv2d.4", "conv2d.5"]
    assert [block.branches for block in graph.blocks] == [(("conv2d.4",), ("conv2d.5",))]


@pytest.mark.slow  # importing GoogLeNet takes 5 to 70 s
def test_branch_blocks_of_googlenet():
    from mulayer.frontend.onnx_import import import_onnx
    from mulayer.models.zoo import build_model

    mod, _, _ = import_onnx(build_model("googlenet"))
    graph = layer_graph(mod)
    assert len(graph.blocks) == 9  # the nine Inception blocks
    for block in graph.blocks:
        assert [len(branch) for branch in block.branches] == [1, 2, 2, 2]
        assert block.branches[3][0].startswith("max_pool2d")


# ------------------------------------------------------------------------------ the simulator
def _real_copies(placed) -> list[tuple[str, int]]:
    """``(direction, bytes)`` of every tensor copy PlaceDevices emitted, in program order."""
    found = []
    for block in placed["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if (
                isinstance(value, relax.Call)
                and getattr(value.op, "name", "") == "relax.to_vdevice"
                and isinstance(value.args[0], relax.Var)
            ):
                elements = int(np.prod([int(d) for d in binding.var.ty.shape.values]))
                direction = "h2d" if binding.var.name.startswith("to_gpu") else "d2h"
                found.append((direction, 4 * elements))
    return found


def _plan_of(graph, gpu) -> Plan:
    decisions = {}
    for layer, g in zip(graph.layers, gpu, strict=True):
        if g == layer.out_channels:
            decisions[layer.name] = LayerDecision("gpu")
        elif g == 0:
            decisions[layer.name] = LayerDecision("cpu")
        else:
            decisions[layer.name] = LayerDecision("split", gpu_size=g)
    return Plan(layers=decisions)


@pytest.mark.parametrize("net", [tiny, odd])
def test_simulated_copies_match_the_passes(net):
    """The simulator copies exactly what SplitChannels + PlaceDevices copy, in the same order."""
    from mulayer.passes.place_devices import PlaceDevices
    from mulayer.passes.split_channels import SplitChannels

    mod = net()
    graph = layer_graph(mod)
    est = CachedEstimator(AnalyticEstimator())
    rng = random.Random(7)
    for _ in range(6):
        gpu = [rng.choice([0, x.out_channels, *split_points(x, 8)]) for x in graph.layers]
        placed = PlaceDevices({"kind": "llvm"}, {"kind": "llvm"})(
            SplitChannels(_plan_of(graph, gpu))(mod)
        )
        simulated = [(c.direction, c.nbytes) for c in simulate(graph, gpu, est).copies]
        assert simulated == _real_copies(placed), gpu


def test_simulated_overlap_and_copies():
    """One conv split in half with free copies takes half as long as on one side."""
    graph = layer_graph(chain_net())
    est = CachedEstimator(EQUAL)
    whole = simulate(graph, [x.out_channels for x in graph.layers], est)
    halves = simulate(graph, [x.out_channels // 2 for x in graph.layers], est)
    assert halves.total_us == pytest.approx(whole.total_us / 2, rel=0.05)
    # On a discrete GPU a copy blocks: the CPU part waits for the GPU part (no overlap).
    discrete = CachedEstimator(AnalyticEstimator(shared_memory=False))
    split = simulate(graph, [x.out_channels // 2 for x in graph.layers], discrete)
    assert split.total_us > simulate(graph, [0] * len(graph.layers), discrete).total_us


# ---------------------------------------------------------------------- known optima
def test_equal_processors_split_about_half():
    result = partition(layer_graph(chain_net()), EQUAL)
    assert result.chosen == "cooperative"
    for layer in _convs(layer_graph(chain_net())):
        decision = result.plan.layers[layer.name]
        assert decision.placement == "split"
        assert 0.375 <= decision.gpu_size / layer.out_channels <= 0.625
    assert result.prediction.total_us < 0.55 * min(result.baselines_us.values())


def test_very_slow_transfer_never_crosses():
    # A GPU ten times faster, but moving the 64 KB input would take seconds.
    slow = AnalyticEstimator(gpu_gflops=1000, cpu_gflops=100, bandwidth_gbps=1e-4)
    result = partition(layer_graph(chain_net()), slow)
    assert result.chosen == "cpu"
    assert all(d.placement == "cpu" for d in result.plan.layers.values())
    assert result.prediction.copies == []


def test_operator_chain_stays_on_the_gpu():
    # A GPU four times faster and copies that cost more than a split saves: one chain on the GPU,
    # data crosses only in (input) and out (result).
    est = AnalyticEstimator(gpu_gflops=400, cpu_gflops=100, bandwidth_gbps=1.0)
    result = partition(layer_graph(chain_net()), est)
    assert all(d.placement == "gpu" for d in result.plan.layers.values())
    assert [c.direction for c in result.prediction.copies] == ["h2d", "d2h"]


def test_two_equal_branches_one_per_processor():
    graph = layer_graph(two_branch_net())
    branches = (("conv2d.1", "conv2d.2"), ("conv2d.3", "conv2d.4"))
    assert [block.branches for block in graph.blocks] == [branches]
    est = AnalyticEstimator(shared_memory=True, sync_us=50.0)
    result = partition(graph, est)
    sides = []
    for branch in graph.blocks[0].branches:
        placements = {result.plan.layers[name].placement for name in branch}
        assert len(placements) == 1 and placements <= {"gpu", "cpu"}, placements
        sides.append(placements.pop())
    assert sorted(sides) == ["cpu", "gpu"]
    assert any("branches joined at" in note for note in result.plan.notes)


def test_split_points_are_aligned():
    graph = layer_graph(odd())
    for layer in graph.layers:
        points = split_points(layer, 8)
        assert all(0 < k < layer.out_channels and k % 8 == 0 for k in points)
        if layer.kind == "conv2d" and layer.groups > 1:
            per_group = layer.out_channels // layer.groups
            assert all(k % per_group == 0 for k in points)


# --------------------------------------------------------------------------- the guarantee
def _estimators(count: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield AnalyticEstimator(
            gpu_gflops=float(10 ** rng.uniform(0, 3)),
            cpu_gflops=float(10 ** rng.uniform(0, 3)),
            gpu_launch_us=float(rng.uniform(0, 50)),
            cpu_launch_us=float(rng.uniform(0, 50)),
            bandwidth_gbps=float(10 ** rng.uniform(-2, 2)),
            copy_latency_us=float(rng.uniform(0, 100)),
            sync_us=float(rng.uniform(0, 50)),
            shared_memory=bool(rng.integers(2)),
        )


@pytest.mark.parametrize("net", [tiny, two_branch_net])
def test_never_predicted_slower_than_one_processor(net):
    graph = layer_graph(net())
    config = PartitionerConfig()
    for est in _estimators(12, seed=hash(net.__name__) % 1000):
        result = partition(graph, est, config)
        best_single = min(result.baselines_us.values())
        assert result.prediction.total_us <= best_single
        if result.chosen == "cooperative":
            assert result.prediction.total_us < best_single * (1 - config.min_gain)
        # The plan's figures are the simulator's, and re-simulating the plan gives them back.
        again = simulate(graph, result.gpu, CachedEstimator(est))
        assert result.plan.predicted_ms == pytest.approx(again.total_us / 1e3, abs=1e-6)
        assert set(result.plan.layers) == {x.name for x in graph.layers}


def test_guarantee_property_based():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    graph = layer_graph(tiny())

    @hypothesis.settings(max_examples=25, deadline=None, derandomize=True)
    @hypothesis.given(
        gpu=st.floats(1, 1000),
        cpu=st.floats(1, 1000),
        launch=st.floats(0, 50),
        bandwidth=st.floats(0.01, 100),
        sync=st.floats(0, 50),
        shared=st.booleans(),
    )
    def check(gpu, cpu, launch, bandwidth, sync, shared):
        est = AnalyticEstimator(
            gpu_gflops=gpu,
            cpu_gflops=cpu,
            gpu_launch_us=launch,
            cpu_launch_us=launch,
            bandwidth_gbps=bandwidth,
            sync_us=sync,
            shared_memory=shared,
        )
        result = partition(graph, est)
        assert result.prediction.total_us <= min(result.baselines_us.values())

    check()


# ------------------------------------------------------------------------------ plans as JSON
def test_auto_plan_json_round_trip(tmp_path):
    plan = partition(layer_graph(tiny()), EQUAL).plan
    assert plan.predicted_ms is not None and set(plan.baselines_ms) == {"gpu", "cpu"}
    assert all(d.predicted_ms is not None for d in plan.layers.values())
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan
    assert Plan.from_json(plan.to_json()) == plan


class _BatchedAnalytic(AnalyticEstimator):
    """An analytic estimator with the optional batched call, counting the calls."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.single = self.batched = 0

    def layer_time_us(self, layer, processor, channels):
        self.single += 1
        return super().layer_time_us(layer, processor, channels)

    def layer_times_us(self, layer, processor, channels):
        self.batched += 1
        return [AnalyticEstimator.layer_time_us(self, layer, processor, k) for k in channels]


def test_batched_predictions_are_used():
    graph = layer_graph(tiny())
    batched = _BatchedAnalytic(shared_memory=True)
    plain = partition(graph, AnalyticEstimator(shared_memory=True))
    assert partition(graph, batched).gpu == plain.gpu
    assert batched.batched <= 2 * len(graph.layers)
    assert batched.single == 0


def test_estimator_protocol_is_checked():
    with pytest.raises(MuLayerError, match="lacks layer_time_us"):
        partition(layer_graph(tiny()), object())


# ------------------------------------------------------------------ -split=auto end to end
@pytest.fixture
def synthetic_cost_model(monkeypatch):
    """Make ``-split=auto`` use an analytic estimator instead of the trained cost model."""

    def use(estimator):
        monkeypatch.setattr(partitioner_pkg, "load_estimator", lambda spec: estimator)

    return use


def _compile_auto(model_path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no calibration: CPU parts stay fp32
        # -verify=off: these tests check the plan's own build (test_verify_plan the measuring)
        target = "mulayer -split=auto -verify=off, llvm, llvm"
        return mulayer.compile(str(model_path), target=target, **kwargs)


def _check_numerics(compiled, model_path, tmp_path):
    compiled.export(tmp_path / "auto.mulayer")
    model = mulayer.load(tmp_path / "auto.mulayer")
    inputs = model.random_inputs(seed=np.random.randint(1 << 30))
    out = list(model(inputs).values())[0]
    ref = onnxruntime_reference(model_path, inputs)[0]
    assert np.all(np.isfinite(out))
    assert max_rel_error(out, ref) < FP16_TOLERANCE
    return model


@pytest.fixture(scope="module")
def tiny_auto(tiny_onnx):
    """Tiny compiled with ``-split=auto``: CPU a bit faster, syncs cost, so the plan mixes GPU,
    CPU and split layers."""
    with pytest.MonkeyPatch.context() as patch:
        est = AnalyticEstimator(gpu_gflops=80, shared_memory=True, sync_us=2.0)
        patch.setattr(partitioner_pkg, "load_estimator", lambda spec: est)
        return _compile_auto(tiny_onnx)


def test_auto_split_tiny_runs_correctly(tiny_auto, tiny_onnx, tmp_path):
    placements = {d.placement for d in tiny_auto.plan.layers.values()}
    assert len(placements) >= 2, placements
    assert tiny_auto.plan.predicted_ms < min(tiny_auto.plan.baselines_ms.values())
    _check_numerics(tiny_auto, tiny_onnx, tmp_path)


def test_auto_split_with_the_shipped_cost_model(tiny_onnx, tmp_path):
    from mulayer.cost_model import shipped_models

    if not shipped_models():
        pytest.skip("no shipped cost model in data/")
    compiled = _compile_auto(tiny_onnx)
    assert compiled.plan.predicted_ms <= min(compiled.plan.baselines_ms.values())
    _check_numerics(compiled, tiny_onnx, tmp_path)


def test_auto_split_real_model_runs_correctly(tmp_path, synthetic_cost_model):
    from mulayer.models.zoo import save_model

    path = tmp_path / "squeezenet1_1.onnx"
    save_model("squeezenet1_1", path)
    synthetic_cost_model(EQUAL)
    compiled = _compile_auto(path)
    assert any(d.placement == "split" for d in compiled.plan.layers.values())
    _check_numerics(compiled, path, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHMARK_MODELS)
def test_auto_split_every_benchmark_model(name, tmp_path, synthetic_cost_model):
    from mulayer.models.zoo import save_model

    path = tmp_path / f"{name}.onnx"
    save_model(name, path)
    synthetic_cost_model(EQUAL)
    compiled = _compile_auto(path)
    assert compiled.plan.predicted_ms < 0.7 * min(compiled.plan.baselines_ms.values())
    _check_numerics(compiled, path, tmp_path)


def _resolve(target: str, plan=None):
    from mulayer.compiler.driver import resolve_plan
    from mulayer.target import parse_target

    mod = tiny()
    names = [layer.name for layer in layer_graph(mod).layers]
    return resolve_plan(plan, parse_target(target), names, mod)


def test_auto_split_without_cost_model():
    with pytest.raises(MuLayerError, match="the auto split needs a cost model: .*nonexistent"):
        _resolve("mulayer -split=auto -cost-model=/nonexistent.zip, llvm, llvm")


def test_auto_split_needs_no_ratio(synthetic_cost_model):
    synthetic_cost_model(EQUAL)
    plan = _resolve("mulayer -split=auto, llvm, llvm")
    assert plan.predicted_ms is not None and len(plan.layers) == 12
    with pytest.warns(UserWarning, match="-ratio is ignored"):
        _resolve("mulayer -split=auto -ratio=0.5, llvm, llvm")


def test_height_split_is_refused():
    with pytest.raises(MuLayerError, match="-split=height is not supported"):
        _resolve("mulayer -split=height -ratio=0.5, llvm, llvm")


def test_given_plan_wins_over_auto(synthetic_cost_model):
    synthetic_cost_model(None)  # the search would fail on it
    plan = Plan(default_ratio=0.0)
    assert _resolve("mulayer -split=auto, llvm, llvm", plan) is plan


# ------------------------------------------------------------------------ inspect --plan
def test_inspect_plan_measure_and_plot(tiny_auto, tmp_path, capsys):
    artifact = tmp_path / "t.mulayer"
    tiny_auto.export(artifact)
    png = tmp_path / "plan.png"
    capsys.readouterr()
    args = ["inspect", str(artifact), "--plan", "--measure", "--repeat", "2", "--plot", str(png)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "predicted" in out and "measured" in out and "conv2d.0" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["inspect", str(artifact), "--plan", "--measure", "--repeat", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["measured_ms"] > 0
    layers = {layer["name"]: layer for layer in report["layers"]}
    # Every layer ran somewhere and got a measured time; the placements are the plan's.
    assert all(layer["measured_ms"] > 0 for layer in layers.values())
    plan = Plan.from_json(mulayer.load(artifact).plan_json)
    for name, decision in plan.layers.items():
        assert layers[name]["placement"] == decision.placement


def test_inspect_plan_needs_a_cooperative_artifact(tiny_onnx, tmp_path, capsys):
    artifact = tmp_path / "cpu.mulayer"
    mulayer.compile(str(tiny_onnx), target="llvm").export(artifact)
    assert main(["inspect", str(artifact), "--plan"]) == 2
    assert "has no plan" in capsys.readouterr().err
    assert main(["inspect", str(artifact), "--measure"]) == 2
