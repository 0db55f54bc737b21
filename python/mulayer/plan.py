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
    """Per-layer placement for one model (``--plan plan.json``, ``compile(plan=...)``).

    The JSON file (what :meth:`save` writes and :meth:`load` reads) is one object::

        {
          "schema_version": 1,
          "default_ratio": 0.5,
          "align": 8,
          "layers": {
            "conv2d.0": {"placement": "cpu"},
            "conv2d.1": {"placement": "split", "gpu_size": 16},
            "dense.0": {"placement": "gpu"}
          }
        }

    ``default_ratio`` (required in a file; a number in [0, 1])
        The share of output channels on the GPU for every layer ``layers`` does not name,
        rounded to a multiple of ``align`` (1 = GPU only, 0 = CPU only).
    ``align`` (optional, default 8; a positive integer)
        GPU slices are multiples of it.
    ``layers`` (optional, default {})
        Layer name (as ``mulayer inspect MODEL.onnx`` lists them: ``conv2d.3``, ``dense.0``,
        ``max_pool2d.1``, ...) to a decision: ``placement`` is ``"gpu"``, ``"cpu"`` or
        ``"split"``; a split needs ``gpu_size``, the number of output channels the GPU
        computes (a multiple of ``align``, at most the layer's channels); ``axis`` is
        ``"channel"`` (the default; ``"height"`` is not built yet); ``predicted_ms`` is
        informational.
    ``schema_version`` (optional, 1), ``predicted_ms``, ``baselines_ms``, ``notes``
        Written by ``-split=auto`` (predicted times, how the plan was found); optional.

    Loading refuses unknown fields, values of the wrong type and, at compile time, layer names
    the model does not have, naming the value and the valid choices. A plan sets every layer:
    a target's ``-ratio`` cannot be combined with it.
    """

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
        gpu = int(decision.gpu_size or 0)
        if gpu > size:
            raise MuLayerError(
                f"plan layer {name!r}: gpu_size {decision.gpu_size} is more than the layer's "
                f"{size} output {'rows' if decision.axis == 'height' else 'channels'}"
            )
        if decision.axis == "channel" and gpu % self.align and gpu != size:
            lower = gpu // self.align * self.align
            raise MuLayerError(
                f"plan layer {name!r}: gpu_size {gpu} is not a multiple of the plan's align "
                f"{self.align} (GPU slices are multiples of align): use e.g. {lower} or "
                f'{lower + self.align}, or set "align" in the plan'
            )
        return gpu

    def placement_reason(self, name: str, size: int) -> str:
        """Why layer ``name`` (``size`` output channels) runs wholly on one processor although
        the plan's ``default_ratio`` splits layers; ``""`` when it is split or the plan names it.
        """
        ratio = self.default_ratio
        if name in self.layers or not 0.0 < ratio < 1.0:
            return ""
        gpu = self.gpu_size(name, size)
        if 0 < gpu < size:
            return ""
        side = "GPU" if gpu else "CPU"
        if size < 2 * self.align:
            return (
                f"not split: {size} channels < 2 x align {self.align}; at ratio {ratio:g} the "
                f"{side} has the larger share"
            )
        return (
            f"not split: ratio {ratio:g} of {size} channels rounds to {gpu} in multiples of "
            f"align {self.align}"
        )

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
        if raw.get("schema_version", PLAN_SCHEMA_VERSION) != PLAN_SCHEMA_VERSION:
            cls._check_type("schema_version", raw["schema_version"], int)
            return cls(schema_version=raw["schema_version"])  # raises: names the version
        if not isinstance(raw.get("layers", {}), dict):
            raise MuLayerError("plan field layers must map layer names to decisions")
        layers = {
            name: _decision_from_json(name, decision)
            for name, decision in raw.get("layers", {}).items()
        }
        ratio = raw.get("default_ratio", 1.0)
        cls._check_type("default_ratio", ratio, (int, float), "a number in [0, 1]")
        cls._check_type("align", raw.get("align", 8), int, "a positive integer")
        if raw.get("predicted_ms") is not None:
            cls._check_type("predicted_ms", raw["predicted_ms"], (int, float), "a number")
        plan = cls(**{**raw, "layers": layers})
        if "default_ratio" not in raw:  # the dataclass default (GPU) would surprise a file
            raise MuLayerError(
                "plan has no default_ratio: give the share of output channels on the GPU for "
                'the layers it does not name (0 = CPU, 1 = GPU), e.g. "default_ratio": 0.5'
            )
        return plan

    @staticmethod
    def _check_type(key: str, value, types, what: str = "an integer") -> None:
        if isinstance(value, bool) or not isinstance(value, types):
            raise MuLayerError(f"plan field {key} is {value!r}; it must be {what}")

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


def _decision_from_json(name: str, raw) -> LayerDecision:
    """One ``layers`` entry of a plan file, with its keys and types checked."""
    valid = [f.name for f in fields(LayerDecision)]
    if not isinstance(raw, dict):
        raise MuLayerError(
            f"plan has a malformed layer entry {name!r}: {raw!r} is not an object such as "
            '{"placement": "gpu"}'
        )
    extra = sorted(set(raw) - set(valid))
    if extra:
        raise MuLayerError(
            f"plan has a malformed layer entry {name!r}: unknown field(s) {', '.join(extra)}; "
            f"valid: {', '.join(valid)}"
        )
    gpu_size = raw.get("gpu_size")
    if gpu_size is not None and (isinstance(gpu_size, bool) or not isinstance(gpu_size, int)):
        raise MuLayerError(
            f"plan layer {name!r}: gpu_size {gpu_size!r} must be an integer (output channels "
            "on the GPU)"
        )
    predicted = raw.get("predicted_ms")
    if predicted is not None and (
        isinstance(predicted, bool) or not isinstance(predicted, (int, float))
    ):
        raise MuLayerError(f"plan layer {name!r}: predicted_ms {predicted!r} must be a number")
    return LayerDecision(**raw)


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
