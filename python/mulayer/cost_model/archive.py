"""Save and load a cost model as one versioned zip archive.

Contents: ``manifest.json`` (format, archive version, feature schema, predictor kind, config,
training-set summary with the device fingerprint, transfer and sync model, shared memory) and
one ``<processor>.json`` per regressor (for XGBoost the booster's own JSON model). Written
atomically. :func:`load_cost_model_file` refuses another archive version or a feature schema
other than this mulayer's, naming both.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

from mulayer.errors import MuLayerError
from mulayer.fileio import atomic_write_bytes

from .features import FEATURE_SCHEMA
from .model import CostModel, CostModelConfig
from .predictors import PREDICTORS, predictor_from_json
from .transfer import TransferModel

ARCHIVE_FORMAT = "mulayer-cost-model"
# 2: feature schema 2 (kernel features), XGBoost regressors carry their processor, the machine
# traits and a roofline prior. Version 1 archives are refused with a retrain hint.
ARCHIVE_VERSION = 2
MANIFEST = "manifest.json"


def save_cost_model(model: CostModel, path: str | Path) -> Path:
    """Write ``model`` to ``path`` (a ``.zip``) atomically; return the path."""
    path = Path(path)
    manifest = {
        "format": ARCHIVE_FORMAT,
        "version": ARCHIVE_VERSION,
        "feature_schema": FEATURE_SCHEMA,
        "predictor": model.config.predictor,
        "processors": sorted(model.predictors),
        "config": model.config.to_json(),
        "training": model.training,
        "transfer": model.transfer.to_json(),
        "shared_memory": model.shared_memory,
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
        for processor, predictor in sorted(model.predictors.items()):
            zf.writestr(f"{processor}.json", json.dumps(predictor.to_json()))
    atomic_write_bytes(path, buffer.getvalue())
    return path


def read_manifest(path: str | Path) -> dict:
    """The manifest of a cost model archive (checked for format and version)."""
    path = Path(path)
    if not path.is_file():
        raise MuLayerError(f"cost model {str(path)!r} does not exist")
    try:
        with zipfile.ZipFile(path) as zf:
            manifest = json.loads(zf.read(MANIFEST))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as err:
        raise MuLayerError(f"{str(path)!r} is not a mulayer cost model archive ({err})") from None
    if manifest.get("format") != ARCHIVE_FORMAT:
        raise MuLayerError(f"{str(path)!r} is not a mulayer cost model archive")
    if manifest.get("version") != ARCHIVE_VERSION:
        raise MuLayerError(
            f"cost model {str(path)!r} has archive version {manifest.get('version')!r}; this "
            f"mulayer reads version {ARCHIVE_VERSION}: retrain it on its profile "
            "(python -m mulayer.cost_model train PROFILE.jsonl -o MODEL.zip)"
        )
    return manifest


def check_schema(schema: dict, path: str | Path) -> None:
    """Refuse a feature schema other than this mulayer's."""
    ours = FEATURE_SCHEMA
    if schema.get("version") != ours["version"] or schema.get("names") != ours["names"]:
        theirs = schema.get("names") or []
        missing = [n for n in ours["names"] if n not in theirs]
        extra = [n for n in theirs if n not in ours["names"]]
        detail = []
        if missing:
            detail.append(f"missing {', '.join(missing[:6])}")
        if extra:
            detail.append(f"unknown {', '.join(extra[:6])}")
        if not detail:
            detail.append("same names in another order")
        raise MuLayerError(
            f"cost model {str(path)!r} was trained with feature schema version "
            f"{schema.get('version')!r} but this mulayer computes version {ours['version']} "
            f"({'; '.join(detail)}); retrain it on the profile data "
            "(python -m mulayer.cost_model train PROFILE.jsonl -o MODEL.zip)"
        )


def load_cost_model_file(path: str | Path) -> CostModel:
    """Load an archive written by :func:`save_cost_model`."""
    path = Path(path)
    manifest = read_manifest(path)
    check_schema(manifest.get("feature_schema") or {}, path)
    kind = manifest["predictor"]
    if kind not in PREDICTORS:
        raise MuLayerError(
            f"cost model {str(path)!r} uses predictor {kind!r}; known: {', '.join(PREDICTORS)}"
        )
    predictors = {}
    with zipfile.ZipFile(path) as zf:
        for processor in manifest["processors"]:
            predictors[processor] = predictor_from_json(
                kind, json.loads(zf.read(f"{processor}.json"))
            )
    return CostModel(
        predictors,
        TransferModel.from_json(manifest["transfer"]),
        bool(manifest["shared_memory"]),
        CostModelConfig.from_json(manifest["config"]),
        training=manifest.get("training", {}),
    )
