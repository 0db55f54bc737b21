#!/usr/bin/env python3
"""Structure of cooperative (CUDA + llvm) modules, compiled without a GPU (issue 16).

For each model, the GPU-only module's kernel count and, at ``-ratio=1`` and ``-ratio=0.5``
(CPU parts int8, calibrated on 4 random samples), the two-device module's kernels before and
after :class:`~mulayer.passes.fuse_per_device.FusePerDevice`, its CUDA-graph launches after
:class:`~mulayer.passes.rewrite_cuda_graph_per_device.RewriteCUDAGraphPerDevice`, and its
crossings (count, bytes, how many cross as uint8).

    python scripts/inspect_two_device.py resnet18 googlenet mobilenetv2
"""

import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from mulayer.compiler.build import legalize_and_fuse, to_fp16
from mulayer.compiler.calibration import calibrate
from mulayer.frontend.onnx_import import import_onnx
from mulayer.models.zoo import save_model
from mulayer.passes.build_helpers import legalize_keeping_vdevices
from mulayer.passes.fuse_per_device import FusePerDevice
from mulayer.passes.pipeline import cooperative_passes, vm_lowering
from mulayer.passes.stage_crossings import StageCrossings
from mulayer.plan import Plan

CUDA = {"kind": "cuda", "arch": "sm_90"}
LLVM = {"kind": "llvm"}
CALL_TIR = tvm.ir.Op.get("relax.call_tir")


def kernels(mod) -> int:
    """Number of kernel calls in ``main``."""
    count = 0
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            count += isinstance(value, relax.Call) and value.op.same_as(CALL_TIR)
    return count


def crossings(mod) -> list[tuple[str, int]]:
    """(dtype, bytes) of every ``to_vdevice`` in ``main``."""
    found = []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and "to_vdevice" in str(value.op):
                ty = binding.var.ty
                count = int(np.prod([int(d) for d in ty.shape.values]))
                found.append((str(ty.dtype), count * np.dtype(str(ty.dtype)).itemsize))
    return found


def main(names: list[str]) -> None:
    rng = np.random.default_rng(1)
    target = tvm.target.Target(CUDA, host=LLVM)
    for name in names:
        path = Path(tempfile.mkdtemp()) / f"{name}.onnx"
        save_model(name, path)
        mod, _, _ = import_onnx(str(path))
        samples = {"input": rng.standard_normal((4, 3, 224, 224)).astype("f4")}
        stats = calibrate(mod, samples, method="search")
        gpu_only = kernels(legalize_and_fuse(to_fp16(mod), target))
        for ratio in (1.0, 0.5):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                placed = cooperative_passes(Plan.uniform(ratio), CUDA, LLVM, stats)(mod)
            legal = legalize_keeping_vdevices(relax.transform.RealizeVDevice()(placed))
            fused = FusePerDevice()(legal)
            cross = crossings(fused)
            with tvm.transform.PassContext(config={"relax.backend.use_cuda_graph": True}):
                lowered = vm_lowering()(StageCrossings()(fused))
            row = {
                "model": name,
                "ratio": ratio,
                "gpu_only_kernels": gpu_only,
                "unfused_kernels": kernels(legal),
                "fused_kernels": kernels(fused),
                "graphs": lowered["main"].script().count("vm.builtin.cuda_graph.run_or_capture"),
                "crossings": len(cross),
                "crossing_bytes": sum(b for _, b in cross),
                "uint8_crossings": sum(1 for d, _ in cross if d == "uint8"),
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["resnet18", "googlenet", "mobilenetv2"])
