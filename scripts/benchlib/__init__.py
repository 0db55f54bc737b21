"""Pieces of the benchmark scripts (``scripts/bench*.py``), importable from ``scripts/``.

- :mod:`.timing`: wall-clock medians, the fields a timed row carries, error texts;
- :mod:`.machine`: what machine and software a result was measured on;
- :mod:`.variants`: mulayer's named builds and ``--targets``;
- :mod:`.models`: the benchmarked models, their calibration samples and photos;
- :mod:`.builds`: every build in child processes, ``--jobs`` at a time, with timeouts;
- :mod:`.measure`: one model's rows: checked against onnxruntime fp32, then timed;
- :mod:`.peers`: the other systems (onnxruntime, PyTorch) and how they are timed;
- :mod:`.report`: ``bench.json``, ``bench.md`` and the charts.

The scripts run as ``python scripts/bench.py ...``, which puts ``scripts/`` on ``sys.path``.
"""
