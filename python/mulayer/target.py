"""Targets: tvmc's grammar in, TVM JSON-dict targets out.

``"mulayer -ratio=0.5, cuda -arch=sm_90, llvm -mcpu=znver4"`` is a comma-separated list of
targets, each a kind followed by ``-key=value`` options. As in tvmc the first TVM target is the
device and the last the host; here the host llvm target also runs the CPU slices. The optional
``mulayer`` pseudo-target (first) carries the partition options and makes the build cooperative.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MuLayerError

# Options each kind accepts in the tvmc grammar (define once; messages and docs derive from it).
LLVM_OPTIONS = ("mcpu", "mtriple", "mattr", "num-cores")
TARGET_OPTIONS: dict[str, tuple[str, ...]] = {
    "llvm": LLVM_OPTIONS,
    "cuda": ("arch", "max_threads_per_block"),
    "opencl": ("device",),
}
GPU_KINDS = ("cuda", "opencl")
# /proc/cpuinfo flag -> LLVM feature, added to a detected host CPU whose LLVM model lacks it.
HIDDEN_FEATURES = {"amx_tile": "amx-tile", "amx_int8": "amx-int8"}
OPENCL_DEVICES = ("mali", "adreno", "generic")
SPLIT_AXES = ("channel", "height", "auto")
# -verify: time an auto plan against the single-processor builds and keep the fastest
# ("auto": where the target's processors are on this machine).
VERIFY_MODES = ("auto", "measure", "off")
MULAYER_OPTIONS = ("ratio", "split", "align", "cost-model", "guard-db", "verify")


@dataclass
class MulayerOptions:
    """Options of the ``mulayer`` pseudo-target (also ``--target-mulayer-<opt>``)."""

    ratio: float | None = None
    split: str = "channel"
    align: int = 8
    cost_model: str | None = None
    guard_db: float = 30.0
    verify: str = "auto"


@dataclass
class TargetSpec:
    """A parsed target: where the GPU side and the CPU side (host) run.

    ``device`` is ``None`` for a CPU-only build. With ``mulayer`` set the build is cooperative and
    ``device`` may itself be an llvm target (the GPU side compiled for the CPU, for machines
    without a GPU).
    """

    host: dict
    device: dict | None = None
    mulayer: MulayerOptions | None = None
    text: str = ""
    detected: list[str] = field(default_factory=list)

    @property
    def cooperative(self) -> bool:
        return self.mulayer is not None

    @property
    def mode(self) -> str:
        if self.cooperative:
            return "cooperative"
        return "gpu" if self.device is not None else "cpu"

    def host_target(self):
        import tvm

        return tvm.target.Target(self.host)

    def device_target(self):
        import tvm

        if self.device is None:
            return None
        if self.device["kind"] == "llvm":
            return tvm.target.Target(self.device)
        return tvm.target.Target(self.device, host=self.host)

    def to_json(self) -> dict:
        raw = {"text": self.text, "host": self.host, "device": self.device}
        if self.mulayer is not None:
            raw["mulayer"] = self.mulayer.__dict__.copy()
        return raw


def _split_top_level(text: str) -> list[str]:
    """The comma-separated targets; ``-mattr=+a,+b`` keeps its feature list (tvmc's grammar)."""
    parts: list[str] = []
    for piece in (piece.strip() for piece in text.split(",")):
        if parts and piece[:1] in "+-" and " " not in piece and "-mattr=" in parts[-1]:
            parts[-1] += "," + piece  # the next feature of the previous target's -mattr
        else:
            parts.append(piece)
    if not text.strip() or any(not part for part in parts):
        raise MuLayerError(
            f"target {text!r} is malformed: give comma-separated targets such as "
            '"llvm", "cuda -arch=sm_90, llvm" or "mulayer -ratio=0.5, cuda, llvm"'
        )
    return parts


def _parse_one(text: str) -> tuple[str, dict[str, str]]:
    words = text.split()
    kind, options = words[0], {}
    valid_kinds = ("mulayer", *TARGET_OPTIONS)
    if kind not in valid_kinds:
        raise MuLayerError(
            f"unknown target kind {kind!r} in {text!r}; valid kinds: {', '.join(valid_kinds)}"
        )
    valid = MULAYER_OPTIONS if kind == "mulayer" else TARGET_OPTIONS[kind]
    for word in words[1:]:
        if not word.startswith("-") or "=" not in word:
            raise MuLayerError(
                f"target option {word!r} of {kind!r} must look like -key=value "
                f"(valid keys: {', '.join(valid)})"
            )
        key, value = word.lstrip("-").split("=", 1)
        if key not in valid:
            raise MuLayerError(
                f"unknown option -{key} for target {kind!r}; valid: "
                f"{', '.join('-' + v for v in valid)}"
            )
        if not value:
            raise MuLayerError(f"option -{key} of target {kind!r} needs a value")
        options[key] = value
    return kind, options


def detect_cpu() -> str:
    """The host CPU's LLVM name (the wheel's LLVM rejects ``-mcpu=native``)."""
    from tvm.target.codegen import llvm_get_system_cpu

    return llvm_get_system_cpu()


def host_cpu_flags() -> set[str]:
    """The host's CPU flags as Linux reports them (``/proc/cpuinfo``); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def detect_hidden_features(mcpu: str) -> list[str]:
    """``+feature`` for what the host runs but LLVM's model of ``mcpu`` lacks (AMX only).

    LLVM names the host CPU from its family and model; a VM that reports an older model (the
    development machine's Xeon shows as ``rocketlake``) can still pass AMX through, and the
    int8 conv rules then leave 30% of ResNet-18's speed unused (docs/results.md).
    """
    import tvm
    from tvm.target.codegen import llvm_get_cpu_features

    flags = host_cpu_flags()
    known = {
        str(f) for f in llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": mcpu}))
    }
    return [
        f"+{feature}"
        for flag, feature in HIDDEN_FEATURES.items()
        if flag in flags and feature not in known
    ]


def _llvm(options: dict[str, str], detected: list[str]) -> dict:
    target: dict = {"kind": "llvm"}
    if "mtriple" in options:
        target["mtriple"] = options["mtriple"]
    if "mcpu" in options:
        target["mcpu"] = options["mcpu"]
        _check_mcpu(options["mcpu"])
    elif "mtriple" not in options:
        target["mcpu"] = detect_cpu()
        note = f"llvm -mcpu={target['mcpu']}"
        if "mattr" not in options and (hidden := detect_hidden_features(target["mcpu"])):
            target["mattr"] = hidden
            note += f" -mattr={','.join(hidden)}"
        note += " (detected)"
        if note not in detected:  # host and "GPU" side of an llvm + llvm target: once
            detected.append(note)
    if "mattr" in options:  # the user's features replace any detected ones
        target["mattr"] = options["mattr"].split(",")
    if "num-cores" in options:
        target["num-cores"] = _positive_int("num-cores", options["num-cores"])
    elif "mtriple" not in options:
        target["num-cores"] = os.cpu_count() or 1
    return target


def _check_mcpu(mcpu: str) -> None:
    from tvm.target.codegen import llvm_is_valid_cpu

    try:
        valid = llvm_is_valid_cpu(mcpu, "")
    except Exception:  # older/newer signatures: do not block on the check itself
        return
    if not valid:
        raise MuLayerError(
            f"llvm -mcpu={mcpu!r} is not a CPU LLVM knows; omit -mcpu to detect the host CPU "
            f"({detect_cpu()}) or use a name such as znver4, sapphirerapids, cortex-a76"
        )


def _positive_int(key: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise MuLayerError(f"option -{key}={value!r} must be a positive integer")
    return number


def _cuda(options: dict[str, str], detected: list[str]) -> dict:
    target: dict = {"kind": "cuda"}
    arch = options.get("arch")
    if arch is None:
        arch = detect_cuda_arch()
        if arch is None:
            raise MuLayerError(
                "cuda target without -arch and no CUDA GPU here to detect it from; "
                "give e.g. cuda -arch=sm_90"
            )
        detected.append(f"cuda -arch={arch} (detected)")
    if not arch.startswith("sm_") or not arch[3:].rstrip("a").isdigit():
        raise MuLayerError(f"cuda -arch={arch!r} is not valid; use e.g. sm_80, sm_90 or sm_90a")
    target["arch"] = arch
    if "max_threads_per_block" in options:
        value = _positive_int("max_threads_per_block", options["max_threads_per_block"])
        target["max_threads_per_block"] = value
    return target


def detect_cuda_arch() -> str | None:
    import tvm

    dev = tvm.cuda(0)
    if not dev.exist:
        return None
    return "sm_" + dev.compute_version.replace(".", "")


def _opencl(options: dict[str, str]) -> dict:
    device = options.get("device", "generic")
    if device not in OPENCL_DEVICES:
        raise MuLayerError(
            f"opencl -device={device!r} is not supported; valid: {', '.join(OPENCL_DEVICES)}"
        )
    return {"kind": "opencl"} if device == "generic" else {"kind": "opencl", "device": device}


def _mulayer(options: dict[str, str]) -> MulayerOptions:
    opts = MulayerOptions()
    if "ratio" in options:
        try:
            opts.ratio = float(options["ratio"])
        except ValueError:
            raise MuLayerError(
                f"mulayer -ratio={options['ratio']!r} is not a number: use a number in [0, 1] "
                "(the share of output channels computed on the GPU)"
            ) from None
        if not 0.0 <= opts.ratio <= 1.0:
            raise MuLayerError(
                f"mulayer -ratio={options['ratio']!r} is out of range: use a number in [0, 1] "
                "(the share of output channels computed on the GPU)"
            )
    if "split" in options:
        if options["split"] not in SPLIT_AXES:
            raise MuLayerError(
                f"mulayer -split={options['split']!r} is not valid; use {', '.join(SPLIT_AXES)}"
            )
        opts.split = options["split"]
    if "align" in options:
        opts.align = _positive_int("align", options["align"])
    if "verify" in options:
        if options["verify"] not in VERIFY_MODES:
            raise MuLayerError(
                f"mulayer -verify={options['verify']!r} is not valid; use "
                f"{', '.join(VERIFY_MODES)} (time the -split=auto plan against the "
                "single-processor builds: where the processors are here, always, never)"
            )
        if opts.split != "auto":
            raise MuLayerError(
                f"mulayer -verify={options['verify']} checks a -split=auto plan; this target "
                f"has -split={opts.split}"
            )
        opts.verify = options["verify"]
    if "cost-model" in options:
        opts.cost_model = options["cost-model"]
    if "guard-db" in options:
        try:
            opts.guard_db = float(options["guard-db"])
        except ValueError:
            raise MuLayerError(
                f"mulayer -guard-db={options['guard-db']!r} must be a number (dB)"
            ) from None
    return opts


def parse_target(text: str, extra_mulayer: dict[str, str] | None = None) -> TargetSpec:
    """Parse a tvmc-style target string; ``extra_mulayer`` holds ``--target-mulayer-*`` options."""
    parts = [_parse_one(part) for part in _split_top_level(text)]
    mulayer_opts: dict[str, str] | None = None
    if parts[0][0] == "mulayer":
        mulayer_opts = parts.pop(0)[1]
    if any(kind == "mulayer" for kind, _ in parts):
        raise MuLayerError("the mulayer pseudo-target must come first in the target list")
    if extra_mulayer:
        unknown = sorted(set(extra_mulayer) - set(MULAYER_OPTIONS))
        if unknown:
            raise MuLayerError(
                f"unknown --target-mulayer option(s) {', '.join(unknown)}; valid: "
                f"{', '.join('--target-mulayer-' + o for o in MULAYER_OPTIONS)}"
            )
        if mulayer_opts is None:
            raise MuLayerError(
                "--target-mulayer-* options need the mulayer pseudo-target, e.g. "
                '--target "mulayer, cuda, llvm"'
            )
        mulayer_opts = {**mulayer_opts, **extra_mulayer}
    if not parts:
        raise MuLayerError(
            f"target {text!r} names no processor; add e.g. ', cuda, llvm' after mulayer"
        )
    if len(parts) > 2:
        raise MuLayerError(
            f"target {text!r} names {len(parts)} processors; give at most two (device, host)"
        )
    detected: list[str] = []
    host_kind, host_opts = parts[-1]
    if host_kind != "llvm":
        if len(parts) == 2:
            raise MuLayerError(f"the last target is the host and must be llvm, got {host_kind!r}")
        host = _llvm({}, detected)  # a lone GPU target gets the detected host CPU
        device_kind, device_opts = host_kind, host_opts
    else:
        host = _llvm(host_opts, detected)
        device_kind, device_opts = parts[0] if len(parts) == 2 else (None, {})
    device = None
    if device_kind == "cuda":
        device = _cuda(device_opts, detected)
    elif device_kind == "opencl":
        device = _opencl(device_opts)
    elif device_kind == "llvm":
        if mulayer_opts is None:
            raise MuLayerError(
                "two llvm targets only make sense with the mulayer pseudo-target "
                '(the GPU side compiled for the CPU): "mulayer -ratio=0.5, llvm, llvm"'
            )
        device = _llvm(device_opts, detected)
    mulayer = _mulayer(mulayer_opts) if mulayer_opts is not None else None
    if mulayer is not None and device is None:
        raise MuLayerError(
            "the mulayer pseudo-target needs a device and a host, e.g. "
            '"mulayer -ratio=0.5, cuda, llvm" or "mulayer -ratio=0.5, llvm, llvm"'
        )
    return TargetSpec(host=host, device=device, mulayer=mulayer, text=text, detected=detected)
