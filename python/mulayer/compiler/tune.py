"""Tune with MetaSchedule the kernels our schedule rules handle least well; apply the result.

:func:`tune_model` (``mulayer tune``) lowers a model exactly as ``mulayer compile`` does for a
single-processor target (frontend, fp16 for a GPU, legalize, fuse), asks the rules which one
would take each PrimFunc, and tunes the PrimFuncs that

- only a *generic* rule claims (``rule.generic``: on the CPU ``Conv2dWidthVector`` — depthwise
  and odd convs — and ``CPUFallback`` — pooling, reductions; on a GPU every dlight rule, i.e.
  all but the tensor-core conv), or no rule at all, and
- compute: hold a reduction block (elementwise kernels are bound by memory, and the fallback's
  parallel vector loops already stream them).

The specialised rules (VNNI/AMX int8, channel-vector conv, packed matmul, tensor-core conv) are
left alone: MetaSchedule without their intrinsics and packed layouts rarely beats them.
``select="all"`` tunes every computing PrimFunc instead. Tasks run one at a time, heaviest first
(FLOPs x calls), each with its share of ``trials``.

The database folder holds MetaSchedule's JSON database (``database_workload.json``,
``database_tuning_record.json``) and ``mulayer_tuning.json`` (schema, target, tasks). Tuning
again into the same folder adds records. :func:`mulayer.compiler.tuning_db.apply_tuning_db`
applies it in the build, before the rules, which skip the PrimFuncs it scheduled
(``tirx.is_scheduled``); see ``mulayer.compiler.build.build_single(..., tuning_db=...)``.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MuLayerError
from ..fileio import atomic_write_bytes, atomic_write_text
from .tuning_db import MANIFEST, RECORD_FILE, SCHEMA, WORKLOAD_FILE

if TYPE_CHECKING:  # TVM loads on first use: `mulayer --help` stays fast
    import tvm

log = logging.getLogger(__name__)

SELECTIONS = ("generic", "all")
# MetaSchedule's search strategies: the evolutionary search (with the XGBoost cost model) for
# real tuning; replay-trace samples the design space at random (fast: tests, smoke runs).
STRATEGIES = ("evolutionary", "replay-trace")


@dataclass
class TuneTask:
    """One PrimFunc picked for tuning (or passed over) and what came of it."""

    name: str
    rule: str  # the rule that schedules it without tuning ("none" if no rule does)
    flops: float
    calls: int
    trials: int = 0
    best_us: float | None = None  # MetaSchedule's best measured time


@dataclass
class TuneReport:
    """What :func:`tune_model` did."""

    db_dir: Path
    target: str
    target_kind: str
    tuned: list[TuneTask] = field(default_factory=list)
    skipped: list[TuneTask] = field(default_factory=list)  # specialised rules: not tuned
    seconds: float = 0.0


@dataclass
class TuneProgress:
    """A progress event: ``trials_done`` of ``trials_total`` for task ``index`` of ``count``."""

    index: int
    count: int
    name: str
    trials_done: int
    trials_total: int


# ---------------------------------------------------------------------------------------------
# Lowering and task selection
# ---------------------------------------------------------------------------------------------
def lower_model(model, target: str, input_shapes=None) -> tuple[tvm.IRModule, tvm.target.Target]:
    """The model as ``mulayer compile`` lowers it for ``target``, before scheduling."""
    from ..frontend.onnx_import import import_onnx
    from ..target import parse_target
    from .build import legalize_and_fuse, to_fp16

    spec = parse_target(target)
    if spec.cooperative:
        raise MuLayerError(
            f"tuning supports single-processor targets ('llvm', 'cuda, llvm'), not {target!r}: "
            "a cooperative build splits its layers into other kernels"
        )
    mod, _, _ = import_onnx(model, input_shapes)
    if spec.mode == "gpu":
        mod, tvm_target = to_fp16(mod), spec.device_target()
    else:
        tvm_target = spec.host_target()
    return legalize_and_fuse(mod, tvm_target), tvm_target


def _has_reduction(func: tvm.tirx.PrimFunc) -> bool:
    from tvm import s_tir

    from mulayer.schedules._util import iter_kinds, leaf_blocks

    sch = s_tir.Schedule(func)
    return any("R" in iter_kinds(sch.get(block)) for block in leaf_blocks(sch))


def select_tasks(mod: tvm.IRModule, target: tvm.target.Target, select: str = "generic"):
    """Split MetaSchedule's tasks of ``mod`` into (to tune, passed over), heaviest first.

    Returns two lists of ``(ExtractedTask, TuneTask)``; see the module doc for the criteria.
    """
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops

    from mulayer.schedules.apply import claiming_rule, is_generic_rule

    if select not in SELECTIONS:
        raise MuLayerError(f"unknown selection {select!r}; valid: {', '.join(SELECTIONS)}")
    chosen, passed = [], []
    for task in ms.relax_integration.extract_tasks(mod, target):
        func = task.dispatched[0]["main"]
        if not _has_reduction(func):
            continue
        rule = claiming_rule(func, target)
        info = TuneTask(
            name=task.task_name,
            rule=_rule_name(rule),
            flops=float(estimate_tir_flops(task.dispatched[0])),
            calls=int(task.weight),
        )
        if select == "all" or is_generic_rule(rule):
            chosen.append((task, info))
        else:
            passed.append((task, info))
    chosen.sort(key=lambda pair: -pair[1].flops * pair[1].calls)
    return chosen, passed


def _rule_name(rule) -> str:
    if rule is None:
        return "none"
    inner = getattr(rule, "rule", None)  # WithTensorIntrinsics(dlight rule)
    return type(inner if inner is not None else rule).__name__


# ---------------------------------------------------------------------------------------------
# Tuning
# ---------------------------------------------------------------------------------------------
def tune_model(
    model,
    target: str,
    trials: int,
    db_dir: str | Path,
    *,
    progress: bool | Callable[[TuneProgress], None] = True,
    input_shapes=None,
    select: str = "generic",
    max_tasks: int | None = None,
    seed: int | None = None,
    strategy: str = "evolutionary",
) -> TuneReport:
    """Tune ``model``'s weakest kernels for ``target`` and write the database to ``db_dir``.

    Parameters
    ----------
    model : path or onnx.ModelProto
    target : a single-processor target string (``"llvm"``, ``"cuda -arch=sm_90, llvm"``).
    trials : total MetaSchedule trials, shared by the tasks (at least 1 each).
    db_dir : folder for the database (created; existing records are kept).
    progress : True shows a progress bar per task on stderr (tqdm, or a line every few
        seconds without it); a callable receives :class:`TuneProgress` events; False is silent.
    select : ``"generic"`` (kernels of catch-all rules, default) or ``"all"``.
    max_tasks : tune at most this many tasks (the heaviest).
    seed : random seed of the search.
    strategy : ``"evolutionary"`` (default) or ``"replay-trace"`` (random samples, fast).
    """
    if trials < 1:
        raise MuLayerError(f"--trials must be at least 1, got {trials}")
    if strategy not in STRATEGIES:
        raise MuLayerError(f"unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    start = time.perf_counter()
    db_dir = Path(db_dir)
    if db_dir.exists() and not db_dir.is_dir():
        raise MuLayerError(f"tuning database {str(db_dir)!r} is a file; give a folder")
    mod, tvm_target = lower_model(model, target, input_shapes)
    chosen, passed = select_tasks(mod, tvm_target, select)
    if max_tasks is not None:
        chosen = chosen[:max_tasks]
    report = TuneReport(
        db_dir=db_dir,
        target=str(tvm_target),
        target_kind=str(tvm_target.kind.name),
        skipped=[t for _, t in passed],
    )
    db_dir.mkdir(parents=True, exist_ok=True)
    if not chosen:
        _write_manifest(db_dir, report)
        report.seconds = time.perf_counter() - start
        return report
    with tempfile.TemporaryDirectory(prefix="mulayer-tune-") as work:
        search = _Search(trials, strategy, seed, progress)
        _tune_tasks(chosen, tvm_target, search, Path(work), db_dir)
        report.tuned = [info for _, info in chosen]
        _write_manifest(db_dir, report)
    report.seconds = time.perf_counter() - start
    return report


@dataclass
class _Search:
    trials: int
    strategy: str
    seed: int | None
    progress: bool | Callable[[TuneProgress], None]


def _tune_tasks(chosen, target, search: _Search, work: Path, db_dir: Path) -> None:
    """Tune the tasks one after the other into a copy of the database, then publish it."""
    from tvm.s_tir import meta_schedule as ms

    from mulayer.schedules._intrin import load_tvm_tensor_intrinsics

    load_tvm_tensor_intrinsics()  # MetaSchedule's rules import them: 30-60 s unless done fast

    for name in (WORKLOAD_FILE, RECORD_FILE):  # continue from existing records
        if (db_dir / name).exists():
            shutil.copy(db_dir / name, work / name)
    database = ms.database.JSONDatabase(
        path_workload=str(work / WORKLOAD_FILE), path_tuning_record=str(work / RECORD_FILE)
    )
    if search.progress is True and not log.isEnabledFor(logging.INFO):
        # MetaSchedule prints its tables on stdout at INFO: the progress bar replaces them.
        logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    contexts, _ = ms.relax_integration.extracted_tasks_to_tune_contexts(
        [task for task, _ in chosen],
        str(db_dir / "logs"),
        strategy=search.strategy,
        seed=search.seed,
    )
    # Build workers import TVM's tensor intrinsics: 30-100 s each (past the 30 s build timeout)
    # unless done the fast way.
    builder = ms.builder.LocalBuilder(initializer=load_tvm_tensor_intrinsics)
    runner = ms.runner.Runner.create("local")
    cost_model = ms.cost_model.CostModel.create("xgb")
    per_task = max(1, -(-search.trials // len(chosen)))
    report = _progress_reporter(search.progress)
    for index, (context, (_, info)) in enumerate(zip(contexts, chosen, strict=True), 1):
        info.trials = per_task
        counter = _trial_counter_class()(
            lambda done, i=index, info=info: report(
                TuneProgress(i, len(chosen), info.name, done, info.trials)
            )
        )
        report(TuneProgress(index, len(chosen), info.name, 0, per_task))
        ms.tune.tune_tasks(
            tasks=[context],
            task_weights=[float(info.calls)],
            work_dir=str(work),
            max_trials_global=per_task,
            num_trials_per_iter=min(64, per_task),
            builder=builder,
            runner=runner,
            database=database,
            cost_model=cost_model,
            measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), counter],
            task_scheduler="round-robin",
        )
        record = database.query_tuning_record(context.mod, target, "main")
        if record is not None and record.run_secs:
            secs = [float(s) for s in record.run_secs]
            info.best_us = round(1e6 * sum(secs) / len(secs), 2)
        else:
            log.warning("tuning found no valid schedule for %s: the rules keep it", info.name)
    report(None)
    for name in (WORKLOAD_FILE, RECORD_FILE):
        atomic_write_bytes(db_dir / name, (work / name).read_bytes())


@functools.cache
def _trial_counter_class():
    """A MeasureCallback class that reports the running count of measured trials."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class TrialCounter(PyMeasureCallback):
        def __init__(self, on_count: Callable[[int], None]) -> None:
            self.on_count = on_count
            self.done = 0

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner):
            self.done += len(measure_candidates)
            self.on_count(self.done)

    return TrialCounter


