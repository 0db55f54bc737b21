"""The compile side: the driver and everything it runs besides the passes and the schedules.

- :mod:`~mulayer.compiler.driver`: ONNX model + target (+ plan, calibration) to a
  :class:`~mulayer.compiler.driver.CompiledModel`, one step a line (``mulayer.compile``);
- :mod:`~mulayer.compiler.calibration`: activation ranges and the int8 accuracy budget;
- :mod:`~mulayer.compiler.build`: single-processor builds (CPU fp32, GPU fp16);
- :mod:`~mulayer.compiler.tune` and :mod:`~mulayer.compiler.tuning_db`: MetaSchedule tuning
  and the database a build applies;
- :mod:`~mulayer.compiler.isolation`: builds in a child process, so a TVM crash is an error;
- :mod:`~mulayer.compiler.fallback`: the CPU fallback library written into an artifact.

The Relax passes are :mod:`mulayer.passes`, the TIR schedule rules :mod:`mulayer.schedules`.
"""
