"""The runtime side: what a deployment needs to run an artifact (the TVM runtime, nothing else).

- :mod:`~mulayer.runtime.artifact`: the artifact file format (written by the compiler, read
  here);
- :mod:`~mulayer.runtime.fallback`: which library of an artifact runs on this machine;
- :mod:`~mulayer.runtime.loader`: :func:`~mulayer.runtime.loader.load_artifact`
  (``mulayer.load``): read, choose, load;
- :mod:`~mulayer.runtime.executor`: inputs checked and placed, the Relax VM called and timed;
- :mod:`~mulayer.runtime.trace`: one call as a Chrome/Perfetto timeline;
- :mod:`~mulayer.runtime.crossing`: the pinned copy cooperative models call where a tensor
  crosses between the devices (registered on import).

Nothing here imports the compile side (onnx, TVM's compiler, ``mulayer.compiler``, the passes,
the schedules, ...); ``tests/test_artifact.py`` checks it in a fresh interpreter.
"""

from . import crossing  # noqa: E402,F401  (registers mulayer.crossing.copy)
