"""Run a build in a child process, so that a crash of TVM becomes a clear error.

TVM can segfault while compiling some modules (DESIGN.md §2: an apache-tvm-ffi release crashes
whenever IR is serialised; a Tensorize under dlight crashed on a CUDA conv). In-process, such a
crash kills the caller with no word on what was being built. :func:`call_in_child` runs a
function (``"module:function"`` with JSON keyword arguments and a JSON result) in a fresh
``python -m mulayer.compiler.isolation`` process. The child records where it is in a small progress
file:

- ``step``: what the driver said it was doing (:func:`report`, e.g. "compiling for cpu");
- ``pass``/``passdone``: every TVM pass as it starts and ends (a ``PassInstrument``), with the
  PrimFunc(s) it works on when the module holds only a few;
- ``schedule``: each PrimFunc as mulayer's schedule rules are offered it.

When the child dies (a signal, or an exit without a result) or runs past ``timeout``, the parent
raises :class:`ChildFailure` naming the signal and the last record, e.g. "the build crashed
(SIGSEGV) while scheduling PrimFunc 'fused_conv2d_add_relu' (step: compiling for cpu)". A
``MuLayerError`` raised in the child is raised again in the parent with the same message; any
other exception becomes a :class:`ChildFailure` carrying the child's traceback. Warnings issued
in the child are issued again in the parent.

Testing hook: ``MULAYER_TEST_FAULT="ACTION@KIND:PATTERN"`` makes the child fail for real when a
progress record of ``KIND`` matches ``PATTERN`` (fnmatch). ACTION is ``segv`` (SIGSEGV),
``abort`` (SIGABRT), ``hang`` (sleep forever) or ``exit`` (exit code 3 without a result), e.g.
``segv@schedule:*conv2d*``. Only the child reads it.
"""

from __future__ import annotations

import builtins
import faulthandler
import fnmatch
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

from ..errors import MuLayerError

log = logging.getLogger(__name__)

FAULT_ENV = "MULAYER_TEST_FAULT"
FAULT_ACTIONS = ("segv", "abort", "hang", "exit")
# A pass over a module with at most this many PrimFuncs (and no Relax function) names them.
_NAMED_FUNCS = 3
_REQUEST, _RESULT, _PROGRESS_FILE = "request.json", "result.json", "progress.txt"
_OUTPUT = "output.txt"  # the child's stdout and stderr


class ChildFailure(RuntimeError):
    """The child crashed, hung, or raised an internal (non-``MuLayerError``) exception.

    ``detail`` holds the child's Python traceback or crash trace (for ``--verbose``).
    """

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


# ----------------------------------------------------------------------------- child side
class _Progress:
    """Appends ``kind<TAB>name`` lines to the progress file (line-buffered: each record reaches
    the kernel at once, so it survives a crash of the process)."""

    def __init__(self, path: Path, fault: str | None) -> None:
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 - open for the child's life
        self._fault = _parse_fault(fault) if fault else None

    def note(self, kind: str, name: str, funcs: str = "") -> None:
        self._file.write(f"{kind}\t{name}\t{funcs}\n")
        if self._fault is not None:
            action, want_kind, pattern = self._fault
            if kind == want_kind and fnmatch.fnmatchcase(name, pattern):
                _inject(action)


_PROGRESS: _Progress | None = None


def report(step: str) -> None:
    """Record the driver's current step (a no-op outside an isolated child)."""
    if _PROGRESS is not None:
        _PROGRESS.note("step", step)


def _parse_fault(text: str) -> tuple[str, str, str]:
    action, _, where = text.partition("@")
    kind, _, pattern = where.partition(":")
    if action not in FAULT_ACTIONS or not kind or not pattern:
        raise MuLayerError(
            f"{FAULT_ENV}={text!r} is malformed: use ACTION@KIND:PATTERN with ACTION one of "
            f"{', '.join(FAULT_ACTIONS)}, e.g. segv@schedule:*conv2d*"
        )
    return action, kind, pattern


def _inject(action: str) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    if action == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif action == "abort":
        os.abort()
    elif action == "exit":
        os._exit(3)
    while True:  # hang
        time.sleep(3600)


def _pass_instrument(progress: _Progress):
    import tvm
    from tvm import tirx

    def funcs(mod) -> str:
        items = list(mod.functions_items())
        if len(items) > _NAMED_FUNCS or not all(isinstance(f, tirx.PrimFunc) for _, f in items):
            return ""
        return ",".join(gvar.name_hint for gvar, _ in items)

    @tvm.instrument.pass_instrument
    class RecordPasses:
        def run_before_pass(self, mod, info) -> None:
            progress.note("pass", info.name, funcs(mod))

        def run_after_pass(self, mod, info) -> None:
            progress.note("passdone", info.name, funcs(mod))

    return RecordPasses()


def _watch_schedules(progress: _Progress) -> None:
    """Record each PrimFunc offered to mulayer's schedule rules (a crash inside a rule, e.g. in
    Tensorize, then names its function)."""
    from mulayer.schedules import apply

    original = getattr(apply, "_schedule_one", None)
    if original is None:  # the rules moved: pass records still say where the build is
        log.debug("mulayer.schedules.apply._schedule_one not found; PrimFuncs not recorded")
        return

    def recorded(name, *args, **kwargs):
        progress.note("schedule", name)
        return original(name, *args, **kwargs)

    apply._schedule_one = recorded


