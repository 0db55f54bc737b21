"""``mulayer profile``'s library function: collect layers, build parts in chunks, time them.

The run reads top to bottom in :func:`profile`:

1. open the data set (what is already measured is skipped);
2. read the models' layers (or reuse them from the data set) and list the parts still to time:
   every distinct layer x processor x channel slice of :func:`channel_grid`;
3. time transfers and sync once (local GPU sessions);
4. on a resumed run, time some parts the earliest run measured again (anchors: ``anchors``
   per processor), so that training can put every run's rows on the earliest run's scale
   (a machine started again may run faster or slower: ``mulayer.cost_model.data``);
5. in rounds: build ``jobs`` chunks of ``chunk_size`` parts in parallel worker processes, then
   time them one by one with nothing else running; append a row per part (with the run's id);
6. stop before a round that would not end within ``max_seconds``; the next run resumes.

Height (row) slices are not profiled: SplitChannels splits output channels only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import zip_longest
from multiprocessing import get_context
from pathlib import Path

from mulayer.errors import MuLayerError
from mulayer.target import TargetSpec, parse_target

from .builder import BuildRequest, build_chunk_safely, library_path
from .dataset import Dataset
from .fingerprint import fingerprint
from .layer_spec import LayerSpec
from .models import read_model_json, resolve_models
from .parts import PROCESSORS, snap_channels
from .timer import (
    TRANSFER_SIZES,
    Timing,
    TimingConfig,
    time_parts,
    time_sync,
    time_transfers,
)

log = logging.getLogger(__name__)

DEFAULT_SLICES = (0.25, 0.5, 0.75, 1.0)


@dataclass
class ProfileConfig:
    """What to profile and how (the options of ``mulayer profile``)."""

    target: str
    models: list[str]
    output: Path
    slices: tuple[float, ...] = DEFAULT_SLICES
    align: int = 8
    processors: tuple[str, ...] = PROCESSORS
    chunk_size: int = 8
    jobs: int = 1
    max_seconds: float | None = None
    timing: TimingConfig = field(default_factory=TimingConfig)
    transfers: bool = True
    transfer_sizes: tuple[int, ...] = TRANSFER_SIZES
    prepack: bool = False
    rpc_tracker: str | None = None
    rpc_key: str | None = None
    # Random layers to time besides the models' (the synthetic model "sweep"; see .sweep).
    sweep: int = 0
    # Profile only the first N distinct layers (tests, quick looks).
    max_layers: int | None = None
    # Parts of the earliest run timed again per processor by a resumed run (0: none).
    anchors: int = 12
    progress: bool = True


@dataclass
class ProfileSummary:
    output: str
    profile_id: str
    fingerprint: dict
    parts_total: int
    parts_measured: int = 0
    parts_failed: int = 0
    parts_left: int = 0
    anchors_measured: int = 0
    transfer_rows: int = 0
    run: str = ""
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return self.parts_left == 0

    def to_json(self) -> dict:
        return {**self.__dict__, "complete": self.complete}


def channel_grid(spec: LayerSpec, slices, align: int) -> list[int]:
    """Channel counts to profile: ``align`` and each share of ``slices``, rounded to ``align``,
    moved to group boundaries of grouped convs, within ``1 .. C``."""
    total = spec.output_shape[1]
    if total <= align:
        return [total]
    counts = {align}
    for share in slices:
        counts.add(max(align, min(total, int(round(total * share / align)) * align)))
    snapped = {snap_channels(spec, k) for k in counts}
    return sorted(k for k in snapped if 0 < k <= total)


# How parts are built: "fused" as a cooperative build fuses them. Rows of profiles whose
# parts ran unfused (before this key) have other ids, so a resumed run never mixes the two.
PART_FORM = "fused"


def _profile_id(fp: dict, spec: TargetSpec, prepack: bool) -> str:
    core = {
        "fp": fp,
        "host": spec.host,
        "device": spec.device,
        "prepack": prepack,
        "parts": PART_FORM,
    }
    return hashlib.sha1(json.dumps(core, sort_keys=True).encode()).hexdigest()[:12]


def timed_layer(layer: dict, spec: LayerSpec) -> dict:
    """A part row's layer entry: the first model's layer of the key, with the epilogue and
    input sign of the spec that is timed (the key leaves both out)."""
    return {
        **layer,
        "epilogue": [step["op"] for step in spec.epilogue],
        "input_nonneg": spec.input_nonneg,
    }


def part_key(shape_key: str, processor: str, channels: int) -> str:
    return f"{shape_key}/{processor}/{channels}"


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return _LineProgress(total)
    interval = 1 if sys.stderr.isatty() else 15
    return tqdm(total=total, unit="part", desc="profile", mininterval=interval)


class _LineProgress:
    """A progress line every 15 s when tqdm is not installed."""

    def __init__(self, total: int):
        self.total, self.n, self.last = total, 0, 0.0

    def update(self, n: int) -> None:
        self.n += n
        if time.monotonic() - self.last > 15 or self.n == self.total:
            self.last = time.monotonic()
            print(f"profile: {self.n}/{self.total} parts", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _open_session(cfg: ProfileConfig, spec: TargetSpec):
    from .session import LocalSession, RPCSession

    if (cfg.rpc_tracker is None) != (cfg.rpc_key is None):
        raise MuLayerError("--rpc-tracker and --rpc-key go together: give both or neither")
    if cfg.rpc_tracker is not None:
        return RPCSession(spec, cfg.rpc_tracker, cfg.rpc_key)
    return LocalSession(spec)


def _collect_layers(cfg: ProfileConfig, data: Dataset, pool) -> tuple[dict[str, LayerSpec], dict]:
    """Distinct layer specs (first-seen order) and each key's first ``Layer`` JSON.

    Models the data set does not describe yet are read (in the build pool when there is one).
    """
    known = {row["model"]: row for row in data.of_kind("model")}
    specs = {row["key"]: LayerSpec.from_json(row["spec"]) for row in data.of_kind("shape")}
    sources = resolve_models(cfg.models, cfg.sweep)
    unread = [s for s in sources if known.get(s.name, {}).get("digest") != s.digest]
    requests = [
        {
            "name": s.name,
            "path": str(s.path) if s.path else None,
            "digest": s.digest,
            "sweep": s.sweep,
        }
        for s in unread
    ]
    log.info("reading %s", ", ".join(s.name for s in unread) or "no models")
    described = pool.map(read_model_json, requests) if pool else map(read_model_json, requests)
    for source, layers_and_specs in zip(unread, described, strict=True):
        entries = []
        for layer_json, spec_json in layers_and_specs:
            spec = LayerSpec.from_json(spec_json)
            if spec.key not in specs:
                specs[spec.key] = spec
                data.append({"row": "shape", "key": spec.key, "spec": spec.to_json()})
            entries.append([layer_json["name"], spec.key, layer_json])
        known[source.name] = {
            "model": source.name,
            "digest": source.digest,
            "synthetic": source.synthetic,
            "layers": entries,
        }
        data.append({"row": "model", **known[source.name]})
    layers: dict[str, dict] = {}
    for source in sources:
        for _name, key, layer_json in known[source.name]["layers"]:
            layers.setdefault(key, layer_json)
    order = list(layers)
    if cfg.max_layers is not None:
        order = order[: cfg.max_layers]
    return {key: specs[key] for key in order}, layers


def _todo(cfg, specs, layers, done: set[str]) -> list[dict]:
    parts = []
    for key, spec in specs.items():
        for processor in cfg.processors:
            for channels in channel_grid(spec, cfg.slices, cfg.align):
                pkey = part_key(key, processor, channels)
                if pkey in done:
                    continue
                parts.append(
                    {
                        "id": pkey,
                        "key": key,
                        "processor": processor,
                        "channels": channels,
                        "spec": spec.to_json(),
                        "layer": timed_layer(layers[key], spec),
                    }
                )
    return parts


def anchor_parts(rows: list[dict], pid: str, specs, layers, cfg) -> list[dict]:
    """Up to ``cfg.anchors`` parts per processor that the earliest run of profile ``pid``
    measured (rows without a run id are that run: profiles made before runs had ids), picked
    by a hash of their key (the same ones on every resumed run), to be timed again."""
    measured = [
        r for r in rows if r.get("profile_id") == pid and "error" not in r and r["key"] in specs
    ]
    if not measured or cfg.anchors <= 0:
        return []
    earliest = measured[0].get("run", "")
    picked: dict[str, list[dict]] = {}
    ranked = sorted(
        (r for r in measured if r.get("run", "") == earliest and r["processor"] in cfg.processors),
        key=lambda r: hashlib.sha1(r["key_part"].encode()).hexdigest(),
    )
    for row in ranked:
        chosen = picked.setdefault(row["processor"], [])
        if len(chosen) < cfg.anchors:
            chosen.append(
                {
                    "id": row["key_part"],
                    "key": row["key"],
                    "processor": row["processor"],
                    "channels": row["channels"],
                    "spec": specs[row["key"]].to_json(),
                    "layer": timed_layer(layers[row["key"]], specs[row["key"]]),
                    "anchor_of": earliest,
                }
            )
    return [part for chosen in picked.values() for part in chosen]


def _chunks(parts: list[dict], size: int) -> list[list[dict]]:
    by_processor: dict[str, list[dict]] = {}
    for part in parts:
        by_processor.setdefault(part["processor"], []).append(part)
    # Alternate processors, so a run stopped early has measured both.
    lists = [[g[i : i + size] for i in range(0, len(g), size)] for g in by_processor.values()]
    return [chunk for group in zip_longest(*lists) for chunk in group if chunk is not None]


def _timing_row(timing: Timing) -> dict:
    # The median over repeats is the latency; the repeats and their spread bound what a cost
    # model can reach (scripts/eval_cost_model.py reports it as the measurement repeatability).
    return {
        "latency_us": round(timing.median_us, 3),
        "samples_us": timing.samples_us,
        "spread": round(timing.spread, 4),
        "number": timing.number,
        "attempts": timing.attempts,
    }


def _measure_transfers(session, data: Dataset, base: dict, sizes, summary) -> None:
    have = {
        (r["direction"], r["memory"], r["nbytes"])
        for r in data.of_kind("transfer")
        if r.get("profile_id") == base["profile_id"]
    }
    device = session.device("gpu")
    sizes = [n for n in sizes if not {(d, "pageable", n) for d in ("h2d", "d2h")} <= have]
    for direction, memory, nbytes, timing in time_transfers(device, sizes):
        if (direction, memory, nbytes) in have:
            continue
        row = {"row": "transfer", "direction": direction, "memory": memory, "nbytes": nbytes}
        data.append({**row, **base, **_timing_row(timing)})
        summary.transfer_rows += 1
    if not any(r.get("profile_id") == base["profile_id"] for r in data.of_kind("sync")):
        data.append({"row": "sync", **base, **_timing_row(time_sync(device))})


def profile(cfg: ProfileConfig) -> ProfileSummary:
    """Profile ``cfg.models``' layers on ``cfg.target``; see the module docstring."""
    start = time.monotonic()
    spec = parse_target(cfg.target) if isinstance(cfg.target, str) else cfg.target
    processors = tuple(p for p in cfg.processors if p == "cpu" or spec.device is not None)
    cfg.processors = processors
    session = _open_session(cfg, spec)
    gpu_dev = session.device("gpu") if spec.device is not None else None
    fp = fingerprint(spec, gpu_dev, session.remote_key)
    pid = _profile_id(fp, spec, cfg.prepack)
    run = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)
    base = {
        "profile_id": pid,
        "run": run,
        "fingerprint": fp,
        "target": {"host": spec.host, "device": spec.device},
    }
    jobs = max(1, cfg.jobs)
    pool = ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) if jobs > 1 else None
    try:
        with Dataset(cfg.output) as data:
            # Step 1. What is done already, and the layers to profile.
            done = {r["key_part"] for r in data.of_kind("part") if r.get("profile_id") == pid}
            specs, layers = _collect_layers(cfg, data, pool)
            todo = _todo(cfg, specs, layers, done)
            summary = ProfileSummary(
                str(cfg.output), pid, fp, parts_total=len(todo) + len(done), run=run
            )
            # Step 2. Transfers and sync (a local GPU: a remote one is timed by its kernels only).
            if cfg.transfers and spec.device is not None and session.remote_key is None:
                _measure_transfers(session, data, base, cfg.transfer_sizes, summary)
            # Step 3. Anchors: a resumed run times parts of the earliest run again.
            anchors = anchor_parts(data.of_kind("part"), pid, specs, layers, cfg) if todo else []
            if anchors:
                _run_rounds(cfg, spec, session, data, base, anchors, summary, start, pool, "anchor")
            # Step 4. Build and time chunks in rounds.
            _run_rounds(cfg, spec, session, data, base, todo, summary, start, pool)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    session.close()
    summary.seconds = round(time.monotonic() - start, 1)
    return summary


