"""Models to compile and check against: the benchmark zoo, real pretrained nets and photos.

- :mod:`~mulayer.models.zoo`: classic CNNs written with ``onnx.helper`` (random weights);
- :mod:`~mulayer.models.pretrained`: real ImageNet nets and photos (the ``models`` extra);
- :mod:`~mulayer.models.reference`: the fp32 reference outputs (onnxruntime);
- :mod:`~mulayer.models.accuracy`: top-1 / top-5 agreement with that reference on photos.
"""
