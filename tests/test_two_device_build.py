"""The two-device build: storage per device, CPU weights resident, pipeline, trace (no GPU)."""

import json
import warnings

import numpy as np
import pytest
import tvm
from tvm import relax

import mulayer
from mulayer.frontend.onnx_import import import_onnx
from mulayer.passes.build_helpers import kernel_sites
from mulayer.passes.lift_cpu_weights import WEIGHTS_FUNC, LiftCPUWeights, cpu_weight_bindings
from mulayer.passes.pipeline import compile_lowered, cooperative_passes, lower_two_device
from mulayer.passes.place_devices import PlaceDevices
from mulayer.passes.separate_device_storage import SeparateDeviceStorage
from mulayer.passes.split_channels import SplitChannels
from mulayer.runtime.trace import write_trace

from .conftest import max_rel_error, onnxruntime_reference

CUDA = {"kind": "cuda", "arch": "sm_90"}
LLVM = {"kind": "llvm"}


@pytest.fixture(scope="module")
def tiny_mod(tiny_onnx):
    mod, _, _ = import_onnx(str(tiny_onnx))
    return mod


def _planned_memory(mod):
    """``mod`` lowered up to and including TVM's static memory planner."""
    t = relax.transform
    seq = tvm.transform.Sequential(
        [
            t.RewriteDataflowReshape(),
            t.ToNonDataflow(),
            t.RemovePurityChecking(),
            t.CallTIRRewrite(),
            t.StaticPlanBlockMemory(),
        ]
    )
    return seq(mod)


def _cross_device_tensors(mod) -> list[str]:
    """Tensors whose device index differs from the device of the storage they live in."""
    storage_device, crossing = {}, []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if not isinstance(value, relax.Call):
                continue
            op = getattr(value.op, "name", None)
            if op == "relax.memory.alloc_storage":
                storage_device[binding.var] = int(value.args[1].value)
            elif op == "relax.memory.alloc_tensor" and storage_device[value.args[0]] != int(
                value.args[4].value
            ):
                crossing.append(binding.var.name)
    return crossing


def test_storage_is_never_shared_across_devices(tiny_mod):
    mod = cooperative_passes(mulayer.Plan.uniform(0.5), CUDA, LLVM)(tiny_mod)
    planned = _planned_memory(lower_two_device(mod, tvm.target.Target(CUDA)))
    # TVM's planner alone does share (the defect this pass exists for) ...
    assert _cross_device_tensors(planned)
    # ... and after SeparateDeviceStorage no tensor lives in another device's storage.
    assert _cross_device_tensors(SeparateDeviceStorage()(planned)) == []


def test_cpu_weights_are_lifted_out_of_main(tiny_mod):
    placed = PlaceDevices(CUDA, LLVM)(SplitChannels(mulayer.Plan.uniform(0.5))(tiny_mod))
    copies = cpu_weight_bindings(placed["main"])
    assert copies, "a cuda + llvm split must read constants on the CPU"
    lifted = LiftCPUWeights()(placed)
    main = lifted["main"]
    assert cpu_weight_bindings(main) == []
    assert int(main.attrs["num_input"]) == 1
    assert len(main.params) == 1 + len(copies)
    weights = lifted[WEIGHTS_FUNC]
    assert len(weights.params) == 0
    assert len(cpu_weight_bindings(weights)) == len(copies)


def test_lifted_weights_run_with_the_same_numbers(tiny_onnx, tiny_mod):
    """Force the constant copies on llvm + llvm: main(x, *weights) equals onnxruntime."""
    split = SplitChannels(mulayer.Plan.uniform(0.5))(tiny_mod)
    placed = PlaceDevices(LLVM, LLVM, copy_constants=True)(split)
    lifted = LiftCPUWeights()(placed)
    ex = compile_lowered(lower_two_device(lifted, tvm.target.Target(LLVM)))
    vm = relax.VirtualMachine(ex, [tvm.cpu(), tvm.cpu()])
    weights = list(vm[WEIGHTS_FUNC]())
    assert len(weights) == len(cpu_weight_bindings(placed["main"]))
    x = np.random.default_rng().standard_normal((1, 3, 32, 32)).astype("float32")
    out = vm["main"](tvm.runtime.tensor(x), *weights).numpy()
    ref = onnxruntime_reference(tiny_onnx, {"input": x})[0]
    assert max_rel_error(out, ref) < 1e-5


def test_relax_get_pipeline_mulayer_builds_for_the_stock_vm(tiny_onnx, tiny_mod):
    pipeline = relax.get_pipeline(
        "mulayer", plan=mulayer.Plan.uniform(0.5), gpu_target=LLVM, cpu_target=LLVM
    )
    ex = tvm.compile(tiny_mod, target=None, relax_pipeline=pipeline)
    vm = relax.VirtualMachine(ex, [tvm.cpu(), tvm.cpu()])
    x = np.random.default_rng().standard_normal((1, 3, 32, 32)).astype("float32")
    out = vm["main"](tvm.runtime.tensor(x)).numpy()
    ref = onnxruntime_reference(tiny_onnx, {"input": x})[0]
    assert np.all(np.isfinite(out))
    assert max_rel_error(out, ref) < 2e-2  # GPU parts in fp16


