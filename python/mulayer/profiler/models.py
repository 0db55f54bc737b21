"""The models to profile: ONNX files, zoo names or the synthetic sweep, read into layer specs.

Reading a model (ONNX import, or building a zoo model) takes seconds to a minute, so what it
yields is stored in the data set (``model`` and ``shape`` rows) and a resumed run reads a model
again only when its digest changed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from mulayer.errors import MuLayerError


@dataclass
class ModelSource:
    """A model to profile: its name (file stem or zoo name) and where it comes from."""

    name: str
    path: Path | None  # None: a zoo model or the sweep
    digest: str
    sweep: int = 0  # layers of the synthetic sweep (this source is then the sweep)

    @property
    def synthetic(self) -> bool:
        return self.sweep > 0

    def load(self):
        """The ONNX model (path or ``onnx.ModelProto``)."""
        if self.path is not None:
            return self.path
        from mulayer.models.zoo import build_model

        return build_model(self.name)


def resolve_models(models: list[str], sweep: int = 0) -> list[ModelSource]:
    """Each ``models`` entry (an ONNX path or a zoo name) as a :class:`ModelSource`, then the
    synthetic sweep of ``sweep`` layers (:mod:`.sweep`) if any."""
    from mulayer.models.zoo import MODEL_NAMES

    sources: dict[str, ModelSource] = {}
    for entry in models:
        path = Path(entry)
        if path.is_file():
            digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            source = ModelSource(path.stem, path, digest)
        elif entry in MODEL_NAMES:
            source = ModelSource(entry, None, f"zoo:{entry}:seed0")
        else:
            raise MuLayerError(
                f"model {entry!r} is neither an ONNX file nor a zoo model "
                f"({', '.join(MODEL_NAMES)})"
            )
        if source.name in sources and sources[source.name].digest != source.digest:
            raise MuLayerError(
                f"two different models are named {source.name!r}; rename one of the files"
            )
        sources[source.name] = source
    if not sources:
        raise MuLayerError("no models given: pass ONNX files or zoo names with --models")
    if sweep > 0:
        from .sweep import SWEEP_MODEL

        if SWEEP_MODEL in sources:
            raise MuLayerError(f"a model is named {SWEEP_MODEL!r}, the synthetic sweep's name")
        sources[SWEEP_MODEL] = ModelSource(SWEEP_MODEL, None, f"sweep:{sweep}:seed0", sweep)
    return list(sources.values())


def read_model(source: ModelSource):
    """``[(Layer, LayerSpec)]`` of the model's splittable layers."""
    from mulayer.frontend.onnx_import import import_onnx

    from .layer_spec import describe_layers

    if source.synthetic:
        return _read_sweep(source.sweep)
    mod, _, _ = import_onnx(source.load())
    return describe_layers(mod["main"])


def _read_sweep(count: int):
    from mulayer.frontend.layers import splittable_layers

    from .layer_spec import layer_module
    from .sweep import sweep_specs

    result = []
    for i, spec in enumerate(sweep_specs(count)):
        (layer,) = splittable_layers(layer_module(spec)["main"])
        layer.name = f"{spec.kind}.{i}"
        layer.input_nonneg = spec.input_nonneg  # a stand-alone layer's input is a parameter
        result.append((layer, spec))
    return result


def read_model_json(source: dict) -> list[tuple[dict, dict]]:
    """:func:`read_model` as JSON (``[(Layer JSON, LayerSpec JSON)]``), for worker processes."""
    path = source["path"]
    model = ModelSource(
        source["name"], Path(path) if path else None, source["digest"], source["sweep"]
    )
    return [(layer.to_json(), spec.to_json()) for layer, spec in read_model(model)]
