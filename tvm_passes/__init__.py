"""Relax passes of mulayer (imported as ``mulayer.passes``).

Importing this package registers ``relax.get_pipeline("mulayer", ...)``
(see :mod:`mulayer.passes.pipeline`).
"""

from .pipeline import register as _register

_register()
