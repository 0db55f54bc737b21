"""Command line: ``mulayer <subcommand>``."""

from .main import main

__all__ = ["main"]
