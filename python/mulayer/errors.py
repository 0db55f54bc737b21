"""The one error type users see."""

from __future__ import annotations


class MuLayerError(Exception):
    """A problem with the user's input (model, target, plan, artifact, path).

    The CLI prints ``error: <message>`` and exits with code 2, without a traceback.
    Messages name the bad value and what would be valid.
    """


def register_with_tvm() -> None:
    """Let a ``MuLayerError`` raised inside a TVM pass (e.g. a plan check in SplitChannels) reach
    the caller as itself: unregistered Python errors come back from TVM as ``RuntimeError``.
    Idempotent; imports ``tvm_ffi``, so it is called by the compiler side, not at import.
    """
    import tvm_ffi

    tvm_ffi.register_error("MuLayerError", MuLayerError)
