"""Stage 1, ONNX in: the model file checked and imported as canonical Relax, and its layer table.

- :mod:`~mulayer.frontend.onnx_import`: load, check and import an ONNX model (params bound, BN
  folded, constants folded) into the canonical form every later step expects;
- :mod:`~mulayer.frontend.model_checks`: what TVM's import and build would trip over later;
- :mod:`~mulayer.frontend.layers`: the layer table (``conv2d.0``, ``dense.1``, ...: the names
  plans, the cost model and ``mulayer inspect`` use).

Compile side only (it imports onnx and TVM's compiler).
"""