def test_kernel_sites_name_both_sides(tiny_mod):
    mod = cooperative_passes(mulayer.Plan.uniform(0.5), CUDA, LLVM)(tiny_mod)
    sites = kernel_sites(lower_two_device(mod, tvm.target.Target(CUDA)))
    # Fused kernels are named after their ops, each with its side's suffix (FusePerDevice).
    kernels = {side: [symbol for symbol, _, s in sites if s == side] for side in ("gpu", "cpu")}
    assert any(s.startswith("fused_conv2d") and s.endswith("_cuda") for s in kernels["gpu"])
    assert any(s.startswith("fused_conv2d") and s.endswith("_llvm") for s in kernels["cpu"])
    assert all(s.endswith("_llvm") for s in kernels["cpu"] if s.startswith("fused_conv2d"))


@pytest.fixture(scope="module")
def coop_artifact(tiny_onnx, tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = mulayer.compile(str(tiny_onnx), target="mulayer -ratio=0.5, llvm, llvm")
    path = tmp_path_factory.mktemp("coop") / "tiny.mulayer"
    compiled.export(path)
    return path


def test_trace_has_named_intervals_on_both_sides(coop_artifact, tmp_path):
    model = mulayer.load(coop_artifact)
    inputs = model.random_inputs(seed=3)
    trace, summary = model.trace(inputs, warmup=1)
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    names = {e["name"] for e in spans}
    assert {"conv2d_0_gpu", "conv2d_0_cpu", "conv2d_0_join"} <= names
    sites = model.metadata["kernel_sites"]
    kernels = [e for e in spans if e["name"] != "copy"]
    assert len(sites) - 2 <= len(kernels) <= len(sites)  # a reshape may become a view
    assert {e["name"] for e in kernels} <= {part for _, part, _ in sites}
    cpu_sum = sum(e["dur"] for e in spans if e["tid"] == 1)
    assert summary.kernel_us["cpu"] == pytest.approx(cpu_sum, rel=1e-3, abs=0.01)
    assert 0 < summary.busy_us <= summary.wall_us
    assert not summary.device_events  # llvm + llvm: host intervals, said in the summary
    # The model still runs normally after tracing (the instrument is removed).
    again = list(model(inputs).values())[0]
    assert np.array_equal(again, list(model(inputs).values())[0])
    path = tmp_path / "trace.json"
    write_trace(path, trace)
    loaded = json.loads(path.read_text())
    assert loaded["otherData"]["summary"]["wall_us"] > 0


def test_artifact_runs_with_plain_tvm_calls(coop_artifact, tmp_path):
    """What README says an existing TVM deployment does: unzip, load_module, VirtualMachine."""
    import zipfile

    from tvm.runtime.vm import VirtualMachine

    with zipfile.ZipFile(coop_artifact) as archive:
        archive.extract("lib.so", tmp_path)
        metadata = json.loads(archive.read("metadata.json"))
    lib = tvm.runtime.load_module(str(tmp_path / "lib.so"))
    vm = VirtualMachine(lib, [tvm.cpu(0) for _ in metadata["vm_devices"]])
    weights = metadata.get("cpu_weights")
    extra = list(vm[weights["function"]]()) if weights else []
    model = mulayer.load(coop_artifact)
    inputs = model.random_inputs(seed=5)
    plain = vm["main"](tvm.runtime.tensor(inputs["input"]), *extra).numpy()
    assert np.array_equal(plain, list(model(inputs).values())[0])


def test_auto_plan_with_every_layer_on_the_gpu_builds_the_gpu_module(tiny_onnx, monkeypatch):
    """The guarantee's build side: an all-GPU auto plan is not built as a two-device module."""
    import mulayer.partitioner as partitioner

    class Result:
        plan = mulayer.Plan.uniform(1.0)
        notes: list = []

    monkeypatch.setattr(partitioner, "auto_plan", lambda mod, spec: Result())
    target = "mulayer -split=auto -verify=off, llvm, llvm"  # the plan's build, not measured
    compiled = mulayer.compile(str(tiny_onnx), target=target)
    metadata = compiled.metadata()
    assert metadata["built_as"] == "gpu" and metadata["mode"] == "cooperative"
    assert "kernel_sites" not in metadata  # not the two-device build
    path = tiny_onnx.parent / "auto_gpu.mulayer"
    compiled.export(path)
    loaded = mulayer.load(path)
    inputs = loaded.random_inputs(seed=np.random.randint(1 << 30))
    out = list(loaded(inputs).values())[0]
    assert max_rel_error(out, onnxruntime_reference(tiny_onnx, inputs)[0]) < 2e-2


def test_opencl_cooperative_build_exports(tiny_onnx, tmp_path):
    """OpenCL + llvm (phones) compiles to one library with an OpenCL module and exports."""
    from mulayer.compiler.build import all_modules

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = mulayer.compile(
            str(tiny_onnx), target="mulayer -ratio=0.5, opencl -device=mali, llvm"
        )
    assert "opencl" in {m.kind for m in all_modules(compiled.executable.mod)}
    path = compiled.export(tmp_path / "phone.mulayer")
    assert path.stat().st_size > 0
    assert compiled.metadata()["vm_devices"] == ["opencl", "cpu"]


def test_tuning_db_is_refused_for_cooperative_targets(tiny_onnx):
    with pytest.raises(mulayer.MuLayerError, match="tuning-db 'db'"):
        mulayer.compile(str(tiny_onnx), target="mulayer -ratio=0.5, llvm, llvm", tuning_db="db")


def test_cli_run_writes_a_trace(coop_artifact, tmp_path, capsys):
    from mulayer.cli.main import main

    path = tmp_path / "t.json"
    assert main(["run", str(coop_artifact), "--random", "--repeat", "2", "--trace", str(path)]) == 0
    assert "overlapped" in capsys.readouterr().out
    events = json.loads(path.read_text())["traceEvents"]
    assert any(e.get("name") == "conv2d_0_cpu" for e in events)
