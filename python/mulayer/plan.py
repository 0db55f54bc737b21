"""The partition plan: where each splittable layer runs and how it is split.

A plan is a versioned, JSON-serialisable dataclass. For every splittable layer (named as in
:func:`mulayer.frontend.layers.splittable_layers`, e.g. ``conv2d.3``) it says which processor runs
it, or how many output channels (or output rows, for the height axis) go to the GPU. Layers the plan
does not list follow ``default_ratio``: the share of output channels given to the GPU (1 = GPU only,
0 = CPU only).

Plans made by the partitioner (``-split=auto``) also carry predictions: per layer
``predicted_ms``, for the whole model ``predicted_ms`` and ``baselines_ms`` (the same estimator's
GPU-only and CPU-only figures), and ``notes`` saying how the plan was found. These fields are
optional: plans written before them load unchanged.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import MuLayerError
from .fileio import atomic_write_text

PLAN_SCHEMA_VERSION = 1
PLACEMENTS = ("gpu", "cpu", "split")
AXES = ("channel", "height")


@dataclass
class LayerDecision:
    """Where one layer runs.

    ``gpu_size`` is the number of output channels (axis ``channel``) or output rows (axis
    ``height``) computed on the GPU when ``placement == "split"``; the CPU computes the rest.
    """

    placement: str = "split"
    axis: str = "channel"
    gpu_size: int | None = None
    predicted_ms: float | None = None

    def validate(self, name: str) -> None:
        if self.placement not in PLACEMENTS:
            raise MuLayerError(
                f"plan layer {name!r}: placement {self.placement!r} is not one of "
                f"{', '.join(PLACEMENTS)}"
            )
        if self.axis not in AXES:
            raise MuLayerError(
                f"plan layer {name!r}: axis {self.axis!r} is not one of {', '.join(AXES)}"
            )
        if self.placement == "split" and (self.gpu_size is None or self.gpu_size < 0):
            raise MuLayerError(
                f"plan layer {name!r}: a split needs gpu_size >= 0, got {self.gpu_size!r}"
            )


@dataclass
class Plan:
    """Per-layer placement for one model."""

    default_ratio: float = 1.0
    align: int = 8
    layers: dict[str, LayerDecision] = field(default_factory=dict)
    schema_version: int = PLAN_SCHEMA_VERSION
    predicted_ms: float | None = None
    baselines_ms: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        if self.schema_version != PLAN_SCHEMA_VERSION:
            raise MuLayerError(
                f"plan schema version {self.schema_version!r} is not supported "
                f"(this mulayer reads version {PLAN_SCHEMA_VERSION})"
            )
        ratio = self.default_ratio
        if not isinstance(ratio, (int, float)) or math.isnan(ratio) or not 0.0 <= ratio <= 1.0:
            raise MuLayerError(f"plan ratio {ratio!r} is out of range: use a number in [0, 1]")
        if not isinstance(self.align, int) or self.align < 1:
            raise MuLayerError(f"plan align {self.align!r} must be a positive integer")
        for name, decision in self.layers.items():
            decision.validate(name)
        if not isinstance(self.baselines_ms, dict) or not all(
            isinstance(v, (int, float)) for v in self.baselines_ms.values()
        ):
            raise MuLayerError(
                f"plan baselines_ms {self.baselines_ms!r} must map a processor to milliseconds"
            )
        if not isinstance(self.notes, list) or not all(isinstance(n, str) for n in self.notes):
            raise MuLayerError(f"plan notes {self.notes!r} must be a list of strings")

    def check_layers(self, known: list[str]) -> None:
        """Refuse a plan naming layers the model does not have."""
        unknown = sorted(set(self.layers) - set(known))
        if unknown:
            shown = ", ".join(known[:8]) + (", ..." if len(known) > 8 else "")
            raise MuLayerError(
                f"plan does not match the model: unknown layer(s) {', '.join(unknown[:5])}; "
                f"the model's splittable layers are {shown or '(none)'}"
            )

    # --------------------------------------------------------------- decisions
    def gpu_size(self, name: str, size: int) -> int:
        """Output channels (or rows) of layer ``name`` (of ``size`` in all) that go to the GPU."""
        decision = self.layers.get(name)
        if decision is None:
            return aligned_split(size, self.default_ratio, self.align)
        if decision.placement == "gpu":
            return size
        if decision.placement == "cpu":
            return 0
        if int(decision.gpu_size or 0) > size:
            raise MuLayerError(
                f"plan layer {name!r}: gpu_size {decision.gpu_size} is more than the layer's "
                f"{size} output {'rows' if decision.axis == 'height' else 'channels'}"
            )
        return int(decision.gpu_size or 0)

    def sole_processor(self, sizes: dict[str, int]) -> str | None:
        """``"gpu"`` or ``"cpu"`` when every layer (name -> output channels) runs wholly there.

        Such a plan is better built for that one processor than as a two-device module.
        """
        shares = {self.gpu_size(name, size) / size for name, size in sizes.items() if size}
        if shares == {1.0}:
            return "gpu"
        if shares == {0.0}:
            return "cpu"
        return None

    def axis(self, name: str) -> str:
        decision = self.layers.get(name)
        return decision.axis if decision is not None else "channel"

    # ------------------------------------------------------------- persistence
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise MuLayerError(f"plan is not valid JSON: {err}") from None
        if not isinstance(raw, dict):
            raise MuLayerError("plan must be a JSON object")
        known = {f.name for f in fields(cls)}
        extra = sorted(set(raw) - known)
        if extra:
            raise MuLayerError(
                f"plan has unknown field(s) {', '.join(extra)}; valid: {', '.join(sorted(known))}"
            )
        if not isinstance(raw.get("layers", {}), dict):
            raise MuLayerError("plan field layers must map layer names to decisions")
        try:
            layers = {
                name: LayerDecision(**decision) for name, decision in raw.get("layers", {}).items()
            }
            return cls(**{**raw, "layers": layers})
        except TypeError as err:
            raise MuLayerError(f"plan has a malformed layer entry: {err}") from None

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise MuLayerError(f"plan file {str(path)!r} does not exist")
        return cls.from_json(path.read_text())

    @classmethod
    def uniform(cls, ratio: float, align: int = 8) -> Plan:
        return cls(default_ratio=ratio, align=align)


def aligned_split(size: int, ratio: float, align: int) -> int:
    """GPU share of ``size`` for ``ratio``, rounded to a multiple of ``align``.

    Ratio 0 and 1 are exact (all CPU, all GPU). In between, the GPU share is rounded to the
    nearest multiple of ``align`` and kept inside ``[0, size]``; when ``size`` is smaller than
    ``align`` the whole layer goes to the side with the larger share.
    """
    if ratio <= 0.0:
        return 0
    if ratio >= 1.0:
        return size
    if size < 2 * align:
        return size if ratio >= 0.5 else 0
    gpu = int(round(size * ratio / align)) * align
    return max(0, min(size, gpu))
