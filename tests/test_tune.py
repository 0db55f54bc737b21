"""``mulayer tune`` / ``mulayer.compiler.tune``: task selection, the database, builds that use
it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax

from mulayer.cli.main import main as cli_main
from mulayer.compiler.build import build_single
from mulayer.compiler.tune import lower_model, select_tasks, tune_model
from mulayer.compiler.tuning_db import MANIFEST, apply_tuning_db, open_tuning_db
from mulayer.errors import MuLayerError
from mulayer.frontend.onnx_import import import_onnx

from .conftest import max_rel_error, onnxruntime_reference

GENERIC = {"Conv2dWidthVector", "CPUFallback", "none"}


@pytest.fixture(scope="module")
def tiny_lowered(tiny_onnx):
    return lower_model(tiny_onnx, "llvm")


def test_select_tasks_picks_kernels_of_generic_rules(tiny_lowered):
    mod, target = tiny_lowered
    chosen, passed = select_tasks(mod, target)
    assert chosen and passed
    assert {info.rule for _, info in chosen} <= GENERIC
    assert not {info.rule for _, info in passed} & GENERIC  # specialised rules are left alone
    work = [info.flops * info.calls for _, info in chosen]
    assert work == sorted(work, reverse=True)  # heaviest first
    everything, none_passed = select_tasks(mod, target, select="all")
    assert not none_passed
    assert len(everything) == len(chosen) + len(passed)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": "mulayer -ratio=0.5, llvm, llvm"}, "single-processor"),
        ({"trials": 0}, "at least 1"),
        ({"strategy": "annealing"}, "unknown strategy"),
        ({"select": "some"}, "unknown selection"),
    ],
)
def test_tune_model_rejects_bad_arguments(tiny_onnx, tmp_path, kwargs, message):
    args = {"target": "llvm", "trials": 2, **kwargs}
    target, trials = args.pop("target"), args.pop("trials")
    with pytest.raises(MuLayerError, match=message):
        tune_model(tiny_onnx, target, trials, tmp_path / "db", progress=False, **args)


def test_apply_tuning_db_needs_a_database(tiny_lowered, tmp_path):
    mod, target = tiny_lowered
    with pytest.raises(MuLayerError, match="not a tuning database"):
        apply_tuning_db(mod, target, tmp_path)


def test_cli_tune_bad_target_is_one_error_line(tiny_onnx, tmp_path, capsys):
    code = cli_main(
        ["tune", str(tiny_onnx), "--target", "mulayer -ratio=0.5, llvm, llvm", "--trials", "1"]
        + ["-o", str(tmp_path / "db")]
    )
    assert code == 2
    assert capsys.readouterr().err.startswith("error: tuning supports single-processor")


@pytest.mark.slow
def test_tune_then_build_with_the_database(tiny_onnx, tiny_lowered, tmp_path):
    """Tune one kernel (2 random trials), then build with the database: numerics vs ORT."""
    from tvm.s_tir import meta_schedule as ms

    db_dir = tmp_path / "db"
    code = cli_main(
        ["tune", str(tiny_onnx), "--target", "llvm", "--trials", "2", "--max-tasks", "1"]
        + ["--strategy", "replay-trace", "--seed", "0", "--json", "-o", str(db_dir)]
    )
    assert code == 0
    manifest = json.loads((db_dir / MANIFEST).read_text())
    assert manifest["schema"] == 1 and manifest["target_kind"] == "llvm"
    (task,) = manifest["tasks"]
    assert task["rule"] in GENERIC and task["trials"] == 2 and task["best_us"] > 0

    # The tuned PrimFunc is the database's best schedule, marked scheduled for the rules.
    mod, target = tiny_lowered
    (extracted,) = [
        t for t in ms.relax_integration.extract_tasks(mod, target) if t.task_name == task["name"]
    ]
    best = open_tuning_db(db_dir, target).query_schedule(extracted.dispatched[0], target, "main")
    assert best is not None
    tuned = apply_tuning_db(mod, target, db_dir)[task["name"]]
    assert tuned.attrs["tirx.is_scheduled"]
    tvm.ir.assert_structural_equal(tuned.body, best.mod["main"].body)
    assert not tvm_ffi.structural_equal(tuned.body, mod[task["name"]].body)

    # A build with the database computes what onnxruntime computes.
    relax_mod, inputs, _ = import_onnx(tiny_onnx)
    vm = relax.VirtualMachine(build_single(relax_mod, target, tuning_db=db_dir), tvm.cpu())
    x = np.random.default_rng().standard_normal(inputs[0].shape).astype("float32")
    out = vm["main"](tvm.runtime.tensor(x)).numpy()
    (ref,) = onnxruntime_reference(tiny_onnx, {inputs[0].name: x})
    assert max_rel_error(out, ref) < 1e-4
