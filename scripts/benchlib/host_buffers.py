"""Host buffers for copy benchmarks: page-locked references and buffers shaped like a plan's.

A pinned reference must be page-locked over every byte it copies: the CUDA driver refuses a copy
that starts in a locked page and runs past the registration, and treats one that starts in a
pageable page as pageable. :func:`page_locked` is
:func:`mulayer.runtime.crossing.page_locked_host` (a page-aligned buffer, every page locked),
refusing to hand back a buffer that is not locked.
"""

from __future__ import annotations

PAGE = 4096
_KEEP: list = []


def page_locked(nbytes: int):
    """A page-aligned uint8 host tensor of ``nbytes``, every page it touches page-locked.

    Call after a CUDA runtime call on this thread (the driver needs a current context)."""
    from mulayer.runtime import crossing

    view = crossing.page_locked_host(nbytes)
    if view is None:
        raise RuntimeError(
            "could not page-lock the reference buffer (no CUDA driver or context, or "
            "MULAYER_PIN_CROSSINGS=0): a pinned reference would be pageable"
        )
    return view


def ragged(nbytes: int):
    """A uint8 host tensor of ``nbytes`` starting 64 bytes into a page (as a 64-byte aligned
    planned buffer may), nothing locked."""
    import tvm

    arena = tvm.runtime.empty((nbytes + 2 * PAGE,), "uint8", tvm.cpu(0))
    _KEEP.append(arena)  # a crossing may lock its inner pages: never freed
    offset = -arena.data_ptr() % PAGE + 64
    return arena._create_view((nbytes,), "uint8", relative_byte_offset=offset)
