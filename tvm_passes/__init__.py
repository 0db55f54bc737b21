"""Relax passes of mulayer (imported as ``mulayer.passes``)."""
