"""PlaceDevices + build_two_device: placement, copies, launch order, two-device numerics."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from mulayer.passes.build_helpers import devices
from mulayer.passes.cast_gpu import CastGPU
from mulayer.passes.common import is_part_op, part_of
from mulayer.passes.pipeline import build_two_device
from mulayer.passes.place_devices import PlaceDevices
from mulayer.passes.split_channels import SplitChannels
from mulayer.plan import Plan

from .relax_nets import NETS, reference, rel_error
from .test_transform_cast_gpu import Split, bind, rand

CUDA = {"kind": "cuda", "arch": "sm_90"}
LLVM = {"kind": "llvm"}


def run_two_device(mod: tvm.IRModule, x: np.ndarray, gpu=LLVM, cpu=LLVM) -> np.ndarray:
    ex = build_two_device(mod, gpu, cpu)
    vm = relax.VirtualMachine(ex, devices(gpu))
    return vm["main"](tvm.runtime.tensor(x, tvm.cpu(0))).numpy()


def test_structure_cuda_llvm():
    @I.ir_module
    class Expected:
        I.module_global_infos(
            {
                "vdevice": [
                    I.vdevice({"kind": "cuda", "arch": "sm_90", "host": {"kind": "llvm"}}, 0),
                    I.vdevice({"kind": "llvm"}, 0),
                ]
            }
        )

        @R.function
        def main(
            x: R.Tensor((1, 4, 8, 8), "float32", "llvm:0"),
            wg: R.Tensor((4, 4, 3, 3), "float32"),
            bg: R.Tensor((1, 4, 1, 1), "float32"),
            wc: R.Tensor((4, 4, 3, 3), "float32"),
            bc: R.Tensor((1, 4, 1, 1), "float32"),
        ) -> R.Tensor((1, 8, 8, 8), "float32", "llvm:0"):
            with R.dataflow():
                # GPU part first: input copied up, launched before any CPU work.
                xg: R.Tensor((1, 4, 8, 8), "float32", "cuda:0") = R.to_vdevice(x, "cuda:0")
                g: R.Tensor((1, 4, 8, 8), "float32", "cuda:0") = R.nn.conv2d(
                    xg, wg, padding=[1, 1, 1, 1]
                )
                g0: R.Tensor((1, 4, 8, 8), "float32", "cuda:0") = R.add(g, bg)
                g1: R.Tensor((1, 4, 8, 8), "float32", "cuda:0") = R.nn.relu(g0)
                # CPU part; the VM keeps constants on the GPU (its first device).
                wcc: R.Tensor((4, 4, 3, 3), "float32", "llvm:0") = R.to_vdevice(wc, "llvm:0")
                c: R.Tensor((1, 4, 8, 8), "float32", "llvm:0") = R.nn.conv2d(
                    x, wcc, padding=[1, 1, 1, 1]
                )
                bcc: R.Tensor((1, 4, 1, 1), "float32", "llvm:0") = R.to_vdevice(bc, "llvm:0")
                c0: R.Tensor((1, 4, 8, 8), "float32", "llvm:0") = R.add(c, bcc)
                c1: R.Tensor((1, 4, 8, 8), "float32", "llvm:0") = R.nn.relu(c0)
                # The GPU result comes down only after the CPU work; the join is on the CPU
                # because the result is returned to the host next.
                gc: R.Tensor((1, 4, 8, 8), "float32", "llvm:0") = R.to_vdevice(g1, "llvm:0")
                gv: R.Tensor((1, 8, 8, 8), "float32", "llvm:0") = R.concat((gc, c1), axis=1)
                R.output(gv)
            return gv

    w, b = rand(8, 4, 3, 3), rand(1, 8, 1, 1)
    params = {"wg": w[:4], "bg": b[:, :4], "wc": w[4:], "bc": b[:, 4:]}
    after = PlaceDevices(CUDA, LLVM)(bind(Split, **params))
    tvm.ir.assert_structural_equal(after, bind(Expected, **params))


def test_launch_order_and_names():
    mod = SplitChannels(Plan.uniform(0.5, align=4))(NETS["tiny"]())
    after = PlaceDevices(CUDA, LLVM)(CastGPU()(mod))
    bindings = after["main"].body.blocks[0].bindings
    index = {b.var.name: i for i, b in enumerate(bindings)}
    ops = [b.var for b in bindings if is_part_op(b.var)]
    assert len(ops) == len([b for b in mod["main"].body.blocks[0].bindings if is_part_op(b.var)])
    for var in ops:
        layer, side = part_of(var)
        if side == "cpu":
            gpu_name = var.name.replace("_cpu", "_gpu")
            assert index[gpu_name] < index[var.name], layer
    # Every copy of a GPU part's result to the CPU comes after that layer's CPU op.
    for b in bindings:
        if b.var.name.startswith("to_cpu_") and part_of(b.value.args[0]) is not None:
            layer, side = part_of(b.value.args[0])
            assert side == "gpu"
            prefix = layer.replace(".", "_")
            assert index[f"{prefix}_cpu"] < index[b.var.name], b.var.name
    # Every binding has a vdevice of the right kind.
    for b in bindings:
        part = part_of(b.var)
        if part is not None:
            kind = b.var.ty.vdevice.target.kind.name
            assert kind == ("cuda" if part[1] == "gpu" else "llvm"), b.var.name


def test_all_gpu_is_placed_wholly_on_the_gpu():
    mod = SplitChannels(Plan.uniform(1.0))(NETS["tiny"]())
    after = PlaceDevices(CUDA, LLVM)(mod)
    func = after["main"]
    # No CPU part: the GPU-only module plus nothing (inputs and result on the GPU, no copy).
    assert func.params[0].ty.vdevice.target.kind.name == "cuda"
    assert func.body.body.ty.vdevice.target.kind.name == "cuda"
    bindings = func.body.blocks[0].bindings
    assert all(b.var.ty.vdevice.target.kind.name == "cuda" for b in bindings)
    copies = [b.var.name for b in bindings if "to_vdevice" in str(b.value.op)]
    assert copies == []


@pytest.mark.parametrize("net", sorted(NETS))
def test_two_device_llvm_matches_unsplit(net):
    mod = NETS[net]()
    x, expected = reference(net)
    for ratio in (0.0, 0.25, 0.5, 1.0):
        placed = PlaceDevices(LLVM, LLVM)(SplitChannels(Plan.uniform(ratio, align=4))(mod))
        assert rel_error(run_two_device(placed, x), expected) <= 1e-5, ratio


def test_two_device_llvm_with_fp16_gpu_side():
    mod = NETS["tiny"]()
    x, expected = reference("tiny")
    placed = PlaceDevices(LLVM, LLVM)(CastGPU()(SplitChannels(Plan.uniform(0.5, align=4))(mod)))
    assert rel_error(run_two_device(placed, x), expected) < 2e-2


def test_cuda_llvm_compiles_with_a_cuda_module():
    mod = CastGPU()(SplitChannels(Plan.uniform(0.5, align=4))(NETS["tiny"]()))
    ex = build_two_device(PlaceDevices(CUDA, LLVM)(mod), CUDA, LLVM)

    def kinds(module) -> list[str]:
        return [module.kind] + [k for m in module.imports for k in kinds(m)]

    assert "cuda" in kinds(ex.mod)


def test_helper_bindings_of_a_part_run_on_its_side():
    @I.ir_module
    class Before:
        @R.function
        def main(
            x: R.Tensor((1, 4, 8, 8), "float32"),
            w0: R.Tensor((8, 4, 1, 1), "float32"),
            w1: R.Tensor((8, 8, 1, 1), "float16"),
        ) -> R.Tensor((1, 8, 8, 8), "float32"):
            with R.dataflow():
                conv2d_0_gpu = R.nn.conv2d(x, w0)
                # A later pass's helper bindings of a CPU part (names as the quantizer's).
                conv2d_1_cpu_qpad = R.astype(conv2d_0_gpu, "float16")
                conv2d_1_cpu_qacc = R.nn.conv2d(conv2d_1_cpu_qpad, w1, out_dtype="float32")
                conv2d_1_cpu = R.nn.relu(conv2d_1_cpu_qacc)
                R.output(conv2d_1_cpu)
            return conv2d_1_cpu

    mod = bind(Before, w0=rand(8, 4, 1, 1), w1=rand(8, 8, 1, 1).astype(np.float16))
    after = PlaceDevices(CUDA, LLVM)(mod)
    kinds = {
        b.var.name: b.var.ty.vdevice.target.kind.name for b in after["main"].body.blocks[0].bindings
    }
    assert kinds["conv2d_0_gpu"] == "cuda"
    assert kinds["conv2d_1_cpu_qpad"] == kinds["conv2d_1_cpu_qacc"] == "llvm"
    assert kinds["to_cpu_conv2d_0_gpu"] == "llvm"


def test_input_quantization_runs_where_the_input_is():
    """An int8 CPU part whose input comes from the GPU: the GPU quantizes, uint8 crosses."""

    @I.ir_module
    class Before:
        @R.function
        def main(
            x: R.Tensor((1, 4, 8, 8), "float32"),
            w0: R.Tensor((8, 4, 1, 1), "float32"),
            w1: R.Tensor((8, 8, 1, 1), "int8"),
        ) -> R.Tensor((1, 8, 8, 8), "int32"):
            with R.dataflow():
                conv2d_0_gpu = R.nn.conv2d(x, w0)
                conv2d_1_cpu_qin = R.round(conv2d_0_gpu)
                conv2d_1_cpu_qin1 = R.astype(conv2d_1_cpu_qin, "uint8")
                conv2d_1_cpu_qacc = R.nn.conv2d(conv2d_1_cpu_qin1, w1, out_dtype="int32")
                R.output(conv2d_1_cpu_qacc)
            return conv2d_1_cpu_qacc

    w1 = np.random.default_rng(0).integers(-127, 127, (8, 8, 1, 1)).astype(np.int8)
    mod = bind(Before, w0=rand(8, 4, 1, 1), w1=w1)
    main = PlaceDevices(CUDA, LLVM)(mod)["main"]
    bindings = {b.var.name: b.var.ty for b in main.body.blocks[0].bindings}
    assert bindings["conv2d_1_cpu_qin"].vdevice.target.kind.name == "cuda"
    assert bindings["conv2d_1_cpu_qin1"].vdevice.target.kind.name == "cuda"
    crossing = bindings["to_cpu_conv2d_1_cpu_qin1"]
    assert crossing.vdevice.target.kind.name == "llvm" and crossing.dtype == "uint8"
    assert "to_cpu_conv2d_0_gpu" not in bindings  # no fp32 copy
