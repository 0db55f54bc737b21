"""The shipped cost models and :func:`load_cost_model`, which picks one.

``cost-model-<name>.zip`` files, trained on profiles measured on known machines, ship inside the
package (``mulayer/cost_model/shipped/``, package data, so a plain ``pip install`` has them);
``MULAYER_DATA_DIR`` names another folder to take them from instead. :func:`load_cost_model`
without a path takes the one whose training fingerprint matches this machine and the target's
GPU kind; with no exact match it takes one of the same GPU kind and warns (predictions for other
hardware are only a starting point: profile this machine). A path that is a bare name
(``-cost-model=h100``) names a shipped model: ``cost-model-h100.zip`` in that folder.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from mulayer.errors import MuLayerError
from mulayer.target import TargetSpec, parse_target

from .archive import load_cost_model_file, read_manifest
from .model import CostModel, shared_memory_for

DATA_ENV = "MULAYER_DATA_DIR"
PATTERN = "cost-model-*.zip"
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"


def data_dir() -> Path:
    """Where the shipped cost models live: ``MULAYER_DATA_DIR``, else the package's own."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    return SHIPPED_DIR


def resolve_path(path: str | Path) -> Path:
    """A ``-cost-model=`` value as a file: a path, or the name of a shipped model.

    A bare name (no folder, no suffix) that is not a file here is looked up in :func:`data_dir`:
    ``h100`` is ``cost-model-h100.zip`` there.
    """
    path = Path(path)
    if path.exists() or path.suffix or len(path.parts) != 1:
        return path
    shipped = data_dir() / PATTERN.replace("*", path.name)
    if shipped.is_file():
        return shipped
    prefix, suffix = PATTERN.split("*")
    names = [p.name[len(prefix) : -len(suffix)] for p, _ in shipped_models()]
    raise MuLayerError(
        f"cost model {str(path)!r} is neither a file nor a shipped model "
        f"(shipped in {data_dir()}: {', '.join(names) or 'none'})"
    )


def _spec(target: str | TargetSpec | None) -> TargetSpec:
    if isinstance(target, TargetSpec):
        return target
    if target is None:
        import tvm

        target = "mulayer, cuda, llvm" if tvm.cuda(0).exist else "mulayer, llvm, llvm"
    return parse_target(target)


def _local_fingerprint(spec: TargetSpec) -> dict:
    import tvm

    from mulayer.profiler.fingerprint import fingerprint

    gpu = None
    if spec.device is not None and spec.device["kind"] not in ("llvm",):
        gpu = tvm.device(spec.device["kind"], 0)
    return fingerprint(spec, gpu)


def _gpu_kind(spec: TargetSpec) -> str | None:
    return spec.device["kind"] if spec.device is not None else None


def shipped_models(folder: Path | None = None) -> list[tuple[Path, dict]]:
    """``(path, manifest)`` of every readable cost model in the data folder."""
    folder = folder or data_dir()
    found = []
    for path in sorted(folder.glob(PATTERN)) if folder.is_dir() else []:
        try:
            found.append((path, read_manifest(path)))
        except MuLayerError as err:
            warnings.warn(f"skipping {path}: {err}", stacklevel=2)
    return found


def _choose(spec: TargetSpec, local: dict) -> tuple[Path, dict, bool]:
    from mulayer.profiler.fingerprint import matches

    kind = _gpu_kind(spec)
    candidates = [
        (path, manifest)
        for path, manifest in shipped_models()
        if manifest.get("training", {}).get("fingerprint", {}).get("gpu_kind") == kind
    ]
    if not candidates:
        raise MuLayerError(
            f"no shipped cost model for a {kind or 'CPU-only'} target in {data_dir()}; profile "
            "this machine (mulayer profile) and train one (python -m mulayer.cost_model train), "
            "then pass its path"
        )
    for path, manifest in candidates:
        if matches(manifest["training"]["fingerprint"], local):
            return path, manifest, True
    return candidates[0][0], candidates[0][1], False


def load_cost_model(path: str | Path | None = None, target: str | TargetSpec | None = None):
    """The cost model at ``path``, or the shipped one for ``target`` on this machine.

    Parameters
    ----------
    path : str or Path, optional
        A cost model archive, or a shipped model's name (``"h100"``: see :func:`resolve_path`);
        ``None`` picks a shipped one from the data folder.
    target : str or TargetSpec, optional
        The target the model will plan for (default: cuda when a CUDA GPU is here, else the
        llvm stand-in). It decides ``shared_memory`` and which shipped model fits.

    Warns (``UserWarning``) when the model was trained on other hardware than this machine.
    """
    spec = _spec(target) if (path is None or target is not None) else None
    local = _local_fingerprint(spec) if spec is not None else None
    if path is None:
        path, manifest, exact = _choose(spec, local)
    else:
        path = resolve_path(path)
        manifest = read_manifest(path)
        exact = local is None
        if local is not None:
            from mulayer.profiler.fingerprint import matches

            exact = matches(manifest.get("training", {}).get("fingerprint", {}), local)
    model: CostModel = load_cost_model_file(path)
    if not exact:
        from mulayer.profiler.fingerprint import differences

        trained = manifest.get("training", {}).get("fingerprint", {})
        diff = "; ".join(differences(trained, local)[:4])
        warnings.warn(
            f"cost model {path.name} was trained on other hardware than this machine ({diff}); "
            "its predictions are only a starting point: profile this machine with "
            "`mulayer profile` for accurate plans (where this machine has the target's "
            "processors, -split=auto also times the plan against the single-processor builds "
            "and keeps the fastest: -verify)",
            stacklevel=2,
        )
    if spec is not None:
        model.shared_memory = shared_memory_for({"device": spec.device})
    return model