def _progress_reporter(progress) -> Callable[[TuneProgress | None], None]:
    """A callable taking progress events (None: finished) for the ``progress`` argument."""
    if callable(progress):
        return lambda event: event is not None and progress(event)
    if not progress:
        return lambda event: None
    return _ProgressBar()


class _ProgressBar:
    """One tqdm bar per task on stderr; plain lines every 10 s without tqdm."""

    def __init__(self) -> None:
        self.bar = None
        self.task = None
        self.last_line = 0.0

    def __call__(self, event: TuneProgress | None) -> None:
        if event is None or event.index != self.task:
            self._close()
        if event is None:
            return
        label = f"task {event.index}/{event.count} {event.name}"
        if event.index != self.task:
            self.task = event.index
            self.bar = self._open(label, event.trials_total)
        if self.bar is not None:
            self.bar.n = min(event.trials_done, event.trials_total)
            self.bar.refresh()
        elif time.monotonic() - self.last_line > 10 or event.trials_done == 0:
            self.last_line = time.monotonic()
            print(f"{label} trial {event.trials_done}/{event.trials_total}", file=sys.stderr)

    @staticmethod
    def _open(label: str, total: int):
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        return tqdm(total=total, desc=label, unit="trial", file=sys.stderr, leave=True)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = None


def _write_manifest(db_dir: Path, report: TuneReport) -> None:
    manifest = db_dir / MANIFEST
    old = json.loads(manifest.read_text()) if manifest.exists() else {}
    tasks = {t["name"]: t for t in old.get("tasks", [])}
    tasks.update({t.name: asdict(t) for t in report.tuned})
    payload = {
        "schema": SCHEMA,
        "target": report.target,
        "target_kind": report.target_kind,
        "tasks": list(tasks.values()),
    }
    atomic_write_text(manifest, json.dumps(payload, indent=1) + "\n")
