"""``mulayer`` entry point: parser → driver → library function (the Python API).

Errors in the user's input print ``error: <message>`` on stderr and exit with code 2; internal
failures exit with code 1. No traceback unless ``--verbose``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
import warnings

from ..errors import MuLayerError
from . import compile_cmd, demo_cmd, inspect_cmd, profile_cmd, run_cmd, tune_cmd

SUBCOMMANDS = (compile_cmd, run_cmd, inspect_cmd, demo_cmd, profile_cmd, tune_cmd)
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="mulayer",
        description="Run every CNN layer on the CPU and the GPU at once, on Apache TVM.",
    )
    parser.add_argument("--version", action="version", version=f"mulayer {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging and full tracebacks"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.formatwarning = lambda message, *_args, **_kw: f"warning: {message}\n"
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args) or 0)
    except MuLayerError as err:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # output piped into e.g. `head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # internal failure: say what broke, trace only on request
        if args.verbose:
            traceback.print_exc()
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(
            f"error: internal failure ({type(err).__name__}: {message}); "
            "rerun with --verbose for the traceback",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
