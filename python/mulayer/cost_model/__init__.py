"""The learned cost model: predicted latency of layer parts, copies and syncs.

The partitioner's interface:

- :meth:`CostModel.layer_time_us` ``(layer, processor, channels)``: time of the part computing
  ``channels`` output channels of a :class:`mulayer.frontend.layers.Layer` on "cpu" (int8) or "gpu"
  (fp16);
- :meth:`CostModel.transfer_time_us` ``(nbytes, direction)``: a host<->device copy ("h2d",
  "d2h"), 0 when ``shared_memory``;
- :meth:`CostModel.sync_time_us` ``()``;
- :attr:`CostModel.shared_memory`;
- :func:`load_cost_model` ``(path=None, target=None)``: a saved model, or the shipped one that
  fits this machine.

Models are trained on ``mulayer profile`` data (:func:`train_cost_model`; command line:
``python -m mulayer.cost_model train``) with XGBoost or one of the baselines
(:mod:`.predictors`), and saved as versioned archives (:mod:`.archive`).
"""

from .archive import ARCHIVE_VERSION, load_cost_model_file, save_cost_model
from .data import PartSample, ProfileData, profile_data
from .defaults import data_dir, load_cost_model, shipped_models
from .features import FEATURE_NAMES, FEATURE_SCHEMA, FEATURE_SCHEMA_VERSION, part_features
from .model import CostModel, CostModelConfig, shared_memory_for, train_cost_model
from .predictors import PREDICTORS, XGBoostConfig

__all__ = [
    "ARCHIVE_VERSION",
    "FEATURE_NAMES",
    "FEATURE_SCHEMA",
    "FEATURE_SCHEMA_VERSION",
    "PREDICTORS",
    "CostModel",
    "CostModelConfig",
    "PartSample",
    "ProfileData",
    "XGBoostConfig",
    "data_dir",
    "load_cost_model",
    "load_cost_model_file",
    "part_features",
    "profile_data",
    "save_cost_model",
    "shared_memory_for",
    "shipped_models",
    "train_cost_model",
]
