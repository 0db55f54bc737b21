"""The latency profiler: time every distinct layer's CPU and GPU parts over a grid of channel
slices, plus host<->device transfers and syncs, into a JSONL data set for the cost model.

``mulayer profile`` is the command line; :func:`profile` the library function. See
:mod:`mulayer.profiler.driver` for the run, :mod:`~mulayer.profiler.parts` for what a part is,
:mod:`~mulayer.profiler.dataset` for the rows.
"""

from .dataset import DATASET_SCHEMA_VERSION, Dataset, read_many, read_rows
from .driver import DEFAULT_SLICES, ProfileConfig, ProfileSummary, channel_grid, profile
from .fingerprint import fingerprint, hardware_id
from .layer_spec import LayerSpec, describe_layers, layer_module
from .timer import TimingConfig

__all__ = [
    "DATASET_SCHEMA_VERSION",
    "DEFAULT_SLICES",
    "Dataset",
    "LayerSpec",
    "ProfileConfig",
    "ProfileSummary",
    "TimingConfig",
    "channel_grid",
    "describe_layers",
    "fingerprint",
    "hardware_id",
    "layer_module",
    "profile",
    "read_many",
    "read_rows",
]
