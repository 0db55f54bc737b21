"""The one error type users see."""

from __future__ import annotations


class MuLayerError(Exception):
    """A problem with the user's input (model, target, plan, artifact, path).

    The CLI prints ``error: <message>`` and exits with code 2, without a traceback.
    Messages name the bad value and what would be valid.
    """