def _run_rounds(cfg, spec, session, data, base, todo, summary, start, pool, kind="part") -> None:
    """Build and time ``todo`` in rounds; append a row of ``kind`` ("part", "anchor") each."""
    chunks = _chunks(todo, cfg.chunk_size)
    jobs = max(1, cfg.jobs)
    bar = _progress(len(todo), cfg.progress and kind == "part")
    round_seconds: list[float] = []
    try:
        with tempfile.TemporaryDirectory(prefix="mulayer-profile-") as tmp:
            index = 0
            while index < len(chunks):
                elapsed = time.monotonic() - start
                estimate = max(round_seconds) if round_seconds else 0.0
                if cfg.max_seconds is not None and elapsed + estimate > cfg.max_seconds:
                    break
                batch = chunks[index : index + jobs]
                round_start = time.monotonic()
                requests = [
                    BuildRequest(
                        processor=chunk[0]["processor"],
                        parts=[
                            {"id": p["id"], "spec": p["spec"], "channels": p["channels"]}
                            for p in chunk
                        ],
                        host=spec.host,
                        device=spec.device,
                        library=library_path(Path(tmp), index + i),
                        prepack=cfg.prepack,
                    ).to_json()
                    for i, chunk in enumerate(batch)
                ]
                if pool is None:
                    built = [build_chunk_safely(r) for r in requests]
                else:
                    built = list(pool.map(build_chunk_safely, requests))
                for chunk, results in zip(batch, built, strict=True):
                    for result in results:
                        _time_chunk(cfg, session, data, base, chunk, result, summary, kind)
                        if result["library"]:
                            Path(result["library"]).unlink(missing_ok=True)
                    if bar is not None:
                        bar.update(len(chunk))
                round_seconds.append(time.monotonic() - round_start)
                index += len(batch)
            if kind == "part":
                summary.parts_left = sum(len(c) for c in chunks[index:])
    finally:
        if bar is not None:
            bar.close()


