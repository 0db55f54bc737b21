"""The tuning database ``mulayer tune`` writes and ``mulayer compile --tuning-db`` applies.

A folder with MetaSchedule's JSON database (``database_workload.json``,
``database_tuning_record.json``) and ``mulayer_tuning.json`` (schema, target, tasks).
:func:`apply_tuning_db` schedules the PrimFuncs it has records for, before the rules (see
:func:`mulayer.compiler.build.lower_for_target`); :mod:`mulayer.compiler.tune` writes it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MuLayerError

if TYPE_CHECKING:  # TVM loads on first use: `mulayer --help` stays fast
    import tvm

log = logging.getLogger(__name__)

SCHEMA = 1
MANIFEST = "mulayer_tuning.json"
WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"


def open_tuning_db(db_dir: str | Path, target: tvm.target.Target):
    """The MetaSchedule database in ``db_dir``, checked against ``target``'s kind."""
    from tvm.s_tir import meta_schedule as ms

    db_dir = Path(db_dir)
    missing = [name for name in (WORKLOAD_FILE, RECORD_FILE) if not (db_dir / name).is_file()]
    if missing:
        raise MuLayerError(
            f"{str(db_dir)!r} is not a tuning database (missing {', '.join(missing)}); "
            "create one with `mulayer tune MODEL --target T -o DIR`"
        )
    manifest = db_dir / MANIFEST
    if manifest.is_file():  # records of another target kind match no PrimFunc here
        tuned_for = json.loads(manifest.read_text()).get("target_kind")
        if tuned_for not in (None, str(target.kind.name)):
            log.warning(
                "tuning database %s was made for %s, not %s", db_dir, tuned_for, target.kind.name
            )
    return ms.database.JSONDatabase(
        path_workload=str(db_dir / WORKLOAD_FILE),
        path_tuning_record=str(db_dir / RECORD_FILE),
        allow_missing=False,
    )


def apply_tuning_db(
    mod: tvm.IRModule, target: tvm.target.Target, db_dir: str | Path
) -> tvm.IRModule:
    """Schedule the PrimFuncs of ``mod`` that ``db_dir`` has records for (marked scheduled).

    ``mod`` must be lowered like :func:`mulayer.compiler.tune.lower_model` does (legalized and
    fused), so that its PrimFuncs are the tuned workloads; the others are returned unchanged.
    """
    from tvm import relax

    database = open_tuning_db(db_dir, target)
    with target, database:
        return relax.transform.MetaScheduleApplyDatabase()(mod)
