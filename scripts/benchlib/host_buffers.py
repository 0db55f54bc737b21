"""Host buffers for copy benchmarks: page-locked references and buffers shaped like a plan's.

A pinned reference must be page-locked over every byte it copies: the CUDA driver refuses a copy
that starts in a locked page and runs past the registration, and treats one that starts in a
pageable page as pageable. So :func:`page_locked` hands out a page-aligned view of a larger
allocation and locks the whole pages it spans (all inside that allocation).
"""

from __future__ import annotations

PAGE = 4096
# Page-locked memory is never freed: a registration left behind by freed memory makes later
# copies through that address fail (see mulayer.runtime.crossing).
_KEEP: list = []


def _view(nbytes: int, offset_in_page: int):
    import tvm

    arena = tvm.runtime.empty((nbytes + 2 * PAGE,), "uint8", tvm.cpu(0))
    _KEEP.append(arena)
    offset = -arena.data_ptr() % PAGE + offset_in_page
    return arena._create_view((nbytes,), "uint8", relative_byte_offset=offset)


def page_locked(nbytes: int):
    """A page-aligned uint8 host tensor of ``nbytes``, every page it touches page-locked.

    Call after a CUDA runtime call on this thread (the driver needs a current context)."""
    from mulayer.runtime import crossing

    view = _view(nbytes, 0)
    if not crossing.PINNER.pin_range(view.data_ptr(), -(-nbytes // PAGE) * PAGE):
        raise RuntimeError(
            "could not page-lock the reference buffer (no CUDA driver or context, or "
            "MULAYER_PIN_CROSSINGS=0): a pinned reference would be pageable"
        )
    return view


def ragged(nbytes: int):
    """A uint8 host tensor of ``nbytes`` starting 64 bytes into a page (as a 64-byte aligned
    planned buffer may), nothing locked."""
    return _view(nbytes, 64)
