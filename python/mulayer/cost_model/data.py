"""Training data: the measured rows of one profile (one machine, target and build options)."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field, replace

from mulayer.errors import MuLayerError
from mulayer.frontend.layers import Layer

from .kernels import (
    NARROW_OUT_CHANNELS,
    MachineTraits,
    is_pixel_lane_pointwise,
    normalize_rule,
    traits_for,
)


@dataclass
class PartSample:
    """One timed part."""

    key: str  # the distinct layer (shape) it belongs to
    processor: str
    layer: Layer
    channels: int
    latency_us: float
    samples_us: tuple[float, ...] = ()
    rule: str = ""  # the schedule rule the profiler recorded for the part's main kernel


STATISTICS = ("median", "min")


@dataclass
class ProfileData:
    """The rows of one ``profile_id``, parsed."""

    profile_id: str
    fingerprint: dict
    target: dict
    parts: list[PartSample] = field(default_factory=list)
    transfers: list[dict] = field(default_factory=list)
    syncs: list[dict] = field(default_factory=list)
    # model name -> the distinct layer keys it contains (real models only)
    models: dict[str, set[str]] = field(default_factory=dict)
    # layer keys of synthetic models (the profiler's sweep): training data, never held out
    synthetic: set[str] = field(default_factory=set)
    statistic: str = "median"
    # run id -> processor -> the factor its parts were multiplied by (the earliest run: none)
    run_scales: dict[str, dict[str, float]] = field(default_factory=dict)
    unanchored_runs: list[str] = field(default_factory=list)  # later runs left unscaled

    def processors(self) -> list[str]:
        return sorted({p.processor for p in self.parts})

    def traits(self) -> MachineTraits:
        """The machine's :class:`~.kernels.MachineTraits`, from the profile's target.

        A profile measured before the GPU depthwise rule existed recorded another rule for its
        depthwise parts: the traits then say so, so its features describe the kernels it timed.
        """
        traits = traits_for(self.target, self.fingerprint)
        old_depthwise = any(
            p.processor == "gpu"
            and p.rule
            and p.layer.kind == "conv2d"
            and 1 < p.layer.groups == p.layer.input_shape[1]
            and normalize_rule(p.rule) != "DepthwiseConv2d"
            for p in self.parts
        )
        # Which rule ran the dense GPU convs with < 64 outputs (the tensor-core rule takes them
        # only with MULAYER_GPU_NARROW_CONV=1; dlight's otherwise): the profile says if it has any.
        narrow_rules = {
            normalize_rule(p.rule) == "Conv2dTensorCore"
            for p in self.parts
            if p.processor == "gpu"
            and p.rule
            and p.layer.kind == "conv2d"
            and p.layer.groups == 1
            and p.channels < NARROW_OUT_CHANNELS
            and min(math.prod(p.layer.output_shape[2:]), math.prod(p.layer.weight_shape[1:])) >= 16
        }
        narrow = True in narrow_rules if narrow_rules else traits.gpu_narrow_conv_rule
        # Whether AMX ran is a property of the profiling machine (a VM may hide it), not of
        # the target alone: a profile that records rules says.
        recorded = {p.rule for p in self.parts if p.processor == "cpu" and p.rule}
        amx = "Conv2dInt8AMX" in recorded if recorded else traits.cpu_amx
        # A profile from before the pixel-lane pointwise schedule timed AMX tiles for them.
        old_pointwise = any(
            p.processor == "cpu"
            and p.rule
            and normalize_rule(p.rule) == "Conv2dInt8AMX"
            and is_pixel_lane_pointwise(p.layer, p.channels)
            for p in self.parts
        )
        return replace(
            traits,
            gpu_depthwise_rule=not old_depthwise,
            gpu_narrow_conv_rule=narrow,
            cpu_amx=amx,
            cpu_pixel_lanes=not old_pointwise,
        )

    def summary(self) -> dict:
        """What a trained model records about its training set."""
        return {
            "profile_id": self.profile_id,
            "fingerprint": self.fingerprint,
            "target": self.target,
            "parts": dict(Counter(p.processor for p in self.parts)),
            "layers": len({p.key for p in self.parts}),
            "transfer_rows": len(self.transfers),
            "models": sorted(self.models),
            "synthetic_layers": len(self.synthetic),
            "statistic": self.statistic,
            "run_scales": self.run_scales,
            "unanchored_runs": self.unanchored_runs,
        }


def profile_data(
    rows: list[dict], profile_id: str | None = None, statistic: str = "median"
) -> ProfileData:
    """Select and parse the rows of one profile.

    With ``profile_id`` None the data must hold exactly one profile (else the error lists them).
    ``statistic`` is the latency taken from each part's repeats: "median" (the row's
    ``latency_us``) or "min" (the least disturbed repeat: use it for data measured on a busy
    machine). Parts of later runs are put on the earliest run's scale (:func:`run_scales`).
    """
    if statistic not in STATISTICS:
        raise MuLayerError(f"statistic {statistic!r}: use one of {', '.join(STATISTICS)}")
    measured = [r for r in rows if r["row"] in ("part", "transfer", "sync")]
    ids = Counter(r.get("profile_id") for r in measured)
    if not ids:
        raise MuLayerError("the profile data holds no measured rows (run `mulayer profile`)")
    if profile_id is None:
        if len(ids) > 1:
            listed = ", ".join(f"{k} ({n} rows)" for k, n in ids.most_common())
            raise MuLayerError(
                f"the profile data mixes {len(ids)} profiles ({listed}); choose one with "
                "--profile-id"
            )
        profile_id = next(iter(ids))
    elif profile_id not in ids:
        raise MuLayerError(
            f"profile id {profile_id!r} is not in the data; it holds {', '.join(map(str, ids))}"
        )
    mine = [r for r in measured if r.get("profile_id") == profile_id]
    data = ProfileData(profile_id, mine[0]["fingerprint"], mine[0]["target"])
    data.statistic = statistic
    parts = [r for r in mine if r["row"] == "part"]
    anchors = [r for r in rows if r["row"] == "anchor" and r.get("profile_id") == profile_id]
    data.run_scales, data.unanchored_runs = run_scales(parts, anchors, statistic)
    # Rows written before part rows recorded their timed epilogue take it from the key's
    # first shape row (the profiler times the first spec of a key, too).
    specs: dict[str, dict] = {}
    for r in rows:
        if r["row"] == "shape":
            specs.setdefault(r["key"], r["spec"])
    for row in mine:
        if row["row"] == "transfer":
            data.transfers.append(row)
        elif row["row"] == "sync":
            data.syncs.append(row)
        elif "error" not in row and row.get("latency_us", 0) > 0:
            scale = data.run_scales.get(row.get("run", ""), {}).get(row["processor"], 1.0)
            data.parts.append(
                PartSample(
                    key=row["key"],
                    processor=row["processor"],
                    layer=layer_from_json(
                        row["layer"], None if "epilogue" in row["layer"] else specs.get(row["key"])
                    ),
                    channels=int(row["channels"]),
                    latency_us=_latency(row, statistic) * scale,
                    samples_us=tuple(t * scale for t in row.get("samples_us") or ()),
                    rule=(row.get("schedule") or {}).get("rule", ""),
                )
            )
    for row in rows:
        if row["row"] != "model":
            continue
        keys = {k for _, k, _ in row["layers"]}
        if row.get("synthetic"):
            data.synthetic |= keys
        else:
            data.models.setdefault(row["model"], set()).update(keys)
    return data


def run_scales(
    parts: list[dict], anchors: list[dict], statistic: str = "median"
) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Per later run and processor, the median over its anchors of (the earliest run's time of
    the part / the anchor's time): the factor that puts the run's parts on the earliest run's
    scale (a machine started again may be faster or slower). Runs are ``mulayer profile``
    invocations (rows without a ``run`` id: one run, made before runs had ids); the earliest
    is the first in the file. Also the later runs with parts but no anchors (left unscaled)."""
    measured = [r for r in parts if "error" not in r and r.get("latency_us", 0) > 0]
    if not measured:
        return {}, []
    earliest = measured[0].get("run", "")
    first = {
        r["key_part"]: _latency(r, statistic) for r in measured if r.get("run", "") == earliest
    }
    ratios: dict[str, dict[str, list[float]]] = {}
    for anchor in anchors:
        reference = first.get(anchor["key_part"])
        if reference is None or "error" in anchor or anchor.get("latency_us", 0) <= 0:
            continue
        by_processor = ratios.setdefault(anchor.get("run", ""), {})
        by_processor.setdefault(anchor["processor"], []).append(
            reference / _latency(anchor, statistic)
        )
    scales = {
        run: {p: statistics.median(values) for p, values in by_processor.items()}
        for run, by_processor in ratios.items()
        if run != earliest
    }
    later = {r.get("run", "") for r in measured} - {earliest}
    unanchored = sorted(
        run
        for run in later
        if any(
            r.get("run", "") == run and r["processor"] not in scales.get(run, {}) for r in measured
        )
    )
    return scales, unanchored


def layer_from_json(raw: dict, spec: dict | None = None) -> Layer:
    """A layer-table entry from JSON; with ``spec`` (the :class:`~mulayer.profiler.LayerSpec`
    JSON of the layer's shape row), the epilogue and input sign are the spec's: the key leaves
    both out, so layers with other epilogues share the parts of the first one, and part rows
    of older profiles recorded the first model's layer, not what was timed."""
    fields = dict(raw)
    for name in ("input_shape", "output_shape", "weight_shape", "strides", "epilogue"):
        if fields.get(name) is not None:
            fields[name] = tuple(fields[name])
    if spec is not None:
        fields["epilogue"] = tuple(step["op"] for step in spec.get("epilogue", ()))
        fields["input_nonneg"] = bool(spec.get("input_nonneg", False))
    return Layer(**fields)


def _latency(row: dict, statistic: str) -> float:
    if statistic == "min" and row.get("samples_us"):
        return float(min(row["samples_us"]))
    return float(row["latency_us"])
