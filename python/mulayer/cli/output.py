"""Printing helpers shared by the subcommands: tables, JSON, step progress."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], file=None) -> None:
    """Print a plain aligned table (numbers right-aligned)."""
    file = file or sys.stdout
    cells = [[_fmt(value) for value in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    numeric = [
        all(isinstance(row[i], (int, float)) for row in rows) if rows else False
        for i in range(len(headers))
    ]

    def line(values):
        out = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(out).rstrip()

    print(line(list(headers)), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for row in cells:
        print(line(row), file=file)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1e5 else f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value)
    return "" if value is None else str(value)


def print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


@contextmanager
def step(message: str, quiet: bool = False):
    """Show ``message ...`` and the seconds it took on stderr, when stderr is a terminal."""
    quiet = quiet or not sys.stderr.isatty()
    start = time.perf_counter()
    if not quiet:
        print(f"{message} ...", end="", file=sys.stderr, flush=True)
    try:
        yield
    except BaseException:
        if not quiet:
            print(" failed", file=sys.stderr, flush=True)
        raise
    if not quiet:
        print(f" done ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)


@contextmanager
def native_stderr_silenced(enabled: bool = True):
    """Drop what native code writes on file descriptor 2 (TVM's C++ ``Warning:`` lines, its
    worker processes) while Python's ``sys.stderr`` (progress bars, warnings, logging) stays on
    the terminal. ``enabled=False`` (``--verbose``) changes nothing."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    old = sys.stderr
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        sys.stderr = open(  # noqa: SIM115 (closed below; the descriptor stays ours)
            saved, "w", buffering=1, closefd=False, errors="backslashreplace"
        )
        handlers = [
            h
            for h in logging.getLogger().handlers
            if isinstance(h, logging.StreamHandler) and h.stream is old
        ]
        for handler in handlers:
            handler.setStream(sys.stderr)
        try:
            yield
        finally:
            sys.stderr.flush()
            for handler in handlers:
                handler.setStream(old)
            sys.stderr.close()
            sys.stderr = old
            os.dup2(saved, 2)
            os.close(saved)