def _run_request(request: dict) -> dict:
    module, _, name = request["call"].partition(":")
    function = getattr(importlib.import_module(module), name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            value = function(**request["kwargs"])
            result = {"ok": True, "value": value}
        except MuLayerError as err:
            result = {"ok": False, "user_error": True, "message": str(err)}
        except Exception as err:  # reported to the parent as an internal failure
            result = {
                "ok": False,
                "user_error": False,
                "type": type(err).__name__,
                "message": str(err),
                "traceback": traceback.format_exc(),
            }
    result["warnings"] = [
        [str(w.message), w.category.__name__]
        for w in caught
        if not issubclass(w.category, DeprecationWarning)
    ]
    return result


def _child_main(request_path: str) -> None:
    """Run the request, write its result, exit (never returns)."""
    global _PROGRESS
    workdir = Path(request_path).parent
    request = json.loads(Path(request_path).read_text())
    logging.basicConfig(
        level=request.get("log_level", logging.WARNING),
        format="%(levelname)s %(name)s: %(message)s",
    )
    _PROGRESS = _Progress(workdir / _PROGRESS_FILE, os.environ.get(FAULT_ENV))
    import tvm

    # After TVM installs its own SIGSEGV handler: faulthandler dumps the Python stacks, then
    # chains to it. Both write to the child's stderr, which the parent captures.
    faulthandler.enable(all_threads=True)
    _watch_schedules(_PROGRESS)
    with tvm.transform.PassContext(instruments=[_pass_instrument(_PROGRESS)]):
        result = _run_request(request)
    tmp = workdir / f"{_RESULT}.tmp"
    tmp.write_text(json.dumps(result, default=str))
    os.replace(tmp, workdir / _RESULT)  # complete or absent
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: a crash in TVM's destructors must not matter


# ---------------------------------------------------------------------------- parent side
def _where(progress_text: str) -> str:
    """Describe the last progress records, e.g. "while scheduling PrimFunc 'f' (step: x)"."""
    step, last = "", None
    for line in progress_text.split("\n")[:-1]:  # the last piece is empty or cut short
        record = line.split("\t")
        if len(record) != 3:
            continue
        last = record
        if record[0] == "step":
            step = record[1]
    if last is None:
        return "while starting"
    kind, name, funcs = last
    on = f" on PrimFunc {', '.join(repr(f) for f in funcs.split(','))}" if funcs else ""
    where = {
        "step": f"while {name}",
        "schedule": f"while scheduling PrimFunc {name!r}",
        "pass": f"in TVM pass {name!r}{on}",
        "passdone": f"after TVM pass {name!r}{on} (in code generation or between passes)",
    }.get(kind, f"at {kind} {name!r}")
    return where if kind == "step" or not step else f"{where} (step: {step})"


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"crashed ({signal.Signals(-code).name})"
        except ValueError:
            return f"crashed (signal {-code})"
    return f"exited with code {code} without a result"


def call_in_child(
    call: str, kwargs: dict, *, timeout: float | None = None, what: str = "the build"
):
    """Run ``call`` (``"package.module:function"``) with JSON ``kwargs`` in a child process.

    Parameters
    ----------
    call : the function to run; it must be importable in a fresh interpreter, take JSON-able
        keyword arguments and return a JSON-able value.
    kwargs : its keyword arguments.
    timeout : seconds before the child is killed (``None``: no limit).
    what : how error messages name the work, e.g. "the build".

    Returns
    -------
    The function's return value.

    Raises
    ------
    MuLayerError
        The function raised one (same message).
    ChildFailure
        The child crashed, hung past ``timeout`` or raised another exception.
    """
    with tempfile.TemporaryDirectory(prefix="mulayer-child-") as tmp:
        workdir = Path(tmp)
        request = {"call": call, "kwargs": kwargs, "log_level": logging.getLogger().level}
        (workdir / _REQUEST).write_text(json.dumps(request))
        command = [sys.executable, "-m", "mulayer.compiler.isolation", str(workdir / _REQUEST)]
        with open(workdir / _OUTPUT, "wb") as output:
            child = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
            )
            try:
                code = child.wait(timeout)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                where = _where(_read(workdir / _PROGRESS_FILE))
                raise ChildFailure(
                    f"{what} did not finish within {timeout:g} s; stopped {where}",
                    _read(workdir / _OUTPUT),
                ) from None
            except BaseException:  # e.g. KeyboardInterrupt: never leave the child running
                child.kill()
                child.wait()
                raise
        printed = _read(workdir / _OUTPUT)
        result_text = _read(workdir / _RESULT)
        if not result_text:
            where = _where(_read(workdir / _PROGRESS_FILE))
            raise ChildFailure(f"{what} {_describe_exit(code)} {where}", printed)
    result = json.loads(result_text)
    # What the child printed (TVM's own messages, debug logs), as in-process; after an error
    # that the message explains, only on request (TVM prints warnings from half-built IR).
    if printed and (result["ok"] or logging.getLogger().isEnabledFor(logging.DEBUG)):
        print(printed, end="" if printed.endswith("\n") else "\n", file=sys.stderr)
    for message, category in result.get("warnings", []):
        kind = getattr(builtins, category, UserWarning)
        warnings.warn(message, kind if isinstance(kind, type) else UserWarning, stacklevel=2)
    if result["ok"]:
        return result["value"]
    if result["user_error"]:
        raise MuLayerError(result["message"])
    first = result["message"].strip().splitlines()[0] if result["message"].strip() else ""
    raise ChildFailure(f"{what} failed ({result['type']}: {first})", printed + result["traceback"])


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


if __name__ == "__main__":
    # Run the child in the importable module (not this ``__main__`` copy) so that ``report``
    # called by the driver sees the progress recorder.
    from mulayer.compiler import isolation

    isolation._child_main(sys.argv[1])