def _time_chunk(cfg, session, data, base, chunk, result, summary, kind="part") -> None:
    """Time the parts of one built library (``result``) and append their rows."""
    by_id = {p["id"]: p for p in chunk}
    rows: dict[str, dict] = {}
    for part_id, error in result["errors"].items():
        rows[part_id] = {"error": error}
    if result["library"]:
        processor = chunk[0]["processor"]
        for part_id, timing in time_parts(
            session, result["library"], processor, result["infos"], cfg.timing
        ):
            info = result["infos"][part_id]
            if isinstance(timing, str):
                rows[part_id] = {"error": timing}
                continue
            rows[part_id] = {
                "precision": info["precision"],
                "schedule": info["schedule"],
                **_timing_row(timing),
            }
    build_seconds = round(result["seconds"] / max(1, len(rows)), 3)
    for part_id, measured in rows.items():
        part = by_id[part_id]
        row = {
            "row": kind,
            "key_part": part_id,
            "key": part["key"],
            "processor": part["processor"],
            "channels": part["channels"],
            "layer": part["layer"],
            "build_seconds": build_seconds,
            **({"anchor_of": part["anchor_of"]} if "anchor_of" in part else {}),
            **base,
            **measured,
        }
        data.append(row)
        if kind == "anchor":
            summary.anchors_measured += "error" not in measured
        elif "error" in measured:
            summary.parts_failed += 1
        else:
            summary.parts_measured += 1
