"""The artifact: one file holding the compiled library, its metadata and (v2) the plan.

Layout (a zip archive)::

    lib.so          the Relax VM executable, exported with ``export_library``
    metadata.json   schema version, versions, targets, input/output specs, sha256 of members
    plan.json       the partition plan (cooperative builds only)

The zip comment holds the sha256 of ``metadata.json``, so every byte that matters is checked on
load. This module is the file format, read and written; loading an artifact to run it is
:func:`mulayer.runtime.loader.load_artifact`. It needs only the TVM runtime (no compiler modules,
no onnx).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
import zlib
from pathlib import Path

from ..errors import MuLayerError
from ..fileio import atomic_write

ARTIFACT_SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
LIB_NAME = "lib.so"
METADATA_NAME = "metadata.json"
PLAN_NAME = "plan.json"
ZIP_MAGIC = b"PK\x03\x04"  # an artifact's first bytes, whole or truncated


def looks_like_artifact(path: str | Path) -> bool:
    """Whether ``path`` is a zip archive, or the beginning of one (a truncated artifact)."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as handle:
        return handle.read(len(ZIP_MAGIC)) == ZIP_MAGIC


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_artifact(
    path: str | Path,
    lib_path: Path,
    metadata: dict,
    plan_json: str | None = None,
    extra_members: dict[str, bytes] | None = None,
) -> None:
    """Write the artifact to ``path`` atomically (temporary name, then rename).

    ``extra_members`` (e.g. a CPU fallback library, see :mod:`mulayer.runtime.fallback`) are stored
    and checksummed like the others.
    """
    members: dict[str, bytes] = {LIB_NAME: Path(lib_path).read_bytes()}
    if plan_json is not None:
        members[PLAN_NAME] = plan_json.encode()
    members.update(extra_members or {})
    metadata = {
        **metadata,
        "schema_version": ARTIFACT_SCHEMA_VERSION,
        "members": {name: _sha256(data) for name, data in members.items()},
    }
    meta_bytes = json.dumps(metadata, indent=2, sort_keys=True).encode()

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(METADATA_NAME, meta_bytes)
            for name, data in members.items():
                archive.writestr(name, data)
            archive.comment = _sha256(meta_bytes).encode()

    atomic_write(Path(path), write)


def read_metadata(path: str | Path) -> tuple[dict, dict[str, bytes]]:
    """Open and verify an artifact; return ``(metadata, members)``.

    Raises ``MuLayerError`` naming what is wrong: missing, not an artifact, truncated,
    tampered with (checksum), or written by an incompatible mulayer/TVM.
    """
    path = Path(path)
    if not path.exists():
        raise MuLayerError(f"artifact {str(path)!r} does not exist")
    if path.is_dir():
        raise MuLayerError(f"artifact path {str(path)!r} is a directory")
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if METADATA_NAME not in names:
                raise MuLayerError(f"{str(path)!r} is not a mulayer artifact (no {METADATA_NAME})")
            meta_bytes = _read_member(archive, METADATA_NAME, path)
            comment = archive.comment.decode(errors="replace")
            members = {
                name: _read_member(archive, name, path) for name in sorted(names - {METADATA_NAME})
            }
    except zipfile.BadZipFile:
        if looks_like_artifact(path):
            raise MuLayerError(
                f"{str(path)!r} is a truncated or damaged mulayer artifact (its zip directory "
                "is missing: was the copy cut short?); copy or recompile it again"
            ) from None
        raise MuLayerError(
            f"{str(path)!r} is not a mulayer artifact or is truncated (not a valid archive)"
        ) from None
    except (zipfile.LargeZipFile, OSError, EOFError) as err:
        raise MuLayerError(f"artifact {str(path)!r} could not be read: {err}") from None
    if comment != _sha256(meta_bytes):
        raise MuLayerError(f"artifact {str(path)!r} is corrupt: metadata checksum mismatch")
    try:
        metadata = json.loads(meta_bytes)
    except json.JSONDecodeError:
        raise MuLayerError(f"artifact {str(path)!r} has unreadable metadata") from None
    version = metadata.get("schema_version")
    if version not in READABLE_SCHEMA_VERSIONS:
        raise MuLayerError(
            f"artifact {str(path)!r} has schema version {version!r}; this mulayer reads "
            f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))}: recompile the model"
        )
    for name, digest in metadata.get("members", {}).items():
        if name not in members:
            raise MuLayerError(f"artifact {str(path)!r} is missing its member {name!r}")
        if _sha256(members[name]) != digest:
            raise MuLayerError(f"artifact {str(path)!r} is corrupt: checksum mismatch for {name!r}")
    return metadata, members


def _read_member(archive: zipfile.ZipFile, name: str, path: Path) -> bytes:
    """One member's bytes; damaged compressed data (or a CRC mismatch) is bad input."""
    try:
        return archive.read(name)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise MuLayerError(
            f"artifact {str(path)!r} is damaged: its member {name!r} cannot be read ({err}); "
            "copy or recompile it again"
        ) from None


def check_runtime_compatible(metadata: dict, path: str | Path) -> None:
    """Refuse an artifact built by another TVM version (its library would not load safely)."""
    import tvm

    built_with = metadata.get("tvm_version")
    if built_with != tvm.__version__:
        raise MuLayerError(
            f"artifact {str(path)!r} was built with TVM {built_with}, but this runtime is TVM "
            f"{tvm.__version__}: recompile the model with this TVM"
        )
