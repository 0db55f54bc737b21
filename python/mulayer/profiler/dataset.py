"""The profile data set: JSON lines, appended as they are measured, safe to resume.

Rows (``"row"`` says which):

- ``shape``: a distinct layer (``key``, its :class:`~mulayer.profiler.layer_spec.LayerSpec`);
- ``model``: a model's splittable layers (``layers``: ``[layer name, shape key, Layer JSON]``),
  with the digest of the model it was read from;
- ``part``: one timed part (``key``, ``processor``, ``channels``, ``latency_us``...);
- ``anchor``: a part of the earliest run (``anchor_of``) timed again by a later run, which
  puts that run's rows on the earliest run's scale;
- ``transfer``: a host<->device copy (``direction``, ``memory``, ``nbytes``, ``latency_us``);
- ``sync``: an empty device synchronisation.

Measured rows (part, transfer, sync) carry the ``fingerprint`` of the machine and a
``profile_id`` (fingerprint + target + build options): a resumed run skips what its own
``profile_id`` already has. Each ``mulayer profile`` invocation is a ``run`` (an id in its
rows; older data sets have none, which counts as one run). Every row carries ``schema``.
Lines are written whole and flushed; a line that does not parse (a run killed mid-write) is
dropped when the file is opened again.
This module needs only the standard library, so the cost model can read data sets anywhere.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

from mulayer.errors import MuLayerError
from mulayer.fileio import atomic_write_text

DATASET_SCHEMA_VERSION = 1
ROW_KINDS = ("shape", "model", "part", "anchor", "transfer", "sync")


def _valid(row: object) -> bool:
    return (
        isinstance(row, dict)
        and row.get("schema") == DATASET_SCHEMA_VERSION
        and row.get("row") in ROW_KINDS
    )


def read_rows(path: str | Path) -> list[dict]:
    """All valid rows of a data set (lines that do not parse, or of another schema, skipped)."""
    path = Path(path)
    if not path.is_file():
        raise MuLayerError(f"profile data {str(path)!r} does not exist")
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if _valid(row):
            rows.append(row)
    return rows


def read_many(paths: Iterable[str | Path]) -> list[dict]:
    rows: list[dict] = []
    for path in paths:
        rows.extend(read_rows(path))
    return rows


class Dataset:
    """An append-only JSONL data set (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: list[dict] = []
        if self.path.exists():
            self._repair()
        self._file = None

    def _repair(self) -> None:
        """Load the rows; rewrite the file without any broken line a killed run left."""
        text = self.path.read_text(errors="replace")
        lines = text.splitlines()
        good = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if _valid(row):
                good.append(line)
                self.rows.append(row)
        if len(good) != len(lines) or (text and not text.endswith("\n")):
            dropped = len(lines) - len(good)
            warnings.warn(
                f"{self.path}: dropped {dropped} unreadable line(s) left by an interrupted run",
                stacklevel=3,
            )
            atomic_write_text(self.path, "".join(line + "\n" for line in good))

    def append(self, row: dict) -> None:
        """Write ``row`` as one line and flush it to disk."""
        row = {"schema": DATASET_SCHEMA_VERSION, **row}
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
        self._file.write(json.dumps(row, sort_keys=True, separators=(",", ":")) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.rows.append(row)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Dataset:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def of_kind(self, kind: str) -> list[dict]:
        return [row for row in self.rows if row["row"] == kind]
